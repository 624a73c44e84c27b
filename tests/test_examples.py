"""The scripts in examples/ run as a researcher would run them (``main(argv)`` with command-line arguments),
offline: on the embedded reference VLM, or on tiny random models saved to a local folder (the ``--model`` path
of a hub id). Each checks its outputs against what the method implies, computed here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from _grounding_fixtures import FIXTURE

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MEDVQA_FIXTURES = Path(__file__).parent / "fixtures" / "medvqa"
PNG = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kept_by_percentile(n: int, percentile: float) -> int:
    """Tokens kept by the strict '<' rule at a linearly interpolated percentile of n distinct scores."""
    pos = percentile / 100 * (n - 1)
    return n - (math.floor(pos) + 1)


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA and its processor, saved like a downloaded checkpoint."""
    from hf_vgrefine.testing import build_tiny_model, tiny_processor

    path = tmp_path_factory.mktemp("tiny_llava_model")
    build_tiny_model("llava", num_hidden_layers=3).model.save_pretrained(path)
    tiny_processor("llava").save_pretrained(path)
    return path


def test_every_example_has_a_docstring_and_argparse():
    import ast

    paths = sorted(EXAMPLES.glob("*.py"))
    assert len(paths) >= 5
    for path in paths:
        text = path.read_text()
        assert len(ast.get_docstring(ast.parse(text)) or "") > 200, path.name
        assert "argparse" in text and 'if __name__ == "__main__":' in text, path.name


def test_quickstart_on_the_reference_vlm(tmp_path):
    rows = _load("quickstart_reference_vlm").main(["--n", "2", "--out", str(tmp_path / "triage.png")])
    assert len(rows) == 2 and [r["answer"] for r in rows] == ["yes", "no"]
    for r in rows:
        assert r["baseline"] in ("yes", "no") and r["vgrefine"] in ("yes", "no")
        assert r["image_tokens"] == 64                                      # 8 x 8 grid of the reference VLM
        assert r["kept_tokens"] == _kept_by_percentile(64, 80.0) == 13
    assert (tmp_path / "triage.png").read_bytes()[:8] == PNG


def test_vgrefine_on_a_model_folder(tmp_path, tiny_llava_dir):
    from PIL import Image

    img = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype("uint8")).save(img)
    cfg = json.dumps({"masked_layers": [1], "sensitive_heads": [[0, 1], [1, 2], [2, 3]], "percentile": 50})
    res = _load("vgrefine_hub_model").main(["--model", str(tiny_llava_dir), "--image", str(img),
                                           "--question", "is there a lesion in the liver ?", "--config", cfg,
                                           "--max-new-tokens", "3", "--out", str(tmp_path / "t.png")])
    assert res["grid"] == [4, 4] and res["image_tokens"] == 16
    assert res["kept_tokens"] == _kept_by_percentile(16, 50.0) == 8
    assert res["masked_layers"] == [1] and res["n_sensitive_heads"] == 3
    assert res["question"].endswith("Answer the question using a single word or phrase.")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG


def test_measure_and_calibrate_on_a_local_dataset(tmp_path, tiny_llava_dir):
    import pandas as pd

    from hf_vgrefine import VGRefineConfig

    out = tmp_path / "run"
    cfg = _load("measure_and_calibrate").main(["--model", str(tiny_llava_dir), "--dataset", FIXTURE, "--k", "3",
                                               "--batch-size", "4", "--out", str(out)])
    measured = pd.read_parquet(out / "grounding" / "per_sample.parquet")
    assert sorted(measured["id"]) == ["fixture/img_b/kidney/attribute", "fixture/img_b/kidney/localization",
                                      "fixture/img_d/spot/localization"]                  # the test rows only
    assert (out / "grounding" / "layers.png").read_bytes()[:8] == PNG
    # calibration on the other image group; the masked layer is the argmax of the mean relative AR over its rows
    cal = pd.read_parquet(out / "calibration" / "measurement" / "per_sample.parquet")
    assert sorted(cal["id"]) == ["fixture/img_a/lesion/attribute", "fixture/img_a/lesion/localization",
                                 "fixture/img_c/lung/attribute", "fixture/img_c/lung/localization"]
    ar = np.stack(cal["relative/attention_ratio"].to_numpy()).astype(float)
    means = list(np.nanmean(ar, 0))
    assert cfg.masked_layers == [means.index(max(means))] and len(cfg.sensitive_heads) == 3
    back = VGRefineConfig.from_pretrained(str(out / "calibration"))
    assert back.masked_layers == cfg.masked_layers and back.sensitive_heads == cfg.sensitive_heads


def test_medvqa_baseline_vs_vgrefine(tmp_path):
    from _tiny_llava import save_tiny_llava

    spec = importlib.util.spec_from_file_location("medvqa_build_fixtures", MEDVQA_FIXTURES / "build_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    data = fixtures.write_all(tmp_path / "data")
    model_dir = save_tiny_llava(tmp_path / "model")
    out = tmp_path / "run"
    cfg = json.dumps({"masked_layers": [1], "sensitive_heads": [[0, 1], [1, 2]], "percentile": 80})
    report = _load("medvqa_baseline_vs_vgrefine").main(
        ["--model", model_dir, "--benchmarks", "bundle,vqa-rad", "--data-dir", str(data), "--vgrefine-config", cfg,
         "--limit", "3", "--batch-size", "4", "--out", str(out)])
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines() if x.strip()]
    ids = {m: [r["id"] for r in recs if r["method"] == m] for m in ("baseline", "vgrefine")}
    assert ids["baseline"] == ids["vgrefine"] and len(ids["baseline"]) == len(set(ids["baseline"])) > 0
    by = {(r["method"], r["id"]): r for r in recs}
    assert all(by[("baseline", i)]["prompt"] == by[("vgrefine", i)]["prompt"] for i in ids["baseline"])
    # accuracies and the paired test recomputed from the per-item records (error records, e.g. a two-image item
    # VGRefine refuses, are excluded)
    scored = {m: [i for i in ids[m] if by[(m, i)]["correct"] is not None] for m in ids}
    for m in ("baseline", "vgrefine"):
        assert report.accuracy(m) == pytest.approx(np.mean([bool(by[(m, i)]["correct"]) for i in scored[m]]))
    both = [i for i in scored["baseline"] if i in set(scored["vgrefine"])]
    b = sum(by[("baseline", i)]["correct"] and not by[("vgrefine", i)]["correct"] for i in both)
    c = sum(by[("vgrefine", i)]["correct"] and not by[("baseline", i)]["correct"] for i in both)
    p = min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)) if b + c else 1.0
    comp = report.summary["comparisons"][0]["overall"]
    assert (comp["a_only"], comp["b_only"]) == (b, c) and comp["p_value"] == pytest.approx(p)
    assert (out / "summary.md").is_file() and json.loads((out / "manifest.json").read_text())["model"]["id"] == model_dir
