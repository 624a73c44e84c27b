"""Registry of family adapters keyed by ``config.model_type``.

Adding a family: subclass :class:`FamilyAdapter` (see ``docs/adding_a_family.md``), implement
``image_spans`` and ``token_grid``, and call :func:`register_adapter`.
"""

from __future__ import annotations

from .base import FamilyAdapter, ImageSpan, UnsupportedModelError
from .gemma3 import Gemma3Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, llava_next_highres_shape
from .qwen_vl import QwenVLAdapter

_REGISTRY: dict[str, type[FamilyAdapter]] = {}


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Register ``cls`` for each of its ``model_types`` (usable as a class decorator)."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__}.model_types is empty")
    for mt in cls.model_types:
        _REGISTRY[mt] = cls
    return cls


for _cls in (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter, Gemma3Adapter):
    register_adapter(_cls)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model) -> FamilyAdapter:
    """The adapter for ``model`` (any ``PreTrainedModel`` whose ``config.model_type`` is registered)."""
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in _REGISTRY:
        raise UnsupportedModelError(
            f"model_type {mt!r} ({type(model).__name__}) has no hf_vgrefine adapter. Supported model types: "
            f"{', '.join(supported_model_types())}. To add a family, subclass hf_vgrefine.adapters.FamilyAdapter "
            "and register it (docs/adding_a_family.md).")
    return _REGISTRY[mt](model)


__all__ = ["FamilyAdapter", "ImageSpan", "UnsupportedModelError", "get_adapter", "register_adapter",
           "supported_model_types", "llava_next_highres_shape"]
