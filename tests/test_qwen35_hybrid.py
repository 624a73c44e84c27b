"""Qwen 3.5's hybrid decoder (Gated DeltaNet linear-attention layers between softmax-attention layers): configs on a
linear layer are refused at construction, every default picks attention layers, and the shared-prefix paths fall back
to the plain path (its tokens, logits and knockout sets). The per-family equivalence with eager references
(capture, VGRefine, beam search, batching, measure, calibrate, runner) runs in the FAMILIES-parametrised files."""

import warnings

import numpy as np
import pytest
import torch
from _grounding_fixtures import (assert_search_rows_equal_the_wrapper, attention_layers, family_processor,
                                 load_fixture, yes_no_correct)

from hf_vgrefine.attention import capture_image_attention
from hf_vgrefine.measure import measure_grounding
from hf_vgrefine.testing import build_tiny_model, tiny_inputs
from hf_vgrefine.vgrefine import VGRefineConfig, VGRefineWrapper
from hf_vgrefine.vgrefine.defaults import depth_default_config

GRIDS = [(4, 4), (2, 3)]
HEADS = [[1, 1], [1, 2], [2, 3], [2, 0]]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("qwen3_5", num_hidden_layers=3)


def test_tiny_model_is_hybrid_with_full_attention_on_the_masked_layers(tiny):
    kinds = tiny.model.config.text_config.layer_types
    assert kinds == ["linear_attention", "full_attention", "full_attention"]
    assert attention_layers(tiny.model) == [1, 2]
    four = build_tiny_model("qwen3_5_moe", num_hidden_layers=4).model
    assert four.config.text_config.layer_types == ["linear_attention", "full_attention", "linear_attention",
                                                   "full_attention"]


@pytest.mark.parametrize("kw, named", [
    (dict(masked_layers=[0], sensitive_heads=[[1, 0]]), r"masked_layers / att_map_layer \[0\]"),
    (dict(masked_layers=[1], sensitive_heads=[[0, 1], [1, 2]]), r"sensitive_heads \[\[0, 1\]\]"),
    (dict(masked_layers=[1], sensitive_heads=[[1, 2]], triage_source="layer", att_map_layer=0),
     r"att_map_layer \[0\]"),
])
def test_wrapper_refuses_linear_attention_layers_at_construction(tiny, kw, named):
    cfg = VGRefineConfig(percentile=50.0, **kw)
    with pytest.raises(ValueError, match=named + r".*linear-attention.*softmax-attention layers \[1, 2\]"):
        VGRefineWrapper(tiny.model, cfg)
    VGRefineWrapper(tiny.model, VGRefineConfig(masked_layers=[2], sensitive_heads=[[1, 0], [2, 3]]))   # attention: fine


def test_capture_and_measure_refuse_linear_layers_and_default_to_attention_layers(tiny):
    inputs = tiny_inputs(tiny, [3, 5], GRIDS, seed=2)
    with pytest.raises(ValueError, match=r"layers \[0\] have no softmax attention.*attention layers: \[1, 2\]"):
        capture_image_attention(tiny.model, inputs, layers=[0, 1])
    assert capture_image_attention(tiny.model, inputs).layers == [1, 2]
    ds = load_fixture().select(range(2))
    proc = family_processor("qwen3_5")
    res = measure_grounding(tiny.model, proc, ds, layers="all", batch_size=2, progress=False)
    assert res.layers == [1, 2]
    with pytest.raises(ValueError, match=r"layers \[0\] are linear-attention layers.*\[1, 2\]"):
        measure_grounding(tiny.model, proc, ds, layers="0,1", batch_size=2, progress=False)


def test_depth_default_picks_attention_layers():
    # Qwen3.5-27B-like layout: 64 layers, full attention every 4th (3, 7, ..., 63)
    attn = list(range(3, 64, 4))
    cfg = depth_default_config(64, 24, attn)
    # round(64 * 16 / 28) = 37 (linear): nearest attention layers 35 and 39 are both 2 away -> the lower one, 35
    assert cfg.masked_layers == [35]
    assert sorted({l for l, _ in cfg.sensitive_heads}) == [31, 35] and len(cfg.sensitive_heads) == 2 * 24
    assert depth_default_config(32, 8, list(range(3, 32, 4))).masked_layers == [19]   # round(18.29) = 18 -> 19
    # a dense model: unchanged rule (round(28 * 16 / 28) = 16, heads of 15 and 16)
    dense = depth_default_config(28, 4)
    assert dense.masked_layers == [16] and sorted({l for l, _ in dense.sensitive_heads}) == [15, 16]
    with pytest.raises(ValueError, match="no softmax-attention layer"):
        depth_default_config(4, 2, [])


def test_wrapper_without_config_uses_attention_layers():
    model = build_tiny_model("qwen3_5", num_hidden_layers=4).model      # [linear, full, linear, full]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = VGRefineWrapper(model, processor=family_processor("qwen3_5"))
    assert any("depth default" in str(r.message) for r in rec)
    # round(4 * 16 / 28) = 2 is linear; 1 and 3 are 1 away -> 1; its heads only (no attention layer before it)
    assert w.config.masked_layers == [1]
    assert {l for l, _ in w.config.sensitive_heads} == {1}


def test_share_prefix_falls_back_to_the_plain_path(tiny):
    """share_prefix=True on a hybrid model: no prefix record (the linear layers' running state is not per-token
    keys/values) and no generic tail packed behind the question (the linear layers would carry the question's text
    into the tail's rows): the tokens, logits and knockout sets equal share_prefix=False, and the generic maps
    equal a separate pass over the generic prompt."""
    model = tiny.model
    inputs = tiny_inputs(tiny, [3, 6], GRIDS, seed=12)
    generic = tiny_inputs(tiny, [5, 5], GRIDS, seed=12)
    kw = dict(generic_inputs=generic, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    runs = {}
    for share in (True, False):
        w = VGRefineWrapper(model, VGRefineConfig(masked_layers=[2], sensitive_heads=HEADS, percentile=50.0,
                                                  share_prefix=share, cache_generic=False))
        calls = []
        handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            runs[share] = w.generate(**inputs, **kw), w.last_triage, len(calls)
        finally:
            handle.remove()
    (out_s, tri_s, n_s), (out_p, tri_p, n_p) = runs[True], runs[False]
    assert tri_s.prefix is None and tri_p.prefix is None
    assert n_s == n_p                              # same passes: question, generic, generate
    assert torch.equal(out_s.sequences, out_p.sequences)
    for a, b in zip(out_s.logits, out_p.logits):
        assert torch.equal(a, b)
    for a, b in zip(tri_s.samples, tri_p.samples):
        assert torch.equal(a.knocked_out, b.knocked_out) and torch.equal(a.triage_map, b.triage_map)


def test_search_runs_full_forwards_on_attention_layers(tiny):
    """The knockout search on a hybrid model: layer runs over the softmax-attention layers only, full forwards
    (no cached prefix), and every candidate's answers equal the wrapper's own on the same config."""
    from hf_vgrefine.prompts import build_inputs, to_model_inputs
    from hf_vgrefine.tuning import SearchSpace, search_knockout

    model, proc = tiny.model, family_processor("qwen3_5")
    ds = load_fixture()
    tok = proc.tokenizer
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    data = [dict(image=ds[i]["image"].convert("RGB").resize((96, 64)), question=ds[i]["question"], answer=a)
            for i, a in zip(range(4), ("yes", "no", "no", "yes"))]
    base = VGRefineConfig(masked_layers=[2], sensitive_heads=[[1, 1], [2, 2]], percentile=50.0)
    space = SearchSpace(max_run=2, percentiles=(50.0,), magnitude_thresholds=(), ks=(2,), generic_norms=("layer_mean",),
                        knockout_heads=("all",))
    assert space.layer_sets(3, [1, 2]) == [(1,), (2,), (1, 2)]
    with pytest.raises(ValueError, match=r"layer_runs \[\(0, 1\)\] hold linear-attention layers"):
        SearchSpace(layer_runs=[(0, 1)]).layer_sets(3, [1, 2])
    res = search_knockout(model, proc, data, base, space=space, head_ranking=[[1, 1], [2, 2], [2, 3]], batch_size=4,
                          progress=False)
    assert res.info["self_check"]["fallback"]
    assert sorted(tuple(r["masked_layers"]) for r in res.table) == [(1,), (1, 2), (2,)]
    with torch.no_grad():
        plain = model(**to_model_inputs(build_inputs(proc, [d["image"] for d in data], [d["question"] for d in data],
                                                     instruction=base.instruction), model)).logits[:, -1]
    assert res.per_example["baseline"] == yes_no_correct(plain, data, yes, no)
    assert_search_rows_equal_the_wrapper(model, proc, data, res, [[1, 1], [2, 2]], yes, no)
    assert np.isfinite([r["accuracy"] for r in res.table]).all()


def test_position_ids_are_the_models_own(tiny):
    """The adapter's M-RoPE positions (get_rope_index, left-padded batch) are the ones the model derives itself:
    passing them explicitly leaves the logits unchanged, and they differ from plain 1-D positions."""
    from hf_vgrefine.adapters import get_adapter

    inputs = tiny_inputs(tiny, [3, 6], GRIDS, seed=3)
    pos = get_adapter(tiny.model).position_ids(inputs)
    assert pos.shape == (3, 2, inputs["input_ids"].shape[1])
    with torch.no_grad():
        own = tiny.model(**inputs).logits
        given = tiny.model(**inputs, position_ids=pos).logits
        flat = tiny.model(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
    valid = inputs["attention_mask"].bool()
    assert torch.equal(own[valid], given[valid])
    assert (own[valid] - flat[valid]).abs().max() > 1e-4
