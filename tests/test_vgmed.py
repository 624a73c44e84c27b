"""VGMED builder: the offline `atlas` configuration, parquet + card output, cache pre-fill and
`load_dataset("vgmed")` resolution, CLI, robustness (missing/corrupt sources, injected failures, kill)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hf_vgrefine.data import schema
from hf_vgrefine.data.sources import MRICRON_TEMPLATES

# Skipped only outside CI: CI installs mricron-data, and there a missing package must fail loudly.
pytestmark = pytest.mark.skipif(
    not (MRICRON_TEMPLATES / "aal.nii.gz").is_file() and not os.environ.get("CI"),
    reason="Debian package mricron-data is not installed (apt-get install -y mricron-data)",
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vgmed"


def _env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("HF_DATASETS_CACHE", None)
    return env


@pytest.fixture(scope="session")
def atlas_build(tmp_path_factory):
    """Full `atlas` build, once per session: parquet folder + a pre-filled cache in its own HF_HOME."""
    from hf_vgrefine.data import build_vgmed

    base = tmp_path_factory.mktemp("vgmed_atlas")
    home = base / "hf_home"
    out = build_vgmed("atlas", base / "out", cache_dir=home / "datasets", progress=False)
    return {"base": base, "home": home, "cache": home / "datasets", "out": out}


@pytest.fixture(scope="session")
def atlas_ds(atlas_build):
    import datasets

    return datasets.load_dataset(str(atlas_build["out"]), "atlas", split="test")


@pytest.fixture(scope="session")
def atlas_arrays(atlas_ds):
    """Decoded images and masks (uint8 arrays) of every row, decoded once (slice images are shared)."""
    import datasets
    from PIL import Image

    raw = atlas_ds.select_columns(["id", "image", "mask", "boxes", "label", "source", "question_type"])
    raw = raw.cast_column("image", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
    images, out = {}, []
    for r in raw.to_list():
        key = r["image"]["bytes"]
        if key not in images:
            images[key] = np.asarray(Image.open(io.BytesIO(key)))
        mask = Image.open(io.BytesIO(r["mask"]["bytes"]))
        out.append({**r, "image": images[key], "mask_mode": mask.mode, "mask": np.asarray(mask)})
    return out


# ---------------------------------------------------------------------------------------------------
# content of the atlas configuration


def test_atlas_counts_and_question_types(atlas_ds):
    ids = atlas_ds["id"]
    assert len(ids) == len(set(ids))
    by_type = {q: atlas_ds.filter(lambda r, q=q: r == q, input_columns="question_type") for q in schema.QUESTION_TYPES}
    for q, part in by_type.items():
        assert len(part) >= 250, q
        assert len(set(part["label"])) >= 60, q
    # spec recipe: 274 atlas items over 95 structures + the liver lesion
    assert len(by_type["localization"]) == 275
    assert len(set(atlas_ds["label"])) == 96
    loc = by_type["localization"]
    assert set(loc["answer"]) == {"yes"} and set(loc["answer_source"]) == {"derived"}
    assert set(by_type["attribute"]["answer_source"]) == {"none"}
    assert all(q.endswith("?") and "{obj}" not in q for q in atlas_ds["question"])
    assert "Is the left hippocampus visible in the image?" in loc["question"] or any(
        "left hippocampus" in q for q in loc["question"])
    assert set(atlas_ds["source"]) == {"mricron_aal", "pydicom_testdata"}
    assert set(atlas_ds["modality"]) == {"mr"}
    licenses = dict(zip(atlas_ds["source"], atlas_ds["license"]))
    assert licenses == {"mricron_aal": schema.LICENSES["mricron_aal"], "pydicom_testdata": "MIT"}
    assert set(atlas_ds["split_group"]) == {"calibration", "test"}
    groups = {}
    for rid, g in zip(ids, atlas_ds["split_group"]):
        groups.setdefault(rid.split("/")[1], set()).add(g)
    assert all(len(g) == 1 for g in groups.values())  # images never straddle groups


def test_features_survive_parquet_round_trip(atlas_ds, atlas_build):
    import datasets
    from PIL import Image

    assert atlas_ds.features == schema.build_features()
    assert isinstance(atlas_ds.features["boxes"], datasets.List)
    assert atlas_ds.features["boxes"].feature.length == 4
    assert atlas_ds.features["boxes"].feature.feature == datasets.Value("float32")
    row = atlas_ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "L"
    assert isinstance(row["mask"], Image.Image) and row["mask"].mode == "L"
    assert all(isinstance(v, float) for b in row["boxes"] for v in b) and all(len(b) == 4 for b in row["boxes"])
    files = sorted((atlas_build["out"] / "data" / "atlas").glob("test-*.parquet"))
    assert [f.name for f in files] == ["test-00000-of-00001.parquet"]
    card = (atlas_build["out"] / "README.md").read_text()
    for needed in ("config_name: atlas", "default: true", "dtype: image", "length: 4", "## Licences", "## Citation",
                   "Tzourio-Mazoyer", "radiological"):
        assert needed in card


def test_every_mask_nonempty_and_equal_to_its_box(atlas_arrays):
    for r in atlas_arrays:
        img, mask = r["image"], r["mask"]
        assert r["mask_mode"] == "L"
        assert mask.shape == img.shape
        assert set(np.unique(mask)) <= {0, 255}
        m = mask > 0
        assert m.any(), r["id"]
        assert len(r["boxes"]) == 1
        assert r["boxes"][0] == schema.mask_bbox_xywh(m), r["id"]
        if r["source"] == "mricron_aal":
            assert m.sum() >= 150 and img.shape == (217, 181)
    lesion = [r for r in atlas_arrays if r["source"] == "pydicom_testdata"]
    assert len(lesion) == 2 and lesion[0]["boxes"] == [[46.0, 139.0, 35.0, 35.0]]
    assert lesion[0]["image"].shape == (300, 484)


def test_images_and_masks_are_aligned(atlas_arrays):
    """T1 intensity inside brain-structure masks is far above the background (air in the corners)."""
    inside, dark_fraction, corners = [], [], []
    for r in atlas_arrays:
        if r["source"] != "mricron_aal" or r["question_type"] != "localization":
            continue
        img, m = r["image"].astype(np.float32), r["mask"] > 0
        inside.append(img[m].mean())
        dark_fraction.append((img[m] < 10).mean())
        corners.append(np.concatenate([img[:12, :12].ravel(), img[:12, -12:].ravel(), img[-12:, :12].ravel(),
                                       img[-12:, -12:].ravel()]).mean())
    inside, corners = np.asarray(inside), np.asarray(corners)
    assert corners.max() < 10
    assert np.median(inside) > 60 and np.median(inside) > 8 * (corners.mean() + 1)
    assert np.percentile(inside, 5) > 30  # every structure, not just most of them, lies on brain tissue
    assert np.mean(dark_fraction) < 0.02
    # control: the same masks shifted by half the image land on much darker pixels on average
    shifted = []
    for r in atlas_arrays:
        if r["source"] == "mricron_aal" and r["question_type"] == "localization":
            m = np.roll(r["mask"] > 0, r["mask"].shape[1] // 2, axis=1)
            m = np.roll(m, r["mask"].shape[0] // 2, axis=0)
            shifted.append(r["image"][m].mean())
    assert np.median(inside) > np.median(shifted) + 20


def test_radiological_orientation(atlas_arrays):
    """Patient-left structures appear on the image right (documented convention)."""
    left_x, right_x = [], []
    for r in atlas_arrays:
        if r["source"] == "mricron_aal" and r["question_type"] == "localization":
            x, _, w, _ = r["boxes"][0]
            centre = (x + w / 2) / r["image"].shape[1]
            (left_x if r["label"].endswith("_L") else right_x if r["label"].endswith("_R") else []).append(centre)
    assert np.mean(left_x) > 0.6 and np.mean(right_x) < 0.4


def test_atlas_is_deterministic_and_rebuild_idempotent(tmp_path, atlas_build):
    import pyarrow.parquet as pq

    from hf_vgrefine.data import build_vgmed

    out = tmp_path / "out"
    kw = dict(cache_dir=tmp_path / "cache", max_samples=40, progress=False)
    build_vgmed("atlas", out, **kw)
    first = pq.read_table(out / "data/atlas/test-00000-of-00001.parquet")
    card = (out / "README.md").read_text()
    build_vgmed("atlas", out, **kw)
    second = pq.read_table(out / "data/atlas/test-00000-of-00001.parquet")
    assert first.equals(second) and (out / "README.md").read_text() == card
    assert first.num_rows == 80
    full = pq.read_table(atlas_build["out"] / "data/atlas/test-00000-of-00001.parquet")
    assert full.slice(0, 80).equals(first)  # the cap takes a prefix of the same deterministic order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # no staging leftovers
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".vgmed-staging")]
    # --max-samples builds do not touch the cache entries that load_dataset("vgmed", ...) reads
    assert not (tmp_path / "cache" / "vgmed").exists()


# ---------------------------------------------------------------------------------------------------
# load_dataset resolution


def test_load_dataset_bare_name_offline_from_any_directory(atlas_build, tmp_path):
    """After the builds, `load_dataset("vgmed", NAME)` and bare `load_dataset("vgmed")` (= atlas) resolve offline
    from an unrelated working directory, also after another configuration was built later."""
    from hf_vgrefine.data import build_vgmed

    build_vgmed("slake", tmp_path / "slake_out", data_dir=FIXTURES / "slake", cache_dir=atlas_build["cache"],
                progress=False, download=False)
    script = textwrap.dedent(
        """
        import json, datasets
        bare = datasets.load_dataset("vgmed", split="test")
        atlas = datasets.load_dataset("vgmed", "atlas", split="test")
        slake = datasets.load_dataset("vgmed", "slake", split="test")
        row = atlas[0]
        print(json.dumps({"bare": [len(bare), bare.info.config_name], "atlas": len(atlas), "slake": len(slake),
                          "img": type(row["image"]).__name__, "boxes": row["boxes"],
                          "box_type": str(atlas.features["boxes"])}))
        """
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=_env(atlas_build["home"]),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["bare"] == [550, "atlas"] and got["atlas"] == 550 and got["slake"] == 8
    assert got["img"] == "PngImageFile" and len(got["boxes"][0]) == 4
    assert got["box_type"] == "List(List(Value('float32'), length=4))"


def test_load_vgmed_uses_the_cache(atlas_build, tmp_path):
    from hf_vgrefine.data import load_vgmed

    ds = load_vgmed("atlas", cache_dir=atlas_build["cache"])
    assert len(ds) == 550
    ds2 = load_vgmed("atlas", root=atlas_build["out"])
    assert ds2["id"] == ds["id"]
    with pytest.raises(FileNotFoundError, match="build-vgmed --config coco"):
        load_vgmed("coco", cache_dir=tmp_path / "empty")


def test_local_folder_named_vgmed_and_shadowing(atlas_build, tmp_path, monkeypatch):
    """A built folder named `vgmed` in the cwd is what `load_dataset("vgmed")` reads there (datasets' rule);
    the package loader is immune to a stray `./vgmed` source folder."""
    import datasets

    from hf_vgrefine.data import build_vgmed, load_vgmed

    build_vgmed("atlas", tmp_path / "vgmed", cache_dir=tmp_path / "c", max_samples=4, progress=False)
    monkeypatch.chdir(tmp_path)
    assert len(datasets.load_dataset("vgmed", "atlas", split="test")) == 8
    stray = tmp_path / "stray"
    (stray / "vgmed").mkdir(parents=True)
    (stray / "vgmed" / "notes.py").write_text("x = 1\n")
    monkeypatch.chdir(stray)
    assert len(load_vgmed("atlas", cache_dir=atlas_build["cache"])) == 550


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_help_documents_every_option(capsys):
    from hf_vgrefine.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build-vgmed", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--config", "--data-dir", "--out", "--push-to-hub", "--private", "--cache-dir", "--no-cache",
                "--max-samples", "--no-download", "--quiet", "atlas", "slake", "full", "coco",
                'load_dataset("vgmed", NAME)'):
        assert opt in text, opt


def test_cli_builds_and_entry_script(tmp_path, capsys):
    from hf_vgrefine.cli import main

    rc = main(["build-vgmed", "--config", "atlas", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
               "--max-samples", "3", "--quiet"])
    assert rc == 0
    assert "written to" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, str(REPO / "dataset_script/vgmed/build.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--push-to-hub" in proc.stdout


def test_card_template_is_in_sync():
    from hf_vgrefine.data import render_card

    committed = (REPO / "dataset_script/vgmed/README.md").read_text(encoding="utf-8")
    assert committed == render_card(), "regenerate with: python dataset_script/vgmed/build.py --write-card"
    assert not (REPO / "dataset_script/vgmed/vgmed.py").exists()  # datasets 5 would refuse the folder


# ---------------------------------------------------------------------------------------------------
# robustness


def test_missing_source_names_file_and_package(tmp_path, capsys):
    from hf_vgrefine.cli import main
    from hf_vgrefine.data import MissingSourceError, build_vgmed

    with pytest.raises(MissingSourceError) as exc:
        build_vgmed("atlas", tmp_path / "o", data_dir=tmp_path / "nothing", cache_dir=tmp_path / "c", progress=False)
    msg = str(exc.value)
    assert "ch2.nii.gz" in msg and "apt-get install" in msg and "mricron-data" in msg
    assert not (tmp_path / "o").exists()
    rc = main(["build-vgmed", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
               "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert rc == 1 and "mricron-data" in capsys.readouterr().err


def test_corrupt_source_is_reported(tmp_path):
    from hf_vgrefine.data import CorruptSourceError, build_vgmed

    src = tmp_path / "templates"
    src.mkdir()
    for name in ("aal.nii.gz", "aal.nii.txt"):
        shutil.copy(MRICRON_TEMPLATES / name, src / name)
    data = (MRICRON_TEMPLATES / "ch2.nii.gz").read_bytes()
    (src / "ch2.nii.gz").write_bytes(data[: len(data) // 2])  # truncated download/copy
    with pytest.raises(CorruptSourceError) as exc:
        build_vgmed("atlas", tmp_path / "o", data_dir=src, cache_dir=tmp_path / "c", progress=False)
    assert "ch2.nii.gz" in str(exc.value) and "mricron-data" in str(exc.value)
    assert not (tmp_path / "o").exists()


def _assert_not_loadable(out: Path, cache: Path):
    import datasets

    from hf_vgrefine.data import cached_path

    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        datasets.load_dataset(str(out), "atlas", split="test")
    assert cached_path("atlas", cache) is None
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
    return leftovers


def test_injected_failure_leaves_nothing_loadable(tmp_path, monkeypatch):
    from hf_vgrefine.data import atlas, build, build_vgmed

    real = atlas.atlas_slice_samples

    def failing(*a, **k):
        for i, s in enumerate(real(*a, **k)):
            if i == 30:
                raise RuntimeError("injected failure")
            yield s

    monkeypatch.setattr(atlas, "atlas_slice_samples", failing)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(RuntimeError, match="injected"):
        build_vgmed("atlas", out, cache_dir=cache, progress=False)
    assert _assert_not_loadable(out, cache) == []
    monkeypatch.setattr(atlas, "atlas_slice_samples", real)

    # failure while writing the parquet shards (after generation succeeded)
    def failing_write(ds, dest, max_shard_size):
        dest.mkdir(parents=True)
        ds.select(range(3)).to_parquet(str(dest / "test-00000-of-00002.parquet"))
        raise OSError("disk full (injected)")

    monkeypatch.setattr(build, "_write_parquet", failing_write)
    with pytest.raises(OSError, match="injected"):
        build_vgmed("atlas", out, cache_dir=cache, progress=False)
    assert _assert_not_loadable(out, cache) == []
    assert not [p for p in cache.iterdir() if p.name.startswith(".vgmed-staging")]

    # a failed rebuild keeps the previous good build intact
    monkeypatch.undo()
    build_vgmed("atlas", out, cache_dir=cache, max_samples=5, progress=False)
    before = (out / "data/atlas/test-00000-of-00001.parquet").read_bytes()
    monkeypatch.setattr(build, "_write_parquet", failing_write)
    with pytest.raises(OSError):
        build_vgmed("atlas", out, cache_dir=cache, max_samples=5, progress=False)
    assert (out / "data/atlas/test-00000-of-00001.parquet").read_bytes() == before
    assert sorted(p.name for p in (out / "data/atlas").iterdir()) == ["test-00000-of-00001.parquet"]


def test_killed_build_leaves_nothing_loadable(tmp_path):
    """SIGKILL in the middle of generation: no dataset folder, no cache entry; the next build cleans up."""
    out, home = tmp_path / "out", tmp_path / "home"
    script = textwrap.dedent(
        f"""
        import os, signal
        from hf_vgrefine.data import atlas, build_vgmed
        real = atlas.atlas_slice_samples
        def dying(*a, **k):
            for i, s in enumerate(real(*a, **k)):
                if i == 100:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield s
        atlas.atlas_slice_samples = dying
        build_vgmed("atlas", {str(out)!r}, progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cache = home / "datasets"
    _assert_not_loadable(out, cache)
    assert [p for p in cache.iterdir() if p.name.startswith(".vgmed-staging")]  # the killed build's staging
    from hf_vgrefine.data import build_vgmed

    build_vgmed("atlas", out, cache_dir=cache, max_samples=2, prefill_cache=False, progress=False)
    assert not [p for p in cache.iterdir() if p.name.startswith(".vgmed-staging")]


def test_foreign_readme_is_not_overwritten(tmp_path):
    from hf_vgrefine.data import build_vgmed

    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    with pytest.raises(FileExistsError):
        build_vgmed("atlas", out, cache_dir=tmp_path / "c", max_samples=2, progress=False)
    assert (out / "README.md").read_text() == "# my notes\n"


def test_push_to_hub_uploads_config_and_card(tmp_path, monkeypatch):
    import huggingface_hub

    from hf_vgrefine.data import build_vgmed, push_config

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

        def upload_file(self, **kw):
            calls.append(("upload_file", kw["path_in_repo"], Path(kw["path_or_fileobj"]).read_text()))

    def no_card(*a, **k):
        raise FileNotFoundError("no README on the Hub yet")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.DatasetCard, "load", classmethod(lambda cls, *a, **k: no_card()))
    out = build_vgmed("atlas", tmp_path / "o", cache_dir=tmp_path / "c", max_samples=3, progress=False,
                      push_to_hub="someone/vgmed")
    kinds = [c[0] for c in calls]
    assert kinds == ["create_repo", "upload_folder", "upload_file"]
    assert calls[0][2]["repo_type"] == "dataset"
    assert calls[1][1]["allow_patterns"] == ["data/atlas/*.parquet"]
    assert calls[1][1]["folder_path"] == str(out)
    assert calls[2][1] == "README.md" and "config_name: atlas" in calls[2][2]
    with pytest.raises(ValueError, match="coco"):
        push_config(out, "coco", "someone/vgmed")


def test_hub_downloads_are_verified(tmp_path, monkeypatch):
    """Downloads are checked against the Hub's own content hash (LFS sha256 / git blob id) and pins."""
    import hashlib

    import huggingface_hub

    from hf_vgrefine.data import CorruptSourceError
    from hf_vgrefine.data.sources import fetch_hub_file, git_blob_sha1_file

    payload = b"{\"image\": \"xmlab1\"}\n"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    good_lfs = blobs / hashlib.sha256(payload).hexdigest()
    good_lfs.write_bytes(payload)
    bad_lfs = blobs / ("0" * 64)
    bad_lfs.write_bytes(payload)
    git = blobs / "g"
    git.write_bytes(payload)
    good_git = blobs / git_blob_sha1_file(git)
    git.rename(good_git)
    target = {"n": 0}

    def fake_download(repo_id, filename, repo_type=None, **kw):
        target["n"] += 1
        link = tmp_path / f"snap-{target['n']}" / filename
        link.parent.mkdir()
        link.symlink_to(target["blob"])
        return str(link)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for blob in (good_lfs, good_git):
        target["blob"] = blob
        assert fetch_hub_file("r/x", "a.jsonl", hint="h").read_bytes() == payload
    target["blob"] = bad_lfs
    with pytest.raises(CorruptSourceError, match="sha256"):
        fetch_hub_file("r/x", "a.jsonl", hint="h")
    target["blob"] = good_lfs
    with pytest.raises(CorruptSourceError, match="does not match the expected"):
        fetch_hub_file("r/x", "a.jsonl", hint="h", sha256="1" * 64)


def test_png_helpers_round_trip():
    from PIL import Image

    m = np.zeros((5, 7), bool)
    m[1:3, 2:6] = True
    im = Image.open(io.BytesIO(schema.encode_png(m)))
    assert im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}
    assert schema.mask_bbox_xywh(m) == [2.0, 1.0, 4.0, 2.0]
    assert schema.xyxy_inclusive_to_xywh([2, 1, 5, 2]) == [2.0, 1.0, 4.0, 2.0]
    assert schema.humanise_structure("Hippocampus_L") == "left hippocampus"
    assert schema.humanise_structure("Frontal_Inf_Tri_R") == "right triangular part of the inferior frontal gyrus"
