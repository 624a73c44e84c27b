"""Readers for the configurations built from released files: ``slake``, ``full`` and ``coco``.

Formats (docs/data_formats.md § VGMED configurations):

* question files are JSON lines, one file per question type, rows paired between the two files
  (same image, label and boxes);
* SLAKE rows (``image`` = ``xmlabN`` in the first release, ``Slake1.0/imgs/xmlabN/source.jpg`` in the
  extended one) carry ``bbox`` = list of ``[x, y, w, h]`` (SLAKE ``detection.json`` boxes);
* the other rows of the extended release carry ``original_bboxes`` = list of ``[x0, y0, x1, y1]`` with
  **inclusive** max (extreme mask pixels) and ``mask`` = the path of one mask PNG (the last region of
  the image — a known defect of the release); every box is kept and converted to xywh, and the stored
  mask is the union of all masks that belong to the row (see :func:`_union_mask`);
* COCO rows carry ``bbox`` (first release, ``image`` = integer val2014 id) or ``original_bboxes``
  (extended release, ``image`` = ``COCO_val2014_%012d.jpg``), both xywh.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np

from . import schema
from .sources import (
    SLAKE_REPO,
    VGMED_RELEASE_REPO,
    CorruptSourceError,
    MissingSourceError,
    fetch_hub_file,
)

logger = logging.getLogger(__name__)

SLAKE_QUESTION_FILES = (
    ("SLAKE_localization_questions.jsonl", "SLAKE_attribute_questions.jsonl"),
    ("VGMED_localization_questions.jsonl", "VGMED_attribute_questions.jsonl"),
    ("VGMED_localization.jsonl", "VGMED_attribute.jsonl"),
)
FULL_QUESTION_FILES = (("VGMED_localization.jsonl", "VGMED_attribute.jsonl"),)
COCO_QUESTION_FILES = (
    ("COCO_localization.jsonl", "COCO_attribute.jsonl"),
    ("COCO_localization_questions.jsonl", "COCO_attribute_questions.jsonl"),
)
MASK_INDEX_FILES = ("VGMED_masks.json", "SAMed2D_v1.json")

RELEASE_HINT = (
    f"download the VGMED question files from https://huggingface.co/datasets/{VGMED_RELEASE_REPO} "
    "(e.g. `hf download {repo} --repo-type dataset --local-dir DIR`) and pass --data-dir DIR"
).format(repo=VGMED_RELEASE_REPO)
SLAKE_HINT = (
    f"download SLAKE's imgs.zip from https://huggingface.co/datasets/{SLAKE_REPO} or https://www.med-vqa.com/slake/ "
    "(CC BY 4.0) and put it, or its extracted imgs/ folder, into the --data-dir folder"
)
FULL_IMAGES_HINT = (
    "the `full` configuration reads the source images and masks of the official release from --data-dir, at the "
    "relative paths written in VGMED_*.jsonl (SA-Med2D-20M: https://huggingface.co/datasets/OpenGVLab/SA-Med2D-20M; "
    "SLAKE under Slake1.0/imgs/; polyp and chest X-ray sets as distributed with the release)"
)
COCO_HINT = (
    "download MS COCO val2014 images from https://cocodataset.org/#download (val2014.zip) and extract them into "
    "DATA_DIR/val2014/ (masks are added when DATA_DIR/annotations/instances_val2014.json is present)"
)


# ---------------------------------------------------------------------------------------------------
# file access


def _read_jsonl(path: Path, hint: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorruptSourceError(path, f"line {lineno} is not valid JSON ({exc.msg})", hint) from exc
            if not isinstance(row, dict):
                raise CorruptSourceError(path, f"line {lineno} is not a JSON object", hint)
            rows.append(row)
    if not rows:
        raise CorruptSourceError(path, "contains no rows", hint)
    return rows


def _question_files(data_dir, candidates, *, download: bool) -> tuple[Path, Path | None]:
    """The (localization, attribute) question files: local copies first, then the release repo."""
    roots = [Path(data_dir)] if data_dir else []
    for root in roots:
        for loc, att in candidates:
            for base in (root, root / "VGMED_Evaluation", root / "data"):
                if (base / loc).is_file():
                    att_path = base / att
                    return base / loc, (att_path if att_path.is_file() else None)
    names = ", ".join(loc for loc, _ in candidates)
    if not download:
        raise MissingSourceError(f"{data_dir}/{candidates[0][0]}", RELEASE_HINT, problem=f"not found (looked for {names})")
    loc, att = candidates[0]
    loc_path = fetch_hub_file(VGMED_RELEASE_REPO, loc, hint=RELEASE_HINT)
    att_path = fetch_hub_file(VGMED_RELEASE_REPO, att, hint=RELEASE_HINT)
    return loc_path, att_path


class FileStore:
    """Read files by relative POSIX path from a folder or from a zip archive."""

    def __init__(self, root: Path | None = None, archive: Path | None = None, hint: str = ""):
        self.root = Path(root) if root else None
        self.archive = Path(archive) if archive else None
        self.hint = hint
        self._zip = None
        self._members: dict[str, str] = {}
        if self.archive is not None:
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (zipfile.BadZipFile, OSError) as exc:
                raise CorruptSourceError(self.archive, f"is not a readable zip archive ({exc})", hint) from exc
            for name in self._zip.namelist():
                if not name.endswith("/"):
                    self._members[name] = name

    def describe(self, rel: str) -> str:
        return f"{self.archive}:{rel}" if self._zip is not None else str((self.root or Path(".")) / rel)

    def find(self, rel: str) -> str | None:
        """Resolve ``rel``; in an archive, a member whose path ends with ``rel`` also matches."""
        if self._zip is not None:
            if rel in self._members:
                return rel
            suffix = "/" + rel
            hits = [m for m in self._members if m.endswith(suffix)]
            return min(hits, key=len) if hits else None
        path = (self.root or Path(".")) / rel
        return rel if path.is_file() else None

    def exists(self, rel: str) -> bool:
        return self.find(rel) is not None

    def read(self, rel: str) -> bytes:
        found = self.find(rel)
        if found is None:
            raise MissingSourceError(self.describe(rel), self.hint)
        if self._zip is not None:
            try:
                return self._zip.read(found)
            except (zipfile.BadZipFile, zlib.error, OSError) as exc:
                raise CorruptSourceError(self.describe(rel), f"archive member is corrupt ({exc})", self.hint) from exc
        return ((self.root or Path(".")) / found).read_bytes()


def _decode_image(data: bytes, where: str, hint: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptSourceError(where, f"is not a decodable image ({exc.__class__.__name__}: {exc})", hint) from exc
    return im


def _image_record(data: bytes, name: str, where: str, hint: str):
    im = _decode_image(data, where, hint)
    return {"bytes": data, "path": PurePosixPath(name).name}, im.size


# ---------------------------------------------------------------------------------------------------
# boxes, masks


def _as_boxes(value, where: str, hint: str) -> list[list[float]]:
    if value is None:
        return []
    arr = value
    if arr and isinstance(arr[0], (int, float)):  # a single box written flat
        arr = [arr]
    boxes = []
    for b in arr:
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(isinstance(v, (int, float)) for v in b):
            raise CorruptSourceError(where, f"box {b!r} is not a list of 4 numbers", hint)
        boxes.append([float(v) for v in b])
    return boxes


def _clip_boxes(boxes, width, height, counter: Counter, key: str) -> list[list[float]]:
    """Clip xywh boxes to the image; boxes without area inside the image are dropped."""
    out = []
    for x, y, w, h in boxes:
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(width)), min(y + h, float(height))
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counter[key] += 1
        if x1 > x0 and y1 > y0:
            out.append([x0, y0, x1 - x0, y1 - y0])
    return out


def _load_mask(data: bytes, where: str, hint: str, size) -> np.ndarray:
    im = _decode_image(data, where, hint)
    if im.size != size:
        raise CorruptSourceError(where, f"mask size {im.size} differs from the image size {size}", hint)
    if im.mode in ("RGBA", "LA"):
        im = im.convert("RGBA").getchannel("A") if im.mode == "RGBA" else im.getchannel("A")
    return np.asarray(im.convert("L")) > 0


def _box_rect(box, width, height):
    x, y, w, h = box
    return (max(int(np.floor(y)), 0), min(int(np.ceil(y + h)), height), max(int(np.floor(x)), 0),
            min(int(np.ceil(x + w)), width))


def _union_mask(masks: Iterable[np.ndarray], boxes, width, height) -> np.ndarray | None:
    """Union of the candidate masks that belong to the row's boxes, or None if they do not cover them.

    A candidate belongs to the row when all its pixels lie inside the union of the row's boxes. The union
    is kept only if, for every box, the mask pixels inside that box touch all four edges of the box (the
    boxes of the release are the extreme pixels of their masks) — so a mask file holding only the last
    region of a multi-region image is never passed off as the whole target.
    """
    inside = np.zeros((height, width), dtype=bool)
    for box in boxes:
        r0, r1, c0, c1 = _box_rect(box, width, height)
        inside[r0:r1, c0:c1] = True
    union = np.zeros((height, width), dtype=bool)
    for m in masks:
        if m.any() and not (m & ~inside).any():
            union |= m
    if not union.any():
        return None
    for box in boxes:
        r0, r1, c0, c1 = _box_rect(box, width, height)
        part = union[r0:r1, c0:c1]
        if part.size == 0 or not (part[0].any() and part[-1].any() and part[:, 0].any() and part[:, -1].any()):
            return None
    return union


def _released_pairs(data_dir, files, key_fn, *, download: bool, keep=None, empty: str | None = None):
    """``(localization file, [(localization row, attribute row or None)])`` of a released question-file pair.

    ``keep``: rows of both files to use; ``empty``: the error when no localization row is left."""
    loc_path, att_path = _question_files(data_dir, files, download=download)
    loc_rows = _read_jsonl(loc_path, RELEASE_HINT)
    att_rows = _read_jsonl(att_path, RELEASE_HINT) if att_path else None
    if keep is not None:
        loc_rows = [r for r in loc_rows if keep(r)]
        att_rows = [r for r in att_rows if keep(r)] if att_rows is not None else None
    if empty is not None and not loc_rows:
        raise CorruptSourceError(loc_path, empty, RELEASE_HINT)
    return loc_path, list(zip(loc_rows, _pair_rows(loc_rows, att_rows, loc_path, att_path, key_fn)))


def _progress_checked(loc_path, pairs, name: str):
    """``pairs`` with a progress bar; a localization row without ``image`` or ``label`` is a corrupt file."""
    for row, att in _progress(pairs, len(pairs), name):
        if "image" not in row or "label" not in row:
            raise CorruptSourceError(loc_path, f"row {row!r:.120} lacks 'image' or 'label'", RELEASE_HINT)
        yield row, att


def _pair_rows(loc_rows, att_rows, loc_path, att_path, key_fn):
    """Attribute row for each localization row: same index if it describes the same target, else by key."""
    if att_rows is None:
        logger.warning("no attribute question file next to %s: attribute questions come from the package templates",
                       loc_path)
        return [None] * len(loc_rows)
    if len(att_rows) == len(loc_rows) and all(key_fn(a) == key_fn(b) for a, b in zip(loc_rows, att_rows)):
        return list(att_rows)
    by_key: dict = {}
    for r in att_rows:
        by_key.setdefault(key_fn(r), []).append(r)
    paired = [by_key[k].pop(0) if by_key.get(k := key_fn(r)) else None for r in loc_rows]
    missing = sum(p is None for p in paired)
    if missing:
        logger.warning("%d localization rows of %s have no attribute row in %s", missing, loc_path, att_path)
    return paired


def _attribute_question(att_row, obj, stem):
    if att_row is not None and att_row.get("question"):
        return str(att_row["question"])
    return schema.pick_template(schema.ATTRIBUTE_TEMPLATES, stem).format(obj=obj)


def _progress(iterable, total, desc):
    from datasets.utils import are_progress_bars_disabled
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=f"reading {desc} sources", unit="target", leave=False,
                disable=are_progress_bars_disabled())


def _finish(counter: Counter, config: str):
    for what, n in sorted(counter.items()):
        logger.warning("%s: %d rows: %s", config, n, what)


# ---------------------------------------------------------------------------------------------------
# SLAKE


def _slake_key(image_field: str) -> str:
    parts = PurePosixPath(str(image_field)).parts
    for p in parts:
        if p.startswith("xmlab"):
            return p
    return PurePosixPath(str(image_field)).stem


def _slake_store(data_dir, *, download: bool) -> tuple[FileStore, str]:
    """(store, prefix): image N is read at ``prefix + 'xmlabN/source.jpg'``."""
    if data_dir:
        root = Path(data_dir)
        for prefix in ("imgs/", "Slake1.0/imgs/", "SLAKE/imgs/"):
            if (root / prefix).is_dir():
                return FileStore(root=root, hint=SLAKE_HINT), prefix
        for zname in ("imgs.zip", "Slake1.0/imgs.zip"):
            if (root / zname).is_file():
                return FileStore(archive=root / zname, hint=SLAKE_HINT), "imgs/"
        if not download:
            raise MissingSourceError(root / "imgs.zip", SLAKE_HINT, problem="not found (nor an imgs/ folder)")
    archive = fetch_hub_file(SLAKE_REPO, "imgs.zip", hint=SLAKE_HINT)
    return FileStore(archive=archive, hint=SLAKE_HINT), "imgs/"


def _detection_boxes(store: FileStore, rel: str, label: str) -> list[list[float]] | None:
    if not store.exists(rel):
        return None
    try:
        det = json.loads(store.read(rel).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptSourceError(store.describe(rel), f"is not valid JSON ({exc})", SLAKE_HINT) from exc
    if isinstance(det, dict):
        det = [det]
    boxes = []
    for obj in det:
        if isinstance(obj, dict):
            for name, box in obj.items():
                if name == label:
                    boxes.extend(_as_boxes(box, store.describe(rel), SLAKE_HINT))
    return boxes


def slake_samples(data_dir=None, *, download: bool = True) -> Iterator[dict]:
    keep = lambda r: "/" not in str(r.get("image", "")) or str(r.get("image", "")).startswith("Slake")  # noqa: E731
    loc_path, pairs = _released_pairs(data_dir, SLAKE_QUESTION_FILES,
                                      lambda r: (_slake_key(r.get("image", "")), r.get("label")), download=download,
                                      keep=keep, empty="contains no SLAKE rows")
    store, prefix = _slake_store(data_dir, download=download)
    counter: Counter = Counter()
    for row, att in _progress_checked(loc_path, pairs, "slake"):
        where = f"{loc_path}: image {row.get('image')!r} label {row.get('label')!r}"
        key = _slake_key(row["image"])
        label = str(row["label"])
        image, (width, height) = _image_record(store.read(f"{prefix}{key}/source.jpg"), f"{key}.jpg",
                                               store.describe(f"{prefix}{key}/source.jpg"), SLAKE_HINT)
        boxes = _as_boxes(row.get("bbox"), where, RELEASE_HINT)
        det_boxes = _detection_boxes(store, f"{prefix}{key}/detection.json", label)
        if not boxes:
            boxes = det_boxes or []
        elif det_boxes is not None and sorted(det_boxes) != sorted(boxes):
            counter["released bbox differs from SLAKE detection.json (released kept)"] += 1
        boxes = _clip_boxes(boxes, width, height, counter, "box clipped to the image")
        if not boxes:
            raise CorruptSourceError(loc_path, f"{where}: no box inside the image", RELEASE_HINT)
        obj = label.lower()
        stem = f"slake/{key}/{label}"
        yield schema.sample_record(
            image_key=key, image=image, width=width, height=height, mask=None, boxes=boxes, label=label, obj=obj,
            location=str(row.get("location", "")), modality_raw=str(row.get("modality", "")), source="slake",
            license_=schema.LICENSES["slake"], loc_question=str(row.get("question") or
                                                                 schema.pick_template(schema.LOCALIZATION_TEMPLATES, stem).format(obj=obj)),
            att_question=_attribute_question(att, obj, stem),
            gt_tokens=row.get("gt_tokens_huatuo", row.get("gt_tokens")), grid=(24, 24),
        )
    _finish(counter, "slake")


# ---------------------------------------------------------------------------------------------------
# full release


def _full_source(image_rel: str) -> str:
    head = PurePosixPath(image_rel).parts[0] if image_rel else ""
    if head.startswith("Slake"):
        return "slake"
    return {
        "SAMed2D_v1": "sa_med2d_20m",
        "endoscopy_polydb": "polyp_db",
        "x_ray_lungs": "cxr_lungs",
    }.get(head, "unknown")


def _load_mask_index(data_dir: Path) -> dict[str, list[str]]:
    for name in MASK_INDEX_FILES:
        path = data_dir / name
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CorruptSourceError(path, f"is not valid JSON ({exc})", FULL_IMAGES_HINT) from exc
            if not isinstance(raw, dict):
                raise CorruptSourceError(path, "must map image paths to lists of mask paths", FULL_IMAGES_HINT)
            index: dict[str, list[str]] = {}
            for k, v in raw.items():
                masks = [v] if isinstance(v, str) else list(v or [])
                index.setdefault(str(k), []).extend(masks)
                index.setdefault("basename:" + PurePosixPath(str(k)).name, []).extend(masks)
            return index
    return {}


def full_samples(data_dir=None, *, download: bool = True) -> Iterator[dict]:
    if not data_dir:
        raise MissingSourceError("<data_dir>", FULL_IMAGES_HINT, problem="no --data-dir given")
    root = Path(data_dir)
    loc_path, pairs = _released_pairs(root, FULL_QUESTION_FILES, lambda r: (r.get("image"), r.get("label")),
                                      download=download)
    store = FileStore(root=root, hint=FULL_IMAGES_HINT)
    mask_index = _load_mask_index(root)
    counter: Counter = Counter()
    for row, att in _progress_checked(loc_path, pairs, "full"):
        rel = str(row["image"])
        label = str(row["label"])
        where = f"{loc_path}: image {rel!r} label {label!r}"
        source = _full_source(rel)
        image, (width, height) = _image_record(store.read(rel), rel, store.describe(rel), FULL_IMAGES_HINT)
        raw_boxes = row.get("bbox") if row.get("bbox") is not None else row.get("original_bboxes")
        boxes = _as_boxes(raw_boxes, where, RELEASE_HINT)
        if source != "slake":  # xyxy with inclusive max -> xywh
            try:
                boxes = [schema.xyxy_inclusive_to_xywh(b) for b in boxes]
            except ValueError as exc:
                raise CorruptSourceError(loc_path, f"{where}: {exc}", RELEASE_HINT) from exc
        boxes = _clip_boxes(boxes, width, height, counter, "box clipped to the image")
        if not boxes:
            raise CorruptSourceError(loc_path, f"{where}: no box inside the image", RELEASE_HINT)
        mask_rels = row.get("mask") or []
        mask_rels = [mask_rels] if isinstance(mask_rels, str) else list(mask_rels)
        mask_rels += mask_index.get(rel, []) + mask_index.get("basename:" + PurePosixPath(rel).name, [])
        masks = []
        for m_rel in dict.fromkeys(mask_rels):
            masks.append(_load_mask(store.read(m_rel), store.describe(m_rel), FULL_IMAGES_HINT, (width, height)))
        mask = _union_mask(masks, boxes, width, height) if masks else None
        if masks and mask is None:
            counter["masks do not cover every box (mask left empty, all boxes kept)"] += 1
        obj = label.replace("_", " ").lower()
        image_key = _slake_key(rel) if source == "slake" else str(PurePosixPath(rel).with_suffix(""))
        stem = f"{source}/{image_key}/{label}"
        modality_raw = str(row.get("modality", ""))
        yield schema.sample_record(
            image_key=image_key, image=image, width=width, height=height, mask=mask, boxes=boxes, label=label,
            obj=obj, location=str(row.get("location", "")), modality_raw=modality_raw, source=source,
            license_=schema.LICENSES.get(source, "LicenseRef-unknown"),
            loc_question=str(row.get("question") or schema.pick_template(schema.LOCALIZATION_TEMPLATES, stem).format(obj=obj)),
            att_question=_attribute_question(att, obj, stem),
            gt_tokens=row.get("gt_tokens_huatuo", row.get("gt_tokens")), grid=(24, 24),
        )
    _finish(counter, "full")


# ---------------------------------------------------------------------------------------------------
# COCO


def _coco_image_name(value) -> tuple[int | None, str]:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        image_id = int(value)
        return image_id, f"COCO_val2014_{image_id:012d}.jpg"
    name = PurePosixPath(str(value)).name
    stem = PurePosixPath(name).stem
    tail = stem.rsplit("_", 1)[-1]
    return (int(tail) if tail.isdigit() else None), name


def _coco_annotations(root: Path):
    path = root / "annotations" / "instances_val2014.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cats = {c["id"]: c["name"] for c in data["categories"]}
        by_key: dict[tuple[int, str], list[dict]] = {}
        for ann in data["annotations"]:
            by_key.setdefault((int(ann["image_id"]), cats[ann["category_id"]]), []).append(ann)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptSourceError(path, f"is not a COCO instances file ({exc.__class__.__name__}: {exc})", COCO_HINT) from exc
    return by_key


def _coco_ann_mask(ann: dict, width: int, height: int) -> np.ndarray | None:
    from PIL import Image, ImageDraw

    seg = ann.get("segmentation")
    if isinstance(seg, list):
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in seg:
            if len(poly) >= 6:
                draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=255)
        return np.asarray(canvas) > 0
    if isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE, column-major
        h, w = seg.get("size", [height, width])
        flat = np.zeros(int(h) * int(w), dtype=bool)
        pos, value = 0, False
        for run in seg["counts"]:
            if value:
                flat[pos:pos + int(run)] = True
            pos += int(run)
            value = not value
        m = flat.reshape((int(w), int(h))).T
        return m if m.shape == (height, width) else None
    return None  # compressed RLE strings need pycocotools; such rows keep boxes only


def coco_samples(data_dir=None, *, download: bool = True) -> Iterator[dict]:
    if not data_dir:
        raise MissingSourceError("<data_dir>/val2014", COCO_HINT, problem="no --data-dir given")
    root = Path(data_dir)
    loc_path, pairs = _released_pairs(root, COCO_QUESTION_FILES,
                                      lambda r: (_coco_image_name(r.get("image"))[1], r.get("label")), download=download)
    image_dir = root / "val2014" if (root / "val2014").is_dir() else root
    store = FileStore(root=image_dir, hint=COCO_HINT)
    anns = _coco_annotations(root)
    counter: Counter = Counter()
    for row, att in _progress_checked(loc_path, pairs, "coco"):
        image_id, name = _coco_image_name(row["image"])
        label = str(row["label"])
        where = f"{loc_path}: image {row['image']!r} label {label!r}"
        image, (width, height) = _image_record(store.read(name), name, store.describe(name), COCO_HINT)
        raw_boxes = row.get("original_bboxes") if row.get("original_bboxes") is not None else row.get("bbox")
        boxes = _clip_boxes(_as_boxes(raw_boxes, where, RELEASE_HINT), width, height, counter, "box clipped to the image")
        if not boxes:
            raise CorruptSourceError(loc_path, f"{where}: no box inside the image", RELEASE_HINT)
        mask = None
        if anns is not None and image_id is not None:
            union = np.zeros((height, width), dtype=bool)
            matched = 0
            for ann in anns.get((image_id, label), []):
                if any(np.allclose(ann.get("bbox", []), b, atol=1.0) for b in boxes):
                    m = _coco_ann_mask(ann, width, height)
                    if m is not None:
                        union |= m
                        matched += 1
            if matched == len(boxes) and union.any():
                mask = union
            else:
                counter["no instance mask for every box (mask left empty)"] += 1
        obj = label.lower()
        image_key = PurePosixPath(name).stem
        stem = f"coco_val2014/{image_key}/{label}"
        yield schema.sample_record(
            image_key=image_key, image=image, width=width, height=height, mask=mask, boxes=boxes, label=label,
            obj=obj, location="", modality_raw="natural", source="coco_val2014",
            license_=schema.LICENSES["coco_val2014"],
            loc_question=str(row.get("question") or schema.pick_template(schema.LOCALIZATION_TEMPLATES, stem).format(obj=obj)),
            att_question=_attribute_question(att, obj, stem),
            gt_tokens=row.get("gt_tokens"), grid=(24, 24),
        )
    _finish(counter, "coco")


SAMPLERS = {"slake": slake_samples, "full": full_samples, "coco": coco_samples}
