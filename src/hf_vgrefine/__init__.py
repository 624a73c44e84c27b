"""hf_vgrefine: visual grounding for medical vision-language models on Hugging Face transformers.

Public entry points are imported lazily so that ``import hf_vgrefine`` stays cheap.
"""

from __future__ import annotations

import importlib

from ._version import __version__

_LAZY = {
    # foundation
    "get_adapter": "hf_vgrefine.adapters",
    "register_adapter": "hf_vgrefine.adapters",
    "TokenGrid": "hf_vgrefine.geometry",
    "boxes_to_token_mask": "hf_vgrefine.geometry",
    "mask_to_token_mask": "hf_vgrefine.geometry",
    "AttentionProbe": "hf_vgrefine.attention",
    "capture_image_attention": "hf_vgrefine.attention",
    "KeyBias": "hf_vgrefine.attention",
    # grounding scores
    "load_grounding_metric": "hf_vgrefine.metrics_module",
    "measure_grounding": "hf_vgrefine.measure",
    "GroundingResults": "hf_vgrefine.measure",
    "calibrate": "hf_vgrefine.calibrate",
    # VGMED
    "build_vgmed": "hf_vgrefine.data",
    "load_vgmed": "hf_vgrefine.data",
    # VGRefine
    "VGRefineConfig": "hf_vgrefine.vgrefine",
    "VGRefineWrapper": "hf_vgrefine.vgrefine",
    "VGRefineLogitsProcessor": "hf_vgrefine.vgrefine",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        # note: after ``hf_vgrefine.calibrate`` (the module) is imported, Python binds the package attribute
        # ``calibrate`` to the module; that module is callable as the function (see calibrate.py)
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_vgrefine' has no attribute {name!r}")
