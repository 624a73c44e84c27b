"""End-to-end grounding measurement on tiny LLaVA / Qwen2-VL models and the VGMED-schema fixture."""

import json
import math
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from hf_vgrefine.measure import GroundingResults, measure_grounding, parse_layers
from hf_vgrefine.prompts import GENERIC_QUESTION, INSTRUCTION, build_inputs, format_question, generic_inputs
from hf_vgrefine.testing import IMAGE, build_tiny_model, tiny_processor

from _grounding_fixtures import FIXTURE, attention_ratio_by_hand, load_fixture, qwen_processor


@pytest.fixture(scope="module")
def ds():
    return load_fixture()


@pytest.fixture(scope="module")
def llava():
    return build_tiny_model("llava").model, tiny_processor("llava")


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_model("qwen2_vl").model, qwen_processor()


class _Counter:
    """Counts forward calls of a model (question and generic passes)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1

    def close(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------ prompts
def test_prompts_image_first_left_padded(llava, ds):
    _, proc = llava
    assert format_question("Is it?") == f"Is it? {INSTRUCTION}"
    assert format_question("Is it?", None) == "Is it?"
    inp = build_inputs(proc, [ds[0]["image"], ds[2]["image"]], ["a b c d e f g", "a"])
    ids = inp["input_ids"]
    assert ids.shape[0] == 2 and bool(inp["attention_mask"][:, -1].all())      # left padding
    assert inp["attention_mask"][1, 0] == 0
    for row in ids:
        first_img = int((row == IMAGE).nonzero()[0])
        text = proc.tokenizer.decode(row[first_img:])
        assert "single word or phrase" in text and text.rstrip().endswith("<|assistant|>")
    gen = generic_inputs(proc, ds[0]["image"])
    assert "general description" in proc.tokenizer.decode(gen["input_ids"][0])
    assert GENERIC_QUESTION.startswith("Write")
    with pytest.raises(ValueError, match="one image per question"):
        build_inputs(proc, [ds[0]["image"]], ["a", "b"])


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0,2-3", 4) == [0, 2, 3]
    assert parse_layers([-1], 4) == [3]
    with pytest.raises(ValueError, match="valid 0..3"):
        parse_layers("5", 4)


# ------------------------------------------------------------------------------------------------ end to end
def test_measure_llava_writes_outputs_and_resumes(llava, ds, tmp_path):
    model, proc = llava
    out = str(tmp_path / "m")
    counter = _Counter(model)
    try:
        first = measure_grounding(model, proc, ds.select(range(3)), per_head=True, batch_size=2, output_dir=out,
                                  progress=False, plot=False, n_boot=100)
        n_first = counter.n
        assert len(first) == 3
        # rerun on the full dataset: only the 4 new rows are measured
        counter.n = 0
        res = measure_grounding(model, proc, ds, per_head=True, batch_size=2, output_dir=out, progress=False,
                                n_boot=200)
        n_second = counter.n
        # rerun again: nothing left to do, no forward pass at all
        counter.n = 0
        again = measure_grounding(model, proc, ds, per_head=True, batch_size=2, output_dir=out, progress=False,
                                  plot=False, n_boot=200)
        assert counter.n == 0
    finally:
        counter.close()
    # 3 rows = [img_a, img_a], [img_b]: 2 question passes + 2 generic passes (img_a once, img_b once)
    assert n_first == 4
    # 4 new rows [img_b, img_c], [img_c, img_d]: 2 question passes + 2 generic passes (img_b and img_c in one
    # batch, img_c then cached, img_d alone)
    assert n_second == 4
    assert first.info["last_run"]["generic_images"] == 2
    assert res.info["last_run"]["skipped_done"] == 3 and res.info["last_run"]["measured"] == 4
    assert again.info["last_run"]["measured"] == 0 and len(again) == 7
    assert res.ids == list(ds["id"])                          # merged in dataset order
    for name in ("per_sample.parquet", "summary.json", "layers.png", "run.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "layers.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # arrays: per layer and per layer x head, relative and raw, all scores
    L, H = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    assert res.get("attention_ratio").shape == (7, L)
    assert res.get("attention_ratio", "raw", per_head=True).shape == (7, L, H)
    assert set(res.score_names) >= {"attention_ratio", "kl_gt_attention", "js_divergence", "soft_dice_ratio",
                                    "energy_pointing_game", "pointing_game", "auroc"}
    assert np.isfinite(res.get("attention_ratio")).all()
    assert ((res.f > 0) & (res.f < 1)).all()
    # energy pointing game == AR * f (spec §2.2) on every sample and layer
    np.testing.assert_allclose(res.get("energy_pointing_game"), res.get("attention_ratio") * res.f[:, None],
                               rtol=1e-6)
    # summary: mean, median, CI, n, chance per layer
    summ = res.summary()
    ar = summ[(summ.kind == "relative") & (summ.score == "attention_ratio")]
    assert list(ar.layer) == list(range(L)) and (ar.n == 7).all() and (ar.chance == 1.0).all()
    assert (ar.ci_low <= ar["mean"]).all() and (ar["mean"] <= ar.ci_high).all()
    np.testing.assert_allclose(ar["mean"], res.get("attention_ratio").mean(0))
    with open(os.path.join(out, "summary.json")) as f:
        js = json.load(f)
    assert js["n_samples"] == 7 and "by_question_type" in js and "head_summary" in js
    assert {r["question_type"] for r in js["by_question_type"]} == {"localization", "attribute"}
    # round trip
    back = GroundingResults.load(out)
    assert back.ids == res.ids and back.heads == list(range(H))
    for k in res.scores:
        np.testing.assert_array_equal(back.scores[k], res.scores[k])
    # a different setting in the same folder is refused
    with pytest.raises(ValueError, match="different settings"):
        measure_grounding(model, proc, ds, gt="soft_mask", output_dir=out, progress=False)


def test_measure_qwen_non_square_grids(qwen, ds):
    model, proc = qwen
    res = measure_grounding(model, proc, ds, batch_size=3, gt="mask_cells", progress=False)
    assert len(res) == 7
    grids = {(r.grid_rows, r.grid_cols) for r in res.meta.itertuples()}
    assert len(grids) >= 3                                      # per-image grids (112x84, 64x96, 90x90, 80x60)
    # img_c has no mask: falls back to its box
    src = dict(zip(res.ids, res.meta.gt_source))
    assert src["fixture/img_c/lung/localization"] == "box"
    assert src["fixture/img_a/lesion/localization"] == "mask_cells"
    assert res.info["last_run"]["generic_images"] == 4          # one generic pass per unique image
    assert np.isfinite(res.get("kl_gt_attention")).all()
    soft = measure_grounding(model, proc, ds.select(range(2)), gt="soft_mask", relative=False, progress=False)
    assert soft.kinds == ["raw"] and (soft.meta.gt_source == "soft_mask").all()


def test_measure_list_of_dicts_and_empty_region(llava, ds):
    model, proc = llava
    row = dict(ds[0])
    row["id"] = "outside"
    row["boxes"] = [[500.0, 500.0, 5.0, 5.0]]       # lies outside the image: error recorded, scores NaN
    row2 = dict(ds[1])
    res = measure_grounding(model, proc, [row, row2], layers=[1], progress=False)
    assert res.ids == ["outside", "fixture/img_a/lesion/attribute"]
    assert res.meta.gt_error[0] and res.f[0] == 0
    assert np.isnan(res.get("attention_ratio")[0]).all() and np.isfinite(res.get("attention_ratio")[1]).all()
    summ = res.summary()
    assert (summ[summ.score == "attention_ratio"].n == 1).all()
    with pytest.raises(ValueError, match="unique"):
        measure_grounding(model, proc, [row, row], progress=False)


# ------------------------------------------------------------------------------------------------ independent check
def test_relative_ar_matches_eager_hand_computation(ds):
    """AR of sample 0 (img_a 112x84, box [20,10,30,30]) from eager ``output_attentions`` maps and a hand mask."""
    sdpa = build_tiny_model("llava").model
    eager = build_tiny_model("llava", attn_implementation="eager").model    # same seed -> same weights
    proc = tiny_processor("llava")
    res = measure_grounding(sdpa, proc, ds.select(range(2)), per_head=True, batch_size=2, progress=False)

    # hand token mask: LLaVA pad-to-square (do_pad=True): side 112, y offset (112-84)//2 = 14; resize to 28
    # -> scale 0.25; 4x4 tokens of 7 canvas px. Box x 20..50 -> 5..12.5 -> cols 0,1; y 24..54 -> 6..13.5 -> rows 0,1
    x0, y0, w, h = 20, 10, 30, 30
    s, oy, cell = 28 / 112, 14, 7
    cols = range(math.floor(x0 * s / cell), math.ceil((x0 + w) * s / cell))
    rows = range(math.floor((y0 + oy) * s / cell), math.ceil((y0 + h + oy) * s / cell))
    B = sorted(r * 4 + c for r in rows for c in cols)
    assert B == [0, 1, 4, 5]

    def eager_maps(text):
        tmpl = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
        inp = proc(images=[ds[0]["image"].convert("RGB")], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = eager(**inp, output_attentions=True)
        pos = (inp["input_ids"][0] == IMAGE).nonzero().flatten()
        return torch.stack([a[0, :, -1, pos] for a in out.attentions]).double().numpy()   # [L, H, N]

    q = eager_maps(ds[0]["question"] + " Answer the question using a single word or phrase.")
    g = eager_maps("Write a general description of the image. Answer the question using a single word or phrase.")
    n = q.shape[-1]

    def ar(m):   # the hand-written attention ratio of each map along the last axis
        region = np.isin(np.arange(n), B)
        return np.apply_along_axis(attention_ratio_by_hand, -1, m, region)

    rel_layer = q.mean(1) / (g.mean(1) + 1e-10)
    np.testing.assert_allclose(res.get("attention_ratio")[0], ar(rel_layer), rtol=1e-5)
    np.testing.assert_allclose(res.get("attention_ratio", "raw")[0], ar(q.mean(1)), rtol=1e-5)
    np.testing.assert_allclose(res.get("attention_ratio", per_head=True)[0], ar(q / (g + 1e-10)), rtol=1e-5)
    assert res.f[0] == pytest.approx(4 / 16)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_measure_subprocess(llava, ds, tmp_path):
    model, proc = llava
    mdir = tmp_path / "tiny-llava"
    model.save_pretrained(mdir)
    proc.save_pretrained(mdir)
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "hf_vgrefine.cli", "measure", "--model", str(mdir), "--dataset", FIXTURE,
           "--limit", "4", "--batch-size", "4", "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "attention_ratio" in r.stdout
    for name in ("per_sample.parquet", "summary.json", "layers.png"):
        assert (out / name).stat().st_size > 0
    res = GroundingResults.load(str(out))
    assert len(res) == 4
    # the same numbers as the in-process API on the in-memory model
    api = measure_grounding(model, proc, ds.select(range(4)), batch_size=4, progress=False)
    np.testing.assert_allclose(res.get("attention_ratio"), api.get("attention_ratio"), rtol=1e-6)
    # rerun through the same entry point in-process (a second interpreter start is slow): all rows done
    from hf_vgrefine.cli import main

    assert main(cmd[3:]) == 0
    assert GroundingResults.load(str(out)).info["last_run"]["measured"] == 0


def test_cli_help_lists_options():
    from hf_vgrefine.cli import build_parser

    parser = build_parser("measure")
    sub = parser._subparsers._group_actions[0].choices["measure"]
    text = sub.format_help()
    for opt in ("--model", "--dataset", "--config", "--split", "--limit", "--per-head", "--batch-size", "--out",
                "--gt", "--layers"):
        assert opt in text


def test_data_parallel_shards_merge(llava, ds, tmp_path):
    """Two simulated accelerate processes: rank r measures rows i % 2 == r; the main process merges."""
    import hf_vgrefine.sharding as sharding

    model, proc = llava

    class _State:
        def __init__(self, rank):
            self.process_index, self.num_processes = rank, 2
            self.is_local_main_process = rank == 0

        def wait_for_everyone(self):
            pass

    out = str(tmp_path / "dp")
    with mock.patch.object(sharding, "partial_state", lambda: _State(1)):
        assert measure_grounding(model, proc, ds, output_dir=out, progress=False, plot=False, n_boot=50) is None
    shards = sorted(os.listdir(os.path.join(out, "shards")))
    assert shards and all(s.startswith("rank001-") for s in shards)
    assert set(GroundingResults.concat([GroundingResults.from_parquet(os.path.join(out, "shards", s))
                                        for s in shards]).meta["index"]) == {1, 3, 5}
    with mock.patch.object(sharding, "partial_state", lambda: _State(0)):
        merged = measure_grounding(model, proc, ds, output_dir=out, progress=False, plot=False, n_boot=50)
    assert merged.ids == list(ds["id"]) and merged.info["last_run"]["measured"] == 4
    single = measure_grounding(model, proc, ds, progress=False)
    np.testing.assert_allclose(merged.get("attention_ratio"), single.get("attention_ratio"), rtol=1e-6)


def test_load_grounding_dataset_from_disk(ds, tmp_path):
    from datasets import DatasetDict

    from hf_vgrefine.measure import load_grounding_dataset

    ds.save_to_disk(str(tmp_path / "one"))
    assert load_grounding_dataset(str(tmp_path / "one"))["id"] == ds["id"]
    DatasetDict({"test": ds, "other": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_grounding_dataset(str(tmp_path / "dict"), split="other")) == 1
    with pytest.raises(ValueError, match="split"):
        load_grounding_dataset(str(tmp_path / "dict"), split="nope")
    assert len(load_grounding_dataset(FIXTURE)) == 7                        # parquet + dataset card


def test_generic_cache_equals_recomputation(llava, ds):
    model, proc = llava
    one = measure_grounding(model, proc, ds, batch_size=1, generic_cache_size=1, progress=False)
    assert one.info["last_run"]["generic_images"] == 4 and one.info["last_run"]["generic_cache_hits"] == 3
    none = measure_grounding(model, proc, ds, batch_size=7, generic_cache_size=0, progress=False)
    assert none.info["last_run"]["generic_images"] == 4         # de-duplicated within the batch
    for k in one.scores:
        np.testing.assert_allclose(one.scores[k], none.scores[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_parquet_round_trip_exact_with_nans_and_heads(tmp_path):
    """Hand-made results (NaNs, per-head axis) survive to_parquet/from_parquet bit for bit; files written
    with variable-length list columns (earlier releases) load the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    S, L, H = 5, 3, 4
    layer = rng.random((S, L))
    layer[1, 2] = np.nan
    head = rng.random((S, L, H))
    head[4] = np.nan
    meta = {"id": [f"s{i}" for i in range(S)], "f": rng.random(S).tolist()}
    res = GroundingResults(meta, [0, 2, 5], {"relative/attention_ratio": layer, "relative_head/attention_ratio": head},
                           heads=[0, 1, 2, 3], info={"model": "hand"})
    path = res.to_parquet(str(tmp_path / "r.parquet"))
    back = GroundingResults.from_parquet(path)
    assert back.layers == [0, 2, 5] and back.heads == [0, 1, 2, 3] and back.info == {"model": "hand"}
    np.testing.assert_array_equal(back.get("attention_ratio"), layer)
    np.testing.assert_array_equal(back.get("attention_ratio", per_head=True), head)
    assert back.meta["id"].tolist() == meta["id"]
    table = pq.read_table(path)
    old = table.set_column(table.schema.get_field_index("relative_head/attention_ratio"), "relative_head/attention_ratio",
                           pa.array([r.ravel().tolist() for r in head], type=pa.list_(pa.float64())))
    pq.write_table(old.replace_schema_metadata(table.schema.metadata), str(tmp_path / "old.parquet"))
    np.testing.assert_array_equal(GroundingResults.from_parquet(str(tmp_path / "old.parquet")).get(
        "attention_ratio", per_head=True), head)
