"""Tiny random-weight models of *any* image-text-to-text model type, built from its default config offline.

Used by the model-type sweep test and by ``scripts/coverage_table.py``. :func:`tiny_config` shrinks every
sub-config of a type's default config (2 text layers, hidden 64, 4 query / 2 KV heads, 2-layer 32-wide vision
towers, 512-token vocabulary with every special-token id remapped below it); :func:`tiny_image_inputs` builds a
left-padded batch by hand: pixel values shaped for the vision tower, the number of image placeholder tokens
read from the model's own ``get_image_features`` output, start/end markers where the config names them.
"""

from __future__ import annotations

import contextlib
import io

import torch

VOCAB = 512
_TEXT = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, max_position_embeddings=2048,
             first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=16, linear_value_head_dim=16, hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB)
_VISION = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, depth=2,
               embed_dim=32, num_heads=2, num_key_value_heads=2, head_dim=16)


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


def _remap_ids(cfg, nxt):
    for k, v in list(cfg.to_dict().items()):
        if isinstance(v, bool) or not isinstance(v, int) or v < VOCAB:
            continue
        if k.endswith(("_token_id", "_token_index", "token_id")):
            try:
                setattr(cfg, k, nxt[0])
                nxt[0] += 1
            except (AttributeError, TypeError, ValueError):
                pass


def tiny_config(model_type: str):
    """The default config of ``model_type`` shrunk to a tiny model (see the module docstring)."""
    from transformers import AutoConfig, PretrainedConfig

    cfg = AutoConfig.for_model(model_type)
    text = cfg.get_text_config(decoder=True)
    text_hidden = 64
    subs = [getattr(cfg, name, None) for name in (getattr(cfg, "sub_configs", None) or {})]
    subs = [s for s in subs if isinstance(s, PretrainedConfig)]
    for sub in subs:
        _shrink(sub, sub is text, text_hidden)
    if text is cfg:
        _shrink(cfg, True)
    nxt = [400]
    for c in [cfg] + subs:
        _remap_ids(c, nxt)
    _shrink_vision_image(cfg)
    return cfg


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
    """Vision towers of fixed input size: 4x4 patches (keeps the sequences short)."""
    from transformers import PretrainedConfig

    for name in getattr(cfg, "sub_configs", None) or {}:
        sub = getattr(cfg, name, None)
        if not isinstance(sub, PretrainedConfig) or sub is cfg.get_text_config(decoder=True):
            continue
        size, patch = getattr(sub, "image_size", None), getattr(sub, "patch_size", None)
        if isinstance(size, int) and isinstance(patch, int) and not hasattr(sub, "temporal_patch_size"):
            try:
                sub.image_size = patch * 4
            except (AttributeError, TypeError, ValueError):
                pass


def _vision(cfg):
    for name in ("vision_config", "visual_config", "vision_tower_config"):
        sub = getattr(cfg, name, None)
        if sub is not None:
            return sub
    return None


def tiny_image_batch(model, n_images: int, seed: int = 0) -> dict:
    """Image inputs for ``n_images`` images (one per sample), shaped for ``model``'s vision tower."""
    g = torch.Generator().manual_seed(seed)
    vc = _vision(model.config)
    if vc is None:
        raise ValueError(f"{type(model.config).__name__} has no vision_config")
    if hasattr(vc, "temporal_patch_size") and hasattr(vc, "spatial_merge_size"):
        p, tp, m = int(vc.patch_size), int(vc.temporal_patch_size), int(vc.spatial_merge_size)
        c = int(getattr(vc, "in_channels", getattr(vc, "num_channels", 3)))
        h = w = 2 * m
        return {"pixel_values": torch.randn(n_images * h * w, c * tp * p * p, generator=g),
                "image_grid_thw": torch.tensor([[1, h, w]] * n_images)}
    size = getattr(vc, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"{type(vc).__name__} has no fixed image_size")
    c = int(getattr(vc, "num_channels", 3) or 3)
    pix = torch.randn(n_images, c, size, size, generator=g)
    sizes = torch.tensor([[size, size]] * n_images)
    variants = [{"pixel_values": pix}, {"pixel_values": pix, "image_sizes": sizes},
                {"pixel_values": pix[:, None], "image_sizes": sizes}, {"pixel_values": pix[:, None]}]
    errors = []
    for v in variants:       # the first layout the model's own get_image_features accepts
        try:
            image_token_count(model, v, n_images)
            return v
        except Exception as e:  # noqa: BLE001 - the next layout is tried; all failures are reported below
            errors.append(f"{sorted(v)} {tuple(v['pixel_values'].shape)}: {type(e).__name__}: {str(e)[:100]}")
    raise ValueError(f"no hand-built image input layout fits {type(model).__name__}: " + " | ".join(errors))


def image_token_count(model, image_inputs: dict, n_images: int) -> int:
    """Image placeholder tokens per image: the text-hidden rows of the model's own ``get_image_features``."""
    hidden = int(model.config.get_text_config(decoder=True).hidden_size)
    with torch.no_grad():
        out = model.get_image_features(**image_inputs)
    feats = getattr(out, "pooler_output", None)
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
    pad = cfg.get_text_config(decoder=True).pad_token_id
    pad = pad if isinstance(pad, int) and pad < VOCAB else 0
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    out = {"input_ids": ids, "attention_mask": mask, **{k: v for k, v in image_inputs.items() if k in accepted}}
    if "image_grid_thw" in image_inputs and "mm_token_type_ids" in accepted:
        out["mm_token_type_ids"] = (ids == img).int()
    return out
