"""Shared helpers of the grounding tests (measure, calibrate): the VGMED-schema fixture and a tiny Qwen2-VL
processor that can be built without torchvision."""

import os
from unittest import mock

from hf_vgrefine.testing import tiny_processor

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "grounding")


def family_processor(family):
    """Tiny processor of ``family``; the torchvision-only video-processor class check is skipped for ``None`` (as in
    :func:`qwen_processor`)."""
    try:
        return tiny_processor(family)
    except (AttributeError, RuntimeError):
        from transformers.processing_utils import ProcessorMixin

        orig = ProcessorMixin.check_argument_for_proper_class

        def check(self, name, arg):
            return None if arg is None else orig(self, name, arg)

        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
            return tiny_processor(family)


def qwen_processor():
    """Tiny Qwen2-VL processor; without torchvision transformers 5.x fails its class check of the absent
    video processor (``VIDEO_PROCESSOR_MAPPING._extra_content``), so that check is skipped for ``None``."""
    try:
        return tiny_processor("qwen2_vl")
    except (AttributeError, RuntimeError):
        from transformers.processing_utils import ProcessorMixin

        orig = ProcessorMixin.check_argument_for_proper_class

        def check(self, name, arg):
            return None if arg is None else orig(self, name, arg)

        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
            return tiny_processor("qwen2_vl")


def load_fixture():
    from datasets import load_dataset

    return load_dataset(FIXTURE, split="test")


# ------------------------------------------------------------------ independent grounding reference
# Written from the method's definitions only (docs/method.md): prompts rendered here with the processor's chat
# template, two full eager forwards with output_attentions, image positions from input_ids, the box cover rule on
# the pad-to-square canvas of a LLaVA processor, and the attention ratio's formula. No hf_vgrefine function is used.
SUFFIX = "Answer the question using a single word or phrase."
GENERIC = "Write a general description of the image."


def _eager_last_row_maps(model, processor, images, texts):
    """Per sample: float64 [L, H, N] last-token attention to the image tokens (eager, full forward)."""
    import torch

    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
        add_generation_prompt=True, tokenize=False) for t in texts]
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        inputs = processor(images=[im.convert("RGB") for im in images], text=prompts, padding=True,
                           return_tensors="pt")
    finally:
        tok.padding_side = side
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            att = model(**inputs, output_attentions=True).attentions          # per layer [B, H, T, T]
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    out = []
    for b, row in enumerate(inputs["input_ids"]):
        pos = (row == model.config.image_token_id).nonzero().flatten()
        out.append(torch.stack([a[b, :, -1, pos] for a in att]).double().numpy())
    return out


def eager_relative_maps(model, processor, examples, per_head=False, eps=1e-10, batch_size=16):
    """Relative maps of ``examples`` (dicts with ``image``, ``question``): question ÷ generic prompt, last token.

    ``per_head=False``: layer-mean maps ``[S, L, N]`` (``mean_h q / (mean_h g + eps)``); ``True``: per-head maps
    ``[S, L, H, N]`` normalised by the same head's generic map."""
    import numpy as np

    out = []
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        imgs = [e["image"] for e in batch]
        q = _eager_last_row_maps(model, processor, imgs, [f"{str(e['question']).strip()} {SUFFIX}" for e in batch])
        g = _eager_last_row_maps(model, processor, imgs, [f"{GENERIC} {SUFFIX}"] * len(batch))
        for qb, gb in zip(q, g):
            out.append(qb / (gb + eps) if per_head else qb.mean(1) / (gb.mean(1) + eps))
    return np.stack(out)


def padded_box_cover(boxes, image_size, side):
    """Flat bool [side*side] token mask of xywh ``boxes`` for a processor that pads the image to a square
    (offset ``(S - W) // 2``, ``(S - H) // 2``) and maps it onto ``side x side`` tokens: every cell a box touches."""
    import math

    import numpy as np

    W, H = image_size
    S = max(W, H)
    ox, oy = (S - W) // 2, (S - H) // 2
    cell = S / side
    mask = np.zeros((side, side), bool)
    for x, y, w, h in boxes:
        c0, c1 = max(math.floor((x + ox) / cell), 0), min(math.ceil((x + w + ox) / cell), side)
        r0, r1 = max(math.floor((y + oy) / cell), 0), min(math.ceil((y + h + oy) / cell), side)
        mask[r0:r1, c0:c1] = True
    return mask.reshape(-1)


def attention_ratio_by_hand(m, region):
    """Mean of ``m`` inside the region over the mean everywhere (the reference constant 1e-8 included)."""
    m = [float(v) for v in m]
    inside = [v for v, r in zip(m, region) if r]
    return sum(inside) / ((sum(m) / len(m)) * len(inside) + 1e-8)


def yes_no_correct(logits, data, yes, no):
    """Per example: the last-position logit of "yes" vs "no" gives the example's answer ([B, vocab] logits)."""
    return [("yes" if logits[i, yes] > logits[i, no] else "no") == d["answer"] for i, d in enumerate(data)]


def assert_search_rows_equal_the_wrapper(model, proc, data, res, sensitive_heads, yes, no):
    """Every row of a knockout search equals a fresh :class:`VGRefineWrapper` forward with that row's masked
    layers and percentile (the wrapper is the independent path; the search shares a cached prefix)."""
    import torch

    from hf_vgrefine.prompts import build_inputs, to_model_inputs
    from hf_vgrefine.vgrefine import VGRefineConfig, VGRefineWrapper

    for r in res.table:
        cfg = VGRefineConfig(masked_layers=list(r["masked_layers"]), sensitive_heads=sensitive_heads,
                             percentile=r["percentile"])
        w = VGRefineWrapper(model, cfg, processor=proc)
        inp = to_model_inputs(build_inputs(proc, [d["image"] for d in data], [d["question"] for d in data],
                                           instruction=cfg.instruction), model)
        with torch.no_grad():
            logits = w(**inp).logits[:, -1]
        assert res.per_example[r["label"]] == yes_no_correct(logits, data, yes, no), r["label"]


def image_positions(model, inputs):
    """Per sample: (image-grid positions, first position after the image's tokens), read from ``input_ids`` and
    the config (not from the adapter under test). LLaVA-NeXT/OneVision: the base block = the first side**2 image
    tokens; InternVL: the stretched image = the last tile (the thumbnail when tiled)."""
    cfg = model.config
    out = []
    for row in inputs["input_ids"]:
        all_pos = (row == cfg.image_token_id).nonzero().flatten()
        pos = all_pos
        if cfg.model_type in ("llava_next", "llava_onevision"):
            side = cfg.vision_config.image_size // cfg.vision_config.patch_size
            pos = pos[: side * side]
        if cfg.model_type == "internvl":
            side = int(cfg.vision_config.image_size[0] * cfg.downsample_ratio) // cfg.vision_config.patch_size[0]
            pos = pos[-side * side:]
        out.append((pos, int(all_pos[-1]) + 1))
    return out


# ------------------------------------------------------------------ eager knockout reference
_REF = {}


def _causal_additive(B, q, kv):
    """Additive causal mask ``[B, 1, q, kv]`` of ``q`` rows ending at key ``kv - 1`` (0 allowed, -inf not)."""
    import torch

    causal = torch.ones(q, kv, dtype=torch.bool).tril(kv - q)
    return torch.zeros(B, 1, q, kv).masked_fill(~causal, float("-inf"))


def _ref_attention(module, query, key, value, attention_mask, **kw):
    """Eager attention with the reference knockout: in the spec's layers, rows at or after each sample's image
    end get -inf on its blocked key positions (prefill only unless ``all_steps``; ``fresh``: a new causal mask
    replaces the layer's own, as the released code does)."""
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    spec = _REF.get("spec")
    q, kv = query.shape[2], key.shape[2]
    indices = kw.pop("indices", None)
    if indices is not None:
        # sparse-attention models (Mistral Large 4, GLM-5) mask the unselected keys themselves for eager/SDPA only
        # and pass other attention functions the selected ``indices`` [B, q, top-k]: mask here as their eager path
        B = query.shape[0]
        if attention_mask is None:
            attention_mask = _causal_additive(B, q, kv)
        m = attention_mask[..., :kv].expand(B, 1, q, kv).clone()
        for bb in range(B):
            for r in range(q):
                drop = sorted(set(range(kv)) - set(indices[bb, r].tolist()))
                m[bb, 0, r, drop] = float("-inf")
        attention_mask = m
    if spec is not None and getattr(module, "layer_idx", None) in spec["layers"] and (q > 1 or spec["all_steps"]):
        B = query.shape[0]
        rep = B // len(spec["blocked"])
        if attention_mask is None or spec["fresh"]:
            attention_mask = _causal_additive(B, q, kv)
        m = attention_mask[..., :kv].expand(B, 1, q, kv).clone()
        for bb in range(B):
            pos, v_end = spec["blocked"][bb // rep]
            for r in range(q):
                if kv - q + r >= v_end:
                    m[bb, 0, r, pos] = float("-inf")
        attention_mask = m
    bias = kw.pop("position_bias", None)
    if bias is not None:
        # an additive position bias (Inkling's relative logits), added to the scaled logits as the model's eager path
        # adds it: folded into the additive mask
        B = query.shape[0]
        if attention_mask is None:
            attention_mask = _causal_additive(B, q, kv)
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape).masked_fill(~attention_mask, float("-inf"))
        attention_mask = attention_mask[..., :kv] + bias[..., :kv]
    sinks = kw.pop("s_aux", None)
    sinks = kw.pop("sinks", None) if sinks is None else sinks
    if sinks is not None:
        # attention sinks (HunYuan V4: one logit per head; Inkling 2: one per query row), as those models' eager
        # paths apply them: one more logit in each row's softmax, with no value
        B, H = query.shape[:2]
        rep = H // key.shape[1]
        k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        w = torch.matmul(query, k.transpose(2, 3)) * kw["scaling"]
        if attention_mask is not None:
            w = w + attention_mask[..., :kv]
        s = sinks.reshape(1, H, 1, 1).expand(B, H, q, 1) if sinks.dim() == 1 else sinks
        p = torch.cat([w, s.to(w.dtype)], -1).float().softmax(-1)[..., :-1].to(query.dtype)
        return torch.matmul(p, v).transpose(1, 2).contiguous(), p
    missing = not hasattr(module, "num_key_value_groups")    # Persimmon (Fuyu) names no KV-head grouping
    if missing:
        module.num_key_value_groups = query.shape[1] // key.shape[1]
    try:
        return eager_attention_forward(module, query, key, value, attention_mask, **kw)
    finally:
        if missing:
            del module.num_key_value_groups


class RefModel:
    """Context: the model's text decoder runs the reference knockout above with ``blocked = [(positions, v_end)]``
    per sample. ``target(name)``: the ``set_attn_implementation`` argument (default ``{"text_config": name}``)."""

    def __init__(self, model, blocked, layers, all_steps=False, fresh=False, target=None):
        self.model, self.spec = model, {"blocked": blocked, "layers": layers, "all_steps": all_steps, "fresh": fresh}
        self.target = target or (lambda name: {"text_config": name})

    def __enter__(self):
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import eager_mask

        AttentionInterface.register("test_ref_knockout", _ref_attention)
        AttentionMaskInterface.register("test_ref_knockout", eager_mask)
        _REF["spec"] = self.spec
        self._before = self.model.config.get_text_config(decoder=True)._attn_implementation
        self.model.set_attn_implementation(self.target("test_ref_knockout"))
        return self.model

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.target(self._before))    # sdpa, or eager where it has none
        _REF.clear()


# ------------------------------------------------------------------ hybrid models (Qwen 3.5)
def attention_layers(model):
    """Decoder layers with softmax attention, read from the text config's ``layer_types`` (not from the adapter under
    test): every layer, except the linear-attention layers of hybrid models."""
    tc = model.config.get_text_config(decoder=True)
    kinds = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    return [i for i, k in enumerate(kinds[: tc.num_hidden_layers]) if k != "linear_attention"]


def per_layer(model, attentions):
    """Eager ``output_attentions`` (one map per softmax-attention layer) as a list indexed by decoder layer, ``None``
    at the linear-attention layers of a hybrid model."""
    attn = attention_layers(model)
    assert len(attentions) == len(attn), (len(attentions), attn)
    got = dict(zip(attn, attentions))
    return [got.get(l) for l in range(model.config.get_text_config(decoder=True).num_hidden_layers)]
