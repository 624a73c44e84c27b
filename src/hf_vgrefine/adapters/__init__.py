"""Registry of family adapters keyed by ``config.model_type``, with the generic adapter as fallback.

Adding a family: subclass :class:`FamilyAdapter` (see ``docs/adding_a_family.md``), implement
``image_spans`` and ``token_grid``, and call :func:`register_adapter`. A model type without a family
adapter gets :class:`~hf_vgrefine.adapters.generic.GenericAdapter` (token level) when its image enters
the decoder as placeholder tokens, else :class:`UnsupportedModelError` with the reason.
"""

from __future__ import annotations

from .base import FamilyAdapter, ImageSpan, UnsupportedModelError
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .generic import GenericAdapter, GeometryUnavailableError, token_level_support
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter, llava_next_highres_shape
from .mistral3 import Mistral3Adapter
from .paligemma import PaliGemmaAdapter
from .qwen_vl import Qwen35Adapter, QwenVLAdapter

_REGISTRY: dict[str, type[FamilyAdapter]] = {}


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Register ``cls`` for each of its ``model_types`` (usable as a class decorator)."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__}.model_types is empty")
    for mt in cls.model_types:
        _REGISTRY[mt] = cls
    return cls


for _cls in (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter, Gemma3Adapter, PaliGemmaAdapter, InternVLAdapter,
             LlavaOnevisionAdapter, Mistral3Adapter, Qwen35Adapter):
    register_adapter(_cls)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model) -> FamilyAdapter:
    """The adapter for ``model``: its family adapter when ``config.model_type`` is registered (exact geometry),
    else the :class:`GenericAdapter` (token level). Raises :class:`UnsupportedModelError` naming the reason when
    the model's image does not enter its decoder as tokens."""
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config: pass a transformers PreTrainedModel")
    if mt in _REGISTRY:
        return _REGISTRY[mt](model)
    try:
        return GenericAdapter(model)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(
            f"model_type {mt!r}: {e} Model types with an exact adapter: {', '.join(supported_model_types())}; "
            "any other model whose image enters the decoder as placeholder tokens gets the generic adapter. To add "
            "a family, subclass hf_vgrefine.adapters.FamilyAdapter and register it (docs/adding_a_family.md).") from None


def support_level(model) -> tuple[str, str]:
    """``("exact", "")``, ``("generic", "")`` or ``("unsupported", reason)`` for ``model`` (a meta-device model is
    enough: only the config and the module structure are read)."""
    mt = getattr(model.config, "model_type", None)
    if mt in _REGISTRY:
        return "exact", ""
    reason = token_level_support(model)
    return ("generic", "") if reason is None else ("unsupported", reason)


__all__ = ["FamilyAdapter", "GenericAdapter", "GeometryUnavailableError", "ImageSpan", "UnsupportedModelError",
           "get_adapter", "register_adapter", "support_level", "supported_model_types", "token_level_support",
           "llava_next_highres_shape"]
