"""``VGRefineConfig``: every knob of VGRefine, serialisable like ``GenerationConfig``.

Defaults follow docs/method.md § Configuration. ``faithful=True`` switches every knob on which the
package default deliberately differs from the released code to the released behaviour:

* ``compose_with_model_mask=False`` — the knockout layers get a fresh causal mask plus the blocked pairs
  (the reference replaces the layer mask; batch size 1 only; loses Gemma3's bidirectional image block);
* ``cache_generic=False``, ``early_exit=False``, ``share_prefix=False`` — every pass is a full forward;
* ``huatuo_box_mapping="stretch"`` and ``min_cells_per_box=0`` — box → token mapping of the metric script;
* ``calibration_eps=0.0`` — plain division in the calibration metrics.
Triage semantics (layer-mean generic normalisation, ``eps=1e-10``, percentile 80 with strict ``<``,
all-heads knockout on the masked layers, prefill only) are the released ones in both modes.

Precedence: **explicit arguments win over** ``faithful=True``. ``faithful`` only chooses the value of the
switches above that are not given (``None`` = not given), so ``VGRefineConfig(faithful=True,
share_prefix=True)`` is the released setting except for the shared prefix. In ``from_pretrained`` /
``from_preset`` the keyword overrides are the explicit arguments: ``from_pretrained(path, faithful=True)``
turns a saved default config into the faithful one.

Loading (``from_dict`` / ``from_pretrained``): unknown keys (fields added by a newer release) are ignored
with a warning, as peft does; a config whose ``version`` is of a newer major release than the installed
package loads with a warning to upgrade (:func:`check_version`). Fields are grouped: the method, the
calibration geometry, performance switches, the reproduction switch and provenance (``model_id``,
``processor_settings``, ``calibration``, ``notes``, ``version``; recorded, never read by the method).
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, field, fields

from .._version import __version__

CONFIG_NAME = "vgrefine_config.json"
INSTRUCTION = "Answer the question using a single word or phrase."
GENERIC_QUESTION = "Write a general description of the image."

# Published settings of the study's official code README (HuatuoGPT-Vision-7B: 28 layers x 28 heads).
_HUATUO_HEADS = [[15, 4], [16, 5], [15, 1], [10, 6], [4, 0], [15, 24], [19, 6], [8, 3], [19, 18], [18, 10],
                 [4, 17], [16, 2], [16, 17], [16, 1], [14, 23], [6, 18], [18, 19], [6, 11], [0, 2], [17, 26]]
PRESETS = {
    "huatuogpt-vision-7b": dict(
        masked_layers=[16], sensitive_heads=_HUATUO_HEADS, percentile=80.0,
        model_id="FreedomIntelligence/HuatuoGPT-Vision-7B-hf",
        processor_settings={"do_pad": True},
        notes="Published layer and 20 heads of the official code README; percentile 80 = released VGRefine() default."),
    "huatuogpt-vision-7b-notebook": dict(
        masked_layers=[16], sensitive_heads=_HUATUO_HEADS, percentile=50.0, eps=0.0, zero_division="notebook",
        model_id="FreedomIntelligence/HuatuoGPT-Vision-7B-hf",
        processor_settings={"do_pad": True},
        notes="Visible parameter cell of the submission notebook eval_RAD.ipynb (percentile 50; plain division "
              "a / g without eps, numpy percentile over the raw scores: a 0/0 NaN score means no knockout)."),
}

_CHOICES = {
    "query": ("last", "post_image"),
    "generic_norm": ("layer_mean", "per_head", "none"),
    "knockout_heads": ("all", "sensitive"),
    "knockout_scope": ("prefill", "all_steps"),
    "knockout_set": ("triage", "oracle"),
    "triage_source": ("heads", "layer"),
    "huatuo_box_mapping": ("pad", "stretch"),
    "zero_division": ("eps", "notebook"),
    "attention_dtype": ("float32", "model"),
    "mask_box_end": ("exclusive", "inclusive_max"),
}
# The switches whose package default differs from the released code: package default, released value.
_PACKAGE_DEFAULTS = dict(compose_with_model_mask=True, cache_generic=True, early_exit=True, share_prefix=True,
                         huatuo_box_mapping="pad", min_cells_per_box=1, calibration_eps=1e-10, attention_dtype="float32",
                         mask_box_end="exclusive")
_FAITHFUL = dict(compose_with_model_mask=False, cache_generic=False, early_exit=False, share_prefix=False,
                 huatuo_box_mapping="stretch", min_cells_per_box=0, calibration_eps=0.0, attention_dtype="model",
                 mask_box_end="inclusive_max")


_EXAMPLE = {"percentile": 80, "magnitude_threshold": 0.5, "eps": 1e-10, "calibration_eps": 1e-10}


def _major(version) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def check_version(saved: str) -> None:
    """Warn when a config was saved by a newer major release of hf_vgrefine than this one (its fields may mean
    something else here), or when its version cannot be read. Older and same-major versions load silently."""
    have, got = _major(__version__), _major(saved)
    if got is None:
        warnings.warn(f"VGRefineConfig: unreadable version {saved!r} in the saved config; loading it as hf_vgrefine "
                      f"{__version__}", UserWarning, stacklevel=3)
    elif have is not None and got > have:
        warnings.warn(f"VGRefineConfig: saved by hf_vgrefine {saved}, a newer major version than this {__version__}; "
                      "its settings may be read differently here: upgrade hf_vgrefine "
                      "(pip install -U hf_vgrefine) or check the config", UserWarning, stacklevel=3)


def _with_overrides(d: dict, overrides: dict) -> dict:
    """``d`` updated with ``overrides``; with ``faithful=True`` among the overrides, the faithful switches that
    ``d`` holds (a saved config has them all) are dropped unless overridden too, so that faithful sets them."""
    d = dict(d)
    if overrides.get("faithful"):
        for k in _FAITHFUL:
            if k not in overrides:
                d.pop(k, None)
    d.update(overrides)
    return d


def _as_int(name: str, value, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"VGRefineConfig.{name}: {value!r} is not a whole number; {hint}")
    return int(value)


def _int_list(name: str, values, hint: str) -> list:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"VGRefineConfig.{name}={values!r}: give a list of layer indices, {hint}")
    return [_as_int(name, v, hint) for v in values]


def _pair_list(values) -> list:
    hint = "give [layer, head] pairs, e.g. sensitive_heads=[[16, 5], [15, 4]]"
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"VGRefineConfig.sensitive_heads={values!r}: {hint}")
    out = []
    for i, pair in enumerate(values):
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise ValueError(f"VGRefineConfig.sensitive_heads[{i}]={pair!r} is not a (layer, head) pair; {hint}")
        out.append([_as_int("sensitive_heads", pair[0], hint), _as_int("sensitive_heads", pair[1], hint)])
    return out


@dataclass
class VGRefineConfig:
    """Configuration of VGRefine (triage + knockout). Layer/head indices are 0-based query heads.

    ``share_prefix`` (on by default; off with ``faithful=True``) reuses the question triage pass twice: (1) the answer
    prefill resumes at the first masked layer from its hidden states and keys/values (layers below are
    identical in both passes), saving ``min(masked_layers) / num_layers`` of a prefill; (2) the generic
    prompt, which shares the question's prefix up to the image end, runs only its text tail on the
    cached prefix. Both equal the plain path (tested; bit-identical logits on the tiny models of every
    family). The prefill resume is skipped (full prefill, same result) when ``generate`` is asked for a
    non-dynamic cache (``cache_implementation``) or is given a cache. Hybrid models (Qwen 3.5, whose linear-attention
    layers keep a running state instead of per-token keys/values) always take the plain path: full answer prefill,
    generic prompt in its own pass (``FamilyAdapter.hybrid``); their results equal ``share_prefix=False``. So do
    sparse-attention models (DSA: Mistral Large 4, GLM-5), whose indexer chooses each row's keys from the model's own
    causal mask, and decoders with short convolutions over the sequence (Inkling), whose state carries the previous
    tokens past any mask (``FamilyAdapter.prefix_paths_exact``).

    ``percentile``: knock out the image tokens whose triage score is strictly below this percentile
    (linear interpolation); ``magnitude_threshold`` is used only when ``percentile is None``
    (min-max-normalised scores below it are knocked out).

    ``zero_division`` (the 0/0 rule of the relative map): ``"eps"`` (default and the released ``VGRefine()``):
    ``s = a / (g + eps)``; a non-finite score is never knocked out, the others are thresholded as usual.
    ``"notebook"`` (the ``huatuogpt-vision-7b-notebook`` preset, with ``eps=0``): ``s = a / g`` and
    ``numpy.percentile`` over the raw scores, as ``eval_RAD.ipynb`` ran it; where question and generic
    attention are both 0 the score is NaN, the threshold becomes NaN and **nothing** is knocked out.

    ``attention_dtype``: ``"float32"`` (default) averages the captured probabilities in fp32; ``"model"``
    (``faithful=True``) casts them to the model's dtype (bf16 on GPU) and averages the heads in that dtype, as
    the released code reads eager attention (:func:`hf_vgrefine.vgrefine.triage.released_numerics`).

    ``mask_box_end``: how a box derived from a mask ends. ``"exclusive"`` (default): the box covers the
    extreme mask pixels (``w = x_max - x_min + 1``); ``"inclusive_max"`` (``faithful=True``): the released
    preparation code's ``[x_min, y_min, x_max, y_max]`` read as box corners, i.e. one pixel narrower
    (:func:`hf_vgrefine.geometry.mask_to_box`).
    """

    # ---- the method: what VGRefine computes (triage, knockout set, knockout)
    masked_layers: list = field(default_factory=list)
    sensitive_heads: list = field(default_factory=list)
    percentile: float | None = 80.0
    magnitude_threshold: float | None = None
    zero_division: str = "eps"
    attention_dtype: str | None = None             # None: "float32" ("model" with faithful=True)
    query: str = "last"
    generic_norm: str = "layer_mean"
    eps: float = 1e-10
    instruction: str | None = INSTRUCTION
    generic_prompt: str = GENERIC_QUESTION
    knockout_heads: str = "all"
    knockout_scope: str = "prefill"
    knockout_set: str = "triage"
    triage_source: str = "heads"
    att_map_layer: int | None = None
    compose_with_model_mask: bool | None = None    # None: True (False with faithful=True)
    # ---- calibration geometry: how boxes and masks become token regions when calibrating
    calibration_eps: float | None = None           # None: 1e-10 (0.0 with faithful=True)
    huatuo_box_mapping: str | None = None          # None: "pad" ("stretch" with faithful=True)
    min_cells_per_box: int | None = None           # None: 1 (0 with faithful=True)
    mask_box_end: str | None = None                # None: "exclusive" ("inclusive_max" with faithful=True)
    # ---- performance switches: same answers, less work (all off with faithful=True)
    cache_generic: bool | None = None              # None: True
    early_exit: bool | None = None                 # None: True
    share_prefix: bool | None = None               # None: True
    # ---- reproduction switch: the released code's value for every switch above left unset
    faithful: bool = False
    # ---- provenance: where the settings come from (not read by the method)
    model_id: str | None = None
    processor_settings: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    notes: str = ""
    version: str = __version__

    def __post_init__(self):
        for k, released in _FAITHFUL.items():             # explicit values win; unset ones follow `faithful`
            if getattr(self, k) is None:
                setattr(self, k, released if self.faithful else _PACKAGE_DEFAULTS[k])
        self.masked_layers = _int_list("masked_layers", self.masked_layers, "e.g. masked_layers=[16]")
        self.sensitive_heads = _pair_list(self.sensitive_heads)
        for name in ("percentile", "magnitude_threshold", "eps", "calibration_eps"):
            value = getattr(self, name)
            if value is None and name in ("percentile", "magnitude_threshold"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"VGRefineConfig.{name}={value!r} is a {type(value).__name__}; give a number "
                                f"(e.g. {name}={_EXAMPLE[name]})")
            if not math.isfinite(float(value)):
                raise ValueError(f"VGRefineConfig.{name}={value!r}; give a finite number (e.g. {name}={_EXAMPLE[name]})")
            setattr(self, name, float(value))
        if self.eps < 0 or self.calibration_eps < 0:
            raise ValueError(f"eps={self.eps}, calibration_eps={self.calibration_eps}: must be >= 0")
        if self.magnitude_threshold is not None and not 0.0 <= self.magnitude_threshold <= 1.0:
            raise ValueError(f"magnitude_threshold must be in [0, 1], got {self.magnitude_threshold}")
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"VGRefineConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.percentile is None and self.magnitude_threshold is None:
            raise ValueError("set percentile (e.g. 80) or magnitude_threshold (in [0, 1])")
        if self.percentile is not None and not 0.0 <= float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")
        if self.triage_source == "heads" and not self.sensitive_heads and self.knockout_set == "triage":
            raise ValueError("sensitive_heads is empty: give (layer, head) pairs, load a preset "
                             "(VGRefineConfig.from_preset) or run hf_vgrefine.calibrate")
        if self.triage_source == "layer" and self.att_map_layer is None:
            raise ValueError("triage_source='layer' needs att_map_layer")
        if not self.masked_layers:
            raise ValueError("masked_layers is empty: give the decoder layer(s) where the knockout applies")

    def check_model(self, num_layers: int, num_heads: int, attention_layers=None):
        """Raise a clear error if layers/heads do not exist in a model of this size; with ``attention_layers`` (the
        adapter's softmax-attention layers) also if a masked layer, a sensitive head's layer or ``att_map_layer`` is
        a linear-attention layer of a hybrid model (Qwen 3.5)."""
        bad_l = [l for l in self.masked_layers if not 0 <= l < num_layers]
        bad_h = [(l, h) for l, h in self.sensitive_heads if not (0 <= l < num_layers and 0 <= h < num_heads)]
        if self.att_map_layer is not None and not 0 <= self.att_map_layer < num_layers:
            bad_l.append(self.att_map_layer)
        if bad_l or bad_h:
            raise ValueError(f"config does not fit the model ({num_layers} layers x {num_heads} query heads): "
                             f"layers out of range {bad_l}, (layer, head) out of range {bad_h}. "
                             "Was the preset made for another model? Recalibrate with hf_vgrefine.calibrate.")
        if attention_layers is None or len(attention_layers) == num_layers:
            return
        attn = set(attention_layers)
        lin_m = sorted({l for l in self.masked_layers if l not in attn})
        lin_h = [[l, h] for l, h in self.sensitive_heads if l not in attn]
        if self.att_map_layer is not None and self.att_map_layer not in attn:
            lin_m.append(self.att_map_layer)
        if lin_m or lin_h:
            raise ValueError(f"config does not fit this hybrid model: masked_layers / att_map_layer {lin_m} and "
                             f"sensitive_heads {lin_h} are on linear-attention layers, which have no attention map to "
                             f"read or block; choose among its softmax-attention layers {sorted(attn)} "
                             "(hf_vgrefine.calibrate picks only those).")

    @property
    def triage_layers(self) -> list:
        """Layers the triage pass must capture (sensitive heads' layers, or ``att_map_layer``)."""
        if self.triage_source == "layer":
            return [self.att_map_layer]
        return sorted({l for l, _ in self.sensitive_heads})

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "VGRefineConfig":
        """Config from a dict (e.g. a saved ``vgrefine_config.json``).

        Unknown keys (fields of a newer version) are ignored with a warning; a ``version`` of a newer major
        release than this package warns that settings may be read differently (:func:`check_version`)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"VGRefineConfig: ignoring unknown fields {unknown} (saved by another version of hf_vgrefine?); "
                          f"known fields: {sorted(known)}", UserWarning, stacklevel=2)
        if "version" in d:
            check_version(d["version"])
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``vgrefine_config.json`` into ``save_directory`` atomically (temp file + rename)."""
        from ..atomic import atomic_write

        return atomic_write(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, revision: str | None = None, **overrides):
        """Load from a JSON file, a directory holding ``vgrefine_config.json``, a preset name, or a hub repo id."""
        p = os.fspath(path_or_repo)
        if p in PRESETS:
            return cls.from_preset(p, **overrides)
        if os.path.isdir(p):
            p = os.path.join(p, CONFIG_NAME)
        elif not os.path.exists(p):
            from huggingface_hub import hf_hub_download

            try:
                p = hf_hub_download(p, CONFIG_NAME, revision=revision)
            except Exception as e:  # the hub error is kept as the cause
                raise FileNotFoundError(
                    f"no VGRefine config at {path_or_repo!r}: not a file, not a directory with {CONFIG_NAME}, not a "
                    f"preset ({', '.join(PRESETS)}), and the hub lookup failed ({type(e).__name__})") from e
        with open(p) as f:
            d = json.load(f)
        return cls.from_dict(_with_overrides(d, overrides))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VGRefineConfig":
        """Published settings: ``"huatuogpt-vision-7b"`` (percentile 80) or ``"huatuogpt-vision-7b-notebook"`` (50)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls.from_dict(_with_overrides(copy.deepcopy(PRESETS[name]), overrides))
