"""Tiny random-weight models of *any* image-text-to-text model type, built from its default config offline.

Used by the model-type sweep test and by ``scripts/coverage_table.py``. :func:`tiny_config` shrinks every
sub-config of a type's default config (2 text layers, hidden 64, 4 query / 2 KV heads, 2-layer 32-wide vision
towers with 4x4 patch grids, VQ-VAE image tokenizers with a 64-entry codebook and a 4x4 code grid, 512-token
vocabulary with every special-token id remapped below it) and keeps the sizes the model ties together consistent
(M-RoPE sections, MLA rotary / KV head sizes, projector widths, per-layer sizes of heterogeneous configs,
feature-layer indices and pooled token counts of the tiny tower). Values a default config leaves unset but the
model reads are filled in first, as the checkpoints hold them (``_CONFIG_FILLS``); sizes the shrunk towers must
share are set after shrinking (``_TINY_FITS``); a VQ-tokenising model's image vocabulary is built for its tiny
codebook (``_IMAGE_VOCABULARIES``).
:func:`tiny_image_batch` finds image inputs the model's own ``get_image_features`` accepts: layouts built from the
vision config first, then the outputs of the type's image processor class (instantiated with its defaults, no
hub files). :func:`tiny_any_inputs` builds a left-padded batch: the number of image placeholder tokens read from
``get_image_features``' output, start/end markers where the config names them.
"""

from __future__ import annotations

import contextlib
import io
import re

import torch

VOCAB = 512
_TEXT = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, max_position_embeddings=2048,
             first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=16, linear_value_head_dim=16, hidden_size_per_layer_input=16,
             vocab_size_per_layer_input=VOCAB,
             linear_head_dim=16, linear_num_heads=2, n_group=1, topk_group=1, index_head_dim=16, index_n_heads=2,
             index_topk=6,      # sparse attention (DSA): top-6 keys per query row, less than the tiny prompts
             swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16)    # Inkling: sliding layers
_VISION = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, depth=2,
               embed_dim=32, num_heads=2, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts=4,
               moe_intermediate_size=32)


def _set(cfg, key, value):
    if not hasattr(cfg, key):
        return
    cur = getattr(cfg, key)
    if isinstance(cur, bool) or not isinstance(cur, int):
        return
    try:
        setattr(cfg, key, value)
    except (AttributeError, TypeError, ValueError):
        pass


def _shrink(cfg, text: bool, text_hidden: int = 64):
    for k, v in (_TEXT if text else _VISION).items():
        _set(cfg, k, v)
    if text:
        _set(cfg, "vocab_size", VOCAB)
        _set(cfg, "unpadded_vocab_size", VOCAB)       # Inkling: the LM head's width (the embedding is padded)
        for key in ("layer_types", "mlp_layer_types"):
            lt = getattr(cfg, key, None)
            if isinstance(lt, (list, tuple)) and len(lt) > cfg.num_hidden_layers:
                # keep one layer of each kind (hybrid models: linear + full attention), the last kind last
                kinds = list(dict.fromkeys(lt))
                keep = (kinds + [lt[-1]] * cfg.num_hidden_layers)[: cfg.num_hidden_layers]
                if len(kinds) >= cfg.num_hidden_layers:
                    keep = kinds[-cfg.num_hidden_layers:]
                setattr(cfg, key, list(keep))
    else:
        _set(cfg, "out_hidden_size", text_hidden)
        _set(cfg, "projection_dim", 32)


def _mlp_ratio(cfg):
    """``intermediate_size / hidden_size`` of a default config when it is a whole number, else ``None``."""
    i, h = getattr(cfg, "intermediate_size", None), getattr(cfg, "hidden_size", None)
    if isinstance(i, int) and isinstance(h, int) and h and i % h == 0:
        return i // h
    return None


_PROJECTOR_DIM = re.compile(r"(hidden_size|hidden_dim|output_dim|input_dim|_in_dim|_out_dim)$")


def _shrink_projectors(cfg, text, subs):
    """Projector widths outside the text config (``projector_hidden_size``, ``out_hidden_size``,
    ``text_hidden_size``, ``merged_hidden_size``...): those the default sets to a multiple of the text or vision
    hidden size keep that multiple of the tiny sizes; other large ones become 64."""
    vision = _vision(cfg)
    t_hid = getattr(text, "hidden_size", None)
    v_hid = getattr(vision, "hidden_size", None) if vision is not None else None
    for c in [cfg] + subs:
        if c is text:
            continue
        for k, v in c.to_dict().items():
            if (isinstance(v, bool) or not isinstance(v, int) or v < 256 or k == "hidden_size" or k in _VISION
                    or not _PROJECTOR_DIM.search(k)):
                continue
            if isinstance(t_hid, int) and v % t_hid == 0:
                new = 64 * (v // t_hid)
            elif isinstance(v_hid, int) and v % v_hid == 0:
                new = 32 * (v // v_hid)
            else:
                new = 64
            _set(c, k, new)
        if isinstance(getattr(c, "projector_output_dim", None), int):    # Llama 4: the tower's output is the
            _set(c, "vision_output_dim", c.projector_output_dim)          # projector's


def _remap_ids(cfg, nxt):
    for k, v in list(cfg.to_dict().items()):
        if isinstance(v, bool) or not isinstance(v, int) or v < VOCAB:
            continue
        if k.endswith(("_token_id", "_token_index", "token_id", "_patch_id")):     # Molmo 2: image_patch_id
            try:
                setattr(cfg, k, nxt[0])
                nxt[0] += 1
            except (AttributeError, TypeError, ValueError):
                pass


# Values a default config leaves unset (None) or lacks although its own modeling code reads them, as the released
# checkpoints set them; filled in before shrinking ("text_config.x" names a sub-config's key), so sizes, layer
# indices and token ids are then shrunk, fitted or remapped like the default's own.
_CONFIG_FILLS = {
    # the Omni thinkers' get_rope_index reads vision_start_token_id, which only the outer Omni config defines
    # (Qwen's <|vision_start|>)
    "qwen2_5_omni_thinker": {"vision_start_token_id": 151652},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 151652},
    # DiffusionGemma's text layers always build a MoE block (router + experts), sized by the checkpoint's config
    # (a Gemma 4 26B-A4B-style MoE); here the tiny sizes: 4 experts, 2 per token, 32 wide
    "diffusion_gemma": {"text_config.num_experts": 4, "text_config.top_k_experts": 2,
                        "text_config.moe_intermediate_size": 32},
    # Granite Vision 4.1 (ibm-granite/granite-vision-4.1-4b): four deepstack projections, each a [vision layer,
    # decoder layer] pair (features of that tower layer are added to the image tokens before that decoder layer),
    # and Window Q-Former projectors with 4x4 queries per 8x8-patch window
    "granite4_vision": {"deepstack_layer_map": [[-19, 9], [-13, 6], [-7, 3], [-1, 0]], "downsample_rate": "4/8"},
    # Apertus 1.5: image codes are vocabulary ids (offset + code): the tiny 64-entry codebook's range ends the
    # 512-token vocabulary, where the audio range starts (the config's check; no audio here)
    "apertus1p5": {"image_token_offset": VOCAB - 64, "audio_token_offset": VOCAB},
    # HunyuanOCR (tencent/HunyuanOCR): 128-wide heads and XD-RoPE, NTK-alpha scaled, over four axes (position,
    # width, height, image index), 16 rotary pairs each (get_rope_index needs at least three axes); shrunk to
    # head_dim 16 and sections of half the tiny head by _fit_rope_sections
    "hunyuan_vl": {"text_config.head_dim": 128,
                   "text_config.rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0, "rope_theta": 10000.0,
                                                   "mrope_section": [16, 16, 16, 16]}},
    # Qwen4-Exp (Qwen/Qwen4-Exp): its QSA indexer scores blocks of 4 consecutive keys with 4 query heads and one
    # 128-wide key head and keeps a 2048-token budget; tiny (sizes the shrinking does not know): blocks of 2, a
    # 4-token budget (two blocks, plus the incomplete last block), fewer keys than the tiny prompts
    "qwen4_exp": {"text_config.indexer_n_heads": 2, "text_config.indexer_kv_heads": 1,
                  "text_config.indexer_head_dim": 16, "text_config.indexer_budget": 4,
                  "text_config.indexer_compress_ratio": 2},
}


def _fill_config(cfg, fills: dict):
    for path, value in fills.items():
        *subs, key = path.split(".")
        owner = cfg
        for name in subs:
            owner = getattr(owner, name)
        setattr(owner, key, value)


# The image vocabulary of models that tokenise the image with a VQ-VAE (no vision tower): config.vocabulary_map is
# the checkpoint tokenizer's vocabulary (None in the default config), from which the model reads the token id of each
# codebook entry (by its name) and of the image placeholder. Per type: the token name of codebook entry i, and the
# other names the model looks up (the image placeholder first). The tiny map puts the tiny codebook's entries at the
# top of the 512-token vocabulary and the other names just below (see _put_image_vocabulary).
_IMAGE_VOCABULARIES = {
    # Chameleon: entry i is "IMGIMG" + i's digits written as letters A-J + "Z" (the model drops the last letter)
    "chameleon": (lambda i: "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z", ("<image>",)),
    # Emu3: entry i is "<|visual token{i:06d}|>"; "<|extra_200|>" is the end-of-row token the model appends to
    # each row of codes (so an image is rows x (cols + 1) tokens)
    "emu3": (lambda i: f"<|visual token{i:06d}|>", ("<image>", "<|extra_200|>")),
}


def _put_image_vocabulary(cfg, code_name, names):
    """``cfg.vocabulary_map`` for the tiny codebook (``cfg.vq_config``'s) and ``cfg.image_token_id`` from it: the
    codebook entries take the highest ids of the vocabulary, ``names`` the ids below them, none of them an id the
    config already uses for a special token."""
    vq = cfg.vq_config
    n = _int(vq, "num_embeddings", "codebook_size")
    used = {v for c in (cfg, cfg.get_text_config(decoder=True)) for k, v in c.to_dict().items()
            if isinstance(v, int) and not isinstance(v, bool) and k.endswith(("_id", "_index"))}
    free = [i for i in range(VOCAB - 1, -1, -1) if i not in used]
    ids = free[: n + len(names)]
    vocabulary = {code_name(i): ids[n - 1 - i] for i in range(n)}
    vocabulary.update(zip(names, ids[n:]))
    cfg.vocabulary_map = vocabulary
    cfg.image_token_id = vocabulary[names[0]]


def _image_vq(cfg):
    """The VQ-VAE config that tokenises the image where the model has no vision tower (Chameleon, Emu3: each codebook
    entry is a text token), else ``None``."""
    vq = getattr(cfg, "vq_config", None)
    if _vision(cfg) is None and vq is not None and isinstance(getattr(vq, "channel_multiplier", None), (list, tuple)):
        return vq
    return None


def _vq_image_side(vq):
    """Image side of a 4x4 code grid: 4 times the VQ encoder's downsampling (2 per level after the first)."""
    return 4 * 2 ** (len(vq.channel_multiplier) - 1)


def _shrink_vq(vq, default: dict):
    """A tiny VQ-VAE image tokenizer: 32 base channels (its GroupNorms have 32 groups), a 64-entry codebook, input
    resolution of a 4x4 code grid; its attention blocks' width (``hidden_size``) stays the channel width of the level
    they sit at, as in the default."""
    base = default.get("base_channels")
    _set(vq, "base_channels", 32)
    for key in ("num_embeddings", "codebook_size"):
        _set(vq, key, 64)
    _set(vq, "resolution", _vq_image_side(vq))
    hidden = default.get("hidden_size")
    if isinstance(base, int) and isinstance(hidden, int) and hidden % base == 0 and (
            hidden // base in default["channel_multiplier"]):
        _set(vq, "hidden_size", vq.base_channels * (hidden // base))

# Values set after shrinking (unlike _CONFIG_FILLS, before it), where the shrunk sizes must agree with them.
# DeepSeek-OCR 2: the MoE decoder's layout for 2 layers (its checkpoint: the first layer dense, the others routed
# experts); the SAM encoder's last downsampling conv feeds the decoder-style encoder (channels = that encoder's
# width) and its position grid is sized to a 64-px image. Unlimited-OCR: the SAM encoder's last downsampling conv
# feeds the CLIP-style encoder as its patch embeddings (channels = its width) and its position grid is sized to a
# 256-px image (4x4 tokens after the 4x downsampling). Apertus 1.5: a small VQ image tokenizer (32-channel base, one
# residual block per stage, a 64-entry codebook). Gemma 4 unified: its patch embedder's width (3840, = its output
# projection's input) and position table (4x4 here).
_TINY_FITS = {"deepseek_ocr2": {"text_config.mlp_layer_types": ["dense", "sparse"],
                                "text_config.num_experts_per_tok": 2,
                                "vision_config.sam_config.image_size": 64,
                                "vision_config.sam_config.output_channels": 16,
                                "vision_config.sam_config.downsample_channels": [16, 64]},
              "unlimited_ocr": {"vision_config.sam_config.image_size": 256,
                                "vision_config.sam_config.output_channels": 16,
                                "vision_config.sam_config.downsample_channels": [16, 32]},
              "apertus1p5": {"vision_config.codebook_size": 64, "vision_config.base_channels": 32,
                             "vision_config.latent_channels": 32, "vision_config.num_res_blocks": 1},
              "gemma4_unified": {"vision_config.mm_embed_dim": 32, "vision_config.output_proj_dims": 32,
                                 "vision_config.mm_posemb_size": 16},
              # Molmo 2: a position table of one 4x4-patch crop (27x27 in the checkpoint), and the adapter's two
              # ViT readouts (layers 24 and 18 of 25, hidden_states[layer + 1]) as the last and the first tiny layer
              "molmo2": {"vision_config.num_position_embeddings": 16, "vision_config.image_size": [56, 56],
                         "adapter_config.vision_feature_layer": [1, 0]}}



def tiny_config(model_type: str):
    """The default config of ``model_type`` shrunk to a tiny model (see the module docstring)."""
    from transformers import AutoConfig, PretrainedConfig

    cfg = AutoConfig.for_model(model_type)
    _fill_config(cfg, _CONFIG_FILLS.get(model_type, {}))
    for name, sub_cls in (getattr(cfg, "sub_configs", None) or {}).items():
        if "vision" in name and getattr(cfg, name, False) is None and isinstance(sub_cls, type):
            setattr(cfg, name, sub_cls())          # a vision tower the default leaves out (Gemma 4): its defaults
    text = cfg.get_text_config(decoder=True)
    subs = [getattr(cfg, name, None) for name in (getattr(cfg, "sub_configs", None) or {})]
    subs = [s for s in subs if isinstance(s, PretrainedConfig)]
    # towers built from sub-configs of their own (DeepSeek-OCR 2: a SAM encoder and a decoder-style encoder)
    nested = [getattr(s, k, None) for s in subs if s is not text for k in (getattr(s, "sub_configs", None) or {})]
    subs += [n for n in nested if isinstance(n, PretrainedConfig)]
    per_layer = {}
    for c in [cfg, text] + subs:        # each config once (the text config is also among the sub-configs)
        if id(c) not in per_layer:
            per_layer[id(c)] = (c, c.to_dict().get("layer_types"), _take_per_layer_overrides(c))
    default_text = text.to_dict()
    vq = _image_vq(cfg)
    default_vq = vq.to_dict() if vq is not None else None
    text_hidden = 64
    _shrink_projectors(cfg, text, subs)
    ratios = {id(sub): _mlp_ratio(sub) for sub in subs}
    # sub-configs other than the vision tower that work at the text width (Idefics2's perceiver resampler)
    text_wide = [sub for sub in subs if sub is not text and sub is not _vision(cfg)
                 and getattr(sub, "hidden_size", None) == getattr(text, "hidden_size", 0)]
    for sub in subs:
        _shrink(sub, sub is text, text_hidden)
        if sub in text_wide:
            _set(sub, "hidden_size", text_hidden)
        if sub is not text and ratios[id(sub)]:       # towers whose MLP width is a fixed multiple
            _set(sub, "intermediate_size", ratios[id(sub)] * sub.hidden_size)
        shuffle = getattr(sub, "pixel_shuffle_ratio", None)
        if sub is not text and isinstance(shuffle, float) and shuffle > 0:    # Llama 4: the pixel-shuffled width
            _set(sub, "intermediate_size", int(sub.hidden_size / shuffle ** 2))   # feeds the MLP of that width
    if text is cfg:
        _shrink(cfg, True)
    nxt = [400]
    for c in [cfg] + subs:
        _remap_ids(c, nxt)
    _shrink_vision_image(cfg)
    _fit_vision_readout(cfg)
    if vq is not None:
        _shrink_vq(vq, default_vq)
    if model_type in _IMAGE_VOCABULARIES:
        _put_image_vocabulary(cfg, *_IMAGE_VOCABULARIES[model_type])
    # sizes the default config keeps equal stay equal (MLA: rotary embedding sized by head_dim; latent attention
    # whose KV heads are its query heads)
    for key, ref in (("head_dim", "qk_rope_head_dim"), ("num_key_value_heads", "num_attention_heads")):
        if default_text.get(key) and default_text.get(key) == default_text.get(ref):
            _set(text, key, getattr(text, ref))
    # MLA whose rotary share is a fixed fraction of head_dim (Dots3: 64 of 256, its rope parameters'
    # partial_rotary_factor): head_dim keeps that multiple of the tiny qk_rope_head_dim
    d_head, d_rope = default_text.get("head_dim"), default_text.get("qk_rope_head_dim")
    if isinstance(d_head, int) and isinstance(d_rope, int) and d_rope and d_head != d_rope and d_head % d_rope == 0:
        _set(text, "head_dim", text.qk_rope_head_dim * (d_head // d_rope))
    if default_text.get("qk_head_dim") and default_text.get("qk_head_dim") == (
            default_text.get("qk_nope_head_dim", 0) + default_text.get("qk_rope_head_dim", 0)):
        _set(text, "qk_head_dim", text.qk_nope_head_dim + text.qk_rope_head_dim)
    if "sliding_window" in default_text and default_text["sliding_window"] is None:
        text.sliding_window = 4096     # Step3p7 builds its sliding-window mask always (longer than any tiny prompt)
    rope = getattr(text, "rope_parameters", None)
    if rope == {} and isinstance(getattr(text, "layer_types", None), list):     # Cohere Compass: none by default
        text.rope_parameters = {k: {"rope_type": "default", "rope_theta": 10000.0} for k in set(text.layer_types)}
    _fit_rope_sections(cfg, text)
    _fill_config(cfg, _TINY_FITS.get(model_type, {}))
    for c, default_types, taken in per_layer.values():
        if taken:
            _put_per_layer_overrides(c, default_types, *taken)
    return cfg


def _take_per_layer_overrides(text):
    """Heterogeneous text configs (per-layer head_dim, heads...: Gemma 4, Dots3): their per-layer overrides by
    original layer index and the global values they override, removed from ``text`` (shrunk as a plain config,
    then :func:`_put_per_layer_overrides` puts them back scaled); ``None`` for a homogeneous config."""
    if not getattr(text, "is_heterogeneous", False):
        return None
    text.serialize_explicit_per_layer_config = True
    overrides = {int(i): o for i, o in (text.to_dict().get("per_layer_config") or {}).items()}
    text.serialize_explicit_per_layer_config = False
    # every overridden key's global value (the explicit serialization also lists keys a layer sets to the global
    # value, e.g. Dots3's head_dim, outside per_layer_attributes)
    keys = set(text.per_layer_attributes).union(*overrides.values())
    glob = {k: text._getattr_without_heterogeneous_validation(k) for k in keys}
    text.per_layer_config = None
    return overrides, glob


def _put_per_layer_overrides(text, default_types, overrides: dict, glob: dict):
    """Per-layer overrides of the kept layers (layer ``i`` of the tiny model stands for the first layer of its
    kind in the default), each size scaled like its global value: e.g. Gemma 4's 512-wide full-attention heads
    (global 256) become 32 wide (global 16)."""
    kinds = getattr(text, "layer_types", None)
    reps = list(range(text.num_hidden_layers))
    if isinstance(kinds, list) and isinstance(default_types, list):
        reps = [default_types.index(k) for k in kinds]
    out = {}
    for i, rep in enumerate(reps):
        layer = {}
        for k, v in overrides.get(rep, {}).items():
            tiny, ref = getattr(text, k, None), glob.get(k)
            if (isinstance(v, int) and not isinstance(v, bool) and isinstance(tiny, int) and isinstance(ref, int)
                    and ref):
                v = max(1, round(tiny * v / ref))
            layer[k] = v
        # MLA layers whose head_dim is the query/key width in the default keep it so: the no-rotary part fills
        # the head (Dots3's sliding-window layers: 192 + 64 = 256)
        full = {**glob, **overrides.get(rep, {})}
        if "head_dim" in full and full.get("head_dim") == full.get("qk_nope_head_dim", 0) + full.get(
                "qk_rope_head_dim", 0):
            layer["qk_nope_head_dim"] = layer.get("head_dim", text.head_dim) - layer.get(
                "qk_rope_head_dim", text.qk_rope_head_dim)
        layer = {k: v for k, v in layer.items() if v != getattr(text, k, None)}
        if layer:
            out[i] = layer
    if out:
        text.per_layer_config = out


def _fit_vision_readout(cfg):
    """Settings that read the tower's output by layer or patch count, fitted to the tiny tower (2 layers, 4x4
    patches): feature-layer indices clamped to the layers there are (decoder-layer targets to the tiny decoder's),
    pooled token counts, patch-count keyed query tables (Gemma 3's mm_tokens_per_image, Aria's
    projector_patch_to_query_dict) and projector windows resized."""
    from transformers import PretrainedConfig

    vc = _vision(cfg)
    layers = getattr(vc, "num_hidden_layers", None) if vc is not None else None
    for c in [cfg] + [getattr(cfg, n, None) for n in (getattr(cfg, "sub_configs", None) or {})]:
        if not isinstance(c, PretrainedConfig) or not isinstance(layers, int):
            continue
        fit = lambda i: max(-(layers + 1), min(layers, i))     # noqa: E731 - hidden states: embeddings + layers
        for key in ("vision_feature_layer", "vision_feature_layers"):
            val = getattr(c, key, None)
            if isinstance(val, int) and not isinstance(val, bool):
                setattr(c, key, fit(val))
            elif isinstance(val, (list, tuple)) and all(isinstance(i, int) for i in val):
                setattr(c, key, [fit(i) for i in val])
        # Granite Vision 4: deepstack [tower layer, decoder layer] pairs and the decoder layers of its spatial
        # projections, within the tiny tower and decoder (pairs aimed past the last decoder layer go to the last)
        last = getattr(cfg.get_text_config(decoder=True), "num_hidden_layers", 0) - 1
        if isinstance(getattr(c, "deepstack_layer_map", None), (list, tuple)):
            c.deepstack_layer_map = [(fit(v), min(t, last)) for v, t in c.deepstack_layer_map]
        if isinstance(getattr(c, "spatial_target_layers", None), (list, tuple)):
            c.spatial_target_layers = [min(t, last) for t in c.spatial_target_layers]
        idx = getattr(c, "global_attn_indexes", None)            # SAM towers: their global-attention layers
        if isinstance(idx, (list, tuple)) and isinstance(getattr(c, "num_hidden_layers", None), int):
            c.global_attn_indexes = sorted({min(i, c.num_hidden_layers - 1) for i in idx})
    size, patch = _int(vc, "image_size"), _int(vc, "patch_size")
    if not (isinstance(size, int) and isinstance(patch, int) and size % patch == 0):
        return
    side = size // patch
    if isinstance(getattr(cfg, "mm_tokens_per_image", None), int) and cfg.mm_tokens_per_image > side * side:
        cfg.mm_tokens_per_image = (side // 2) ** 2                          # 2x2 pooling of the 4x4 patches
    if isinstance(getattr(cfg, "image_grid_pinpoints", None), list):           # any-resolution tiling: one tile
        cfg.image_grid_pinpoints = [[size, size]]
    rate = getattr(cfg, "downsample_rate", None)
    if isinstance(rate, str) and "/" in rate:
        # Granite Vision 4's Window Q-Former: q x q queries per w x w-patch window; the window within the tiny side
        q, w = (int(x) for x in rate.split("/"))
        while (w > side or side % w) and q % 2 == 0 and w % 2 == 0:
            q, w = q // 2, w // 2
        cfg.downsample_rate = f"{q}/{w}"
    if isinstance(getattr(cfg, "projector_patch_to_query_dict", None), dict):
        cfg.projector_patch_to_query_dict = {side * side: side}
        _set(cfg, "max_value_projector_patch_to_query_dict", side)


def _fit_rope_sections(cfg, text):
    """Multi-axis (M-RoPE) sections must sum to half the rotary dimension: scale the model's sections (the
    config's, any number of axes, else the three-axis default its rotary embedding falls back to) down to the
    tiny head size."""
    import importlib
    import inspect
    import re

    try:
        src = inspect.getsource(importlib.import_module(type(text).__module__.replace(".configuration_", ".modeling_")))
    except (ImportError, OSError, TypeError):
        return
    found = re.search(r"mrope_section\"?\]?,? *\[(\d+), *(\d+), *(\d+)\]", src)
    rope = getattr(text, "rope_parameters", None)
    if not rope or not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        return
    default = rope.get("mrope_section") or (found and [int(x) for x in found.groups()])
    if not default:
        return
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None)) or 1.0
    half = int(head_dim * partial) // 2
    share = [half * d / sum(default) for d in default]
    sections = [max(1, int(x)) for x in share]
    while sum(sections) < half:            # the largest shortfalls first
        i = max(range(len(share)), key=lambda j: share[j] - sections[j])
        sections[i] += 1
    while sum(sections) > half:
        sections[sections.index(max(sections))] -= 1
    text.rope_parameters = {**rope, "mrope_section": sections}


def build_tiny(model_type: str, class_name: str, seed: int = 0, attn_implementation="sdpa", device=None):
    """Tiny random model of ``model_type`` (``eval()``); ``device="meta"`` builds the structure only."""
    import transformers

    cfg = tiny_config(model_type)
    cls = getattr(transformers, class_name)
    torch.manual_seed(seed)
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx, contextlib.redirect_stdout(io.StringIO()):
        try:
            model = cls._from_config(cfg, attn_implementation=attn_implementation)
        except ValueError as e:       # some towers have no SDPA path: the class default, text switched below
            if "does not support an attention implementation" not in str(e):
                raise
            model = cls._from_config(cfg, attn_implementation="eager")
    if device != "meta":
        with torch.no_grad():      # random init leaves some projectors at zero (images would be ignored)
            for name, p in model.named_parameters():
                if p.dim() >= 2 and not p.any() and ("proj" in name or "embed" in name):
                    torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def _shrink_vision_image(cfg):
    """Vision towers of fixed input size: 4x4 patches (keeps the sequences short), or 4x4 tokens after the
    tower's own pixel shuffle (Granite Docling's ``scale_factor``)."""
    from transformers import PretrainedConfig

    for name in getattr(cfg, "sub_configs", None) or {}:
        sub = getattr(cfg, name, None)
        if not isinstance(sub, PretrainedConfig) or sub is cfg.get_text_config(decoder=True):
            continue
        size, patch = getattr(sub, "image_size", None), getattr(sub, "patch_size", None)
        shuffle = getattr(sub, "scale_factor", None)
        shuffle = shuffle if isinstance(shuffle, int) and not isinstance(shuffle, bool) and shuffle > 1 else 1
        if isinstance(size, int) and isinstance(patch, int) and not hasattr(sub, "temporal_patch_size"):
            try:
                sub.image_size = patch * 4 * shuffle
            except (AttributeError, TypeError, ValueError):
                pass


def _vision(cfg):
    for name in ("vision_config", "visual_config", "vision_tower_config"):
        sub = getattr(cfg, name, None)
        if sub is not None:
            return sub
    return None


def _int(vc, *names, default=None):
    for name in names:
        val = getattr(vc, name, None)
        if isinstance(val, (list, tuple)) and val and isinstance(val[0], int):
            val = val[0]
        if isinstance(val, int) and not isinstance(val, bool):
            return val
    return default


def _hand_built_layouts(model, n_images: int, g):
    """Candidate image inputs built from the vision config alone (the first layouts tried)."""
    vc, vq = _vision(model.config), _image_vq(model.config)
    if vc is None and vq is None:
        p, c = _int(model.config, "patch_size"), _int(model.config, "num_channels", default=3)
        if isinstance(p, int):    # no vision tower: patches linearly embedded by the model (Fuyu), 16 per image
            yield {"pixel_values": torch.randn(n_images, 16, c * p * p, generator=g)}
        return
    vc = vc if vc is not None else vq          # a VQ-VAE image tokenizer: images of a 4x4 code grid
    c = _int(vc, "num_channels", "in_channels", "in_chans", default=3)
    p = _int(vc, "patch_size", "spatial_patch_size")
    size = _int(vc, "image_size", default=_vq_image_side(vq) if vq is not None else None)
    params = _image_feature_params(model)
    if "image_grid_thw" in params and isinstance(p, int):
        # flattened patches of a 4x4 (merged: 2x2) grid per image; the row width depends on the tower
        m = _int(vc, "spatial_merge_size", "merge_size", "merge_kernel_size", default=1)
        tp = _int(vc, "temporal_patch_size", "patch_temporal", default=1)
        h = w = 4 if m <= 2 else 2 * m
        thw = torch.tensor([[1, h, w]] * n_images)
        rows = n_images * h * w
        side = {"image_merge_sizes": torch.tensor([max(m, 1)] * n_images)} if "image_merge_sizes" in params else {}
        for width in dict.fromkeys((c * tp * p * p, c * p * p)):
            yield {"pixel_values": torch.randn(rows, width, generator=g), "image_grid_thw": thw, **side}
        yield {"pixel_values": torch.randn(rows, c, p, p, generator=g), "image_grid_thw": thw, **side}
        # one row per merged token, its m x m patches as one channels-last pixel block, the grid counted in merged
        # tokens (Inkling 2)
        yield {"pixel_values": torch.randn(rows, m * p, m * p, c, generator=g), "image_grid_thw": thw, **side}
    if "spatial_shapes" in params and isinstance(p, int):
        # NaViT-style towers (SigLIP 2): padded patch sequences, their 4x4 grids and patch masks
        yield {"pixel_values": torch.randn(n_images, 16, c * p * p, generator=g),
               "spatial_shapes": torch.tensor([[4, 4]] * n_images),
               "pixel_attention_mask": torch.ones(n_images, 16, dtype=torch.long)}
    if "image_position_ids" in params and isinstance(p, int):
        # encoder-free patch embedders (Gemma 4 unified): one row per merged k x k patch block, flattened raw
        # pixels, with its (x, y) position on a 4x4 grid
        k = _int(vc, "pooling_kernel_size", default=1)
        ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        pos = torch.stack([xs.flatten(), ys.flatten()], -1)
        yield {"pixel_values": torch.randn(n_images, 16, c * (p * k) ** 2, generator=g),
               "image_position_ids": pos.expand(n_images, 16, 2).clone()}
    if "image_token_pooling" in params and isinstance(p, int):
        # Molmo 2: one crop of 4x4 flattened patches per image; each image token pools a 2x2 block of them
        # (image_token_pooling: indices into that image's patches), image_grids [2, 2, 0, 0]: a 2x2 grid of pooled
        # tokens at one resolution and none at the other
        r, q = torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")
        corner = (8 * r + 2 * q).flatten()[:, None]
        pooling = corner + torch.tensor([0, 1, 4, 5])
        yield {"pixel_values": torch.randn(n_images, 16, c * p * p, generator=g),
               "image_token_pooling": pooling.repeat(n_images, 1),
               "image_grids": torch.tensor([[2, 2, 0, 0]] * n_images),
               "image_num_crops": torch.ones(n_images, dtype=torch.long)}
    tp = _int(vc, "temporal_patch_size")
    if not isinstance(size, int):
        if isinstance(p, int) and isinstance(tp, int) and "image_grid_thw" not in params:
            # towers that embed each patch into one token, no grid (Inkling): 16 channels-last [t, p, p, c] patches
            yield {"pixel_values": torch.randn(n_images * 16, tp, p, p, c, generator=g)}
        down = _int(vc, "spatial_scale_factor")
        if isinstance(down, int):
            # convolutional image tokenizers of any input size (Apertus 1.5's VQ encoder): a 4x4-code image, its size
            side = 4 * down
            yield {"pixel_values": torch.randn(n_images, c, side, side, generator=g),
                   "image_sizes": torch.tensor([[side, side]] * n_images)}
        return
    pix = torch.randn(n_images, c, size, size, generator=g)
    sizes = torch.tensor([[size, size]] * n_images)
    high = getattr(model.config, "high_res_vision_config", None)
    if "high_res_pixel_values" in params and isinstance(getattr(high, "image_size", None), int):
        # a second, high-resolution tower (DeepSeek-VL hybrid's SAM encoder) sees the same image at its size
        yield {"pixel_values": pix, "high_res_pixel_values": torch.randn(n_images, c, high.image_size,
                                                                          high.image_size, generator=g)}
    yield {"pixel_values": pix}
    yield {"pixel_values": pix, "image_sizes": sizes}
    yield {"pixel_values": pix[:, None], "image_sizes": sizes}
    yield {"pixel_values": pix[:, None]}
    # any-resolution towers: the base view and one tile (image_grid_pinpoints of one tile, see tiny_config)
    yield {"pixel_values": torch.stack([pix, pix.flip(-1)], 1), "image_sizes": sizes}
    # tiled towers: one tile per image, with its all-valid pixel mask, or (Granite Docling) its real-tile mask
    yield {"pixel_values": pix[:, None], "pixel_attention_mask": torch.ones(n_images, 1, size, size, dtype=torch.bool)}
    yield {"pixel_values": pix[:, None], "pixel_attention_mask": torch.ones(n_images, 1, dtype=torch.bool)}


def _processor_layouts(model, n_images: int, g):
    """Candidate image inputs made by the model type's own image processor class (defaults, no hub files) from a
    small random image: at its default output size, and without resizing / tiling at the tower's input size."""
    import transformers
    from transformers.utils import is_torchvision_available

    names = _processor_names(model)
    name = names.get("torchvision") if is_torchvision_available() else None
    name = name or names.get("pil")
    if name is None:
        return
    cls = getattr(transformers, name)
    vc = _vision(model.config)
    ip = cls()
    side = _int(vc, "image_size", default=None) if vc is not None else None
    p = _int(ip, "patch_size") or (_int(vc, "patch_size", default=14) if vc is not None else 14)
    m = _int(ip, "merge_size", "spatial_merge_size", "pooling_kernel_size") or (
        _int(vc, "spatial_merge_size", "merge_size", "pooling_kernel_size", default=1) if vc is not None else 1)
    side = side or 4 * p * max(1, m)          # 4x4 merged / pooled tokens
    img = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    for kwargs in ({"do_resize": False, "do_center_crop": False, "do_image_splitting": False, "do_pad": False},
                   {}):
        ip = cls()
        call = {k: v for k, v in kwargs.items() if hasattr(ip, k)}
        out = ip(images=[img] * n_images, return_tensors="pt", **call)
        yield {k: v for k, v in out.items() if torch.is_tensor(v)}


def _last_layouts(model, n_images: int, g):
    """Candidate image inputs tried after the processor's: SAM-then-encoder towers (Unlimited-OCR) get the global
    view at the SAM encoder's input size (see ``_TINY_FITS``), no local tiles."""
    vc = _vision(model.config)
    sam = _int(getattr(vc, "sam_config", None), "image_size")
    if isinstance(sam, int):
        c = _int(vc.sam_config, "num_channels", default=3)
        yield {"pixel_values": torch.randn(n_images, c, sam, sam, generator=g)}


def _image_feature_params(model) -> set:
    """Named arguments of ``get_image_features`` (the wrapper's and its inner model's, which some wrappers pass
    through ``**kwargs``: VideoLLaMA 3's image_merge_sizes)."""
    import inspect

    out = set()
    for owner in (model, getattr(model, "model", None)):
        fn = getattr(owner, "get_image_features", None)
        if fn is not None:
            out |= {n for n, prm in inspect.signature(fn).parameters.items() if prm.kind != prm.VAR_KEYWORD}
    return out


def _image_feature_fn(model):
    """The model's ``get_image_features`` (on the wrapper, else on its inner ``model``)."""
    for owner in (model, getattr(model, "model", None)):
        fn = getattr(owner, "get_image_features", None)
        if fn is not None:
            return fn
    return None


def tiny_image_batch(model, n_images: int, seed: int = 0) -> dict:
    """Image inputs for ``n_images`` images (one per sample) that the model's own ``get_image_features`` accepts:
    hand-built layouts from the vision config first, then the outputs of the type's image processor class, then
    :func:`_last_layouts`."""
    g = torch.Generator().manual_seed(seed)
    if _vision(model.config) is None and not _processor_names(model):
        raise ValueError(f"{type(model.config).__name__} has no vision_config")
    errors = []
    for layouts in (_hand_built_layouts, _processor_layouts, _last_layouts):
        try:
            for v in layouts(model, n_images, g):
                try:
                    image_token_count(model, v, n_images)
                    return v
                except Exception as e:  # noqa: BLE001 - the next layout is tried; all failures are reported below
                    errors.append(f"{sorted(v)} {tuple(v['pixel_values'].shape)}: {type(e).__name__}: {str(e)[:100]}")
        except Exception as e:  # noqa: BLE001 - a processor that cannot run here: reported below
            errors.append(f"{layouts.__name__}: {type(e).__name__}: {str(e).strip()[:100]}")
    raise ValueError(f"no image input layout fits {type(model).__name__}: " + " | ".join(errors))


def _processor_names(model) -> dict:
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    return IMAGE_PROCESSOR_MAPPING_NAMES.get(model.config.model_type) or {}


def image_token_count(model, image_inputs: dict, n_images: int) -> int:
    """Image placeholder tokens per image: the text-hidden rows of the model's own ``get_image_features``."""
    hidden = int(model.config.get_text_config(decoder=True).hidden_size)
    fn = _image_feature_fn(model)
    params = _image_feature_params(model)
    with torch.no_grad():
        out = fn(**{k: v for k, v in image_inputs.items() if k in params})
    feats = getattr(out, "pooler_output", None)
    deepstack = getattr(out, "deepstack_features", None)
    if feats is None and isinstance(deepstack, (list, tuple)) and deepstack:
        feats = deepstack[0][1]      # Granite Vision 4: only (decoder layer, per-image features) pairs, one per layer
    if feats is None:
        feats = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    numel = sum(f.numel() for f in feats) if isinstance(feats, (list, tuple)) else feats.numel()
    total = numel // hidden
    if total % n_images:
        raise ValueError(f"{total} image features for {n_images} images")
    return total // n_images


def tiny_any_inputs(model, prompt_lengths: list, seed: int = 0, image_inputs: dict | None = None) -> dict:
    """Left-padded batch: per sample ``[bos, t, t, (start), image x n, (end), text x prompt_lengths[b]]``."""
    from .adapters.generic import _END_ATTRS, _START_ATTRS, _first_attr, config_image_token_id

    cfg = model.config
    B = len(prompt_lengths)
    image_inputs = image_inputs if image_inputs is not None else tiny_image_batch(model, B, seed)
    n = image_token_count(model, image_inputs, B)
    img = config_image_token_id(cfg)
    start, end = _first_attr(cfg, _START_ATTRS), _first_attr(cfg, _END_ATTRS)
    special = {v for k, v in cfg.to_dict().items() if isinstance(v, int) and k.endswith(("_id", "_index"))}
    special |= {v for k, v in cfg.get_text_config(decoder=True).to_dict().items()
                if isinstance(v, int) and k.endswith(("_id", "_index"))}
    pool = torch.tensor([i for i in range(5, 390) if i not in special])
    g = torch.Generator().manual_seed(seed)
    rows = []
    for L in prompt_lengths:
        pre = pool[torch.randint(len(pool), (2,), generator=g)].tolist()
        block = ([start] if start is not None else []) + [img] * n + ([end] if end is not None else [])
        text = pool[torch.randint(len(pool), (L,), generator=g)].tolist()
        rows.append(pre + block + text)
    T = max(len(r) for r in rows)
    pad = getattr(cfg.get_text_config(decoder=True), "pad_token_id", None)
    pad = pad if isinstance(pad, int) and pad < VOCAB else 0
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    out = {"input_ids": ids, "attention_mask": mask, **{k: v for k, v in image_inputs.items() if k in accepted}}
    # image-token types (1 = image), as the processors of grid-based models return them (Molmo 2's prefill then lets
    # its image tokens attend to each other both ways)
    if ("image_grid_thw" in image_inputs or "image_grids" in image_inputs) and "mm_token_type_ids" in accepted:
        out["mm_token_type_ids"] = (ids == img).int()
    return out
