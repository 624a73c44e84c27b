"""Knockout search (hf_vgrefine.tuning): batched triage with the search's knobs = the per-sample functions with a
VGRefineConfig, a planted setting is found,
a candidate's accuracy equals the wrapper run with that config, and the test split is never read."""

import json
import os

import numpy as np
import pytest
import torch

from hf_vgrefine.tuning import Candidate, SearchSpace, TriageKnobs, paired_bootstrap, search_knockout
from hf_vgrefine.vgrefine import VGRefineConfig, VGRefineWrapper
from hf_vgrefine.vgrefine.triage import knockout_set, triage_scores


# ============================================================================================ pure functions
@pytest.mark.parametrize("norm", ["layer_mean", "per_head", "none"])
def test_vectorised_triage_equals_per_sample_functions(norm):
    g = torch.Generator().manual_seed(0)
    B, L, H, N = 5, 3, 4, 37
    q = torch.rand(B, L, H, N, generator=g) ** 3
    gen = torch.rand(B, L, H, N, generator=g) ** 3 + 1e-3
    q[1, :, :, 3] = 0.0                     # ties
    gen[2, 0, 0, 5] = 0.0                   # huge ratio
    heads = [[2, 1], [0, 3], [2, 0]]
    s_vec = triage_scores(q, gen, [0, 1, 2], TriageKnobs(tuple(map(tuple, heads)), norm, 1e-10))
    for P, M in [(80.0, None), (0.0, None), (100.0, None), (37.5, None), (None, 0.2), (None, 0.0)]:
        cfg = VGRefineConfig(masked_layers=[1], sensitive_heads=heads, percentile=P, magnitude_threshold=M,
                             generic_norm=norm)
        K_vec = knockout_set(s_vec, TriageKnobs(tuple(map(tuple, heads)), norm, 1e-10, P, M))[0]
        for b in range(B):
            ref = triage_scores(q[b], gen[b], [0, 1, 2], cfg)
            assert torch.equal(s_vec[b], ref)
            K_ref, _ = knockout_set(ref, cfg)
            assert torch.equal(K_vec[b], K_ref), (P, M, b)


def test_vectorised_knockout_non_finite_and_constant():
    s = torch.tensor([[1.0, float("nan"), 3.0, 2.0, float("inf")], [2.0, 2.0, 2.0, 2.0, 2.0],
                      [float("nan")] * 5])
    for P, M in [(50.0, None), (90.0, None), (None, 0.5)]:
        cfg = VGRefineConfig(masked_layers=[0], sensitive_heads=[[0, 0]], percentile=P, magnitude_threshold=M)
        K = knockout_set(s, TriageKnobs(((0, 0),), "layer_mean", 1e-10, P, M))[0]
        for b in range(3):
            assert torch.equal(K[b], knockout_set(s[b], cfg)[0]), (P, M, b)


def test_paired_bootstrap_matches_direct_resampling():
    rng = np.random.default_rng(3)
    d = rng.integers(-1, 2, size=(2, 60)).astype(float)
    lo, hi, se = paired_bootstrap(d, n_boot=500, seed=11)
    idx = np.random.default_rng(11).integers(0, 60, size=(500, 60))
    for c in range(2):
        boots = d[c][idx].mean(1)
        assert np.isclose(lo[c], np.percentile(boots, 2.5)) and np.isclose(hi[c], np.percentile(boots, 97.5))
        assert np.isclose(se[c], boots.std(ddof=1))


def test_search_space_validation():
    with pytest.raises(ValueError, match="percentiles"):
        SearchSpace(percentiles=(120,))
    with pytest.raises(ValueError, match="generic_norms"):
        SearchSpace(generic_norms=("mean",))
    assert SearchSpace(max_run=2).layer_sets(3) == [(0,), (1,), (2,), (0, 1), (1, 2)]
    with pytest.raises(TypeError, match="search must be"):
        SearchSpace.coerce(3)


# ============================================================================================ reference VLM
@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(1)
    from hf_vgrefine import reference_task as rt
    from hf_vgrefine.data import load_vgmed
    from hf_vgrefine.demo import reference_model_dir
    from hf_vgrefine.measure import load_model_and_processor

    model, processor = load_model_and_processor(str(reference_model_dir()), dtype="float32")
    images = rt.images_from_vgmed(load_vgmed("atlas"))
    examples = rt.heldout_examples(images=images, split_group="calibration", limit=24, seed=7)
    return model, processor, images, examples


def _wrapper_answers(model, processor, examples, config):
    """Independent reference: VGRefineWrapper with ``config``, the larger of the yes/no logits."""
    from hf_vgrefine.prompts import build_inputs, to_model_inputs

    tok = processor.tokenizer
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    wrapper = VGRefineWrapper(model, config, processor=processor)
    out = []
    for s in range(0, len(examples), 16):
        batch = examples[s:s + 16]
        inputs = to_model_inputs(build_inputs(processor, [e["image"] for e in batch], [e["question"] for e in batch],
                                              instruction=config.instruction), model)
        with torch.no_grad():
            logits = wrapper(**inputs).logits[:, -1]
        out += ["yes" if logits[i, yes] > logits[i, no] else "no" for i in range(len(batch))]
    return out


PLANTED = dict(masked_layers=[1], sensitive_heads=[[2, 0], [2, 1]], percentile=90.0)


def test_search_finds_planted_setting_and_matches_the_wrapper(ref, tmp_path):
    model, processor, _, examples = ref
    # labels planted by construction: the answers of VGRefine with masked layer 1 and percentile 90 (k=2 heads),
    # so that setting scores 100 % and the plain model does not
    planted = VGRefineConfig(**PLANTED)
    labels = _wrapper_answers(model, processor, examples, planted)
    data = [dict(e, answer=a) for e, a in zip(examples, labels)]
    base = VGRefineConfig(masked_layers=[3], sensitive_heads=[[2, 0], [2, 1]], percentile=60.0)
    space = SearchSpace(max_run=1, percentiles=(30.0, 60.0, 90.0), magnitude_thresholds=(), ks=(2,),
                        generic_norms=("layer_mean",), knockout_heads=("all",))
    res = search_knockout(model, processor, data, base, space=space, head_ranking=[[2, 0], [2, 1], [2, 2], [2, 3]],
                          batch_size=16, progress=False, output_dir=str(tmp_path / "search"))
    assert res.baseline["accuracy"] < 1.0
    assert res.info["best"]["label"] == "L1 k2 P90 layer_mean ko:all"
    assert res.chosen["label"] == "L1 k2 P90 layer_mean ko:all" and res.chosen["accuracy"] == 1.0
    assert res.config.masked_layers == [1] and res.config.percentile == 90.0
    assert res.config.sensitive_heads == [[2, 0], [2, 1]]
    assert res.info["self_check"]["done"] and not res.info["self_check"]["fallback"]
    # every candidate's per-question verdicts equal the wrapper run with that candidate's config
    by_label = {r["label"]: r for r in res.table}
    for label in ("L0 k2 P30 layer_mean ko:all", "L2 k2 P90 layer_mean ko:all", "L3 k2 P60 layer_mean ko:all"):
        r = by_label[label]
        cand = Candidate(tuple(r["masked_layers"]), r["k"], r["percentile"], r["magnitude_threshold"],
                         r["generic_norm"], r["knockout_heads"])
        cfg = cand.to_config(base, [[2, 0], [2, 1], [2, 2], [2, 3]])
        ref_ok = [a == d["answer"] for a, d in zip(_wrapper_answers(model, processor, data, cfg), data)]
        assert res.per_example[label] == ref_ok, label
        assert r["accuracy"] == pytest.approx(np.mean(ref_ok))
    # files: config loadable by the wrapper, report, table, figure
    files = {k: tmp_path / "search" / v for k, v in res.files.items()}
    assert all(f.stat().st_size > 200 for f in files.values())
    loaded = VGRefineConfig.from_pretrained(str(tmp_path / "search"))
    assert loaded.masked_layers == [1] and loaded.calibration["search"]["chosen"] == res.chosen["label"]
    table = json.loads(files["results"].read_text())["table"]
    assert len(table) == res.info["n_candidates"] == 12      # 4 layers x 3 percentiles (the base L3 P60 among them)
    assert "48 questions" in files["report"].read_text() and "12 candidates" in files["report"].read_text()


def test_sensitive_heads_and_generic_norm_candidates_match_the_wrapper(ref):
    model, processor, _, examples = ref
    data = examples[:32]
    base = VGRefineConfig(masked_layers=[2], sensitive_heads=[[2, 2], [2, 3]], percentile=80.0)
    ranking = [[2, 2], [1, 3], [2, 3], [0, 1]]
    space = SearchSpace(layer_runs=[(1, 2)], percentiles=(85.0,), magnitude_thresholds=(0.2,), ks=(3,),
                        generic_norms=("per_head", "none"), knockout_heads=("sensitive",), strategy="grid")
    res = search_knockout(model, processor, data, base, space=space, head_ranking=ranking, batch_size=16,
                          progress=False)
    rows = [r for r in res.table if not r["is_base"]]
    assert len(rows) == 8                   # k in {3, base 2} x 2 thresholds x 2 normalisations
    for r in rows:
        cand = Candidate(tuple(r["masked_layers"]), r["k"], r["percentile"], r["magnitude_threshold"],
                         r["generic_norm"], r["knockout_heads"])
        cfg = cand.to_config(base, ranking)
        ok = [a == d["answer"] for a, d in zip(_wrapper_answers(model, processor, data, cfg), data)]
        assert res.per_example[r["label"]] == ok, r["label"]
        assert 0.0 < r["kept_fraction"] < 1.0 and r["kept_in_region"] is not None
    assert res.info["n_with_distractors"] > 0


class _Guarded(dict):
    """A test-split row: reading anything but its split_group / id fails the test."""

    def __getitem__(self, key):
        if key not in ("split_group", "id"):
            raise AssertionError(f"the search read {key!r} of a test row")
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        if key not in ("split_group", "id"):
            raise AssertionError(f"the search read {key!r} of a test row")
        return dict.get(self, key, default)


def test_search_never_reads_the_test_split(ref):
    model, processor, images, examples = ref
    from hf_vgrefine import reference_task as rt

    test_rows = [_Guarded(e) for e in rt.heldout_examples(images=images, split_group="test", limit=4, seed=0)]
    data = examples[:16] + test_rows
    base = VGRefineConfig(masked_layers=[2], sensitive_heads=[[2, 0], [2, 1]], percentile=80.0)
    res = search_knockout(model, processor, data, base, space=SearchSpace(layer_runs=[(2,)], percentiles=(90.0,),
                                                                          magnitude_thresholds=(), ks=(2,),
                                                                          generic_norms=("layer_mean",),
                                                                          knockout_heads=("all",)),
                          head_ranking=[[2, 0], [2, 1]], progress=False)
    assert res.info["n_calibration"] == 16
    assert set(res.ids) == {e["id"] for e in examples[:16]}


def test_search_errors_are_clear(ref):
    model, processor, _, examples = ref
    base = VGRefineConfig(masked_layers=[2], sensitive_heads=[[2, 0]], percentile=80.0)
    with pytest.raises(ValueError, match="no 'answer'"):
        search_knockout(model, processor, [dict(examples[0], answer=None)], base, progress=False)
    with pytest.raises(ValueError, match="no calibration rows"):
        search_knockout(model, processor, [dict(examples[0], split_group="test")], base, progress=False)
    with pytest.raises(ValueError, match="not one of its choices"):
        search_knockout(model, processor, [dict(examples[0], choices=["yes", "no"], answer="maybe")], base,
                        progress=False)


def test_calibrate_with_search(ref, tmp_path):
    from hf_vgrefine.calibrate import calibrate

    model, processor, _, examples = ref
    space = dict(layer_runs=[(1,), (2,)], percentiles=(80.0, 90.0), magnitude_thresholds=(), ks=(2,),
                 generic_norms=("layer_mean",), knockout_heads=("all",))
    cfg = calibrate(model, processor, examples[:24], k=2, split_group=None, batch_size=8, progress=False,
                    output_dir=str(tmp_path), search=space)
    s = cfg.calibration["search"]
    assert s["n_calibration"] == 24 and s["n_candidates"] >= 4
    assert cfg.calibration["rule"]          # the grounding calibration's record is kept
    on_disk = VGRefineConfig.from_pretrained(str(tmp_path))
    assert on_disk.to_dict() == cfg.to_dict()
    assert os.path.exists(tmp_path / "search" / "search_report.md")
    assert os.path.exists(tmp_path / "search" / "search_gain_vs_percentile.png")
