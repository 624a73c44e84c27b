"""Shared helpers of the grounding tests (measure, calibrate): the VGMED-schema fixture and a tiny Qwen2-VL
processor that can be built without torchvision."""

import os
from unittest import mock

from hf_vgrefine.testing import tiny_processor

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "grounding")


def family_processor(family):
    """Tiny processor of ``family``; the torchvision-only video-processor class check is skipped for ``None`` (as in
    :func:`qwen_processor`)."""
    try:
        return tiny_processor(family)
    except (AttributeError, RuntimeError):
        from transformers.processing_utils import ProcessorMixin

        orig = ProcessorMixin.check_argument_for_proper_class

        def check(self, name, arg):
            return None if arg is None else orig(self, name, arg)

        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
            return tiny_processor(family)


def qwen_processor():
    """Tiny Qwen2-VL processor; without torchvision transformers 5.x fails its class check of the absent
    video processor (``VIDEO_PROCESSOR_MAPPING._extra_content``), so that check is skipped for ``None``."""
    try:
        return tiny_processor("qwen2_vl")
    except (AttributeError, RuntimeError):
        from transformers.processing_utils import ProcessorMixin

        orig = ProcessorMixin.check_argument_for_proper_class

        def check(self, name, arg):
            return None if arg is None else orig(self, name, arg)

        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
            return tiny_processor("qwen2_vl")


def load_fixture():
    from datasets import load_dataset

    return load_dataset(FIXTURE, split="test")
