"""Attention capture and logit bias vs independent eager references, on tiny random models of every family (hybrid
Qwen 3.5: its softmax-attention layers, read from the config's ``layer_types``)."""

import math

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from _grounding_fixtures import attention_layers, image_positions, per_layer

from hf_vgrefine.adapters import get_adapter
from hf_vgrefine.attention import AttentionProbe, KeyBias, capture_image_attention
from hf_vgrefine.testing import FAMILIES, build_tiny_model, tiny_inputs

# different image sizes per sample where the family allows it
GRIDS = {"llava_next": [(40, 70), (60, 30), (28, 28)], "qwen2_vl": [(4, 4), (2, 3), (3, 5)],
         "qwen2_5_vl": [(4, 4), (2, 3), (3, 5)], "qwen3_vl": [(4, 4), (2, 3), (3, 5)],
         "qwen3_5": [(4, 4), (2, 3), (3, 5)], "qwen3_5_moe": [(4, 4), (2, 3), (3, 5)],
         "llava_onevision": [(40, 70), (50, 50), (28, 28)],  # (50, 50): capped high-res grid
         "mistral3": [(3, 4), (2, 2), (4, 3)],
         "internvl": [(1,), (3,), (5,)]}   # InternVL: tiles per image (1, or 2 / 4 tiles + the thumbnail)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return build_tiny_model(request.param)


def _eager_attentions(model, inputs):
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    return [None if a is None else a.float() for a in per_layer(model, out.attentions)]   # None: linear layer


_image_positions = image_positions


def _reference_maps(attn, positions, query):
    """From eager [B, H, T, T] maps: rows -> image-key columns, per sample [L, H, N]."""
    out = []
    for b, (pos, v_end) in enumerate(positions):
        per_layer = []
        for A in attn:
            if A is None:
                continue
            if query == "last":
                per_layer.append(A[b, :, -1, pos])
            else:
                per_layer.append(A[b, :, v_end:, :][:, :, pos].mean(1))
        out.append(torch.stack(per_layer))
    return out


@pytest.mark.parametrize("batch", ["single", "padded3"])
@pytest.mark.parametrize("query", ["last", "post_image"])
def test_capture_equals_eager(tiny, batch, query):
    lengths = [4] if batch == "single" else [3, 7, 2]
    grids = GRIDS.get(tiny.family)
    grids = grids[: len(lengths)] if grids else None
    inputs = tiny_inputs(tiny, lengths, grids)
    cap = capture_image_attention(tiny.model, inputs, query=query)
    ref = _reference_maps(_eager_attentions(tiny.model, inputs), _image_positions(tiny.model, inputs), query)
    assert cap.maps.shape[:3] == (len(lengths), len(attention_layers(tiny.model)), 4)
    for b in range(len(lengths)):
        torch.testing.assert_close(cap.sample(b), ref[b], atol=1e-5, rtol=0)
        assert torch.isnan(cap.maps[b, ..., cap.n_tokens[b]:]).all()


def test_capture_subset_explicit_rows_and_early_exit(tiny):
    inputs = tiny_inputs(tiny, [5, 2], (GRIDS.get(tiny.family) or [None, None])[:2] if tiny.family in GRIDS else None)
    positions = _image_positions(tiny.model, inputs)
    T = inputs["input_ids"].shape[1]
    rows = [T - 1, T - 2]
    l0 = attention_layers(tiny.model)[0]
    full = capture_image_attention(tiny.model, inputs, layers=[l0], heads=[3, 1], query=rows, early_exit=False)
    early = capture_image_attention(tiny.model, inputs, layers=[l0], heads=[3, 1], query=rows, early_exit=True)
    torch.testing.assert_close(full.maps, early.maps, equal_nan=True, atol=0, rtol=0)
    attn = _eager_attentions(tiny.model, inputs)
    for b, (pos, _) in enumerate(positions):
        ref = attn[l0][b][[3, 1]][:, rows][:, :, pos].mean(1)
        torch.testing.assert_close(early.sample(b)[0], ref, atol=1e-5, rtol=0)


def test_outputs_unchanged_and_restored_after_exception(tiny):
    model = tiny.model
    inputs = tiny_inputs(tiny, [3, 6], GRIDS[tiny.family][:2] if tiny.family in GRIDS else None)
    with torch.no_grad():
        before = model(**inputs).logits
    capture_image_attention(model, inputs)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionProbe(model):
            assert model.config.get_text_config()._attn_implementation == "vgrefine"
            raise RuntimeError("boom")
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    with torch.no_grad():
        again = model(**inputs).logits
    assert torch.equal(before, again)


def test_zero_bias_is_bit_identical(tiny):
    inputs = tiny_inputs(tiny, [3, 6], GRIDS[tiny.family][:2] if tiny.family in GRIDS else None)
    spans = get_adapter(tiny.model).image_spans(inputs)
    with torch.no_grad():
        plain = tiny.model(**inputs).logits
        bias = [KeyBias(layers=(0, 1), batch_index=b, row_start=sp[0].end, row_stop=None, cols=sp[0].positions,
                        value=0.0) for b, sp in enumerate(spans)]
        with AttentionProbe(tiny.model, biases=bias, batch_size=2):
            biased = tiny.model(**inputs).logits
    assert torch.equal(plain, biased)


# ------------------------------------------------------------------ independent eager reference for -inf bias
_BLOCK = {}


def _reference_masked_eager(module, query, key, value, attention_mask, **kw):
    """Eager attention on an additive float mask, with the test's own blocked pairs set to -inf."""
    spec = _BLOCK.get("spec")
    if spec is not None and module.layer_idx in spec["layers"] and query.shape[2] > 1:
        B, _, q, _ = query.shape
        kv = key.shape[2]
        if attention_mask is None:
            attention_mask = torch.zeros(B, 1, q, kv).masked_fill(
                torch.ones(q, kv, dtype=torch.bool).triu(1), float("-inf"))
        m = attention_mask[..., :kv].expand(B, 1, q, kv).clone()
        for b, (rows, cols) in enumerate(spec["pairs"]):
            for r in rows:
                for c in cols:
                    m[b, 0, r, c] = float("-inf")
        attention_mask = m
    return eager_attention_forward(module, query, key, value, attention_mask, **kw)


def test_inf_bias_equals_masked_eager(tiny):
    model = tiny.model
    inputs = tiny_inputs(tiny, [4, 6], GRIDS[tiny.family][:2] if tiny.family in GRIDS else None)
    spans = get_adapter(model).image_spans(inputs)
    T = inputs["input_ids"].shape[1]
    layers = (1,)
    pairs = []
    biases = []
    for b, sp in enumerate(spans):
        blocked = sp[0].positions[::2]          # every second image token
        pairs.append((list(range(sp[0].end, T)), blocked.tolist()))
        biases.append(KeyBias(layers=layers, batch_index=b, row_start=sp[0].end, row_stop=T, cols=blocked))
    with torch.no_grad(), AttentionProbe(model, biases=biases, batch_size=2):
        ours = model(**inputs).logits
    AttentionInterface.register("test_ref_masked", _reference_masked_eager)
    AttentionMaskInterface.register("test_ref_masked", eager_mask)
    _BLOCK["spec"] = {"layers": layers, "pairs": pairs}
    model.set_attn_implementation({"text_config": "test_ref_masked"})
    try:
        with torch.no_grad():
            ref = model(**inputs).logits
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        _BLOCK.clear()
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = model(**inputs).logits
    assert (plain[valid] - ours[valid]).abs().max() > 1e-4   # the block really changed something
    # blocked mass is exactly zero in the post-bias capture
    cap = capture_image_attention(model, inputs, layers=[1], query="last", biases=biases)
    for b, sp in enumerate(spans):
        assert torch.all(cap.sample(b)[0][:, ::2] == 0)
        assert torch.all(cap.sample(b)[0][:, 1::2] > 0)


def test_soft_bias_per_head_matches_reference(tiny):
    """A finite per-head bias equals adding it to the eager logits by hand (first attention layer, head 2)."""
    model = tiny.model
    inputs = tiny_inputs(tiny, [4], GRIDS[tiny.family][:1] if tiny.family in GRIDS else None)
    pos, _ = _image_positions(model, inputs)[0]
    T = inputs["input_ids"].shape[1]
    l0 = attention_layers(model)[0]
    bias = KeyBias(layers=(l0,), batch_index=0, row_start=T - 1, row_stop=T, cols=pos[:3], value=2.5, heads=(2,))
    cap = capture_image_attention(model, inputs, layers=[l0], heads=[2, 0], biases=[bias])
    attn = _eager_attentions(model, inputs)[l0][0]                    # [H, T, T] layer l0, sample 0
    for k, h in enumerate([2, 0]):
        row = attn[h, -1]
        if h == 2:                                                   # softmax(logits + b) from softmax(logits)
            w = row.clone()
            w[pos[:3]] *= math.exp(2.5)
            row = w / w.sum()
        torch.testing.assert_close(cap.sample(0)[0, k], row[pos], atol=1e-6, rtol=0)


def test_bad_inputs_raise_clear_errors():
    tiny = build_tiny_model("llava")
    inputs = tiny_inputs(tiny, [3])
    with pytest.raises(ValueError, match="layers .* out of range"):
        capture_image_attention(tiny.model, inputs, layers=[5])
    with pytest.raises(ValueError, match="heads .* out of range"):
        capture_image_attention(tiny.model, inputs, heads=[4])
    no_image = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="no image tokens"):
        capture_image_attention(tiny.model, no_image)
    right = tiny_inputs(tiny, [3, 6])
    right["input_ids"] = right["input_ids"].flip(1)
    right["attention_mask"] = right["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left padding"):
        capture_image_attention(tiny.model, right)
    with pytest.raises(ValueError, match="query must be"):
        capture_image_attention(tiny.model, inputs, query="first")


def test_unsupported_model_names_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_vgrefine.adapters import UnsupportedModelError

    m = LlamaForCausalLM._from_config(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="qwen2_vl.*adding_a_family"):
        get_adapter(m)


@pytest.mark.parametrize("impl", ["vgrefine", {"text_config": "vgrefine", "vision_config": "sdpa"}])
def test_from_pretrained_local_dir_with_registered_attention(tmp_path, impl):
    """The hub code path on a local directory: a model loaded with attn_implementation='vgrefine' (string
    form: vision tower too) captures the same rows as eager and keeps its implementation after a probe."""
    from transformers import AutoModelForImageTextToText

    from hf_vgrefine.attention import register_attention

    tiny = build_tiny_model("llava")
    tiny.model.save_pretrained(tmp_path)
    register_attention()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation=impl).eval()
    assert model.config.get_text_config()._attn_implementation == "vgrefine"
    inputs = tiny_inputs(tiny, [3, 5])
    with torch.no_grad():
        plain = tiny.model(**inputs).logits
        loaded = model(**inputs).logits
    torch.testing.assert_close(loaded, plain, atol=1e-5, rtol=0)
    cap = capture_image_attention(model, inputs)
    ref = _reference_maps(_eager_attentions(tiny.model, inputs), _image_positions(model, inputs), "last")
    for b in range(2):
        torch.testing.assert_close(cap.sample(b), ref[b], atol=1e-5, rtol=0)
    assert model.config.get_text_config()._attn_implementation == "vgrefine"


def test_probe_switch_is_remembered_and_restores_every_config(monkeypatch):
    """The probe switches only the text decoder to "vgrefine" and restores every config's value on exit (also
    after an exception, and after the user changed the implementation in between); a repeated switch between
    the same implementations does not call set_attn_implementation again (no walk over the modules)."""
    from hf_vgrefine.attention import ATTN_NAME, AttentionProbe, _all_configs
    from hf_vgrefine.testing import build_tiny_model

    model = build_tiny_model("llava", num_hidden_layers=2).model
    text = model.config.get_text_config(decoder=True)
    configs = _all_configs(model)
    before = [c._attn_implementation_internal for c in configs]
    calls = []
    real = model.set_attn_implementation
    monkeypatch.setattr(model, "set_attn_implementation", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    for _ in range(3):
        with AttentionProbe(model):
            assert text._attn_implementation == ATTN_NAME
            assert model.config.vision_config._attn_implementation == before[configs.index(model.config.vision_config)]
        assert [c._attn_implementation_internal for c in configs] == before
    assert len(calls) == 1           # the first switch; the way back and later switches reuse its configs
    real({"text_config": "eager"})
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionProbe(model):
            assert text._attn_implementation == ATTN_NAME
            raise RuntimeError("boom")
    assert text._attn_implementation == "eager"
