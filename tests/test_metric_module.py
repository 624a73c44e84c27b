"""The grounding_ratio evaluate module: the three offline loading routes, each against scores worked out by hand."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_vgrefine import metrics as core
from hf_vgrefine import metrics_module

REPO = Path(__file__).resolve().parents[1]
ROOT_MODULE = REPO / "metrics" / "grounding_ratio"

# fixed inputs shared by the in-process checks and the fresh-process check
PREDS = [
    [[0.9, 0.1, 0.0], [0.2, 0.3, 0.0]],
    [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.0, 0.1]],
    [[1.0, 1.0], [1.0, 1.0]],
]
REFS = [
    [[1, 0, 0], [1, 0, 0]],
    [[0, 0], [0, 0], [1, 1], [0, 0]],
    [[0.5, 0.0], [0.0, 0.0]],  # soft ground truth
]

_BARE_LOAD = textwrap.dedent(
    """
    import json, sys
    import evaluate
    metric = evaluate.load("grounding_ratio", keep_in_memory=True)
    preds, refs = json.loads(sys.argv[1])
    out = metric.compute(predictions=preds, references=refs, return_per_sample=True)
    print("RESULT" + json.dumps({"module": type(metric).__module__, "out": out}))
    """
)


def _clean_env(hf_home: Path) -> dict:
    env = dict(os.environ)
    env.pop("HF_MODULES_CACHE", None)
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    return env


def _cli() -> list:
    exe = shutil.which("hf-vgrefine")
    return [exe] if exe else [sys.executable, "-m", "hf_vgrefine.cli"]


@pytest.fixture(scope="module", autouse=True)
def fresh_process(tmp_path_factory):
    """`hf-vgrefine install-metric` in a subprocess, then bare evaluate.load in another one.

    The second (slow: it imports evaluate) process is started at module set-up and runs while the
    in-process tests do; the last test collects it.
    """
    base = tmp_path_factory.mktemp("bare_load")
    hf_home, cwd = base / "hf_home", base / "cwd"
    cwd.mkdir()
    env = _clean_env(hf_home)
    install = subprocess.run(_cli() + ["install-metric"], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    proc = None
    if install.returncode == 0:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BARE_LOAD, json.dumps([PREDS, REFS])],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    state = {"install": install, "proc": proc, "hf_home": hf_home, "cwd": cwd}
    yield state
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


def _hand_scores() -> dict:
    """Every score of PREDS / REFS worked out by hand from the formulas (docs/method.md, Grounding scores).

    Sample 1: map [.9 .1 0 .2 .3 0] (sum 1.5), region {0, 3}. Sample 2: map [.1 .2 .3 .4 .5 .6 0 .1] (sum 2.2),
    region {4, 5}. Sample 3: a constant map over 4 tokens, soft region w = [.5 0 0 0] (support {0}).
    p = m / (sum m + 1e-8), g = w / sum w; thresholded scores keep the |B| largest values (ties all kept).
    """
    ln = math.log
    e8 = 1e-8
    # sample 1: p = [.6, 1/15, 0, 2/15, .2, 0], g = [.5, 0, 0, .5, 0, 0]
    p1 = [0.9 / (1.5 + e8), 0.1 / (1.5 + e8), 0.0, 0.2 / (1.5 + e8), 0.3 / (1.5 + e8), 0.0]
    g1 = [0.5, 0, 0, 0.5, 0, 0]
    # sample 2: p = m / 2.2, g = 1/2 on tokens 4, 5
    m2 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.1]
    p2 = [x / (2.2 + e8) for x in m2]
    g2 = [0, 0, 0, 0, 0.5, 0.5, 0, 0]
    # sample 3: p = 1/4 everywhere, g = [1, 0, 0, 0]
    p3 = [1 / (4 + e8)] * 4
    g3 = [1.0, 0, 0, 0]

    def kl(p, g):      # zeros of g are clipped to 1e-12: they add 1e-12 * ln(1e-12 / p_i) each
        return sum(max(gi, 1e-12) * ln(max(gi, 1e-12) / max(pi, 1e-12)) for pi, gi in zip(p, g))

    def js(p, g):
        mid = [(a + b) / 2 for a, b in zip(p, g)]
        return 0.5 * sum(a * ln((a + e8) / (c + e8)) for a, c in zip(p, mid)) + \
            0.5 * sum(b * ln((b + e8) / (c + e8)) for b, c in zip(g, mid))

    def soft_dice(p, g):
        return sum(a * b for a, b in zip(p, g)) / sum(((a + b) / 2) ** 2 for a, b in zip(p, g))

    return {
        # mean inside / mean overall: (0.9 + 0.2) / (1.5 / 6 * 2); (0.5 + 0.6) / (2.2 / 8 * 2); (0.5 * 1 / 0.5) / 1
        "attention_ratio": [1.1 / (0.5 + e8), 1.1 / (0.55 + e8), 0.5 / (0.5 + e8)],
        "kl_gt_attention": [kl(p1, g1), kl(p2, g2), kl(p3, g3)],
        "js_divergence": [js(p1, g1), js(p2, g2), js(p3, g3)],
        "soft_dice_ratio": [soft_dice(p1, g1), soft_dice(p2, g2), soft_dice(p3, g3)],
        # mass inside: 1.1 / 1.5; 1.1 / 2.2; 0.5 * 1/4 (soft: sum w_i p_i)
        "energy_pointing_game": [1.1 / (1.5 + e8), 1.1 / (2.2 + e8), 0.5 / (4 + e8)],
        # argmax: token 0 (in region); token 5 (in region); all tied -> first token 0 (in the support)
        "pointing_game": [1.0, 1.0, 1.0],
        # top-|B|: {0, 4} vs {0, 3} -> IoU 1/3; {5, 4} = region -> 1; |B| = 1 but all 4 tied -> S = all, IoU 1/4
        "thresholded_iou": [1 / 3, 1.0, 1 / 4],
        "thresholded_dice": [2 * 1 / 4, 1.0, 2 * 1 / 5],
        # pairs (inside, outside) ranked correctly, ties 1/2: 7 of 8; 12 of 12; 3 ties of 3
        "auroc": [7 / 8, 1.0, 0.5],
    }


def _check_against_hand(out: dict, per_sample: bool = True):
    """The module's output against :func:`_hand_scores` (maps are float32 inside the module: rtol 1e-6)."""
    want = _hand_scores()
    assert out["n"] == 3
    assert out["n_nan"] == {name: 0 for name in core.ALL}
    for name in core.ALL:
        assert out[name] == pytest.approx(sum(want[name]) / 3, rel=1e-6, abs=1e-9), name
        if per_sample:
            np.testing.assert_allclose(out["per_sample"][name], want[name], rtol=1e-6, atol=1e-9, err_msg=name)


def test_module_files_are_one_source():
    packaged = metrics_module.metric_module_dir()
    for name in ("grounding_ratio.py", "README.md"):
        assert (ROOT_MODULE / name).read_bytes() == (packaged / name).read_bytes(), name
    text = (packaged / "grounding_ratio.py").read_text()
    assert "from hf_vgrefine import metrics as grounding_core" in text
    # one import per line (evaluate's dependency scanner) and no formula in the adaptor
    for line in text.splitlines():
        if line.startswith(("import ", "from ")):
            assert "," not in line, line
    assert "np." not in text and "log(" not in text


def test_load_from_repo_path_gives_hand_computed_scores():
    import evaluate

    metric = evaluate.load(str(ROOT_MODULE), keep_in_memory=True)
    _check_against_hand(metric.compute(predictions=PREDS, references=REFS, return_per_sample=True))


def test_load_grounding_metric_and_options():
    metric = metrics_module.load_grounding_metric(keep_in_memory=True)
    _check_against_hand(metric.compute(predictions=PREDS, references=REFS, return_per_sample=True))
    # numpy / torch / bool inputs, incremental adds, option forwarding
    rng = np.random.default_rng(0)
    maps = [rng.random((4, 6)), torch.rand(8, 3, generator=torch.Generator().manual_seed(0))]
    masks = [rng.random((4, 6)) < 0.3, (rng.random((8, 3)) < 0.3).astype(np.int64)]
    masks[0][0, 0] = masks[1][0, 0] = 1
    metric.add(prediction=maps[0], reference=masks[0])
    metric.add_batch(predictions=maps[1:], references=masks[1:])
    out = metric.compute(scores=["vgmed_iou", "pointing_game"], tolerance=1, threshold_mode="otsu")
    assert set(out) == {"vgmed_iou", "pointing_game", "n", "n_nan"}
    want = [
        core.grounding_scores(np.asarray(m, np.float32).ravel(), np.asarray(g, bool), ["vgmed_iou", "pointing_game"],
                              tolerance=1, grid=np.shape(m))
        for m, g in zip(maps, masks)
    ]
    assert out["vgmed_iou"] == pytest.approx(np.mean([w["vgmed_iou"] for w in want]), rel=1e-6)
    assert out["pointing_game"] == np.mean([w["pointing_game"] for w in want])
    # NaN samples are counted, not averaged
    out = metric.compute(predictions=[[[1.0, 2.0]], [[1.0, 2.0]]], references=[[[0, 1]], [[0, 0]]], scores=["auroc"])
    assert out == {"auroc": 1.0, "n": 2, "n_nan": {"auroc": 1}}
    with pytest.raises(ValueError, match="shape"):
        metric.compute(predictions=[[[1.0, 2.0]]], references=[[[1.0], [0.0]]])


def test_install_metric_layout_and_idempotence(tmp_path):
    script = metrics_module.install_metric(tmp_path)
    version_dir = script.parent
    assert script.name == "grounding_ratio.py"
    assert version_dir.parent == tmp_path / "evaluate_modules" / "metrics" / "evaluate-metric--grounding_ratio"
    assert len(version_dir.name) == 64  # evaluate only considers 64-character version folders
    assert script.read_bytes() == (metrics_module.metric_module_dir() / "grounding_ratio.py").read_bytes()
    for pkg in (tmp_path / "evaluate_modules", version_dir.parent.parent, version_dir.parent, version_dir):
        assert (pkg / "__init__.py").is_file()
    # re-install: same place, refreshed mtime, no temporary folders left behind
    os.utime(script, (1, 1))
    assert metrics_module.install_metric(tmp_path) == script
    assert script.stat().st_mtime > time.time() - 60
    assert {p.name for p in version_dir.parent.iterdir()} == {"__init__.py", version_dir.name}
    # a damaged copy is replaced
    script.write_text("broken")
    metrics_module.install_metric(tmp_path)
    assert script.read_bytes() == (metrics_module.metric_module_dir() / "grounding_ratio.py").read_bytes()
    assert {p.name for p in version_dir.parent.iterdir()} == {"__init__.py", version_dir.name}


def test_modules_cache_dir_matches_evaluate(monkeypatch, tmp_path):
    import evaluate.config

    assert metrics_module.modules_cache_dir() == Path(evaluate.config.HF_MODULES_CACHE)
    # the environment rule used by a process that has not imported evaluate (the CLI)
    monkeypatch.delitem(sys.modules, "evaluate.config")
    monkeypatch.delenv("HF_MODULES_CACHE", raising=False)
    assert metrics_module.modules_cache_dir() == Path(evaluate.config.HF_MODULES_CACHE)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert metrics_module.modules_cache_dir() == tmp_path / "home" / "modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "mods"))
    assert metrics_module.modules_cache_dir() == tmp_path / "mods"


def test_cli_help_and_print_only(capsys, tmp_path):
    from hf_vgrefine import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["install-metric", "--help"])
    assert exc.value.code == 0
    assert "--cache-dir" in capsys.readouterr().out
    assert cli.main(["install-metric", "--print-only", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("evaluate-metric--grounding_ratio")
    assert not any(tmp_path.iterdir())
    assert cli.main(["install-metric", "--cache-dir", str(tmp_path)]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()


def test_bare_name_loads_offline_in_fresh_process(fresh_process):
    install = fresh_process["install"]
    assert install.returncode == 0, install.stderr
    installed = Path(install.stdout.strip())
    assert installed.is_file()
    assert str(installed).startswith(str(fresh_process["hf_home"] / "modules" / "evaluate_modules" / "metrics"))
    stdout, stderr = fresh_process["proc"].communicate(timeout=180)
    assert fresh_process["proc"].returncode == 0, stderr[-3000:]
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT"):])
    assert "evaluate-metric--grounding_ratio" in result["module"]
    _check_against_hand(result["out"])
    assert not (fresh_process["cwd"] / "grounding_ratio").exists()  # not found via the working directory
