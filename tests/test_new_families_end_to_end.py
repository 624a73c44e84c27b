"""Measurement, calibration, the Med-VQA runner and VGRefine on processor-built prompts for the exact families
added after the first six whose real processor builds offline here (PaliGemma, InternVL, LLaVA-OneVision, Qwen 3.5;
the Pixtral / Mistral 3 processor class needs torchvision): measured attention ratios equal a hand computation from
eager ``output_attentions`` (hybrid Qwen 3.5: its softmax-attention layers, the only ones eager returns maps of);
calibration and the runner run end to end."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from _grounding_fixtures import (assert_search_rows_equal_the_wrapper, attention_layers, attention_ratio_by_hand,
                                 family_processor, load_fixture)

from hf_vgrefine.adapters import get_adapter
from hf_vgrefine.calibrate import calibrate
from hf_vgrefine.geometry import boxes_to_token_mask
from hf_vgrefine.grounding_pass import PromptLayout
from hf_vgrefine.measure import measure_grounding
from hf_vgrefine.testing import IMAGE, build_tiny_model
from hf_vgrefine.vgrefine import VGRefineConfig, VGRefineWrapper

NEW = ["paligemma", "internvl", "llava_onevision", "qwen3_5"]


@pytest.fixture(scope="module")
def ds():
    return load_fixture()


def _grid_positions(model, ids):
    """The default grid's positions, read from the ids here: PaliGemma all image tokens; InternVL the last tile
    (the thumbnail); LLaVA-OneVision the first side² tokens (the base image)."""
    pos = (ids == IMAGE).nonzero().flatten()
    cfg = model.config
    if cfg.model_type == "internvl":
        return pos[-4:]
    if cfg.model_type == "llava_onevision":
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return pos[: side * side]
    return pos


@pytest.mark.parametrize("family", NEW)
def test_measured_ratio_matches_eager_hand_computation(family, ds):
    sdpa = build_tiny_model(family).model
    eager = build_tiny_model(family, attn_implementation="eager").model     # same seed -> same weights
    proc = family_processor(family)
    res = measure_grounding(sdpa, proc, ds.select(range(2)), per_head=True, batch_size=2, progress=False)
    image = ds[0]["image"].convert("RGB")
    grid = get_adapter(sdpa).token_grid(proc, image.size)
    B = np.flatnonzero(boxes_to_token_mask(ds[0]["boxes"], grid, box_format="xywh"))

    def eager_maps(text):
        tmpl = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
        inp = proc(images=[image], text=[prompt], return_tensors="pt")
        inp = {k: v for k, v in inp.items() if k not in ("labels", "num_patches", "batch_num_images")}
        with torch.no_grad():
            out = eager(**inp, output_attentions=True)
        pos = _grid_positions(eager, inp["input_ids"][0])
        assert len(pos) == grid.n_tokens
        return torch.stack([a[0, :, -1, pos] for a in out.attentions]).double().numpy()   # [L, H, N]

    q = eager_maps(ds[0]["question"] + " Answer the question using a single word or phrase.")
    g = eager_maps("Write a general description of the image. Answer the question using a single word or phrase.")
    n = q.shape[-1]

    def ar(m):   # the hand-written attention ratio of each map along the last axis
        region = np.isin(np.arange(n), B)
        return np.apply_along_axis(attention_ratio_by_hand, -1, m, region)

    np.testing.assert_allclose(res.get("attention_ratio")[0], ar(q.mean(1) / (g.mean(1) + 1e-10)), rtol=1e-5)
    np.testing.assert_allclose(res.get("attention_ratio", per_head=True)[0], ar(q / (g + 1e-10)), rtol=1e-5)
    assert res.f[0] == pytest.approx(len(B) / n)


@pytest.mark.parametrize("family", NEW)
def test_calibrate_then_vgrefine_generate(family, ds, tmp_path):
    tiny = build_tiny_model(family)
    model, proc = tiny.model, family_processor(family)
    L = model.config.get_text_config().num_hidden_layers
    H = model.config.get_text_config().num_attention_heads
    cfg = calibrate(model, proc, ds, k=4, output_dir=str(tmp_path), progress=False)
    curve = np.array(cfg.calibration["layer_curves"]["attention_ratio"])
    attn = attention_layers(model)                     # hybrid: the curve runs over the softmax-attention layers
    assert len(curve) == len(attn)
    assert cfg.masked_layers == [attn[int(np.argmax(curve))]] and len(cfg.sensitive_heads) == 4
    assert all(l in attn and 0 <= l < L and 0 <= h < H for l, h in cfg.sensitive_heads)
    json.loads((tmp_path / "vgrefine_config.json").read_text())
    # the calibrated config drives VGRefine on processor-built prompts (a padded batch of two)
    w = VGRefineWrapper(model, VGRefineConfig(masked_layers=cfg.masked_layers, sensitive_heads=cfg.sensitive_heads,
                                              percentile=50.0), processor=proc)
    images = [ds[i]["image"].convert("RGB") for i in range(2)]
    from hf_vgrefine.prompts import build_inputs, generic_inputs, to_model_inputs

    inputs = to_model_inputs(build_inputs(proc, images, [ds[0]["question"], ds[1]["question"] + " Is it bright?"]),
                             model)
    gen = to_model_inputs(generic_inputs(proc, images), model)
    out = w.generate(**inputs, generic_inputs=gen, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and len(w.last_triage) == 2
    assert all(int(t.knocked_out_positions.numel()) > 0 for t in w.last_triage)


@pytest.mark.parametrize("family", ["paligemma", "qwen3_5"])
def test_medvqa_runner(family, tmp_path_factory):
    """The Med-VQA runner (baseline and VGRefine) on a tiny PaliGemma / hybrid Qwen 3.5 with its real processor."""
    from pathlib import Path

    from hf_vgrefine.medvqa import evaluate_medvqa as evaluate
    from hf_vgrefine.medvqa import load_benchmark

    fixtures = Path(__file__).parent / "fixtures" / "medvqa"
    spec = importlib.util.spec_from_file_location("medvqa_build_fixtures", fixtures / "build_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = mod.write_all(tmp_path_factory.mktemp("medvqa_data"))
    items = [*load_benchmark("vqa-rad", data_dir=data)]
    model, proc = build_tiny_model(family).model, family_processor(family)
    heads = [[1, 1], [1, 2]] if family == "qwen3_5" else [[0, 1], [1, 2]]      # Qwen 3.5: layer 0 is linear
    cfg = VGRefineConfig(masked_layers=[1], sensitive_heads=heads, percentile=50.0)
    out = tmp_path_factory.mktemp("runner")
    rep = evaluate(model, proc, items, methods=("baseline", "vgrefine"), vgrefine_config=cfg.to_json_string(),
                   out_dir=out, batch_size=4, progress=False)
    s = rep.summary
    assert s["methods"] == ["baseline", "vgrefine"] and not s["failures"]
    assert s["closed"]["vgrefine"]["micro"]["n"] == s["closed"]["baseline"]["micro"]["n"] > 0


def test_paligemma_prefix_lm_paths_equal_full_forwards(ds):
    """PaliGemma's image tokens attend to the prompt text after them (prefix-LM): the packed generic tail and the
    search's cached prefixes would reuse image keys computed with another text, so they run full forwards; the
    default (share_prefix) path equals the plain path, and every search candidate equals the wrapper's answers."""
    from hf_vgrefine.prompts import build_inputs, to_model_inputs
    from hf_vgrefine.tuning import SearchSpace, search_knockout

    model, proc = build_tiny_model("paligemma", num_hidden_layers=3).model, family_processor("paligemma")
    images = [ds[i]["image"].convert("RGB") for i in range(2)]
    questions = [ds[0]["question"], ds[1]["question"] + " Is it bright?"]
    inputs = to_model_inputs(build_inputs(proc, images, questions), model)
    runs = {}
    for share in (True, False):
        w = VGRefineWrapper(model, VGRefineConfig(masked_layers=[2], sensitive_heads=[[0, 1], [1, 2]], percentile=50.0,
                                                  share_prefix=share), processor=proc)
        out = w.generate(**inputs, max_new_tokens=3, do_sample=False)
        runs[share] = out, [t.triage_map for t in w.last_triage]
    assert torch.equal(runs[True][0], runs[False][0])
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    tok = proc.tokenizer
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    data = [dict(image=ds[i]["image"].convert("RGB"), question=ds[i]["question"], answer=a)
            for i, a in zip(range(4), ("yes", "no", "no", "yes"))]
    base = VGRefineConfig(masked_layers=[2], sensitive_heads=[[0, 1], [1, 2]], percentile=50.0)
    space = SearchSpace(max_run=1, percentiles=(50.0,), magnitude_thresholds=(), ks=(2,), generic_norms=("layer_mean",),
                        knockout_heads=("all",))
    res = search_knockout(model, proc, data, base, space=space, head_ranking=[[0, 1], [1, 2], [2, 3]], batch_size=4,
                          progress=False)
    assert res.info["self_check"]["fallback"]
    assert_search_rows_equal_the_wrapper(model, proc, data, res, [[0, 1], [1, 2]], yes, no)


@pytest.mark.parametrize("family", NEW)
def test_generic_prompt_built_from_the_question_equals_processor_output(family, ds):
    """The wrapper's generic prompt (question prefix up to the image end + the rendered generic tail) equals the
    processor's own output for the generic question (PaliGemma's <bos> and final newline, InternVL's </img>)."""
    model, proc = build_tiny_model(family, num_hidden_layers=3).model, family_processor(family)
    images = [ds[i]["image"].convert("RGB") for i in range(2)]

    def render(q):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    proc.tokenizer.padding_side = "left"
    drop = ("labels", "num_patches", "batch_num_images")
    inputs = {k: v for k, v in proc(images=images, text=[render("is there a lesion ?"), render("what is left ?")],
                                    return_tensors="pt", padding=True).items() if k not in drop}
    w = VGRefineWrapper(model, VGRefineConfig(masked_layers=[1], sensitive_heads=[[1, 1]], percentile=50.0),
                        processor=proc)
    built = w._generic_batch(inputs, PromptLayout.read(w.adapter, inputs), [0, 1])
    g_text = render("Write a general description of the image. Answer the question using a single word or phrase.")
    ref = proc(images=images, text=[g_text, g_text], return_tensors="pt", padding=True)
    assert torch.equal(built["input_ids"], ref["input_ids"])
    assert torch.equal(built["pixel_values"], ref["pixel_values"])
    if "token_type_ids" in built:
        assert torch.equal(built["token_type_ids"], ref["token_type_ids"])
