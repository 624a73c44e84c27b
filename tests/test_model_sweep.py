"""Sweep over every image-text-to-text model type of the installed transformers.

Each type is either

* **exact** — a family adapter (its capture / VGRefine equivalence is tested per family in test_attention.py and
  test_vgrefine.py, its geometry in test_processor_geometry.py);
* **generic** — built tiny from its default config offline (``hf_vgrefine.testing_any``): attention capture equals
  eager ``output_attentions`` on a left-padded batch (<= 1e-5) and ``VGRefineWrapper.generate`` equals an
  eager reference of triage + knockout written here;
* **unsupported** — ``get_adapter`` raises ``UnsupportedModelError`` saying why;
* or listed in ``NOT_TINY`` with the reason its tiny model or its image inputs (hand-built from the vision config,
  or made by the type's image processor class) cannot be made offline here (a limit of this harness, not a claim
  about the package); the partition test keeps the lists complete.

Hybrid decoders (linear-attention layers) are compared on their softmax-attention layers; sparse-attention (DSA)
types run with top-k below the prompt length, so the sparse key selection is part of the comparison.
"""

import functools

import numpy as np
import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as MAPPING

from _grounding_fixtures import RefModel

from hf_vgrefine.adapters import UnsupportedModelError, get_adapter, support_level, supported_model_types
from hf_vgrefine.attention import capture_image_attention
from hf_vgrefine.testing_any import build_tiny, tiny_any_inputs
from hf_vgrefine.vgrefine import VGRefineConfig, VGRefineWrapper

# built tiny and swept through the generic adapter
GENERIC_SWEPT = ("apertus1p5", "aria", "aya_vision", "chameleon", "cohere2_vision", "cohere_compass", "cosmos3_edge",
                 "cosmos3_omni", "deepseek_ocr2", "deepseek_vl", "deepseek_vl_hybrid", "emu3", "ernie4_5_vl_moe",
                 "exaone4_5", "fuyu", "gemma4", "gemma4_unified", "glm46v", "glm4v", "glm4v_moe", "glm5_next",
                 "glm_ocr", "glmga", "got_ocr2", "granite4_vision", "granite_docling", "hunyuan_vl", "hy_v4_vl",
                 "hyperclovax_vision_v2", "idefics2", "idefics3", "inkling2", "inkling2_loop", "inkling_mm_model",
                 "janus", "kimi_k25", "lfm2_vl", "lfm3_vl", "lighton_ocr", "llama4", "llava_next_video",
                 "llava_onevision1_5", "minimax_m3_vl", "mistral_large4", "molmo2", "muse_glimmer", "muse_spark",
                 "ovis2", "ovis2_5", "paddleocr_vl", "pp_chart2table", "qianfan_ocr", "qwen2_5_omni_thinker",
                 "qwen3_omni_moe_thinker", "qwen3_vl_moe", "shieldgemma2", "smolvlm", "step3p7", "unlimited_ocr",
                 "video_llama_3", "video_llava", "vipllava")
# unsupported: the image does not enter the decoder's self-attention as placeholder tokens, or the package would get
# the model wrong: diffusion_gemma's bidirectional diffusion decoder (not token by token), dots3_note's layers with
# different head counts, qwen4_exp's QSA selection merged into the mask the package reads query positions from
UNSUPPORTED = ("blip", "blip-2", "diffusion_gemma", "dots3_note", "evolla", "florence2", "git", "idefics",
               "instructblip", "instructblipvideo", "kosmos-2", "kosmos-2.5", "minicpm_ocr", "minicpmv4_6",
               "minicpmv4_7", "mistral4", "mllama", "nemotron_h_omni", "pi0", "pi05", "pix2struct", "pp_formulanet",
               "qwen4_exp", "t5gemma2", "udop", "vision-encoder-decoder")
_TIMM = ("its vision tower needs timm, which imports torchvision at import time (PyPI's torchvision does not load "
         "beside the CPU torch build used here)")
NOT_TINY = {
    "fast_vlm": _TIMM, "gemma3n": _TIMM, "perception_lm": _TIMM,
}
HEADS = [[0, 1], [1, 2], [0, 3], [1, 0]]


def test_every_model_type_is_accounted_for():
    exact = set(supported_model_types()) & set(MAPPING)
    groups = [exact, set(GENERIC_SWEPT), set(UNSUPPORTED), set(NOT_TINY)]
    assert sum(len(g) for g in groups) == len(set().union(*groups)), "a model type is listed twice"
    listed = set().union(*groups)
    assert not set(MAPPING) - listed, (
        f"transformers {transformers.__version__} has image-text-to-text types this sweep does not classify: "
        f"{sorted(set(MAPPING) - listed)}; the lists here are for the release pinned in constraints-cpu.txt "
        "(add each new type to one list, then run scripts/coverage_table.py --write README.md)")
    assert not listed - set(MAPPING), f"listed types transformers no longer has: {sorted(listed - set(MAPPING))}"
    print(f"\nsweep: {len(exact)} exact, {len(GENERIC_SWEPT)} generic swept, {len(UNSUPPORTED)} unsupported, "
          f"{len(NOT_TINY)} not built tiny here, of {len(MAPPING)}")


@functools.lru_cache(maxsize=None)
def _tiny(mt):
    return build_tiny(mt, MAPPING[mt])


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_unsupported_types_raise_a_clear_error(model_type):
    model = build_tiny(model_type, MAPPING[model_type], device="meta")
    level, reason = support_level(model)
    assert level == "unsupported"
    with pytest.raises(UnsupportedModelError, match=r"not supported, because .*(cross-attention|encoder-decoder|"
                                                    r"placeholder token|decoder's layer list|"
                                                    r"numbers of attention heads|QSA indexer|"
                                                    r"does not generate autoregressively|position bias)"):
        get_adapter(model)


def test_diffusion_decoder_is_unsupported():
    """DiffusionGemma's image does enter a causal encoder as placeholder tokens, but its answer comes from a
    diffusion decoder (bidirectional self-attention over a canvas, its own non-GenerationMixin generate), whose
    layers are the decoder layers the generic adapter would hook: unsupported, saying so."""
    model = build_tiny("diffusion_gemma", MAPPING["diffusion_gemma"], device="meta")
    level, reason = support_level(model)
    assert level == "unsupported"
    assert "does not generate autoregressively" in reason and "bidirectional (is_causal=False)" in reason
    assert "DiffusionGemmaGenerationMixin.generate" in reason
    # a causal decoder without a language-model head (AutoModel: not a GenerationMixin either) is still supported
    from transformers import AutoModel

    from hf_vgrefine.testing_any import tiny_config
    assert support_level(AutoModel.from_config(tiny_config("video_llava"))) == ("generic", "")


def test_layers_with_different_head_counts_are_unsupported():
    """Dots3's sliding-window layers have half the query heads of its indexed-attention layers (64 / 128 in its
    default config): refused, naming the counts, since capture maps and sensitive heads take one head count per
    model. Gemma 4's layers differ in head width only and stay generic."""
    from transformers import AutoConfig

    from hf_vgrefine.adapters.generic import per_layer_head_counts, token_level_support

    default = AutoConfig.for_model("dots3_note").get_text_config(decoder=True)
    assert per_layer_head_counts(default, 6) == [128, 128, 64, 64, 64, 128]
    model = build_tiny("dots3_note", MAPPING["dots3_note"], device="meta")
    assert "different numbers of attention heads ([2, 4]" in token_level_support(model)
    assert token_level_support(build_tiny("gemma4", MAPPING["gemma4"], device="meta")) is None


def test_qsa_selection_merged_into_the_mask_is_unsupported():
    """Qwen4-Exp's QSA indexer merges its block selection into the mask handed to the attention function, so a row
    whose own block is not selected does not see itself there, and positions read from that mask (the package's
    ``_query_positions``, where knockout rows start) come out wrong: refused with that reason."""
    from hf_vgrefine.adapters.generic import token_level_support
    from hf_vgrefine.attention import _query_positions, allowed_matrix

    model = build_tiny("qwen4_exp", MAPPING["qwen4_exp"])
    inputs = tiny_any_inputs(model, [14, 20], seed=2)
    indexer = model.model.language_model.layers[model.config.text_config.layer_types.index("indexed_attention")]
    indexer = indexer.self_attn.indexer
    T = inputs["input_ids"].shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & inputs["attention_mask"].bool()[:, None, None]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, T, model.config.text_config.hidden_size, generator=g)
    q, keys = torch.randn(2, T, 2, 16, generator=g), torch.randn(2, T, 16, generator=g)
    cos = torch.ones(2, T, 4)                                     # no rotation: scores from q and keys alone
    sel = indexer._select_tokens(h, q, keys, cos, 0 * cos, causal) & causal
    pos = _query_positions(sel, allowed_matrix(sel, T, T, "cpu"), T, T, 0, "cpu")
    real = inputs["attention_mask"].bool()
    assert not torch.equal(pos[real], torch.arange(T).expand(2, T)[real])
    assert "QSA indexer merges its key-block selection" in token_level_support(model)


@pytest.mark.parametrize("model_type", ["hy_v4_vl", "inkling2"])
def test_attention_sinks_enter_the_softmax(model_type):
    """Attention sinks handed to the attention function (HunYuan V4: ``s_aux``, one per head; Inkling 2: ``sinks``,
    one per query row) take part of each row's probability mass, which SDPA alone would give to the keys: the
    package's function runs them as one more zero key/value with the sink as its logit, so a plain forward through
    it equals the model's eager forward (the sweep's capture and generate tests cover the rest)."""
    model = _tiny(model_type)
    adapter = get_adapter(model)
    inputs = tiny_any_inputs(model, [3, 6], seed=1)
    att = _eager(model, adapter, inputs)
    real = inputs["attention_mask"].bool()
    assert max(float(a[:, :, -1].sum(-1).max()) for a in att) < 0.99        # the sinks hold a share of every row
    before = adapter.text_config._attn_implementation
    try:
        model.set_attn_implementation(adapter.text_attn_target("eager"))
        with torch.no_grad():
            ref = model(**inputs).logits
        from hf_vgrefine.attention import register_attention

        model.set_attn_implementation(adapter.text_attn_target(register_attention()))
        with torch.no_grad():
            got = model(**inputs).logits
    finally:
        model.set_attn_implementation(adapter.text_attn_target(before))
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)

def _eager(model, adapter, inputs):
    """Eager ``output_attentions`` of the decoder's softmax-attention layers (``adapter.attention_layers``: every
    layer, or a hybrid model's attention layers, whose linear-attention layers output none)."""
    before = adapter.text_config._attn_implementation
    model.set_attn_implementation(adapter.text_attn_target("eager"))
    try:
        with torch.no_grad():
            att = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(adapter.text_attn_target(before))
    att = [a for a in att if a is not None]
    assert len(att) == len(adapter.attention_layers)
    return [a.double() for a in att]


def _heads(adapter):
    """``HEADS`` on the decoder's softmax-attention layers (the same heads where every layer is one)."""
    layers = list(adapter.attention_layers)
    return [[layers[l % len(layers)], h] for l, h in HEADS]


def _positions(model, inputs):
    """Image positions per sample from the ids (independent of the adapter): every image-token id, and the end."""
    tid = getattr(model.config, "image_token_id", None)
    tid = tid if tid is not None else model.config.image_token_index
    out = []
    for row in inputs["input_ids"]:
        pos = (row == tid).nonzero().flatten()
        out.append((pos, int(pos[-1]) + 1))
    return out


@pytest.mark.parametrize("model_type", GENERIC_SWEPT)
def test_generic_capture_equals_eager(model_type):
    model = _tiny(model_type)
    adapter = get_adapter(model)
    assert adapter.family == "generic" and not adapter.exact_geometry
    inputs = tiny_any_inputs(model, [3, 6], seed=1)
    assert inputs["attention_mask"][0, 0] == 0                      # left-padded
    for query in ("last", "post_image"):
        cap = capture_image_attention(model, inputs, query=query)
        att = _eager(model, adapter, inputs)
        for b, (pos, end) in enumerate(_positions(model, inputs)):
            if query == "last":
                ref = torch.stack([a[b, :, -1, pos] for a in att])
            else:
                ref = torch.stack([a[b, :, end:, :][:, :, pos].mean(1) for a in att])
            torch.testing.assert_close(cap.sample(b).double(), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ eager reference of triage + knockout
def _reference_knockout(model, inputs, generic, percentile=50.0, eps=1e-10):
    adapter = get_adapter(model)
    qa, ga = _eager(model, adapter, inputs), _eager(model, adapter, generic)
    at = list(adapter.attention_layers).index
    qpos, gpos = _positions(model, inputs), _positions(model, generic)
    blocked = []
    for b in range(inputs["input_ids"].shape[0]):
        rel = [(qa[at(l)][b, h, -1, qpos[b][0]] / (ga[at(l)][b, :, -1, gpos[b][0]].mean(0) + eps)).numpy()
               for l, h in _heads(adapter)]
        s = np.mean(rel, 0)
        blocked.append((qpos[b][0][torch.from_numpy(s < np.percentile(s, percentile))], qpos[b][1]))
    return blocked


def _vgrefine_and_reference(model, inputs, generic, **gen_kw):
    """``VGRefineWrapper.generate`` (last attention layer masked, ``HEADS``, percentile 50) and ``generate`` of the
    eager reference knockout model, after checking that the wrapper knocked out the reference's tokens."""
    adapter = get_adapter(model)
    masked = [adapter.attention_layers[-1]]
    w = VGRefineWrapper(model, VGRefineConfig(masked_layers=masked, sensitive_heads=_heads(adapter), percentile=50.0))
    out = w.generate(**inputs, generic_inputs=generic, **gen_kw)
    blocked = _reference_knockout(model, inputs, generic)
    for b in range(inputs["input_ids"].shape[0]):
        assert torch.equal(w.last_triage[b].knocked_out_positions.sort().values, blocked[b][0].sort().values)
    with RefModel(model, blocked, masked, target=adapter.text_attn_target), torch.no_grad():
        ref = model.generate(**inputs, **gen_kw)
    return out, ref


@pytest.mark.parametrize("model_type", GENERIC_SWEPT)
def test_generic_vgrefine_generate_equals_eager_reference(model_type):
    model = _tiny(model_type)
    inputs = tiny_any_inputs(model, [3, 6], seed=2)
    generic = tiny_any_inputs(model, [7, 2], seed=2, image_inputs={k: v for k, v in inputs.items()
                                                                    if k not in ("input_ids", "attention_mask",
                                                                                 "mm_token_type_ids")})
    out, ref = _vgrefine_and_reference(model, inputs, generic, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)


def test_generic_geometry_is_refused_or_approximate():
    """Pixel geometry: a clear error naming what is missing, or an approximate stretch grid for a plain square."""
    from transformers import SiglipImageProcessor

    from hf_vgrefine.adapters import GeometryUnavailableError

    model = _tiny("video_llava")               # 4x4 = 16 image tokens
    adapter = get_adapter(model)
    span = adapter.image_spans(tiny_any_inputs(model, [2]))[0][0]
    grid = adapter.token_grid(SiglipImageProcessor(size={"height": 56, "width": 56}), (80, 40), span=span)
    assert grid.approximate and grid.shape == (span.rows, span.cols) and span.rows == span.cols
    with pytest.raises(GeometryUnavailableError, match=r"do_center_crop=True.*token level only"):
        adapter.token_grid(SiglipImageProcessor(size={"height": 56, "width": 56}, do_center_crop=True,
                                                crop_size={"height": 56, "width": 56}), (80, 40), span=span)
    qwen = get_adapter(_tiny("qwen3_vl_moe"))
    from transformers import Qwen2VLImageProcessor
    qspan = qwen.image_spans(tiny_any_inputs(_tiny("qwen3_vl_moe"), [2]))[0][0]
    with pytest.raises(GeometryUnavailableError, match=r"does not stretch to a fixed square.*token level only"):
        qwen.token_grid(Qwen2VLImageProcessor(), (80, 40), span=qspan)


def test_generic_flattened_patch_rows_are_sliced_per_image():
    """``pixel_values`` as ``[rows, c, p, p]`` patches (PaddleOCR-VL's layout) with ``image_grid_thw``: each
    sample's image is its grid's ``t*h*w`` rows; a row count that does not add up is not sliced."""
    model = _tiny("paddleocr_vl")
    adapter = get_adapter(model)
    inputs = tiny_any_inputs(model, [3, 6])
    pv, thw = inputs["pixel_values"], inputs["image_grid_thw"]
    n0, n1 = int(thw[0].prod()), int(thw[1].prod())
    assert pv.dim() == 4 and adapter.per_image_rows("pixel_values", inputs) == [n0, n1]
    sel = adapter.select_images(inputs, [1])
    assert torch.equal(sel["pixel_values"], pv[n0:]) and torch.equal(sel["image_grid_thw"], thw[1:])
    assert adapter.per_image_rows("pixel_values", dict(inputs, pixel_values=pv[:-1])) is None


def test_molmo2_crops_and_pooled_tokens_are_sliced_per_image():
    """Molmo 2's image inputs: ``image_num_crops`` crops of ``pixel_values`` and ``h1*w1 + h2*w2`` rows of
    ``image_token_pooling`` (from ``image_grids``) per image; selecting the second image gives its rows, whose
    pooling indices count from its own first patch."""
    model = _tiny("molmo2")
    adapter = get_adapter(model)
    inputs = tiny_any_inputs(model, [3, 6])
    inputs = dict(inputs, image_grids=torch.tensor([[2, 2, 0, 0], [1, 1, 1, 3]]))     # 4 and 1 + 3 = 4 tokens
    assert adapter.per_image_rows("image_token_pooling", inputs) == [4, 4]
    assert adapter.per_image_rows("pixel_values", inputs) == [1, 1]
    sel = adapter.select_images(inputs, [1])
    assert torch.equal(sel["image_token_pooling"], inputs["image_token_pooling"][4:])
    assert torch.equal(sel["pixel_values"], inputs["pixel_values"][1:])
    assert torch.equal(sel["image_grids"], inputs["image_grids"][1:])


@pytest.mark.parametrize("model_type", ["mistral_large4", "glm5_next"])
def test_sparse_attention_types_select_fewer_keys_than_the_prompt(model_type):
    """The DSA types of the sweep run with top-k below the prompt length, so their capture / knockout equality
    above covers the sparse key selection (``hf_vgrefine.attention.sparse_index_mask``)."""
    model = _tiny(model_type)
    inputs = tiny_any_inputs(model, [3, 6], seed=1)
    assert model.config.get_text_config(decoder=True).index_topk < inputs["input_ids"].shape[1]


def _same_prefix_generic(model, inputs, tail):
    """Generic prompts that share each question's prefix up to the image end, then one common text ``tail`` (the
    shape VGRefine packs behind the question where it can), left-padded, with the question's images."""
    tid = getattr(model.config, "image_token_id", None)
    tid = tid if tid is not None else model.config.image_token_index
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        r = ids[mask.bool()].tolist()
        rows.append(r[:max(i for i, x in enumerate(r) if x == tid) + 1] + list(tail))
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    out = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out.update(input_ids=ids, attention_mask=mask)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = (ids == tid).long()
    return out


def test_sparse_attention_generic_prompt_is_not_packed():
    """DSA's indexer picks each row's top-k keys from the model's own causal mask, so a generic tail packed behind
    a long question would pick among the question's tokens (which VGRefine hides from it) and get a different
    map. With a generic prompt that shares the question's prefix (where other models pack) and questions longer
    than top-k, triage and tokens still equal the eager reference of separate question and generic passes."""
    model = _tiny("mistral_large4")
    adapter = get_adapter(model)
    assert adapter.sparse_attention and not get_adapter(_tiny("video_llava")).sparse_attention
    inputs = tiny_any_inputs(model, [14, 20], seed=2)
    generic = _same_prefix_generic(model, inputs, [11, 23, 37, 41, 53])
    assert model.config.get_text_config(decoder=True).index_topk < 14
    out, ref = _vgrefine_and_reference(model, inputs, generic, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)


def test_short_convolution_models_run_the_plain_path():
    """Inkling's decoder layers mix neighbouring tokens with short causal convolutions outside attention (no mask
    reaches them; their state sits in the cache), so a generic tail packed behind the question would see the
    question through them, and a replayed prefix would leave their state empty for the decode steps. With a generic
    prompt sharing the question's prefix, triage equals the eager reference of separate passes and every step's
    logits equal those of the reference knockout model."""
    model = _tiny("inkling_mm_model")
    adapter = get_adapter(model)
    assert adapter.short_convolutions and not adapter.prefix_paths_exact
    assert get_adapter(_tiny("video_llava")).prefix_paths_exact
    inputs = tiny_any_inputs(model, [14, 20], seed=2)
    generic = _same_prefix_generic(model, inputs, [11, 23, 37, 41, 53])
    out, ref = _vgrefine_and_reference(model, inputs, generic, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.scores, ref.scores):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_positions_follow_what_generate_hands_the_model():
    """Ovis2.5's ``prepare_inputs_for_generation`` drops generate's position ids, so its language model counts
    positions from the cache (pads included); the adapter's prefill positions (those a replayed prefix is rotated
    with) are then ``[0, T)`` on every row, as a hook on the language model sees them in ``generate``; elsewhere they
    are the mask's cumsum that generate passes."""
    from hf_vgrefine.adapters.generic import generate_passes_positions

    for mt, passes in (("ovis2_5", False), ("video_llava", True)):
        model = _tiny(mt)
        adapter = get_adapter(model)
        assert generate_passes_positions(model) is passes
        inputs = tiny_any_inputs(model, [3, 6], seed=2)
        seen = []
        owner = model.model.language_model
        h = owner.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
        try:
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
        finally:
            h.remove()
        T = inputs["input_ids"].shape[1]
        used = (torch.arange(T)[None].expand(2, T) if seen[0] is None else seen[0])
        assert torch.equal(adapter.position_ids(inputs), used)
        assert (seen[0] is None) is (not passes)


def test_prefix_replay_only_where_the_cache_holds_the_attention_keys():
    """VGRefine's shared prefix is replayed into the generation cache only where the decoder caches the keys and
    values its attention function receives; latent-KV attention (Kimi-K2.5's DeepSeek-V3 decoder caches the
    compressed KV) runs the answer prefill in full (its generate equality is tested above)."""
    assert get_adapter(_tiny("video_llava")).can_replay_prefix
    assert not get_adapter(_tiny("kimi_k25")).can_replay_prefix


def test_readme_coverage_table_agrees_with_the_sweep():
    """The README table (scripts/coverage_table.py) calls every swept type generic and every unsupported one
    unsupported."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([^`]+)` \| `[^`]+` \| (.+) \|$", readme, re.M))
    assert set(rows) == set(MAPPING)
    assert [t for t in GENERIC_SWEPT if not rows[t].startswith("generic")] == []
    assert [t for t in UNSUPPORTED if not rows[t].startswith("unsupported")] == []
