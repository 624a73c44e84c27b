"""Run manifest of a Med-VQA evaluation (model, processor, libraries, decoding, prompt, scorer, methods) and the
per-method resume keys that must not change between runs sharing an output folder."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..jsonio import json_safe
from ..sharding import settings_diff
from .methods import Method
from .scorers import SCORER_VERSION

__all__ = ["build_manifest", "check_resume", "library_versions", "resume_key"]


def library_versions() -> dict[str, str]:
    """Python and the versions of the libraries that shape the results."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("hf_vgrefine", "torch", "transformers", "datasets", "accelerate", "tokenizers", "huggingface-hub",
                 "pillow", "numpy", "scipy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_manifest(model, processor, *, model_id, revision, methods: Sequence[Method], decoding: str,
                   gen_kwargs: Mapping, seed: int, scorer: str, template: str, instruction: str | None,
                   chat_template: str | None, example_prompt: str | None, batch_size: int, world_size: int,
                   limit: int | None, answer_types: Sequence[str], removed: Mapping[str, int]) -> dict[str, Any]:
    """Run manifest (JSON-able)."""
    cfg = getattr(model, "config", None)
    tmpl = chat_template or getattr(processor, "chat_template", None)
    ip = getattr(processor, "image_processor", None)
    return json_safe({
        "model": {"id": model_id or getattr(cfg, "_name_or_path", None) or type(model).__name__,
                  "revision": revision or getattr(cfg, "_commit_hash", None),
                  "class": type(model).__name__, "dtype": str(getattr(model, "dtype", "")),
                  "device": str(getattr(model, "device", ""))},
        "processor": {"class": type(processor).__name__,
                      "image_processor": ip.to_dict() if ip is not None and hasattr(ip, "to_dict") else None,
                      "chat_template_sha1": hashlib.sha1(tmpl.encode()).hexdigest() if isinstance(tmpl, str) else None,
                      "chat_template_override": chat_template is not None},
        "libraries": library_versions(),
        "seed": seed,
        "decoding": {"preset": decoding, **dict(gen_kwargs)},
        "prompt": {"template": template, "instruction": instruction, "example": example_prompt,
                   "chat": "processor chat template, one user turn: images first, then text; generation prompt "
                           "appended; left padding"},
        "scorer": {"name": scorer, "version": SCORER_VERSION, "open_ended": "exact match + token recall"},
        "methods": [{"name": m.name, "gen_kwargs": m.gen_kwargs, "prompt_variant": m.prompt_fn is not None,
                     "config": m.config} for m in methods],
        "batch_size": batch_size, "world_size": world_size, "limit_per_dataset": limit,
        "answer_types": list(answer_types), "removed_by_filter": dict(removed),
        "resume_keys": {m.name: resume_key(model, m, model_id=model_id, revision=revision, gen_kwargs=gen_kwargs,
                                           template=template, instruction=instruction, chat_template=tmpl)
                        for m in methods},
    })


def resume_key(model, method: Method, *, model_id, revision, gen_kwargs: Mapping, template: str,
               instruction: str | None, chat_template: str | None) -> dict[str, Any]:
    """What must not change between runs that share an ``out_dir`` for ``method`` (JSON-able): model,
    decoding, prompt template/instruction, chat template, method kwargs / config. The scorer may change:
    stored responses are re-scored."""
    cfg = getattr(model, "config", None)
    return json_safe({
        "model": model_id or getattr(cfg, "_name_or_path", None) or type(model).__name__,
        "revision": revision or getattr(cfg, "_commit_hash", None), "class": type(model).__name__,
        "dtype": str(getattr(model, "dtype", "")),
        "decoding": {**dict(gen_kwargs), **method.gen_kwargs}, "template": template, "instruction": instruction,
        "chat_template_sha1": hashlib.sha1(chat_template.encode()).hexdigest() if isinstance(chat_template, str) else None,
        "prompt_variant": method.prompt_fn is not None, "config": method.config,
    })


def check_resume(out: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Raise if ``out`` holds results of a method made with other settings; returns the old keys."""
    path = out / "manifest.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("resume_keys", {})
    except (json.JSONDecodeError, OSError):
        return {}
    for name, key in manifest["resume_keys"].items():
        if name in old and old[name] != key:
            diff = sorted(settings_diff(old[name], key))
            raise ValueError(f"{out} already holds results of method {name!r} made with different settings "
                             f"({', '.join(diff)}); use another out_dir or the original settings")
    return old
