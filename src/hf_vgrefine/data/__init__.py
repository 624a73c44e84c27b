"""VGMED as a Hugging Face dataset: builder, offline ``atlas`` configuration, parquet + card publishing.

Quick start (offline, needs Debian ``mricron-data``)::

    from hf_vgrefine.data import build_vgmed, load_vgmed
    root = build_vgmed("atlas", "/tmp/vgmed")          # parquet + README; also pre-fills the datasets cache
    ds = load_vgmed("atlas")                            # or datasets.load_dataset("vgmed", "atlas", split="test")

Heavy imports (``datasets``) happen on first use of an attribute.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "build_vgmed": "hf_vgrefine.data.build",
    "load_vgmed": "hf_vgrefine.data.build",
    "prefill_cache": "hf_vgrefine.data.build",
    "push_config": "hf_vgrefine.data.build",
    "render_card": "hf_vgrefine.data.build",
    "cached_path": "hf_vgrefine.data.build",
    "default_out_dir": "hf_vgrefine.data.build",
    "VGMED": "hf_vgrefine.data.builder",
    "VGMEDConfig": "hf_vgrefine.data.builder",
    "cache_hash": "hf_vgrefine.data.builder",
    "build_features": "hf_vgrefine.data.schema",
    "CONFIG_NAMES": "hf_vgrefine.data.schema",
    "DEFAULT_CONFIG": "hf_vgrefine.data.schema",
    "VGMEDSourceError": "hf_vgrefine.data.sources",
    "MissingSourceError": "hf_vgrefine.data.sources",
    "CorruptSourceError": "hf_vgrefine.data.sources",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_vgrefine.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
