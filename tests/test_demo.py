"""``hf-vgrefine demo``: runs end to end offline on the shipped reference model, writes the report with
non-trivial figures, and every number of the report's tables equals the saved results JSON."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hf_vgrefine import demo


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import argparse

    from hf_vgrefine.commands import demo as demo_command

    out = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser(prog="hf-vgrefine")
    demo_command.add_cli(parser.add_subparsers(dest="command"))      # the contract of hf_vgrefine.cli
    args = parser.parse_args(["demo", "--out", str(out), "--limit", "24", "--calibration-limit", "12",
                              "--no-progress", "--batch-size", "24"])
    assert args.func(args) == 0
    return out, json.loads((out / demo.RESULTS_JSON).read_text())


def _tables(md: str) -> list[list[list[str]]]:
    tables, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _num(cell: str):
    return None if cell == "n/a" else float(cell)


def test_files_exist_with_non_trivial_size(run):
    out, res = run
    for name in (demo.REPORT_MD, demo.REPORT_HTML, demo.RESULTS_JSON, "per_example.jsonl",
                 "calibration/vgrefine_config.json"):
        assert (out / name).is_file(), name
    for key, rel in demo.FIGURES.items():
        path = out / rel
        assert path.is_file(), key
        assert path.stat().st_size > 10_000, (key, path.stat().st_size)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({rel})" in (out / demo.REPORT_MD).read_text()
    html = (out / demo.REPORT_HTML).read_text()
    assert all(f"src='{rel}'" in html for rel in demo.FIGURES.values())
    assert res["data"]["n_test"] == 48 and res["data"]["n_calibration"] == 24
    assert res["accuracy"]["baseline"]["n"] == 48


def test_report_tables_equal_the_results_json(run):
    out, res = run
    tables = _tables((out / demo.REPORT_MD).read_text())
    header = [t for t in tables if t[0] == demo.LAYER_HEADER]
    assert len(header) == 1
    layer_rows = header[0][1:]
    g = res["grounding"]
    assert [int(r[0]) for r in layer_rows] == g["layers"]
    for i, r in enumerate(layer_rows):
        expect = [g["relative"]["attention_ratio"]["mean"][i], g["relative"]["attention_ratio"]["ci_low"][i],
                  g["relative"]["attention_ratio"]["ci_high"][i], g["raw"]["attention_ratio"]["mean"][i],
                  g["relative"]["energy_pointing_game"]["mean"][i], g["chance"]["energy_pointing_game"]]
        assert [_num(c) for c in r[1:]] == pytest.approx(expect, abs=5e-5)

    acc_table = [t for t in tables if t[0] == demo.TABLE_HEADER]
    assert len(acc_table) == 1
    rows = {r[0]: r for r in acc_table[0][1:]}
    assert set(rows) == {"baseline", "VGRefine", "oracle knockout"}
    for method, key in demo.TABLE_METHODS:
        a, m = res["accuracy"][key], res["masked_layer_grounding"][key]
        expect = [a["accuracy"], a["recall_yes"], a["recall_no"], m["attention_ratio"], m["region_mass"]]
        assert [_num(c) for c in rows[method][1:6]] == pytest.approx(expect, abs=5e-5)
        assert int(rows[method][6]) == a["n"]

    # the per-example file is the source of the accuracy numbers
    per = [json.loads(x) for x in (out / "per_example.jsonl").read_text().splitlines()]
    assert len(per) == res["accuracy"]["baseline"]["n"]
    base = sum(p["baseline"] == p["answer"] for p in per) / len(per)
    refd = sum(p["vgrefine"] == p["answer"] for p in per) / len(per)
    assert base == pytest.approx(res["accuracy"]["baseline"]["accuracy"], abs=5e-5)
    assert refd == pytest.approx(res["accuracy"]["vgrefine"]["accuracy"], abs=5e-5)
    orac = sum(p["oracle"] == p["answer"] for p in per) / len(per)
    assert orac == pytest.approx(res["accuracy"]["oracle"]["accuracy"], abs=5e-5)
    # the oracle keeps exactly the region's tokens: kept fraction = region fraction f, all attention mass at the
    # masked layer inside the region
    for p in per:
        assert p["oracle_kept_fraction"] == pytest.approx(p["f"], abs=1e-6)
        assert p["mass_oracle"] == pytest.approx(1.0, abs=1e-5)

    md = (out / demo.REPORT_MD).read_text()
    m = re.search(r"Best layer: \*\*(\d+)\*\* \(relative AR ([0-9.]+)", md)
    assert m and int(m.group(1)) == g["best_layer"] and float(m.group(2)) == pytest.approx(g["best_layer_ar"], abs=5e-5)
    assert str(res["calibration"]["masked_layers"]) in md


def test_reference_model_is_grounded_in_the_demo(run):
    import pandas as pd

    out, res = run
    g = res["grounding"]
    assert g["best_layer_ar"] >= 1.3
    # the calibration rule recomputed here from the calibration run's per-sample scores: masked layer = argmax over
    # layers of the mean relative attention ratio (NaN samples excluded, ties -> lower layer)
    per = pd.read_parquet(out / "calibration" / "measurement" / "per_sample.parquet")
    ar = np.stack(per["relative/attention_ratio"].to_numpy()).astype(float)          # [samples, layers]
    means = [float(np.mean(col[np.isfinite(col)])) for col in ar.T]
    assert res["calibration"]["masked_layers"] == [means.index(max(means))]
    # calibration slices and test slices agree on the grounded layer of the reference model
    assert res["calibration"]["masked_layers"] == [g["best_layer"]]
    assert res["accuracy"]["baseline"]["accuracy"] >= 0.65
    assert res["timing"]["total_s"] < 120


def test_tuned_vgrefine_row_on_the_same_test_questions(run):
    out, r = run
    a, t = r["accuracy"], r["tuning"]
    rows = [json.loads(x) for x in (out / "per_example.jsonl").read_text().splitlines()]
    assert a["vgrefine_tuned"]["n"] == a["baseline"]["n"] == len(rows)
    acc_t = sum(x["vgrefine_tuned"] == x["answer"] for x in rows) / len(rows)
    acc_b = sum(x["baseline"] == x["answer"] for x in rows) / len(rows)
    assert a["vgrefine_tuned"]["accuracy"] == round(acc_t, 4)
    assert a["tuned_difference"] == pytest.approx(acc_t - acc_b, abs=1e-4)
    lo, hi = a["tuned_difference_ci"]
    assert lo <= a["tuned_difference"] <= hi
    # the search's questions come from the calibration slices only (never a test image)
    search = json.loads((out / "search" / "search_results.json").read_text())
    test_slices = {x["id"].split("/")[1] for x in rows}
    assert search["ids"] and not {i.split("/")[1] for i in search["ids"]} & test_slices
    assert t["n_calibration"] == len(search["ids"]) and t["n_candidates"] == len(search["table"])
    assert (out / "search" / "search_gain_vs_percentile.png").stat().st_size > 1000
    assert "VGRefine (tuned on the calibration split)" in (out / demo.REPORT_MD).read_text()


def test_transposed_mask_control_is_in_results_and_report(run):
    out, r = run
    ctrl = r["masked_layer_grounding"]["control_transposed_mask"]
    per = [json.loads(line) for line in (out / "per_example.jsonl").read_text().splitlines()]
    # the control is the mean of the per-example values, each the AR against the transposed token mask
    vals = [p["triage_ar_transposed"] for p in per if p["triage_ar_transposed"] is not None]
    assert ctrl["triage_attention_ratio"] == pytest.approx(sum(vals) / len(vals), abs=1e-4)
    # on the grounded reference model the transposed mask scores far below the real one
    assert ctrl["triage_attention_ratio"] < r["masked_layer_grounding"]["vgrefine"]["triage_attention_ratio"] / 2
    md = (out / demo.REPORT_MD).read_text()
    assert f"{ctrl['triage_attention_ratio']:.4f} against the same token mask transposed" in md


def test_report_html_renders_markdown_emphasis(run):
    out, _ = run
    page = (out / demo.REPORT_HTML).read_text()
    text = re.sub(r"<[^>]+>", "", page)
    assert "<i>Oracle knockout</i>" in page and "<b>" in page
    assert not re.search(r"(?<![\w*])\*[^*\s][^*]*\*(?![\w*])", text)       # no literal *emphasis*
    assert "**" not in text
