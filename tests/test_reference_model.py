"""The shipped reference VLM: loads with the Auto classes, answers the held-out grounding task well above
chance, and its last-token attention lands on the named structure — a geometry check end to end: the same
attention scored against the transposed token mask (x/y swapped) falls back towards chance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _grounding_fixtures import attention_ratio_by_hand, eager_relative_maps, padded_box_cover

from hf_vgrefine.demo import reference_model_dir

REF = reference_model_dir()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(REF)).eval()
    processor = AutoProcessor.from_pretrained(str(REF))
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def heldout():
    from hf_vgrefine.reference_task import heldout_examples

    return heldout_examples(split_group="test")


@pytest.fixture(scope="module")
def card():
    return json.loads((REF / "training_results.json").read_text())


def test_files_and_auto_classes(ref):
    model, processor = ref
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    weights = REF / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 20 * 1024 * 1024
    for name in ("config.json", "processor_config.json", "tokenizer.json", "chat_template.jinja", "README.md",
                 "training_results.json"):
        assert (REF / name).is_file(), name
    assert processor.image_processor.do_pad
    from hf_vgrefine.adapters import get_adapter

    grid = get_adapter(model).token_grid(processor, (181, 217))
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert (grid.rows, grid.cols) == (side, side) and side >= 8


def test_training_script_is_importable_and_matches_the_shipped_config(ref):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_reference_vlm as script
    finally:
        sys.path.remove(str(EXAMPLES))
    model, processor = ref
    fresh = script.build_model(seed=0)
    a, b = fresh.config.to_dict(), model.config.to_dict()
    for key in ("text_config", "vision_config"):
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                  "image_size", "patch_size"):
            assert a[key].get(k) == b[key].get(k), (key, k)
    assert script.build_processor().tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_heldout_accuracy_well_above_chance(ref, heldout, card):
    import importlib

    sys.path.insert(0, str(EXAMPLES))
    try:
        script = importlib.import_module("train_reference_vlm")
    finally:
        sys.path.remove(str(EXAMPLES))
    model, processor = ref
    assert len(heldout) == 452 and sum(e["answer"] == "yes" for e in heldout) == 226
    rep = script.evaluate_accuracy(model, processor, heldout, batch_size=64)
    assert rep["accuracy"] >= 0.75, rep
    assert min(rep["recall_yes"], rep["recall_no"]) >= 0.6, rep
    # the model card's number is the one measured by the training script on the same examples
    assert rep["accuracy"] == pytest.approx(card["heldout"]["test"]["accuracy"], abs=2 / len(heldout))


def _relative_maps(model, processor, examples, layers, batch_size=32):
    from hf_vgrefine.attention import capture_image_attention
    from hf_vgrefine.prompts import build_inputs, generic_inputs

    out = []
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        imgs = [e["image"] for e in batch]
        q = capture_image_attention(model, build_inputs(processor, imgs, [e["question"] for e in batch]), layers=layers)
        g = capture_image_attention(model, generic_inputs(processor, imgs), layers=layers)
        rel = q.maps.double().mean(2) / (g.maps.double().mean(2) + 1e-10)   # [B, L, N] layer-mean relative
        out.append(rel.numpy())
    return np.concatenate(out)


def test_attention_lands_on_the_named_structure_and_transposed_mask_does_not(ref, heldout):
    from hf_vgrefine.adapters import get_adapter
    from hf_vgrefine.geometry import boxes_to_token_mask
    from hf_vgrefine.measure import measure_grounding
    from hf_vgrefine.metrics import attention_ratio

    model, processor = ref
    adapter = get_adapter(model)
    sub = heldout[::3]                                     # 151 examples over all 8 test slices
    layers = list(range(adapter.num_layers))
    maps = _relative_maps(model, processor, sub, layers)   # [S, L, N]
    grid = adapter.token_grid(processor, sub[0]["image"].size)
    R, C = grid.rows, grid.cols
    ar, ar_t = np.zeros((len(sub), len(layers))), np.zeros((len(sub), len(layers)))
    for s, e in enumerate(sub):
        gt = boxes_to_token_mask(e["boxes"], grid, box_format="xywh").reshape(R, C)
        for li in range(len(layers)):
            ar[s, li] = attention_ratio(maps[s, li], gt.ravel())
            ar_t[s, li] = attention_ratio(maps[s, li], gt.T.ravel())
    mean, mean_t = np.nanmean(ar, 0), np.nanmean(ar_t, 0)
    best = int(np.argmax(mean))
    assert mean[best] >= 1.3, mean
    # geometry proves itself: the swapped mask loses the effect (towards chance = 1)
    assert mean_t[best] <= 1.0 + 0.4 * (mean[best] - 1.0), (mean, mean_t)
    assert mean[best] - mean_t[best] >= 0.25, (mean, mean_t)
    # the package's measurement gives the per-layer numbers of an independent computation (eager attention,
    # prompts, image positions, box cover and attention ratio written out in the test helpers)
    few = sub[:16]
    res = measure_grounding(model, processor, few, layers="all", batch_size=12, scores=["attention_ratio"],
                            progress=False)
    rel = eager_relative_maps(model, processor, few, batch_size=12)                 # [24, L, N]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ref = np.array([[attention_ratio_by_hand(rel[s, li], padded_box_cover(e["boxes"], e["image"].size, side))
                     for li in range(len(layers))] for s, e in enumerate(few)])
    np.testing.assert_allclose(res.get("attention_ratio", "relative"), ref, rtol=1e-4, atol=1e-6)


def test_card_states_the_measured_numbers(card):
    text = (REF / "README.md").read_text()
    acc = card["heldout"]["test"]["accuracy"]
    assert f"{acc:.4f}" in text
    best = card["grounding"]["best_layer"]
    assert f"{card['grounding']['relative_ar'][best]:.4f}" in text
    # training + held-out evaluation within the 10-minute CPU budget
    assert card["training"]["seconds"]["total"] + card["evaluation_seconds"] <= 600
    assert card["grounding"]["relative_ar_transposed"][best] < card["grounding"]["relative_ar"][best]
