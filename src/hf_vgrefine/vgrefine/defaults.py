"""What ``VGRefineWrapper(model)`` uses when no config or processor is given.

* **Processor**: ``AutoProcessor.from_pretrained(model.name_or_path)`` — the model's own folder or hub id
  (tokenizer padding set to left, as batches need).
* **Config**: the preset of a known checkpoint (:func:`preset_for_model`: the checkpoint id of a preset in
  :data:`~hf_vgrefine.vgrefine.config.PRESETS`, e.g. ``FreedomIntelligence/HuatuoGPT-Vision-7B-hf`` →
  ``huatuogpt-vision-7b``); for any other supported model :func:`depth_default_config`, derived from its
  depth ``L`` and heads ``H`` with one warning pointing to :func:`hf_vgrefine.calibrate`:

  - masked layer ``m = round(L * 16 / 28)`` clipped to ``[0, L-1]`` — the published layer 16 of the
    28-layer HuatuoGPT-Vision-7B at the same relative depth (≈ 0.57 L);
  - sensitive heads: every head of layers ``m-1`` and ``m`` (only ``m`` when ``m = 0``) — the published
    heads cluster at layers 15-16 of that model;
  - percentile 80 and every other knob at its default;
  - hybrid models (Qwen 3.5: linear-attention layers between softmax-attention ones): ``m`` is the
    softmax-attention layer nearest to that depth (ties -> the lower one) and the heads are those of ``m`` and
    of the attention layer before it, so the default never names a linear-attention layer.

  This is a starting point, not a calibration: run ``hf_vgrefine.calibrate`` on a few grounding
  samples (e.g. ``load_vgmed("atlas")``) for the model's own layer and heads.
"""

from __future__ import annotations

import logging
import os
import warnings

from .config import PRESETS, VGRefineConfig

logger = logging.getLogger(__name__)

DEPTH_FRACTION = 16 / 28
DEFAULT_CONFIG_WARNING = (
    "VGRefineWrapper: no config given and {name!r} has no preset; using the depth default (masked layer {m} of "
    "{L}, all {H} heads of layers {layers}, percentile 80). Calibrate for this model with "
    "hf_vgrefine.calibrate(model, processor, load_vgmed('atlas')) (CLI: hf-vgrefine calibrate) and pass the result.")


def _model_name(model) -> str:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name or "")


def preset_for_model(model_or_name) -> str | None:
    """Name of the preset made for this checkpoint (by hub id, or a local folder whose name ends with the
    id's last part, e.g. ``.../HuatuoGPT-Vision-7B-hf``), else ``None``."""
    name = model_or_name if isinstance(model_or_name, (str, os.PathLike)) else _model_name(model_or_name)
    name = os.fspath(name).rstrip("/")
    if not name:
        return None
    for preset, spec in PRESETS.items():
        mid = spec.get("model_id")
        if not mid or preset.endswith("-notebook"):
            continue
        if name == mid or os.path.basename(name) == mid.rsplit("/", 1)[-1] or \
                os.path.basename(name).startswith(f"models--{mid.replace('/', '--')}"):
            return preset
    return None


def depth_default_config(num_layers: int, num_heads: int, attention_layers=None) -> VGRefineConfig:
    """The documented default for a model of ``num_layers`` decoder layers with ``num_heads`` query heads;
    ``attention_layers``: its softmax-attention layers when some layers are not (hybrid models)."""
    if num_layers < 1 or num_heads < 1:
        raise ValueError(f"a model needs >= 1 layer and head, got {num_layers} layers x {num_heads} heads")
    target = min(num_layers - 1, max(0, round(num_layers * DEPTH_FRACTION)))
    attn = list(range(num_layers)) if attention_layers is None else sorted(int(x) for x in attention_layers)
    if not attn:
        raise ValueError("the model has no softmax-attention layer: VGRefine has nothing to read or block")
    i = min(range(len(attn)), key=lambda j: (abs(attn[j] - target), attn[j]))
    m = attn[i]
    layers = attn[max(0, i - 1):i + 1]
    heads = [[l, h] for l in layers for h in range(num_heads)]
    rule = (f"masked layer round({num_layers}*16/28)" if m == target else
            f"masked layer {m}, the softmax-attention layer nearest to round({num_layers}*16/28) = {target}")
    return VGRefineConfig(masked_layers=[m], sensitive_heads=heads, percentile=80.0,
                          notes=f"depth default (no calibration): {rule}, all heads of layers {layers}")


def default_config(model, adapter) -> VGRefineConfig:
    """Preset of a known checkpoint, else :func:`depth_default_config` with one warning."""
    preset = preset_for_model(model)
    if preset is not None:
        return VGRefineConfig.from_preset(preset)
    cfg = depth_default_config(adapter.num_layers, adapter.num_heads, adapter.attention_layers)
    m = cfg.masked_layers[0]
    warnings.warn(DEFAULT_CONFIG_WARNING.format(
        name=_model_name(model) or type(model).__name__, m=m, L=adapter.num_layers, H=adapter.num_heads,
        layers=sorted({l for l, _ in cfg.sensitive_heads})), UserWarning, stacklevel=4)
    return cfg


def default_processor(model):
    """``AutoProcessor`` from the model's own folder or hub id (left padding); ``None`` with a warning when
    it cannot be loaded (then pass ``processor=``)."""
    name = _model_name(model)
    if not name:   # a model built in memory: nothing to load from (generic_inputs= or processor= are needed later)
        return None
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any loading failure means: ask the user for it
        warnings.warn(f"VGRefineWrapper: could not load the processor from {name!r} ({type(e).__name__}: {e}); "
                      "pass processor=AutoProcessor.from_pretrained(...)", UserWarning, stacklevel=4)
        return None
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    return processor


def resolve(model, config, processor):
    """``(config, processor)`` for ``VGRefineWrapper.__init__``: given values are kept, missing ones defaulted."""
    if config is None:
        from ..adapters import get_adapter

        config = default_config(model, get_adapter(model))
    if processor is None:
        processor = default_processor(model)
    return config, processor
