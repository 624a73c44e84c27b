"""Runner end to end on a tiny random LLaVA (saved + reloaded through the Auto classes) and the fixtures:
two methods, summary + paired comparison, resume after an injected failure, image errors, VGRefine
wiring, CLI and data parallelism with ``accelerate launch`` (2 CPU processes vs 1)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny_llava import load_tiny_llava, save_tiny_llava

from hf_vgrefine.medvqa import (
    MMMU_TEMPLATE,
    MedVQAItem,
    Method,
    build_mcq_prompt,
    compare,
    evaluate_medvqa as evaluate,
    load_benchmark,
    prepare_items,
    read_records,
)

FIXTURES = Path(__file__).parent / "fixtures" / "medvqa"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("medvqa_build_fixtures", FIXTURES / "build_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_all(tmp_path_factory.mktemp("medvqa_data"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
    model, processor = load_tiny_llava(path)
    return path, model, processor


@pytest.fixture(scope="module")
def items(data):
    return [*load_benchmark("bundle", data_dir=data), *load_benchmark("vqa-rad", data_dir=data),
            *load_benchmark("pmc-vqa", data_dir=data)]


def _mcnemar_by_hand(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value written out: the discordant pairs are Binomial(b + c, 1/2) under H0."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_end_to_end_methods_summary_and_comparison(tmp_path, tiny, items):
    _, model, processor = tiny
    four_tokens = Method("baseline_4tok", model.generate, {"max_new_tokens": 4})
    mmmu_prompt = Method("mmmu_prompt", model.generate,
                         prompt_fn=lambda it, p: build_mcq_prompt(it.question, it.options, template=MMMU_TEMPLATE))
    report = evaluate(model, processor, items, methods=["baseline", four_tokens, mmmu_prompt], out_dir=tmp_path,
                      batch_size=4, progress=False, model_id="tiny-llava", revision="rev-123")
    n = len(prepare_items(items).items)
    assert n == 14  # bundle 8 (after dropping open / no-option / duplicate records), VQA-RAD 3, PMC-VQA 3
    recs = _lines(tmp_path / "predictions.jsonl")
    keys = [(r["method"], r["id"]) for r in recs]
    assert len(keys) == len(set(keys)) == 3 * n and not list(tmp_path.glob("predictions.rank*.jsonl"))
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == report.summary and s["methods"] == ["baseline", "baseline_4tok", "mmmu_prompt"]
    assert s["columns"] == [*s["datasets"], "macro", "micro"]
    assert s["datasets"] == ["VQA-RAD", "SLAKE", "PathVQA", "PMC-VQA", "OmniMedVQA", "MMMU-Medical-Tr"]
    for m in s["methods"]:
        row = s["closed"][m]
        assert sum(c["n"] for c in row["datasets"].values()) == row["micro"]["n"] == n
        for c in row["datasets"].values():
            assert c["ci_low"] <= c["accuracy"] <= c["ci_high"]
        accs = [c["accuracy"] for c in row["datasets"].values()]
        assert row["macro"]["accuracy"] == pytest.approx(sum(accs) / len(accs))
    by = {(r["method"], r["id"]): r for r in recs}
    # same prompt for baseline and the 4-token variant; the prompt variant differs
    ids = [r["id"] for r in recs if r["method"] == "baseline"]
    assert all(by[("baseline", i)]["prompt"] == by[("baseline_4tok", i)]["prompt"] for i in ids)
    assert by[("mmmu_prompt", ids[0])]["prompt"].startswith("Please answer the multiple-choice questions below.")
    assert by[("baseline", ids[0])]["prompt"].endswith(
        "Answer with the option's letter from the given choices directly. Answer the question using a single word or phrase.")
    # paired comparison: flipped items are exactly the items whose verdict differs
    comp = s["comparisons"][0]
    assert (comp["a"], comp["b"]) == ("baseline", "baseline_4tok") and comp["overall"]["n"] == n
    flipped = {i for i in ids if by[("baseline", i)]["correct"] != by[("baseline_4tok", i)]["correct"]}
    assert {f["id"] for f in comp["flipped"]} == flipped
    assert comp["overall"]["a_only"] + comp["overall"]["b_only"] == len(flipped)
    # the exact McNemar p-value recomputed here from the records: two-sided binomial test at 1/2 on the discordant
    # pairs, P = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c))
    a_only = sum(by[("baseline", i)]["correct"] and not by[("baseline_4tok", i)]["correct"] for i in ids)
    b_only = len(flipped) - a_only
    assert (comp["overall"]["a_only"], comp["overall"]["b_only"]) == (a_only, b_only)
    assert comp["overall"]["p_value"] == pytest.approx(_mcnemar_by_hand(a_only, b_only), rel=1e-12)
    for ds_name, cell in comp["datasets"].items():
        pairs = [(by[("baseline", i)]["correct"], by[("baseline_4tok", i)]["correct"]) for i in ids
                 if by[("baseline", i)]["dataset"] == ds_name]
        b_, c_ = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
        assert cell["p_value"] == pytest.approx(_mcnemar_by_hand(b_, c_), rel=1e-12), ds_name
    # a pair of methods with many discordant items: baseline vs the MMMU prompt
    comp2 = compare(report, method_a="baseline", method_b="mmmu_prompt")["overall"]
    b2 = sum(by[("baseline", i)]["correct"] and not by[("mmmu_prompt", i)]["correct"] for i in ids)
    c2 = sum(by[("mmmu_prompt", i)]["correct"] and not by[("baseline", i)]["correct"] for i in ids)
    assert (comp2["a_only"], comp2["b_only"]) == (b2, c2)
    assert comp2["p_value"] == pytest.approx(_mcnemar_by_hand(b2, c2), rel=1e-12)
    assert compare(report, method_a="baseline", method_b="baseline_4tok")["overall"] == comp["overall"]
    md = (tmp_path / "summary.md").read_text()
    assert "| method | VQA-RAD | SLAKE | PathVQA | PMC-VQA | OmniMedVQA | MMMU-Medical-Tr | Macro | Micro |" in md
    assert "## Paired comparison: baseline_4tok vs baseline" in md and "McNemar p" in md
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["model"]["id"] == "tiny-llava" and man["model"]["revision"] == "rev-123"
    assert {"torch", "transformers", "accelerate"} <= set(man["libraries"]) and man["seed"] == 42
    assert man["decoding"]["do_sample"] is False and man["decoding"]["max_new_tokens"] == 1
    assert man["prompt"]["template"].endswith("directly.") and man["scorer"]["name"] == "mcq_letter"
    assert [m["name"] for m in man["methods"]] == s["methods"] and man["world_size"] == 1
    assert all(len(by[("baseline", i)]["response"].split()) <= 1 for i in ids)


def test_batched_equals_unbatched(tiny, items):
    _, model, processor = tiny
    one = evaluate(model, processor, items, methods=["baseline"], batch_size=1, progress=False)
    many = evaluate(model, processor, items, methods=["baseline"], batch_size=5, progress=False)
    assert [r["response"] for r in one.records] == [r["response"] for r in many.records]
    assert one.summary == many.summary


def test_resume_after_injected_failure(tmp_path, tiny, items):
    _, model, processor = tiny
    calls = {"baseline": 0, "short": 0}

    class Interrupted(RuntimeError):
        pass

    def flaky(**kw):
        calls["baseline"] += 1
        if calls["baseline"] == 3:
            raise Interrupted("injected failure in batch 3")
        return model.generate(**kw)

    def counting(name):
        def gen(**kw):
            calls[name] += kw["input_ids"].shape[0]
            return model.generate(**kw)
        return gen

    run = tmp_path / "run"
    short = {"max_new_tokens": 2}
    with pytest.raises(Interrupted):
        evaluate(model, processor, items, methods=[Method("baseline", flaky), Method("short", model.generate, short)],
                 out_dir=run, batch_size=3, progress=False)
    shard = _lines(run / "predictions.rank0.jsonl")
    assert len(shard) == 6 and not (run / "predictions.jsonl").exists() and not (run / "summary.json").exists()
    with open(run / "predictions.rank0.jsonl", "a") as f:  # a write torn by the crash
        f.write('{"method": "baseline", "id": "VQA-RAD/1", "resp')

    calls.update(baseline=0, short=0)
    methods = [Method("baseline", counting("baseline")), Method("short", counting("short"), short)]
    resumed = evaluate(model, processor, items, methods=methods, out_dir=run, batch_size=3, progress=False)
    n = len(resumed.records) // 2
    assert calls == {"baseline": n - 6, "short": n}  # done items were skipped

    clean = evaluate(model, processor, items, methods=[Method("baseline", model.generate), Method("short", model.generate, short)],
                     out_dir=tmp_path / "clean", batch_size=3, progress=False)
    assert (run / "summary.json").read_text() == (tmp_path / "clean" / "summary.json").read_text()
    assert (run / "summary.md").read_text() == (tmp_path / "clean" / "summary.md").read_text()
    got, ref = _lines(run / "predictions.jsonl"), _lines(tmp_path / "clean" / "predictions.jsonl")
    assert got == ref and len({(r["method"], r["id"]) for r in got}) == len(got) == 2 * n
    assert not list(run.glob("predictions.rank*.jsonl"))

    calls.update(baseline=0, short=0)  # a third run has nothing left to do
    again = evaluate(model, processor, items, methods=methods, out_dir=run, batch_size=3, progress=False)
    assert calls == {"baseline": 0, "short": 0} and again.summary == clean.summary


def test_unreadable_image_is_recorded_and_listed(tmp_path, tiny, data):
    _, model, processor = tiny
    good = load_benchmark("vqa-rad", data_dir=data)[:2]
    bad = MedVQAItem("bad/0", "VQA-RAD", [b"definitely not an image"], "Is it normal?", ["yes", "no"], "yes")
    missing = MedVQAItem("bad/1", "VQA-RAD", [str(tmp_path / "nope.png")], "Is it big?", ["yes", "no"], "no")
    for _ in range(2):  # errors are retried on a rerun, never duplicated
        rep = evaluate(model, processor, [*good, bad, missing], methods=["baseline"], out_dir=tmp_path / "r",
                       progress=False)
    assert rep.summary["closed"]["baseline"]["micro"]["n"] == 2
    assert [f["id"] for f in rep.summary["failures"]] == ["bad/0", "bad/1"]
    assert all(f["error"].startswith("image: ") for f in rep.summary["failures"])
    assert len(read_records(tmp_path / "r")) == 4 == len(_lines(tmp_path / "r" / "predictions.jsonl"))
    assert "## Failures (2 items excluded)" in (tmp_path / "r" / "summary.md").read_text()


def test_vgrefine_method(tmp_path, tiny, items):
    from hf_vgrefine.vgrefine import VGRefineConfig
    _, model, processor = tiny
    cfg = VGRefineConfig(masked_layers=[1], sensitive_heads=[[0, 1], [1, 2]], percentile=50.0)
    rep = evaluate(model, processor, items, methods=("baseline", "vgrefine"), vgrefine_config=cfg.to_json_string(),
                   out_dir=tmp_path, batch_size=4, progress=False, generic_cache_dir=tmp_path / "gc")
    s = rep.summary
    # a second run reads the generic maps back from the cache folder and predicts the same
    assert len(list((tmp_path / "gc").rglob("*.safetensors"))) > 0
    again = evaluate(model, processor, items, methods=("vgrefine",), vgrefine_config=cfg.to_json_string(),
                     out_dir=tmp_path / "again", batch_size=4, progress=False, generic_cache_dir=tmp_path / "gc")
    first = {r["id"]: r["response"] for r in read_records(tmp_path) if r["method"] == "vgrefine"}
    second = {r["id"]: r["response"] for r in read_records(tmp_path / "again")}
    assert first == second and len(first) == again.summary["closed"]["vgrefine"]["micro"]["n"] + 1
    assert s["methods"] == ["baseline", "vgrefine"] and s["prompt"]["instruction"] == cfg.instruction
    assert [f["id"] for f in s["failures"]] == ["MMMU-Medical-Tr/6"]  # two images: not supported by VGRefine
    assert "one image" in s["failures"][0]["error"]
    comp = s["comparisons"][0]
    assert comp["overall"]["n"] == s["closed"]["vgrefine"]["micro"]["n"] == s["closed"]["baseline"]["micro"]["n"] - 1
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["methods"][1]["config"]["masked_layers"] == [1]
    assert "## Paired comparison: vgrefine vs baseline" in (tmp_path / "summary.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_one_process_vs_accelerate_two_processes(tmp_path, tiny, data):
    from hf_vgrefine.cli import main

    path, _, _ = tiny
    args = ["--model", path, "--benchmarks", "bundle,vqa-rad", "--data-dir", str(data), "--methods", "baseline",
            "--batch-size", "1", "--no-progress"]
    assert main(["evaluate", *args, "--out", str(tmp_path / "one")]) == 0

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).parent), env.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "hf_vgrefine.medvqa.cli", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))
    one, two = _lines(tmp_path / "one" / "predictions.jsonl"), _lines(tmp_path / "two" / "predictions.jsonl")
    assert len(one) == len(two) == 11
    assert one == two  # same items, order, prompts, responses and verdicts
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s1 == s2
    assert "| baseline |" in proc.stdout


def test_resume_guard_and_rescoring(tmp_path, tiny, data):
    _, model, processor = tiny
    its = load_benchmark("vqa-rad", data_dir=data)
    calls = []

    def gen(**kw):
        calls.append(kw["input_ids"].shape[0])
        return model.generate(**kw)

    first = evaluate(model, processor, its, methods=[Method("baseline", gen)], out_dir=tmp_path, progress=False)
    assert sum(calls) == 3 and {r["scorer"] for r in first.records} == {"mcq_letter"}
    with pytest.raises(ValueError, match="different settings.*instruction"):
        evaluate(model, processor, its, methods=[Method("baseline", gen)], out_dir=tmp_path, instruction=None,
                 progress=False)
    with pytest.raises(ValueError, match="different settings.*decoding"):
        evaluate(model, processor, its, methods=[Method("baseline", gen)], out_dir=tmp_path, max_new_tokens=3,
                 progress=False)
    # another scorer: nothing is generated again, stored responses are re-scored
    again = evaluate(model, processor, its, methods=[Method("baseline", gen)], out_dir=tmp_path,
                     scorer="yesno_xor_substring", progress=False)
    assert sum(calls) == 3 and again.summary["scorer"]["name"] == "yesno_xor_substring"
    assert {r["scorer"] for r in _lines(tmp_path / "predictions.jsonl")} == {"yesno_xor_substring"}
    assert [r["response"] for r in again.records] == [r["response"] for r in first.records]
    # a new method may be added to an existing out_dir
    more = evaluate(model, processor, its, methods=[Method("baseline", gen), Method("b2", model.generate, {"max_new_tokens": 2})],
                    out_dir=tmp_path, progress=False)
    assert sum(calls) == 3 and more.summary["methods"] == ["baseline", "b2"]
