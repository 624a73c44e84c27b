"""Generic adapter: any decoder-only VLM whose image enters the decoder's self-attention as placeholder tokens.

Used by :func:`hf_vgrefine.adapters.get_adapter` when no family adapter is registered for ``config.model_type``.
Triage, knockout and attention capture only need the image tokens' positions and the decoder's layers and
heads, which the generic adapter reads from the model:

* **image tokens**: the runs of ``config.image_token_id`` (alias ``image_token_index``) in ``input_ids``; one
  contiguous run per image, or, where the config names image start/end marker tokens (``boi``/``eoi``,
  ``image_start``/``image_end``, ``vision_start``/``vision_end``), every image-token run between one start
  marker and the next end marker (tiled images whose tiles are separated by text tokens);
* **decoder**: the layer list of the text model (searched), layers/heads/KV heads from the text config; the
  layers whose attention goes through ``transformers``' attention registry (hybrid models: the softmax
  attention layers only, see :attr:`FamilyAdapter.attention_layers`);
* **position ids**: generate's 1-D positions, or, for models that derive multi-axis (M-RoPE) positions
  themselves, the positions the model hands its language model (read by running it up to the decoder).

Pixel geometry needs the processor's exact transform. The generic adapter offers it only where the processor
plainly stretches the image to a fixed square and the image block is a perfect square of tokens: a stretch
:class:`~hf_vgrefine.geometry.TokenGrid` flagged ``approximate=True``. Otherwise :meth:`GenericAdapter.token_grid`
raises :class:`GeometryUnavailableError` naming what is missing (results stay token level).

Models whose image does not reach the decoder as tokens, or that do not generate token by token (a diffusion
decoder refining a block at once), get :class:`~hf_vgrefine.adapters.UnsupportedModelError` with the reason
(:func:`token_level_support`).
"""

from __future__ import annotations

import inspect
import math
import re

import torch

from .base import FamilyAdapter, ImageSpan, UnsupportedModelError

_IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")
_START_ATTRS = ("boi_token_id", "boi_token_index", "image_start_token_id", "vision_start_token_id")
_END_ATTRS = ("eoi_token_id", "eoi_token_index", "image_end_token_id", "vision_end_token_id")
_LAYER_PATHS = ("model.language_model.layers", "language_model.model.layers", "model.layers",
                "language_model.layers", "model.language_model.model.layers",
                "language_model.model.decoder.layers", "model.language_model.decoder.layers", "model.decoder.layers")
_TOWER_NAMES = re.compile(r"(^|\.)(vision|visual|vision_tower|vision_model|image_encoder|audio|audio_tower|vq|vqmodel|"
                          r"qformer|perceiver|resampler|connector|multi_modal_projector|mm_projector|protein)", re.I)
_CROSS_NAMES = re.compile(r"cross_?attn|cross_?attention|crossattention|encoder_attn", re.I)


class GeometryUnavailableError(ValueError):
    """Pixel ↔ token geometry was asked of a model whose adapter cannot provide it (token-level results only)."""


def _first_attr(config, names):
    for name in names:
        val = getattr(config, name, None)
        if isinstance(val, int) and not isinstance(val, bool):
            return int(val)
    return None


def config_image_token_id(config) -> int | None:
    """The image placeholder id of ``config`` (``image_token_id`` or ``image_token_index``), or ``None``."""
    return _first_attr(config, _IMAGE_TOKEN_ATTRS)


_REGISTRY_USE: dict = {}


def _uses_attention_registry(attn_module) -> bool:
    """True when the module's forward dispatches through ``transformers``' attention registry (memoised per class)."""
    cls = type(attn_module)
    if cls not in _REGISTRY_USE:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _REGISTRY_USE[cls] = "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src
    return _REGISTRY_USE[cls]


def find_decoder_layers(model):
    """``(path, ModuleList)`` of the text decoder's layers: the known v5/v4 paths first, else the one module list
    outside the vision/audio towers whose length is the text config's ``num_hidden_layers``; ``(None, None)``."""
    for path in _LAYER_PATHS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return path, obj
    try:
        n = int(model.config.get_text_config(decoder=True).num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        return None, None
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and not _TOWER_NAMES.search(name)]
    if len(found) == 1:
        return found[0]
    return None, None


def layer_attention(layer):
    """The self-attention module of one decoder layer (a submodule with ``layer_idx`` that dispatches through the
    attention registry), or ``None`` (linear-attention / recurrent / convolution layers of hybrid models)."""
    for name, mod in layer.named_modules():
        if not name or _CROSS_NAMES.search(name):
            continue
        if getattr(mod, "layer_idx", None) is not None and _uses_attention_registry(mod):
            return mod
    return None


_CACHE_UPDATE = re.compile(r"\.update\(\s*(\w+)\s*,\s*(\w+)")
_ATTN_CALL = re.compile(r"attention_interface\(\s*self\s*,\s*\w+\s*,\s*(\w+)\s*,\s*(\w+)")


def caches_attention_keys(attn_module) -> bool:
    """True when the attention module's forward writes to the cache the very key/value tensors it hands the
    attention function (what a replayed prefix writes); False for latent caches (multi-head latent attention
    caches the compressed KV and expands it afterwards: DeepSeek-V3, Kimi-K2.5, Mistral Large 4) or when the
    source does not show it."""
    try:
        src = inspect.getsource(type(attn_module).forward)
    except (OSError, TypeError):
        return False
    updates, call = _CACHE_UPDATE.findall(src), _ATTN_CALL.search(src)
    return bool(updates) and call is not None and all(u == call.groups() for u in updates)


def generate_passes_positions(model) -> bool:
    """Whether ``generate`` hands its ``position_ids`` (the mask's cumsum) to the model's forward. False where the
    model's ``prepare_inputs_for_generation`` drops them (Ovis2.5 sets them to ``None`` and its language model counts
    positions from the cache, so a left-padded row's real tokens start after its pads); asked with a two-token
    prompt on the host, no model call."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    marker = torch.arange(2)[None]
    try:
        out = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids), position_ids=marker,
                                                  cache=None, is_first_iteration=True)
    except (TypeError, ValueError, RuntimeError, AttributeError, KeyError, IndexError, NotImplementedError):
        return True      # a custom signature that needs real inputs: assume generate's default (positions passed)
    return out.get("position_ids") is not None


def token_level_support(model) -> str | None:
    """``None`` when ``model``'s image enters its decoder's self-attention as placeholder tokens of ``input_ids``
    and the model generates token by token with transformers' ``generate`` (the generic adapter works); otherwise
    the reason it does not, as one sentence ("... because ...")."""
    config = model.config
    mt = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return (f"{mt} is an encoder-decoder model: the image is encoded by a separate encoder and reaches the text "
                "decoder through cross-attention, not as tokens of the decoder's self-attention")
    text = config.get_text_config(decoder=True)
    if getattr(text, "cross_attention_layers", None) is not None or getattr(text, "add_cross_attention", False):
        return (f"{mt} feeds the image to its decoder through cross-attention layers (text config "
                "cross_attention_layers), not as tokens of the decoder's self-attention")
    _, layers = find_decoder_layers(model)
    if layers is None:
        return f"{mt}: cannot locate the text decoder's layer list (no decoder-only language model found)"
    for name, _ in model.named_modules():
        if _CROSS_NAMES.search(name) and not _TOWER_NAMES.search(name):
            return (f"{mt} feeds the image to its decoder through cross-attention layers ({name.split('.')[-1]}), "
                    "not as tokens of the decoder's self-attention")
    if config_image_token_id(config) is None:
        return (f"{mt}: the config names no image placeholder token (image_token_id / image_token_index), so the "
                "image does not enter the decoder as placeholder tokens of input_ids")
    attns = [a for a in (layer_attention(layer) for layer in layers) if a is not None]
    if not attns:
        return (f"{mt}: the decoder's attention does not go through transformers' attention registry "
                "(ALL_ATTENTION_FUNCTIONS with module.layer_idx), which the package's capture and knockout use")
    if isinstance(getattr(text, "indexer_budget", None), int):
        return (f"{mt}: its QSA indexer merges its key-block selection into the attention mask before the attention "
                "function runs, so a query row need not see its own key, while the package reads query positions "
                "(where VGRefine's knockout starts) from that mask; prompts longer than the indexer budget would be "
                "knocked out at the wrong rows")
    heads = per_layer_head_counts(text, len(layers))
    if len(set(heads)) > 1:
        return (f"{mt}: its decoder layers have different numbers of attention heads ({sorted(set(heads))}, a "
                "heterogeneous per-layer config), while the package's capture maps and VGRefine's sensitive heads "
                "take one head count for every layer")
    from transformers import GenerationMixin

    # a decoder model without a language-model head (AutoModel) is not a GenerationMixin either and still works for
    # capture and measurement; refused here is the non-generating model whose decoder is bidirectional
    if not isinstance(model, GenerationMixin) and all(getattr(a, "is_causal", True) is False for a in attns):
        gen = getattr(type(model), "generate", None)
        own = f"its generate is {gen.__qualname__}" if gen is not None else "it has no generate"
        return (f"{mt} does not generate autoregressively: {type(model).__name__} is not a transformers "
                f"GenerationMixin ({own}) and its decoder's self-attention is bidirectional (is_causal=False), a "
                "diffusion-style decoder that refines a block of tokens at once; VGRefine's knockout acts on "
                "transformers' next-token generate")
    return None


def per_layer_head_counts(text_config, num_layers: int) -> list:
    """Query-head count of every decoder layer: from the per-layer configs of a heterogeneous text config (Dots3's
    sliding-window layers have half the heads of its full-attention layers), else the config's one count."""
    if getattr(text_config, "is_heterogeneous", False):
        return [getattr(text_config.per_layer_config[i], "num_attention_heads", None) for i in range(num_layers)]
    return [getattr(text_config, "num_attention_heads", None)] * num_layers


class GenericAdapter(FamilyAdapter):
    """Token-level adapter for an unregistered ``model_type`` (see the module docstring)."""

    model_types = ()
    family = "generic"
    exact_geometry = False

    def __init__(self, model):
        reason = token_level_support(model)
        if reason is not None:
            raise UnsupportedModelError(f"{type(model).__name__} is not supported, because {reason}.")
        super().__init__(model)
        self._layers_path, self._layers = find_decoder_layers(model)
        self._start_id = _first_attr(self.config, _START_ATTRS)
        self._end_id = _first_attr(self.config, _END_ATTRS)
        inner = getattr(model, "model", model)
        rope = getattr(self.text_config, "rope_parameters", None) or getattr(self.text_config, "rope_scaling", None)
        self.can_replay_prefix = all(caches_attention_keys(a) for a in
                                     (layer_attention(layer) for layer in self._layers) if a is not None)
        self.drops_generate_positions = not generate_passes_positions(model)
        self.derives_positions = hasattr(inner, "get_rope_index") or (
            isinstance(rope, dict) and any("mrope" in str(k) for k in rope))
        self.explicit_position_ids = not (self.derives_positions or self.drops_generate_positions)

    def per_image_rows(self, key, inputs):
        """Flattened patches of every image in one tensor (the Qwen-VL convention, used by many newer models): a
        ``[t, h, w]`` grid per image in ``image_grid_thw`` gives its ``t*h*w`` rows of ``pixel_values`` (rows of
        flattened patches, or of ``[channels, patch, patch]`` patches as PaddleOCR-VL's processor makes them).
        One patch row per image token with no grid (Inkling): a sample's rows are its placeholder-token count.
        Molmo 2's crops and pooled tokens: ``image_num_crops`` crops of ``pixel_values`` per image, and per image
        ``h1*w1 + h2*w2`` rows of ``image_token_pooling`` from its ``image_grids`` row ``[h1, w1, h2, w2]`` (each
        image's pooling indices count from its own first patch)."""
        val = inputs.get(key)
        if not torch.is_tensor(val) or val.dim() < 2:
            return None
        thw, grids, crops = inputs.get("image_grid_thw"), inputs.get("image_grids"), inputs.get("image_num_crops")
        if key == "pixel_values" and thw is not None:
            counts = torch.as_tensor(thw).prod(-1).tolist()
        elif key == "pixel_values" and grids is not None and crops is not None:
            counts = torch.as_tensor(crops).tolist()
        elif key == "image_token_pooling" and grids is not None:
            g = torch.as_tensor(grids)
            counts = (g[:, 0] * g[:, 1] + g[:, 2] * g[:, 3]).tolist()
        elif key == "pixel_values" and "input_ids" in inputs and val.shape[0] != inputs["input_ids"].shape[0]:
            # one patch row per image token, no grid (Inkling): each sample's rows are its placeholder count
            counts = (inputs["input_ids"] == self.image_token_id).sum(-1).tolist()
        else:
            return None
        return counts if sum(counts) == val.shape[0] else None

    # ----------------------------------------------------------------- decoder structure
    @property
    def decoder_layers(self):
        return self._layers

    @property
    def num_heads(self) -> int:
        for name in ("num_attention_heads", "n_head", "num_heads"):
            val = getattr(self.text_config, name, None)
            if val:
                return int(val)
        raise UnsupportedModelError(f"{type(self.text_config).__name__} names no attention-head count")

    def text_attn_target(self, name: str):
        """The text sub-config's key (``{"text_config": name}``), or ``name`` when the config is the text config."""
        for key in getattr(self.config, "sub_configs", {}) or {}:
            if getattr(self.config, key, None) is self.text_config:
                return {key: name}
        return name

    def position_ids(self, inputs: dict) -> torch.Tensor:
        """Generate's 1-D positions; ``[0, T)`` per row where ``generate`` drops them (the language model then
        counts from its cache); for models that derive (multi-axis) positions themselves, the positions the model
        passes to its language model for these inputs (the model runs up to its language model's input)."""
        if not self.derives_positions:
            return self._cache_positions(inputs) if self.drops_generate_positions else super().position_ids(inputs)
        got = {}

        class _Stop(Exception):
            pass

        def hook(module, args, kwargs):
            got["pos"] = kwargs.get("position_ids")
            raise _Stop

        owner = self.model
        for part in (self._layers_path or "").split(".")[:-1]:
            owner = getattr(owner, part)
        # the language model's input positions (decoder layers may see only the text axis of M-RoPE positions)
        handle = owner.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(**{k: v for k, v in inputs.items() if k != "position_ids"}, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        pos = got.get("pos")
        if pos is None and self.drops_generate_positions:
            return self._cache_positions(inputs)
        return super().position_ids(inputs) if pos is None else pos

    @staticmethod
    def _cache_positions(inputs):
        """What a language model given no position ids uses: positions counted from its cache, ``[0, T)`` on every
        row, pads included, ``[B, T]``."""
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)

    # ----------------------------------------------------------------- image tokens
    def image_spans(self, inputs):
        ids = inputs["input_ids"]
        runs = self.image_runs(ids)
        self._require_images(runs)
        out = []
        for b, sample in enumerate(runs):
            groups = self._group_runs(ids[b], sample)
            spans = []
            for i, group in enumerate(groups):
                pos = torch.cat([torch.arange(s, e) for s, e in group])
                n = int(pos.numel())
                side = math.isqrt(n)
                rows, cols = (side, side) if side * side == n else (1, n)
                spans.append(ImageSpan(group[0][0], group[-1][1], rows, cols, pos, image_index=i))
            out.append(spans)
        return out

    def _group_runs(self, row: torch.Tensor, runs: list) -> list:
        """Runs that lie between the same start and end marker form one image (tiles); else one run per image."""
        if self._start_id is None or self._end_id is None or len(runs) < 2:
            return [[r] for r in runs]
        starts = (row == self._start_id).nonzero().flatten().tolist()
        ends = (row == self._end_id).nonzero().flatten().tolist()
        if not starts or not ends:
            return [[r] for r in runs]
        groups, key_of = {}, []
        for s, e in runs:
            before = [p for p in starts if p < s]
            after = [p for p in ends if p >= e]
            if not before or not after or any(before[-1] < p < s for p in ends):
                key = ("run", s)
            else:
                key = ("block", before[-1])
            groups.setdefault(key, []).append((s, e))
            key_of.append(key)
        return [groups[k] for k in dict.fromkeys(key_of)]

    # ----------------------------------------------------------------- geometry
    def token_grid(self, processor, image_size, span=None, inputs=None):
        """Approximate stretch grid where the processor plainly resizes to a fixed square and the image block is a
        perfect square of tokens; otherwise :class:`GeometryUnavailableError`."""
        from ..geometry import TokenGrid

        mt = self.config.model_type
        ip = getattr(processor, "image_processor", processor)
        if ip is None:
            raise GeometryUnavailableError(f"{mt}: no image processor given; token_grid needs the model's processor")
        missing = plain_square_resize_problem(ip)
        n = span.n_tokens if span is not None else self._square_tokens_from_config()
        if missing is None and n is None:
            missing = ("the number of image tokens per image is unknown: pass span= (from adapter.image_spans) so "
                       "that the grid size can be read from the prompt")
        if missing is None:
            side = math.isqrt(n)
            if side * side != n:
                missing = f"the image block has {n} tokens, not a perfect square"
        if missing is not None:
            raise GeometryUnavailableError(
                f"model_type {mt!r} has no exact hf_vgrefine adapter and no plain square token grid ({missing}); "
                "its results are token level only (triage, knockout, attention capture work), pixel geometry "
                "(metrics against boxes/masks, overlays, oracle knockout) needs a family adapter for the "
                "processor's exact transform (docs/adding_a_family.md)")
        w0, h0 = (int(v) for v in (image_size.size if hasattr(image_size, "mode") else image_size))
        return TokenGrid(side, side, (w0, h0), (1.0, 1.0), (0.0, 0.0), (float(w0), float(h0)), approximate=True)

    def _square_tokens_from_config(self):
        for name in ("mm_tokens_per_image", "image_seq_length", "num_image_tokens"):
            val = getattr(self.config, name, None)
            if isinstance(val, int) and val > 0:
                return val
        return None


_DYNAMIC_FLAGS = ("do_pan_and_scan", "do_image_splitting", "crop_to_patches", "do_convert_rgb_tiles",
                  "image_grid_pinpoints", "min_pixels", "max_pixels", "max_soft_tokens", "max_image_tiles",
                  "dynamic_hd", "max_num_patches", "max_patches")


def plain_square_resize_problem(ip) -> str | None:
    """``None`` when the image processor stretches every image to one fixed square (``size`` height == width, no
    crop, no tiling or dynamic resolution); otherwise what prevents a plain square grid."""
    for flag in _DYNAMIC_FLAGS:
        val = getattr(ip, flag, None)
        if val not in (None, False, 0, [], ()):
            if flag in ("min_pixels", "max_pixels", "max_soft_tokens", "max_num_patches", "max_patches"):
                return f"{type(ip).__name__} resizes to a dynamic resolution ({flag}={val!r})"
            return f"{type(ip).__name__} tiles or crops the image ({flag}={val!r})"
    if getattr(ip, "do_center_crop", False):
        return f"{type(ip).__name__} centre-crops the image (do_center_crop=True)"
    if getattr(ip, "do_pad", False):
        return f"{type(ip).__name__} pads the image (do_pad=True)"
    if not getattr(ip, "do_resize", True):
        return f"{type(ip).__name__} does not resize (do_resize=False): the grid depends on the image size"
    size = getattr(ip, "size", None)
    h = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    w = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
    if not h or not w or h != w:
        return f"{type(ip).__name__} does not stretch to a fixed square (size={size!r})"
    return None
