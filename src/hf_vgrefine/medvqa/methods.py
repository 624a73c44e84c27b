"""Ways of answering a Med-VQA item: :class:`Method` (a ``generate``-like callable and its settings), the
baseline (plain ``model.generate``) and VGRefine (:class:`~hf_vgrefine.vgrefine.VGRefineWrapper`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .schema import MedVQAItem

__all__ = ["Method", "baseline_method", "vgrefine_method", "resolve_methods", "resolve_vgrefine_config",
           "single_image_only"]


@dataclass
class Method:
    """One way of answering: ``generate_fn(**inputs, **gen_kwargs)`` with the contract of
    ``model.generate`` (returns token ids ``(B, T_in + T_new)`` or an output with ``.sequences``).

    ``gen_kwargs`` override the run's decoding kwargs for this method; ``prompt_fn(item, prompt)`` may
    rewrite the prompt (a prompt variant); ``unsupported(item)`` returns a reason string for items the
    method cannot answer (they get an error record: excluded from accuracy, listed); ``config`` is
    recorded in the manifest.
    """

    name: str
    generate_fn: Callable[..., Any]
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_fn: Callable[[MedVQAItem, str], str] | None = None
    unsupported: Callable[[MedVQAItem], str | None] | None = None
    config: Any = None


def baseline_method(model, name: str = "baseline", **gen_kwargs) -> Method:
    """Plain ``model.generate``."""
    return Method(name, model.generate, dict(gen_kwargs))


def resolve_vgrefine_config(spec: Any):
    """VGRefine configuration from ``None`` / a ``VGRefineConfig`` / a dict / a JSON string / a preset
    name, JSON file, folder with ``vgrefine_config.json`` or Hub id (``VGRefineConfig.from_pretrained``)."""
    if spec is None or not isinstance(spec, (str, os.PathLike, dict)):
        return spec
    from hf_vgrefine.vgrefine import VGRefineConfig

    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if not s.lstrip().startswith("{"):
            return VGRefineConfig.from_pretrained(s)
        spec = json.loads(s)
    return VGRefineConfig.from_dict(spec)


def single_image_only(item: MedVQAItem) -> str | None:
    """Why VGRefine cannot answer ``item`` (not exactly one image), else None."""
    n = len(item.images)
    return None if n == 1 else f"unsupported: VGRefine needs exactly one image per prompt ({n} given)"


def vgrefine_method(model, processor, config: Any = None, name: str = "vgrefine", generic_cache_dir=None,
                    **gen_kwargs) -> Method:
    """``VGRefineWrapper(model, config, processor=processor).generate(**inputs, **gen_kwargs)``.

    The wrapper is built once, before any generation, so a bad config fails the run at start.
    ``generic_cache_dir``: persist the generic-prompt maps there (reused by reruns and other runs of the
    same model).
    """
    from hf_vgrefine.vgrefine import VGRefineWrapper

    cfg = resolve_vgrefine_config(config)
    wrapper = VGRefineWrapper(model, cfg, processor=processor, cache_dir=generic_cache_dir)
    return Method(name, wrapper.generate, dict(gen_kwargs), unsupported=single_image_only,
                  config=getattr(wrapper, "config", cfg))


def resolve_methods(methods: Iterable[str | Method], model, processor, vgrefine_config=None,
                    generic_cache_dir=None) -> list[Method]:
    """Names ``"baseline"`` / ``"vgrefine"`` → :class:`Method`; Method objects pass through."""
    out: list[Method] = []
    for m in methods:
        if isinstance(m, Method):
            out.append(m)
        elif m == "baseline":
            out.append(baseline_method(model))
        elif m == "vgrefine":
            out.append(vgrefine_method(model, processor, vgrefine_config, generic_cache_dir=generic_cache_dir))
        else:
            raise ValueError(f"unknown method {m!r}: use 'baseline', 'vgrefine' or a Method object")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    return out
