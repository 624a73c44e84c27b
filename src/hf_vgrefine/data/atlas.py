"""The offline ``atlas`` configuration: Colin27 T1 slices with AAL structure masks, plus the
radiologist-outlined liver lesion bundled with pydicom (docs/data_formats.md § The atlas configuration).

All work is vectorised per slice (``scipy.ndimage.find_objects`` + ``bincount``): the full
configuration (275 targets) renders in well under a second once the volumes are loaded.

Orientation: images are axial slices in the **radiological** convention: anterior at the top,
patient-left on image-right. Structure names keep the patient's side (``Hippocampus_L`` is the
patient's left hippocampus, shown on the right of the image).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from . import schema
from .sources import (
    MRICRON_INSTALL_HINT,
    MRICRON_TEMPLATES,
    PYDICOM_HINT,
    CorruptSourceError,
    MissingSourceError,
    check_pinned,
    require_file,
)

ATLAS_SLICES = tuple(range(40, 140, 10))  # axial indices k (z = k - 71 mm): 10 slices, z = -31 ... +59 mm
MIN_PIXELS = 150  # drop tiny cross-sections
ATLAS_FILES = ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")
LESION_FILE = "examples_overlay.dcm"


def templates_dir(data_dir=None) -> Path:
    return Path(data_dir) if data_dir else MRICRON_TEMPLATES


def _load_volume(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise CorruptSourceError(path, f"cannot be read as NIfTI ({exc.__class__.__name__}: {exc})", MRICRON_INSTALL_HINT) from exc
    if data.ndim != 3:
        raise CorruptSourceError(path, f"expected a 3-D volume, got shape {data.shape}", MRICRON_INSTALL_HINT)
    return data, img.affine


def _read_names(path: Path) -> dict[int, str]:
    names = {}
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise CorruptSourceError(path, "is not a UTF-8 text file", MRICRON_INSTALL_HINT) from exc
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise CorruptSourceError(path, f"line {lineno} is not '<value> <name> [code]': {line!r}", MRICRON_INSTALL_HINT)
        names[int(parts[0])] = parts[1]
    if len(names) < 90:
        raise CorruptSourceError(path, f"lists only {len(names)} structures (AAL has 116)", MRICRON_INSTALL_HINT)
    return names


def load_atlas(data_dir=None):
    """``(t1 float32, labels int32, names, affine)`` with validation; errors name the file and the package."""
    root = templates_dir(data_dir)
    paths = {name: require_file(root / name, MRICRON_INSTALL_HINT) for name in ATLAS_FILES}
    for name, path in paths.items():
        check_pinned(path, MRICRON_INSTALL_HINT, name)
    t1, t1_affine = _load_volume(paths["ch2.nii.gz"])
    aal, aal_affine = _load_volume(paths["aal.nii.gz"])
    if t1.shape != aal.shape or not np.allclose(t1_affine, aal_affine, atol=1e-3):
        raise CorruptSourceError(
            paths["aal.nii.gz"],
            f"grid {aal.shape} does not match ch2.nii.gz {t1.shape} (the AAL atlas must be on the Colin27 grid)",
            MRICRON_INSTALL_HINT,
        )
    if not np.issubdtype(aal.dtype, np.integer):
        aal = np.rint(aal)
    names = _read_names(paths["aal.nii.txt"])
    return t1.astype(np.float32, copy=False), aal.astype(np.int32, copy=False), names, t1_affine


def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    # (x, y) plane -> rows = posterior..anterior flipped so anterior is on top; columns flipped for the
    # radiological convention (patient-left on image-right).
    return volume[:, :, k].T[::-1, ::-1]


def _sample(image_key, image_png, width, height, mask_full, box, label, obj, location, modality_raw, source,
            license_, attribute_templates):
    stem = f"{image_key}/{label}"
    return schema.sample_record(
        image_key=image_key, image=image_png, width=width, height=height, mask=mask_full, boxes=[box], label=label,
        obj=obj, location=location, modality_raw=modality_raw, source=source, license_=license_,
        loc_question=schema.pick_template(schema.LOCALIZATION_TEMPLATES, stem).format(obj=obj),
        att_question=schema.pick_template(attribute_templates, stem).format(obj=obj))


def atlas_slice_samples(data_dir=None, slices=ATLAS_SLICES, min_pixels=MIN_PIXELS) -> Iterator[dict]:
    from scipy import ndimage as ndi

    t1, aal, names, affine = load_atlas(data_dir)
    for k in slices:
        if not 0 <= k < t1.shape[2]:
            raise ValueError(f"axial index {k} outside the volume (0..{t1.shape[2] - 1})")
    brain = t1[aal > 0]
    lo, hi = 0.0, float(np.percentile(brain, 99.5)) if brain.size else float(t1.max())
    license_ = schema.LICENSES["mricron_aal"]
    for k in slices:
        img = schema.window_to_uint8(_axial(t1, k), lo, hi)
        lab = np.ascontiguousarray(_axial(aal, k))
        height, width = lab.shape
        z_mm = int(round(float(affine[2, 3] + k * affine[2, 2])))  # MNI z of axial index k (k - 71 on this grid)
        image_key = f"colin27_t1_axial_z{z_mm:+04d}mm"
        image_png = schema.encode_png(img)
        counts = np.bincount(lab.ravel(), minlength=int(lab.max()) + 1)
        objects = ndi.find_objects(lab)
        for lid in np.flatnonzero(counts[1:] >= min_pixels) + 1:
            sl = objects[lid - 1]
            if int(lid) not in names:
                raise CorruptSourceError(templates_dir(data_dir) / "aal.nii.txt", f"has no name for label value {lid}",
                                         MRICRON_INSTALL_HINT)
            mask = np.zeros(lab.shape, dtype=bool)
            mask[sl] = lab[sl] == lid
            ys, xs = sl
            box = [float(xs.start), float(ys.start), float(xs.stop - xs.start), float(ys.stop - ys.start)]
            label = names[int(lid)]
            yield _sample(image_key, image_png, width, height, mask, box, label, schema.humanise_structure(label),
                          "Brain", "MR", "mricron_aal", license_, schema.ATTRIBUTE_TEMPLATES)


def lesion_sample() -> dict:
    """The liver lesion outlined in the overlay plane of pydicom's ``examples_overlay.dcm``."""
    import pydicom
    from scipy import ndimage as ndi

    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(LESION_FILE)
    except Exception as exc:  # pragma: no cover - depends on the pydicom installation
        raise MissingSourceError(LESION_FILE, PYDICOM_HINT) from exc
    if path is None:
        raise MissingSourceError(LESION_FILE, PYDICOM_HINT)
    path = require_file(path, PYDICOM_HINT)
    check_pinned(path, PYDICOM_HINT, LESION_FILE)
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        overlay = ds.overlay_array(0x6000).astype(bool)
    except Exception as exc:
        raise CorruptSourceError(path, f"cannot be decoded ({exc.__class__.__name__}: {exc})", PYDICOM_HINT) from exc
    if overlay.shape != pixels.shape:
        raise CorruptSourceError(path, f"overlay {overlay.shape} does not match the image {pixels.shape}", PYDICOM_HINT)
    lab, n = ndi.label(overlay, structure=np.ones((3, 3)))
    lesion = None
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        filled = ndi.binary_fill_holes(lab[sl] == i)
        fill_ratio = filled.sum() / filled.size  # disc ~ 0.785, box glyph ~ 1, text strokes low
        if filled.sum() > 200 and 0.6 < fill_ratio < 0.9:
            if lesion is not None:
                raise CorruptSourceError(path, "overlay has more than one lesion-like outline", PYDICOM_HINT)
            lesion = np.zeros(overlay.shape, dtype=bool)
            lesion[sl] = filled
    if lesion is None:
        raise CorruptSourceError(path, "no lesion outline found in overlay group 0x6000", PYDICOM_HINT)
    lo, hi = np.percentile(pixels, [1, 99])
    img = schema.window_to_uint8(pixels, float(lo), float(hi))  # the overlay is never drawn into the image
    height, width = img.shape
    box = schema.mask_bbox_xywh(lesion)
    return _sample("pydicom_examples_overlay", schema.encode_png(img), width, height, lesion, box, "Liver lesion",
                   "liver lesion", "Abdomen", str(getattr(ds, "Modality", "MR")), "pydicom_testdata",
                   schema.LICENSES["pydicom_testdata"], schema.LESION_ATTRIBUTE_TEMPLATES)


def atlas_samples(data_dir=None, include_lesion: bool = True) -> Iterator[dict]:
    yield from atlas_slice_samples(data_dir)
    if include_lesion:
        yield lesion_sample()
