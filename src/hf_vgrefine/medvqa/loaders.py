"""Loaders: every Med-VQA source → a list of :class:`~.schema.MedVQAItem` (``docs/medvqa.md`` § Benchmarks).

Each loader takes ``source``: a Hub dataset id (default; read with ``datasets.load_dataset`` /
``huggingface_hub.hf_hub_download``) or a local path in the source's published layout:

| loader | local layout |
|---|---|
| :func:`load_bundle` | ``medical_multimodel_evaluation_data.json`` (file or its folder) + images folder or ``images.zip`` |
| :func:`vqa_rad`, :func:`path_vqa` | parquet file(s) / folder (``data/test-*.parquet``): ``image`` {bytes, path}, ``question``, ``answer`` |
| :func:`slake` | folder with ``test.json`` + ``imgs/`` or ``imgs.zip`` |
| :func:`pmc_vqa` | folder with ``test_clean.csv`` + ``images/`` or ``images.zip`` (or the CSV file) |
| :func:`omnimedvqa` | folder with ``QA_information/Open-access/*.json`` + ``Images/`` |
| :func:`mmmu_med` | folder with ``<Subject>/<split>-*.parquet`` (MMMU layout) |

Raw loaders (everything except the bundle) mark items ``bundle_identical=False``; VQA-RAD, SLAKE and
PathVQA yes/no items become two-option MCQs ``["yes", "no"]``, other answers are open-ended (SLAKE
non-yes/no CLOSED items keep ``answer_type="closed"`` without options and are dropped by the
protocol filter, counted as ``no_options``).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .protocol import LETTERS, parse_options
from .schema import CLOSED, OPEN, ImageRef, MedVQAItem

BUNDLE_REPO = "FreedomIntelligence/Medical_Multimodal_Evaluation_Data"
BUNDLE_FILE = "medical_multimodel_evaluation_data.json"
VQA_RAD_REPO = "flaviagiammarino/vqa-rad"
PATH_VQA_REPO = "flaviagiammarino/path-vqa"
SLAKE_REPO = "BoKelvin/SLAKE"
PMC_VQA_REPO = "xmcmic/PMC-VQA"
OMNIMEDVQA_REPO = "foreverbeliever/OmniMedVQA"
MMMU_REPO = "MMMU/MMMU"
MMMU_MED_SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                     "Pharmacy", "Public_Health")
YES_NO = ("yes", "no")


# ---------------------------------------------------------------------------------------------------
# helpers


def _is_local(source: str | os.PathLike) -> bool:
    return os.path.exists(os.fspath(source))


def cache_root() -> Path:
    """Where zip archives are extracted: ``$HF_VGREFINE_CACHE`` or ``$HF_HOME/hf_vgrefine``."""
    env = os.environ.get("HF_VGREFINE_CACHE")
    if env:
        return Path(env)
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "hf_vgrefine"


def extract_zip(zip_path: str | os.PathLike) -> Path:
    """Extract ``zip_path`` once into the cache (keyed by real path, size, mtime); returns the folder.

    Safe under concurrent processes: extraction goes to a private temp folder renamed into place.
    """
    zp = Path(zip_path).resolve()
    st = zp.stat()
    key = hashlib.sha1(f"{zp}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_root() / "extracted" / f"{zp.stem}-{key}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(zp) as zf:
        for member in zf.namelist():  # refuse absolute / parent paths
            if member.startswith("/") or ".." in Path(member).parts:
                raise ValueError(f"unsafe path in {zp}: {member}")
        zf.extractall(tmp)
    (tmp / ".complete").touch()
    try:
        os.rename(tmp, dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / ".complete").exists():
            raise
    return dest


class ImageResolver:
    """Resolve relative image paths against folders, extracting zip archives only when needed.

    ``roots``: folders to try in order; ``zips``: archives whose extracted folder (and the given
    ``zip_subdirs`` inside it) are tried next. Unresolvable paths return the first candidate, so that
    opening the image later fails loudly.
    """

    def __init__(self, roots: Sequence[str | os.PathLike], zips: Sequence[str | os.PathLike] = (),
                 zip_subdirs: Sequence[str] = ("",)):
        self.roots = [Path(os.path.abspath(r)) for r in roots]
        self.zips = [Path(z) for z in zips if Path(z).exists()]
        self.zip_subdirs = list(zip_subdirs)
        self._extracted = False

    def __call__(self, rel: str) -> str:
        if os.path.isabs(rel):
            return rel
        for r in self.roots:
            if (r / rel).exists():
                return str(r / rel)
        if self.zips and not self._extracted:
            self._extracted = True
            for z in self.zips:
                ex = extract_zip(z)
                self.roots += [ex / s if s else ex for s in self.zip_subdirs]
            return self(rel)
        return str(self.roots[0] / rel) if self.roots else rel


def _image_ref(value: Any, resolve: Callable[[str], str] | None = None) -> ImageRef | None:
    """``{bytes, path}`` struct / path string / PIL image → bytes or path (None if empty)."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return resolve(value["path"]) if resolve else value["path"]
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        return resolve(os.fspath(value)) if resolve else os.fspath(value)
    if hasattr(value, "save"):  # PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot interpret image value of type {type(value).__name__}")


def _hub_file(repo_id: str, filename: str, revision: str | None = None) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", revision=revision)


def _data_file_and_zips(source, filename: str, revision: str | None) -> tuple[Path, list[Path]]:
    """The data file (``source`` = the file, its folder, or a Hub dataset id holding ``filename``) and the
    ``images.zip`` candidates beside it."""
    src = os.fspath(source)
    if _is_local(src):
        path = Path(src) / filename if os.path.isdir(src) else Path(src)
        return path, [path.parent / "images.zip"]
    path = Path(_hub_file(src, filename, revision))
    z = _hub_file_optional(src, "images.zip", revision)
    return path, [Path(z)] if z else []


def _hub_file_optional(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    try:
        return _hub_file(repo_id, filename, revision)
    except Exception:  # noqa: BLE001 - archive absent / offline: images may be resolvable otherwise
        return None


def _load_split(source: str, split: str, config: str | None = None, revision: str | None = None):
    """``datasets`` split from a Hub id, a parquet file, a folder of parquet files or a saved folder;
    ``Image`` columns are returned undecoded ({bytes, path})."""
    from datasets import Image as HFImage
    from datasets import load_dataset

    src = os.fspath(source)
    if os.path.isfile(src):
        ds = load_dataset("parquet", data_files={split: src}, split=split)
    elif os.path.isdir(src) and config is not None:
        files = sorted(glob.glob(os.path.join(src, config, f"{split}-*.parquet")))
        if not files:
            raise FileNotFoundError(f"no {config}/{split}-*.parquet under {src}")
        ds = load_dataset("parquet", data_files={split: files}, split=split)
    elif os.path.isdir(src):
        ds = load_dataset(src, split=split)
    else:
        ds = load_dataset(src, config, split=split, revision=revision)
    for col, feat in ds.features.items():
        if isinstance(feat, HFImage):
            ds = ds.cast_column(col, HFImage(decode=False))
    return ds


def _yes_no_item(id_: str, dataset: str, image: ImageRef | None, question: str, answer: str,
                 modality: str | None, meta: dict, source_type: str | None = None) -> MedVQAItem:
    a = str(answer).strip()
    is_yn = a.lower() in YES_NO
    if is_yn:
        kind, options, a = CLOSED, list(YES_NO), a.lower()
    else:
        kind, options = (source_type or OPEN), []
    return MedVQAItem(id=id_, dataset=dataset, images=[image] if image is not None else [], question=question,
                      options=options, answer=a, answer_type=kind, modality=modality, bundle_identical=False,
                      meta=meta)


# ---------------------------------------------------------------------------------------------------
# the HuatuoGPT-Vision evaluation bundle


def load_bundle(source: str | os.PathLike = BUNDLE_REPO, images_dir: str | os.PathLike | None = None,
                filename: str = BUNDLE_FILE, datasets: Iterable[str] | None = None,
                revision: str | None = None) -> list[MedVQAItem]:
    """The combined closed-ended evaluation file (``docs/medvqa.md`` § Benchmarks and loaders, primary source).

    ``source``: Hub id (downloads ``filename`` and ``images.zip``), the JSON file, or its folder.
    Records need ``question``, ``options`` (list or list literal), ``answer`` (option text), ``image``
    (relative path or list), ``dataset``; optional ``question_type`` (``"open"``), ``subset``, ``id``,
    ``modality``. Item ids: the record's ``id`` if present, else ``"{dataset}/{index in file}"``.
    ``datasets``: keep only these ``dataset`` values.
    """
    path, zips = _data_file_and_zips(source, filename, revision)
    root = Path(images_dir) if images_dir is not None else path.parent
    resolve = ImageResolver([root, root / "images"], zips, zip_subdirs=("", "images"))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
        if isinstance(records, dict):  # {"data": [...]} or {id: record}
            records = records.get("data") or list(records.values())
    keep = set(datasets) if datasets is not None else None
    items = []
    for i, r in enumerate(records):
        ds = str(r.get("dataset", "unknown"))
        if keep is not None and ds not in keep:
            continue
        imgs = r.get("image", r.get("images", [])) or []
        if isinstance(imgs, str):
            imgs = [imgs]
        qtype = r.get("question_type")
        items.append(MedVQAItem(
            id=str(r["id"]) if r.get("id") is not None else f"{ds}/{i}",
            dataset=ds, images=[resolve(p) for p in imgs], question=str(r["question"]),
            options=parse_options(r.get("options")), answer=str(r.get("answer", "?")),
            answer_type=OPEN if qtype == "open" else CLOSED, modality=r.get("modality"),
            subset=r.get("subset"), bundle_identical=True,
            meta={k: v for k, v in r.items() if k in ("question_type", "answer_idx", "subset")},
        ))
    return items


# ---------------------------------------------------------------------------------------------------
# VQA-RAD / PathVQA (parquet: image, question, answer)


def _parquet_yes_no(source: str, split: str, dataset: str, key: str, modality: str,
                    revision: str | None) -> list[MedVQAItem]:
    ds = _load_split(source, split, revision=revision)
    base = Path(source).parent if os.path.isfile(os.fspath(source)) else Path(os.fspath(source))
    resolve = ImageResolver([base]) if _is_local(source) else None
    items = []
    for i, row in enumerate(ds):
        items.append(_yes_no_item(f"{key}/{split}/{i}", dataset, _image_ref(row["image"], resolve),
                                  str(row["question"]), row["answer"], modality, {"split": split}))
    return items


def vqa_rad(source: str | os.PathLike = VQA_RAD_REPO, split: str = "test", revision: str | None = None) -> list[MedVQAItem]:
    """VQA-RAD (Hub parquet); yes/no answers → MCQ ``["yes", "no"]``, others open. Ids ``vqa-rad/{split}/{row}``."""
    return _parquet_yes_no(os.fspath(source), split, "VQA-RAD", "vqa-rad", "radiology", revision)


def path_vqa(source: str | os.PathLike = PATH_VQA_REPO, split: str = "test", revision: str | None = None) -> list[MedVQAItem]:
    """PathVQA (Hub parquet); yes/no answers → MCQ ``["yes", "no"]``, others open. Ids ``path-vqa/{split}/{row}``."""
    return _parquet_yes_no(os.fspath(source), split, "PathVQA", "path-vqa", "pathology", revision)


# ---------------------------------------------------------------------------------------------------
# SLAKE (json + imgs.zip)


def slake(source: str | os.PathLike = SLAKE_REPO, split: str = "test", lang: str | None = "en",
          revision: str | None = None) -> list[MedVQAItem]:
    """SLAKE ``{split}.json`` (fields ``qid, img_name, question, answer, q_lang, answer_type, modality,
    content_type, location``), images under ``imgs/`` (or ``imgs.zip``). ``lang``: keep ``q_lang == lang``
    (None: all). Ids ``slake/{split}/{qid}``."""
    src = os.fspath(source)
    if _is_local(src):
        root = Path(src)
        path = root / f"{split}.json" if root.is_dir() else root
        root = path.parent
        zips = [root / "imgs.zip"]
    else:
        path = Path(_hub_file(src, f"{split}.json", revision))
        root = path.parent
        z = _hub_file_optional(src, "imgs.zip", revision)
        zips = [Path(z)] if z else []
    resolve = ImageResolver([root / "imgs", root], zips, zip_subdirs=("imgs", ""))
    items = []
    for i, r in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        if lang is not None and r.get("q_lang", lang) != lang:
            continue
        src_type = str(r.get("answer_type", "")).lower() or None
        qid = r.get("qid", i)
        meta = {k: r[k] for k in ("content_type", "location", "q_lang", "img_id") if k in r}
        meta["source_answer_type"] = src_type
        items.append(_yes_no_item(f"slake/{split}/{qid}", "SLAKE", resolve(r["img_name"]), str(r["question"]),
                                  r["answer"], r.get("modality"), meta,
                                  source_type=CLOSED if src_type == "closed" else OPEN))
    return items


# ---------------------------------------------------------------------------------------------------
# PMC-VQA (csv + images.zip)

_CHOICE_PREFIX = re.compile(r"^\s*([A-D])\s*[:.)]\s*")


def pmc_vqa(source: str | os.PathLike = PMC_VQA_REPO, filename: str = "test_clean.csv",
            revision: str | None = None) -> list[MedVQAItem]:
    """PMC-VQA CSV (``Figure_path, Question, Answer, Choice A…D, Answer_label``); choice texts lose their
    ``"A:"`` prefix; the answer is the option named by ``Answer_label`` (or the option equal to
    ``Answer``). Images under ``images/`` (or ``images.zip``). Ids ``pmc-vqa/{csv stem}/{row}``."""
    path, zips = _data_file_and_zips(source, filename, revision)
    root = path.parent
    resolve = ImageResolver([root / "images", root / "figures", root], zips, zip_subdirs=("images", ""))
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            row = {(k or "").strip(): (v if v is not None else "") for k, v in row.items()}
            options = []
            for L in "ABCD":
                v = row.get(f"Choice {L}")
                if v is None or not str(v).strip():
                    continue
                options.append(_CHOICE_PREFIX.sub("", str(v)).strip())
            label = str(row.get("Answer_label", "")).strip().upper()
            answer_text = _CHOICE_PREFIX.sub("", str(row.get("Answer", ""))).strip()
            if label and label in LETTERS[:len(options)]:
                answer = options[LETTERS.index(label)]
            elif answer_text in options:
                answer = answer_text
            else:
                answer = "?"
            items.append(MedVQAItem(
                id=f"pmc-vqa/{path.stem}/{i}", dataset="PMC-VQA", images=[resolve(row["Figure_path"].strip())],
                question=str(row["Question"]).strip(), options=options, answer=answer, answer_type=CLOSED,
                modality=None, bundle_identical=False,
                meta={"figure_path": row["Figure_path"], "answer_label": label or None},
            ))
    return items


# ---------------------------------------------------------------------------------------------------
# OmniMedVQA (json per source dataset)


def omnimedvqa(source: str | os.PathLike, access: str = "Open-access", datasets: Iterable[str] | None = None,
               revision: str | None = None) -> list[MedVQAItem]:
    """OmniMedVQA ``QA_information/{access}/*.json`` records (``question_id, dataset, question_type,
    question, gt_answer, image_path, option_A…option_D, modality_type``); ``image_path`` is relative to
    the root. ``source``: local root (or a Hub id, fetched with ``snapshot_download``). ``datasets``:
    keep these source-dataset names. Item dataset ``"OmniMedVQA"``, subset = source dataset."""
    src = os.fspath(source)
    if not _is_local(src):
        from huggingface_hub import snapshot_download

        src = snapshot_download(repo_id=src, repo_type="dataset", revision=revision)
    root = Path(src)
    qa_dir = root / "QA_information" / access
    if not qa_dir.is_dir():
        found = sorted(root.glob(f"*/QA_information/{access}"))
        if not found:  # the release may ship as an archive
            for z in sorted(root.glob("*.zip")):
                ex = extract_zip(z)
                found += sorted(ex.glob(f"QA_information/{access}")) + sorted(ex.glob(f"*/QA_information/{access}"))
        if not found:
            raise FileNotFoundError(f"no QA_information/{access} under {root} (nor in a .zip there)")
        qa_dir = found[0]
        root = qa_dir.parent.parent
    resolve = ImageResolver([root])
    keep = set(datasets) if datasets is not None else None
    items = []
    for jf in sorted(qa_dir.glob("*.json")):
        for j, r in enumerate(json.loads(jf.read_text(encoding="utf-8"))):
            sub = str(r.get("dataset", jf.stem))
            if keep is not None and sub not in keep:
                continue
            options = [str(r[f"option_{L}"]) for L in LETTERS if r.get(f"option_{L}") not in (None, "")]
            gt = str(r.get("gt_answer", "?"))
            items.append(MedVQAItem(
                id=f"omnimedvqa/{r.get('question_id', f'{jf.stem}_{j}')}", dataset="OmniMedVQA",
                images=[resolve(r["image_path"])], question=str(r["question"]), options=options,
                answer=gt if gt in options else "?", answer_type=CLOSED,
                modality=r.get("modality_type", r.get("modality")), subset=sub, bundle_identical=False,
                meta={"question_type": r.get("question_type"), "gt_answer": gt},
            ))
    return items


# ---------------------------------------------------------------------------------------------------
# MMMU Health & Medicine


def mmmu_med(source: str | os.PathLike = MMMU_REPO, subjects: Sequence[str] = MMMU_MED_SUBJECTS,
             split: str = "validation", revision: str | None = None) -> list[MedVQAItem]:
    """MMMU subjects (config per subject; columns ``id, question, options`` (list literal),
    ``image_1…image_7`` ({bytes, path}), ``answer`` (letter for multiple-choice), ``question_type``,
    ``img_type``, ``subfield``). The answer letter is mapped to the option text (``"?"``, e.g. the test
    split, stays unanswerable and scores wrong). Item dataset ``"MMMU-Med"``, subset = subject."""
    src = os.fspath(source)
    if os.path.isdir(src):  # local copy: only the subjects present
        present = [s for s in subjects if glob.glob(os.path.join(src, s, f"{split}-*.parquet"))]
        if not present:
            raise FileNotFoundError(f"none of {list(subjects)} has {split}-*.parquet under {src}")
        subjects = present
    items = []
    for subject in subjects:
        ds = _load_split(src, split, config=subject, revision=revision)
        for row in ds:
            options = parse_options(row.get("options"))
            is_mc = row.get("question_type", "multiple-choice") == "multiple-choice" and options
            ans = str(row.get("answer", "?")).strip()
            if is_mc:
                idx = LETTERS.find(ans.upper()) if len(ans) == 1 else -1
                answer = options[idx] if 0 <= idx < len(options) else "?"
            else:
                answer = ans
            imgs = [_image_ref(row.get(f"image_{k}")) for k in range(1, 8)]
            img_type = row.get("img_type")
            try:
                modality = ", ".join(parse_options(img_type)) if img_type else None
            except ValueError:
                modality = str(img_type)
            items.append(MedVQAItem(
                id=f"mmmu/{row['id']}", dataset="MMMU-Med", images=[im for im in imgs if im is not None],
                question=str(row["question"]), options=options if is_mc else [], answer=answer,
                answer_type=CLOSED if is_mc else OPEN, modality=modality, subset=subject,
                bundle_identical=False, meta={"answer_letter": ans if is_mc else None, "split": split,
                                              "subfield": row.get("subfield")},
            ))
    return items


# ---------------------------------------------------------------------------------------------------
# registry


BENCHMARKS: dict[str, tuple[Callable[..., list[MedVQAItem]], str | None]] = {
    "bundle": (load_bundle, BUNDLE_REPO),
    "vqa-rad": (vqa_rad, VQA_RAD_REPO),
    "slake": (slake, SLAKE_REPO),
    "path-vqa": (path_vqa, PATH_VQA_REPO),
    "pmc-vqa": (pmc_vqa, PMC_VQA_REPO),
    "omnimedvqa": (omnimedvqa, OMNIMEDVQA_REPO),
    "mmmu-med": (mmmu_med, MMMU_REPO),
}
_ALIASES = {"vqarad": "vqa-rad", "vqa_rad": "vqa-rad", "pathvqa": "path-vqa", "path_vqa": "path-vqa",
            "pmcvqa": "pmc-vqa", "pmc_vqa": "pmc-vqa", "omnimed": "omnimedvqa", "omnimed-vqa": "omnimedvqa",
            "mmmu": "mmmu-med", "mmmu_med": "mmmu-med", "huatuo": "bundle"}


def canonical_benchmark(name: str) -> str:
    """Registry key for a benchmark name or alias (case-insensitive)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    return key


def load_benchmark(name: str, source: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                   **kwargs) -> list[MedVQAItem]:
    """Load a benchmark by registry name. ``source`` wins; else ``data_dir/<name>`` if it exists; else the
    Hub id."""
    key = canonical_benchmark(name)
    fn, default = BENCHMARKS[key]
    if source is None and data_dir is not None and (Path(data_dir) / key).exists():
        source = Path(data_dir) / key
    if source is None:
        source = default
    return fn(source, **kwargs)
