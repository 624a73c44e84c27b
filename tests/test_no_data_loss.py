"""Commands that write a folder never delete what the package did not create (issue 12, data loss).

Each case builds a user's folder by hand, runs the command as a user would (``hf_vgrefine.cli.main``),
and checks file by file that the user's content is still there and that the message names the problem
and the fix.
"""

from __future__ import annotations

import json

import pytest

from hf_vgrefine import cli, outdir


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_demo_with_missing_model_keeps_calibration_folder(tmp_path, capsys):
    out = tmp_path / "p"
    (out / "calibration").mkdir(parents=True)
    (out / "calibration" / "mine.txt").write_text("my notes")
    before = _tree(out)
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--model", str(tmp_path / "nonexistent"), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "is not a local folder and not a hub model id" in err and "Traceback" not in err
    assert _tree(out) == before


def test_demo_api_with_missing_model_keeps_calibration_folder(tmp_path):
    from hf_vgrefine.demo import run_demo

    out = tmp_path / "p"
    (out / "calibration").mkdir(parents=True)
    (out / "calibration" / "vgrefine_config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a local folder and not a hub model id"):
        run_demo(model="/nonexistent", out_dir=out, progress=False)
    assert (out / "calibration" / "vgrefine_config.json").read_text() == "{}"


def test_demo_refuses_folder_with_foreign_files(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper.tex").write_text("draft")
    (out / "calibration").mkdir()
    (out / "calibration" / "x.json").write_text("1")
    before = _tree(out)
    code = cli.main(["demo", "--out", str(out), "--limit", "1", "--calibration-limit", "1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not written by hf-vgrefine demo" in err and "--overwrite" in err and "paper.tex" in err
    assert _tree(out) == before


def test_demo_overwrite_keeps_foreign_files_and_reruns_into_its_own_folder(tmp_path):
    out = tmp_path / "results"
    (out / "calibration").mkdir(parents=True)
    (out / "paper.tex").write_text("draft")
    (out / "calibration" / "mine.txt").write_text("keep me")
    args = ["demo", "--out", str(out), "--limit", "2", "--calibration-limit", "2", "--no-progress", "--no-html"]
    assert cli.main(args + ["--overwrite"]) == 0
    assert (out / "paper.tex").read_text() == "draft"
    kept = [p for p in out.iterdir() if p.name.startswith("calibration.old-")]
    assert len(kept) == 1 and (kept[0] / "mine.txt").read_text() == "keep me"
    assert outdir.is_marked(out) and outdir.is_marked(out / "calibration")
    assert json.loads((out / "calibration" / "vgrefine_config.json").read_text())["masked_layers"]
    # the folder is now the demo's: a second run needs no flag and replaces only its own calibration
    assert cli.main(args) == 0
    assert [p.name for p in out.iterdir() if p.name.startswith("calibration.old-")] == [kept[0].name]
    assert (out / "paper.tex").read_text() == "draft"
    assert not [p for p in out.iterdir() if ".partial-" in p.name or ".trash-" in p.name]


def _build(out, *extra):
    return cli.main(["build-vgmed", "--out", str(out), "--max-samples", "2", "--quiet", *extra])


def test_build_vgmed_refuses_foreign_file_in_config_folder_and_never_deletes_it(tmp_path, capsys):
    out = tmp_path / "vgmed"
    assert _build(out) == 0
    shard = next((out / "data" / "atlas").glob("test-*.parquet"))
    (out / "data" / "atlas" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _build(out) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "not written by build-vgmed" in err and "--overwrite" in err
    assert (out / "data" / "atlas" / "notes.txt").read_text() == "mine"
    assert _build(out, "--overwrite") == 0
    assert (out / "data" / "atlas" / "notes.txt").read_text() == "mine"
    assert shard.is_file()
    import datasets

    assert len(datasets.load_dataset(str(out), "atlas", split="test")) == 4


def test_build_vgmed_refuses_foreign_out_folder(tmp_path, capsys):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "table.csv").write_text("a,b\n")
    assert _build(out) == 2
    assert "table.csv" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["table.csv"]
    assert _build(out, "--overwrite") == 0
    assert (out / "table.csv").read_text() == "a,b\n" and (out / "data" / "atlas").is_dir()


def test_replace_dir_removes_only_marked_folders(tmp_path):
    staged = tmp_path / "new"
    staged.mkdir()
    (staged / "a").write_text("new")
    target = tmp_path / "t"
    target.mkdir()
    (target / "user.txt").write_text("user")
    kept = outdir.replace_dir(staged, target)
    assert kept is not None and (kept / "user.txt").read_text() == "user"
    assert (target / "a").read_text() == "new"
    outdir.mark(target, "test")
    staged.mkdir()
    (staged / "b").write_text("b")
    assert outdir.replace_dir(staged, target) is None
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t", kept.name])
