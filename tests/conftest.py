"""Test hygiene: offline hub, temp HF_HOME, one torch thread (2-core CI machines)."""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="hf_vgrefine_test_home_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HF_HOME"] = os.environ.get("HF_VGREFINE_TEST_HF_HOME", _HF_HOME)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
