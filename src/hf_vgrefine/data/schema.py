"""VGMED row schema, question templates, identifiers and small geometry helpers.

Everything here is pure Python/numpy and shared by every configuration of the builder.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Iterable, Sequence

import numpy as np

DATASET_NAME = "vgmed"
CONFIG_NAMES = ("atlas", "slake", "full", "coco")
DEFAULT_CONFIG = "atlas"
QUESTION_TYPES = ("localization", "attribute")
SPLIT = "test"

CONFIG_DESCRIPTIONS = {
    "atlas": (
        "Offline configuration built from Debian `mricron-data` (axial slices of the Colin27 T1 MRI with "
        "per-structure masks and boxes from the AAL atlas) plus the radiologist-outlined liver lesion of "
        "pydicom's bundled `examples_overlay.dcm`. No download; used by CI and demos."
    ),
    "slake": (
        "The SLAKE-based part of VGMED (1,388 targets x 2 question types): released question files joined "
        "with the SLAKE images (CC BY 4.0). Boxes are SLAKE `detection.json` boxes (xywh)."
    ),
    "full": (
        "The released 8-modality VGMED (13,962 targets x 2 question types) read from the official release "
        "files and a local folder with the source images and masks. Partly CC BY-NC-SA 4.0."
    ),
    "coco": (
        "Natural-image control set: the released COCO question files joined with MS COCO val2014 images "
        "(images are never redistributed by this package)."
    ),
}

# The ten localization templates of the released VGMED/COCO question files (docs/data_formats.md § VGMED rows).
LOCALIZATION_TEMPLATES = (
    "Is there a {obj} in the image?",
    "Can you see a {obj} in the image?",
    "Does the image contain a {obj}?",
    "Is a {obj} present in this image?",
    "Do you see a {obj} in the picture?",
    "Is the {obj} visible in the image?",
    "Is there any sign of a {obj} in the image?",
    "Can a {obj} be found in this image?",
    "Does this image show a {obj}?",
    "Is a {obj} shown in the picture?",
)

# The package's own attribute templates for generated configurations (the released attribute questions
# are free text; these are used only where no released question exists). No answer is implied.
ATTRIBUTE_TEMPLATES = (
    "Is the {obj} symmetric with its contralateral counterpart?",
    "Does the {obj} show abnormal signal intensity?",
    "Is the {obj} enlarged?",
    "Does the {obj} have a homogeneous texture?",
    "Are the margins of the {obj} well defined?",
    "Is the {obj} brighter than the surrounding tissue?",
    "Does the {obj} appear atrophic?",
    "Is there a focal lesion within the {obj}?",
)
LESION_ATTRIBUTE_TEMPLATES = (
    "Is the {obj} hyperintense compared with the surrounding liver?",
    "Does the {obj} have well-defined margins?",
    "Is the {obj} round?",
    "Does the {obj} appear homogeneous?",
)

from ..citation import STUDY_CITATION  # noqa: E402

CITATION = STUDY_CITATION + """\
@inproceedings{liu2021slake,
  title     = {SLAKE: A Semantically-Labeled Knowledge-Enhanced Dataset for Medical Visual Question Answering},
  author    = {Liu, Bo and Zhan, Li-Ming and Xu, Li and Ma, Lin and Yang, Yan and Wu, Xiao-Ming},
  booktitle = {IEEE International Symposium on Biomedical Imaging (ISBI)},
  year      = {2021}
}
@article{ye2023samed2d,
  title   = {SA-Med2D-20M Dataset: Segment Anything in 2D Medical Imaging with 20 Million masks},
  author  = {Ye, Jin and others},
  journal = {arXiv:2311.11969},
  year    = {2023}
}
@inproceedings{lin2014coco,
  title     = {Microsoft COCO: Common Objects in Context},
  author    = {Lin, Tsung-Yi and others},
  booktitle = {ECCV},
  year      = {2014}
}
@article{tzourio2002aal,
  title   = {Automated Anatomical Labeling of Activations in SPM Using a Macroscopic Anatomical Parcellation
             of the MNI MRI Single-Subject Brain},
  author  = {Tzourio-Mazoyer, N. and others},
  journal = {NeuroImage},
  volume  = {15},
  pages   = {273--289},
  year    = {2002}
}
@article{holmes1998colin27,
  title   = {Enhancement of MR Images Using Registration for Signal Averaging},
  author  = {Holmes, C. J. and Hoge, R. and Collins, L. and Woods, R. and Toga, A. W. and Evans, A. C.},
  journal = {Journal of Computer Assisted Tomography},
  volume  = {22},
  pages   = {324--333},
  year    = {1998}
}
"""

LICENSES = {
    "mricron_aal": "BSD-3-Clause AND LicenseRef-Colin27-AAL-research-terms",
    "pydicom_testdata": "MIT",
    "slake": "CC-BY-4.0",
    "sa_med2d_20m": "CC-BY-NC-SA-4.0",
    "polyp_db": "LicenseRef-unknown",
    "cxr_lungs": "LicenseRef-unknown",
    "coco_val2014": "CC-BY-4.0 AND LicenseRef-Flickr-terms",
}

# Modality strings as stored by the sources -> normalised values of the `modality` column.
_MODALITY_MAP = {
    "ct": "ct",
    "mr": "mr",
    "mri": "mr",
    "x_ray": "x_ray",
    "x-ray": "x_ray",
    "xray": "x_ray",
    "x ray": "x_ray",
    "cr": "x_ray",
    "dx": "x_ray",
    "ultrasound": "ultrasound",
    "us": "ultrasound",
    "pet": "pet",
    "endoscopy": "endoscopy",
    "dermoscopy": "dermoscopy",
    "fundus_photography": "fundus_photography",
    "fundus photography": "fundus_photography",
    "natural": "natural",
}


def normalise_modality(raw: str) -> str:
    key = str(raw).strip().lower()
    return _MODALITY_MAP.get(key, key.replace(" ", "_").replace("-", "_"))


def build_features():
    """The `datasets.Features` of every VGMED configuration (docs/data_formats.md § VGMED rows)."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "id": Value("string"),
            "image": Image(),
            "mask": Image(),
            "boxes": List(List(Value("float32"), length=4)),
            "question": Value("string"),
            "question_type": Value("string"),
            "answer": Value("string"),
            "answer_source": Value("string"),
            "label": Value("string"),
            "modality": Value("string"),
            "modality_raw": Value("string"),
            "location": Value("string"),
            "source": Value("string"),
            "license": Value("string"),
            "image_width": Value("int32"),
            "image_height": Value("int32"),
            "area_ratio": Value("float32"),
            "split_group": Value("string"),
            "gt_tokens_ref": List(List(Value("int32"), length=2)),
            "gt_tokens_ref_grid": List(Value("int32")),
        }
    )


# ---------------------------------------------------------------------------------------------------
# identifiers, deterministic choices


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "x"


def stable_int(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def split_group(image_key: str) -> str:
    """``calibration`` for ~20% of the images (sha1(image_key) mod 5 == 0), ``test`` otherwise."""
    return "calibration" if stable_int(image_key) % 5 == 0 else "test"


def pick_template(templates: Sequence[str], key: str) -> str:
    return templates[stable_int(key) % len(templates)]


# Plain-English names of the AAL structures (side prefixed separately). Unknown names fall back to
# "underscores -> spaces, lower case".
AAL_NAMES = {
    "Precentral": "precentral gyrus",
    "Frontal_Sup": "superior frontal gyrus",
    "Frontal_Sup_Orb": "orbital part of the superior frontal gyrus",
    "Frontal_Mid": "middle frontal gyrus",
    "Frontal_Mid_Orb": "orbital part of the middle frontal gyrus",
    "Frontal_Inf_Oper": "opercular part of the inferior frontal gyrus",
    "Frontal_Inf_Tri": "triangular part of the inferior frontal gyrus",
    "Frontal_Inf_Orb": "orbital part of the inferior frontal gyrus",
    "Rolandic_Oper": "rolandic operculum",
    "Supp_Motor_Area": "supplementary motor area",
    "Olfactory": "olfactory cortex",
    "Frontal_Sup_Medial": "medial superior frontal gyrus",
    "Frontal_Med_Orb": "medial orbitofrontal gyrus",
    "Rectus": "gyrus rectus",
    "Insula": "insula",
    "Cingulum_Ant": "anterior cingulate gyrus",
    "Cingulum_Mid": "middle cingulate gyrus",
    "Cingulum_Post": "posterior cingulate gyrus",
    "Hippocampus": "hippocampus",
    "ParaHippocampal": "parahippocampal gyrus",
    "Amygdala": "amygdala",
    "Calcarine": "calcarine cortex",
    "Cuneus": "cuneus",
    "Lingual": "lingual gyrus",
    "Occipital_Sup": "superior occipital gyrus",
    "Occipital_Mid": "middle occipital gyrus",
    "Occipital_Inf": "inferior occipital gyrus",
    "Fusiform": "fusiform gyrus",
    "Postcentral": "postcentral gyrus",
    "Parietal_Sup": "superior parietal lobule",
    "Parietal_Inf": "inferior parietal lobule",
    "SupraMarginal": "supramarginal gyrus",
    "Angular": "angular gyrus",
    "Precuneus": "precuneus",
    "Paracentral_Lobule": "paracentral lobule",
    "Caudate": "caudate nucleus",
    "Putamen": "putamen",
    "Pallidum": "globus pallidus",
    "Thalamus": "thalamus",
    "Heschl": "Heschl's gyrus",
    "Temporal_Sup": "superior temporal gyrus",
    "Temporal_Pole_Sup": "superior temporal pole",
    "Temporal_Mid": "middle temporal gyrus",
    "Temporal_Pole_Mid": "middle temporal pole",
    "Temporal_Inf": "inferior temporal gyrus",
    "Cerebelum_Crus1": "cerebellar crus I",
    "Cerebelum_Crus2": "cerebellar crus II",
    "Cerebelum_3": "cerebellar lobule III",
    "Cerebelum_4_5": "cerebellar lobules IV-V",
    "Cerebelum_6": "cerebellar lobule VI",
    "Cerebelum_7b": "cerebellar lobule VIIb",
    "Cerebelum_8": "cerebellar lobule VIII",
    "Cerebelum_9": "cerebellar lobule IX",
    "Cerebelum_10": "cerebellar lobule X",
    "Vermis_1_2": "cerebellar vermis (lobules I-II)",
    "Vermis_3": "cerebellar vermis (lobule III)",
    "Vermis_4_5": "cerebellar vermis (lobules IV-V)",
    "Vermis_6": "cerebellar vermis (lobule VI)",
    "Vermis_7": "cerebellar vermis (lobule VII)",
    "Vermis_8": "cerebellar vermis (lobule VIII)",
    "Vermis_9": "cerebellar vermis (lobule IX)",
    "Vermis_10": "cerebellar vermis (lobule X)",
}


def humanise_structure(name: str) -> str:
    """AAL-style names -> question text: ``Hippocampus_L`` -> ``left hippocampus``."""
    name = str(name)
    side = ""
    if name.endswith(("_L", "_R")):
        side = "left " if name.endswith("_L") else "right "
        name = name[:-2]
    text = AAL_NAMES.get(name) or name.replace("_", " ").lower()
    return f"{side}{text}"


# ---------------------------------------------------------------------------------------------------
# geometry


def mask_bbox_xywh(mask: np.ndarray) -> list[float]:
    """Bounding box of a boolean mask as ``[x, y, w, h]`` with exclusive right/bottom edge."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask")
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def xyxy_inclusive_to_xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"degenerate xyxy box {list(box)}")
    return [x0, y0, x1 - x0 + 1.0, y1 - y0 + 1.0]


def union_bbox_xywh(boxes: Iterable[Sequence[float]]) -> list[float]:
    b = np.asarray(list(boxes), dtype=np.float64)
    x0, y0 = b[:, 0].min(), b[:, 1].min()
    x1, y1 = (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def boxes_area_ratio(boxes: Sequence[Sequence[float]], width: int, height: int) -> float:
    """Area of the union of boxes (rasterised on the pixel grid) over the image area."""
    canvas = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        x1, y1 = min(int(np.ceil(x + w)), width), min(int(np.ceil(y + h)), height)
        canvas[y0:y1, x0:x1] = True
    return float(canvas.mean()) if canvas.size else 0.0


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W) or (H, W, 3) array, or a bool mask (-> 0/255), to PNG bytes."""
    from PIL import Image

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def window_to_uint8(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    a = (np.asarray(array, dtype=np.float32) - lo) / max(hi - lo, 1e-6)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def sample_record(*, image_key, image, width, height, mask, boxes, label, obj, location, modality_raw, source,
                  license_, loc_question, att_question, gt_tokens=None, grid=None) -> dict:
    """One target of a VGMED source before it becomes rows: ``image`` (encoded), ``mask`` (bool ``[H, W]`` or
    None; stored as PNG), ``boxes`` (``[x, y, w, h]`` pixels), the localization and attribute questions,
    the released reference tokens (``[row, col]`` pairs on ``grid``). ``area_ratio``: mask (else box) area
    over the image area."""
    if mask is not None:
        area = float(mask.mean())
        mask_value = encode_png(mask)
    else:
        area = boxes_area_ratio(boxes, width, height)
        mask_value = None
    tokens = []
    for t in gt_tokens or []:
        if isinstance(t, (list, tuple)) and len(t) == 2:
            tokens.append([int(t[0]), int(t[1])])
    return {
        "image_key": image_key,
        "image": image,
        "mask": mask_value,
        "width": width,
        "height": height,
        "boxes": boxes,
        "area_ratio": area,
        "label": label,
        "location": location,
        "modality_raw": modality_raw,
        "source": source,
        "license": license_,
        "questions": {
            "localization": (loc_question, "yes", "derived"),
            "attribute": (att_question, "", "none"),
        },
        "gt_tokens_ref": tokens,
        "gt_tokens_ref_grid": list(grid) if tokens and grid else [],
    }
