"""Calibration of VGRefine's masked layer and sensitive heads on tiny models + the ranking rule."""

import json

import numpy as np
import pandas as pd
import pytest

from hf_vgrefine.calibrate import calibrate, choose_layer, rank_heads
from hf_vgrefine.measure import GroundingResults
from hf_vgrefine.testing import build_tiny_model, tiny_processor
from hf_vgrefine.vgrefine import VGRefineConfig

from _grounding_fixtures import FIXTURE, attention_ratio_by_hand, eager_relative_maps, load_fixture, padded_box_cover
from _grounding_fixtures import qwen_processor as _qwen_processor


@pytest.fixture(scope="module")
def ds():
    return load_fixture()


# ------------------------------------------------------------------------------------------------ rule
def test_rank_heads_rule():
    m = np.array([[1.0, 3.0, np.nan], [3.0, 2.0, 0.5]])
    ranked = rank_heads(m, layers=[0, 1], heads=[0, 1, 2])
    # ties (3.0) -> lower layer first; NaN last
    assert [(l, h) for l, h, _ in ranked] == [(0, 1), (1, 0), (1, 1), (0, 0), (1, 2), (0, 2)]
    asc = rank_heads(m, [0, 1], [0, 1, 2], descending=False, exclude_layers=[0])
    assert [(l, h) for l, h, _ in asc] == [(1, 2), (1, 1), (1, 0)]
    assert choose_layer(np.array([1.0, 2.0, 2.0, 0.5]), [0, 1, 2, 3]) == 1          # tie -> lower layer
    assert choose_layer(np.array([1.0, 2.0, 2.0, 0.5]), [0, 1, 2, 3], exclude_layers=[1]) == 2
    assert choose_layer(np.array([1.0, 2.0, np.nan, 0.5]), [0, 1, 2, 3], higher_is_better=False) == 3
    with pytest.raises(ValueError, match="finite"):
        choose_layer(np.array([np.nan]), [0])


def _synthetic_results(L=3, H=4, S=5):
    """Per-head AR with a known best head (2, 1) and best layer 2; head (0, 3) best by median only."""
    rng = np.random.default_rng(0)
    head = 1.0 + 0.01 * rng.standard_normal((S, L, H))
    head[:, 2, 1] += 1.0
    head[:, 1, 2] += 0.5
    layer = head.mean(2)
    meta = pd.DataFrame({"id": [f"s{i}" for i in range(S)], "index": range(S), "question_type": "localization",
                         "modality": "mr", "source": "x", "label": "y", "f": 0.25, "n_gt_tokens": 4,
                         "n_tokens": 16, "grid_rows": 4, "grid_cols": 4, "gt_source": "box", "gt_error": ""})
    scores = {"relative/attention_ratio": layer, "relative_head/attention_ratio": head,
              "relative/kl_gt_attention": -layer, "relative_head/kl_gt_attention": -head,
              "relative/js_divergence": -layer, "relative_head/js_divergence": -head}
    return GroundingResults(meta, list(range(L)), scores, list(range(H)), {"gt": "box", "eps": 1e-10, "query": "last"})


def test_calibrate_from_results_rule():
    tiny = build_tiny_model("llava", num_hidden_layers=3)
    res = _synthetic_results()
    cfg = calibrate(tiny.model, tiny_processor("llava"), None, k=2, results=res)
    assert cfg.masked_layers == [2]
    assert cfg.sensitive_heads == [[2, 1], [1, 2]]
    cal = cfg.calibration
    assert cal["k_effective"] == 2 and cal["layer_ranking"][0] == 2 and cal["n_samples"] == 5
    assert np.allclose(np.array(cal["head_statistic"]["matrix"]), res.get("attention_ratio", per_head=True).mean(0))
    cfg_x = calibrate(tiny.model, tiny_processor("llava"), None, k=1, results=res, exclude_layers=[2],
                      rank_by="kl_mean")
    assert cfg_x.masked_layers == [1] and cfg_x.sensitive_heads == [[1, 2]]
    with pytest.raises(ValueError, match="rank_by"):
        calibrate(tiny.model, tiny_processor("llava"), None, results=res, rank_by="nope")


# ------------------------------------------------------------------------------------------------ end to end
def test_calibrate_llava_end_to_end(ds, tmp_path):
    tiny = build_tiny_model("llava")
    model, proc = tiny.model, tiny_processor("llava")
    L, H = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    with pytest.warns(UserWarning, match="only 8 candidate heads"):
        cfg = calibrate(model, proc, ds, k=20, output_dir=str(tmp_path), progress=False)
    assert len(cfg.masked_layers) == 1 and 0 <= cfg.masked_layers[0] < L
    assert len(cfg.sensitive_heads) == L * H
    assert all(0 <= l < L and 0 <= h < H for l, h in cfg.sensitive_heads)
    assert len({tuple(p) for p in cfg.sensitive_heads}) == L * H
    cal = cfg.calibration
    assert cal["split_group"] == "calibration" and cal["n_samples"] == 4            # img_a, img_c rows
    assert set(cal["question_types"]) == {"localization", "attribute"}
    # the chosen layer is the argmax of the reported layer curve; heads are ordered by the reported matrix
    curve = np.array(cal["layer_curves"]["attention_ratio"])
    assert cfg.masked_layers[0] == int(np.argmax(curve))
    mat = np.array(cal["head_statistic"]["matrix"])
    vals = [mat[l, h] for l, h in cfg.sensitive_heads]
    assert vals == sorted(vals, reverse=True)
    # written files; the JSON loads with VGRefineConfig
    assert (tmp_path / "vgrefine_config.json").exists() and (tmp_path / "calibration_heads.png").stat().st_size > 0
    assert (tmp_path / "measurement" / "per_sample.parquet").exists()
    back = VGRefineConfig.from_pretrained(str(tmp_path))
    assert back.sensitive_heads == cfg.sensitive_heads and back.masked_layers == cfg.masked_layers
    back.check_model(L, H)
    with open(tmp_path / "vgrefine_config.json") as f:
        json.load(f)                                        # strict JSON (no NaN)
    # the head statistic equals an independent computation: eager per-head relative maps of the calibration rows,
    # the box cover rule on the padded canvas and the attention ratio, all written out in the test helpers
    rows = [r for r in ds if r["split_group"] == "calibration"]
    rel = eager_relative_maps(model, proc, rows, per_head=True)                      # [S, L, H, N]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ar = np.array([[[attention_ratio_by_hand(rel[s, l, h], padded_box_cover(r["boxes"], r["image"].size, side))
                     for h in range(H)] for l in range(L)] for s, r in enumerate(rows)])
    np.testing.assert_allclose(mat, ar.mean(0), rtol=1e-4)


def test_calibrate_qwen_and_cli(ds, tmp_path):
    tiny = build_tiny_model("qwen2_vl")
    cfg = calibrate(tiny.model, _qwen_processor(), ds, k=3, rank_by="ar_median", split_group=None, progress=False)
    assert len(cfg.sensitive_heads) == 3 and cfg.calibration["n_samples"] == 7
    assert all(0 <= l < 2 and 0 <= h < 4 for l, h in cfg.sensitive_heads)

    llava = build_tiny_model("llava").model
    mdir = tmp_path / "tiny"
    llava.save_pretrained(mdir)
    tiny_processor("llava").save_pretrained(mdir)
    from hf_vgrefine.cli import main

    out = tmp_path / "cal"
    rc = main(["calibrate", "--model", str(mdir), "--dataset", FIXTURE, "--k", "3", "--exclude-layers", "0",
               "--processor-setting", "do_pad=false", "--processor-setting", 'size={"shortest_edge": 28}',
               "--no-progress", "--out", str(out)])
    assert rc == 0
    c = VGRefineConfig.from_pretrained(str(out))
    assert c.processor_settings["do_pad"] is False and c.processor_settings["size"] == {"shortest_edge": 28}
    assert c.masked_layers == [1] and all(l == 1 for l, _ in c.sensitive_heads) and len(c.sensitive_heads) == 3
    assert (out / "calibration_heads.png").exists()
