"""The reference grounding task: "Is there an abnormality in the {structure}?" on VGMED ``atlas`` slices.

The package's reference VLM (``resources/reference_vlm``, trained by ``examples/train_reference_vlm.py``)
learns this task, and ``hf-vgrefine demo`` measures it. The answer depends only on **local evidence
inside the named structure**, so a model that solves it has a reason to look at that structure's image
tokens — which is what the grounding scores measure.

Task
    An axial Colin27 T1 slice (as rendered by VGMED ``atlas``) receives 1–3 **hypointense lesions**: a soft
    disc of radius 7–12 px centred inside one AAL structure and clipped to it (65–90 % signal drop). The
    question names one structure of the slice. ``yes``: one lesion lies inside the named structure (plus 0–2
    distractor lesions in *other* structures); ``no``: every lesion lies in other structures, each lesion
    pixel at least 14 px from the named one (the contralateral homologue 25 % and one of the 5 nearest
    structures 20 % of the time, else any other structure).
    Lesion counts have the same distribution for both answers, so "is there a lesion at all" or "how many"
    carry no information: only the named region decides.

Splits (honest held-out)
    * ``heldout_examples`` uses the **VGMED atlas rows themselves** (the 10 axial slices
      ``z = -31 ... +59 mm``, brain rows only; the liver row is not part of this task): every target
      yields one ``yes`` and one ``no`` example (exactly balanced), deterministic per row id and seed;
      the rows keep VGMED's ``split_group`` (``calibration``: 2 slices, ``test``: 8 slices).
    * ``training_images`` renders **other** axial slices of the same volumes with the same code
      (:func:`hf_vgrefine.data.atlas.atlas_slice_samples`), keeping only slices at least ``margin`` mm
      (default 3) away from every VGMED slice: training never sees a held-out image.
      ``TrainingStream`` draws examples from them with augmentation (random slice, random lesion
      placement/size/depth, distractors, global gain and Gaussian noise).

Every example is a dict in VGMED's schema (``image`` PIL ``L``, ``mask`` = the **named** structure,
``boxes`` = its box, ``question``, ``answer``, ``id``, ``label``, ``split_group``, ...) plus the lesion
geometry, so :func:`hf_vgrefine.measure.measure_grounding` and :func:`hf_vgrefine.calibrate.calibrate`
take it as is.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = ["QUESTION", "ANSWERS", "TASK_SOURCE", "TaskSettings", "Target", "AtlasImage", "render_lesions", "lesion_profile",
           "images_from_vgmed", "training_images", "training_slice_indices", "make_example", "heldout_examples",
           "TrainingStream", "vocabulary", "balanced_accuracy_report"]

QUESTION = "Is there an abnormality in the {obj}?"
ANSWERS = ("yes", "no")
TASK_SOURCE = "vgmed_atlas_reference"
QUESTION_TYPE = "abnormality"


@dataclass(frozen=True)
class TaskSettings:
    """Lesion model and sampling knobs (defaults = the shipped reference model's task)."""

    radius: tuple = (7.0, 12.0)           # lesion disc radius range, original pixels (clipped to the structure)
    depth: tuple = (0.65, 0.9)            # fractional signal drop inside the lesion
    edge: float = 1.0                     # soft edge width (px) of the disc and of the structure clip
    distractors: tuple = (0.4, 0.35, 0.25)  # P(0, 1, 2 extra lesions in other structures)
    clearance: float = 14.0               # px between any lesion pixel and the named structure in negatives
    p_homologue: float = 0.25             # negatives: lesion in the contralateral homologue if present
    p_neighbour: float = 0.2              # negatives: lesion in one of the 5 nearest structures
    noise: tuple = (0.0, 5.0)             # training augmentation: Gaussian noise sigma range (8-bit units)
    gain: tuple = (0.92, 1.08)            # training augmentation: global intensity gain range


DEFAULT_SETTINGS = TaskSettings()


# ============================================================================================ geometry
_FAR = np.float32(1e6)
_OUTSIDE_PAD = 16  # px around a structure where its outside distance is computed exactly (beyond: far)


@dataclass
class Target:
    """One named structure on one slice: boolean mask, xywh box, distance maps (lazily computed)."""

    label: str
    obj: str
    mask: np.ndarray
    box: list
    row_id: str = ""
    _cand: tuple | None = field(default=None, repr=False)
    _outside: tuple | None = field(default=None, repr=False)
    _centroid: tuple | None = field(default=None, repr=False)

    def _crop(self, pad: int):
        H, W = self.mask.shape
        x, y, w, h = (int(v) for v in self.box)
        return max(y - pad, 0), min(y + h + pad, H), max(x - pad, 0), min(x + w + pad, W)

    @property
    def candidates(self) -> tuple:
        """``(xs, ys, depth)``: every mask pixel and its distance to the nearest outside pixel."""
        if self._cand is None:
            from scipy import ndimage as ndi

            y0, y1, x0, x1 = self._crop(1)
            sub = self.mask[y0:y1, x0:x1]
            edt = ndi.distance_transform_edt(sub).astype(np.float32)
            ys, xs = np.nonzero(sub)
            self._cand = (xs + x0, ys + y0, edt[ys, xs])
        return self._cand

    def distance_outside(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Distance of pixels ``(xs, ys)`` to the nearest mask pixel (exact up to 16 px, else large)."""
        if self._outside is None:
            from scipy import ndimage as ndi

            y0, y1, x0, x1 = self._crop(_OUTSIDE_PAD)
            self._outside = (y0, y1, x0, x1, ndi.distance_transform_edt(~self.mask[y0:y1, x0:x1]).astype(np.float32))
        y0, y1, x0, x1, d = self._outside
        inb = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        out = np.full(xs.shape, _FAR, dtype=np.float32)
        out[inb] = d[ys[inb] - y0, xs[inb] - x0]
        return out

    @property
    def centroid(self) -> tuple:
        if self._centroid is None:
            xs, ys, _ = self.candidates
            self._centroid = (float(xs.mean()), float(ys.mean()))
        return self._centroid


@dataclass
class AtlasImage:
    """One axial slice (uint8 ``[H, W]``) with its named structures."""

    key: str
    image: np.ndarray
    targets: list
    split_group: str = "train"

    def homologue(self, t: int) -> int | None:
        lab = self.targets[t].label
        if lab.endswith(("_L", "_R")):
            other = lab[:-1] + ("R" if lab.endswith("_L") else "L")
            for j, tt in enumerate(self.targets):
                if tt.label == other:
                    return j
        return None

    def neighbours(self, t: int, k: int = 5) -> list[int]:
        cx, cy = self.targets[t].centroid
        d = [((tt.centroid[0] - cx) ** 2 + (tt.centroid[1] - cy) ** 2, j) for j, tt in enumerate(self.targets) if j != t]
        return [j for _, j in sorted(d)[:k]]


def _decode(png) -> np.ndarray:
    from PIL import Image

    if hasattr(png, "mode"):
        return np.asarray(png)
    return np.asarray(Image.open(io.BytesIO(png)))


def _obj(label: str) -> str:
    from .data.schema import humanise_structure

    return humanise_structure(label)


def lesion_profile(x: float, y: float, r: float, shape: tuple, edge: float = 1.0, host: np.ndarray | None = None):
    """Soft footprint ``(y0, y1, x0, x1, weights)`` of a lesion disc centred on pixel ``(x, y)``, clipped to
    the boolean ``host`` mask (smoothly, ``edge`` px) when given."""
    H, W = shape
    pad = r + 4 * edge + 2
    x0, x1 = max(int(x - pad), 0), min(int(x + pad) + 1, W)
    y0, y1 = max(int(y - pad), 0), min(int(y + pad) + 1, H)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    prof = 1.0 / (1.0 + np.exp((np.hypot(xx - x, yy - y) - r) / edge))
    if host is not None:
        from scipy import ndimage as ndi

        prof = prof * np.clip(ndi.gaussian_filter(host[y0:y1, x0:x1].astype(np.float32), edge * 0.7) * 2.0, 0, 1)
    return y0, y1, x0, x1, prof.astype(np.float32)


def render_lesions(image: np.ndarray, footprints: Sequence[tuple], depths: Sequence[float]) -> np.ndarray:
    """Hypointense lesions: ``I · (1 − depth · w)`` for each footprint ``(y0, y1, x0, x1, w)``
    (:func:`lesion_profile`); returns a new uint8 image."""
    out = image.astype(np.float32)
    for (y0, y1, x0, x1, w), depth in zip(footprints, depths):
        out[y0:y1, x0:x1] *= 1.0 - float(depth) * w
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ============================================================================================ sources
def _group_atlas_samples(samples: Iterable[dict], split_of=None) -> list[AtlasImage]:
    images: dict[str, AtlasImage] = {}
    for s in samples:
        key = s["image_key"]
        if key not in images:
            images[key] = AtlasImage(key=key, image=_decode(s["image"]).copy(), targets=[],
                                     split_group=split_of(key) if split_of else "train")
        mask = _decode(s["mask"]) > 0
        images[key].targets.append(Target(label=s["label"], obj=_obj(s["label"]), mask=mask,
                                          box=[float(v) for v in s["boxes"][0]]))
    return [im for im in images.values() if len(im.targets) >= 2]


def images_from_vgmed(dataset=None) -> list[AtlasImage]:
    """The brain slices of a VGMED ``atlas`` dataset (default: :func:`hf_vgrefine.data.load_vgmed`) with
    every target of each slice (from its ``localization`` rows), in dataset order."""
    if dataset is None:
        from .data import load_vgmed

        dataset = load_vgmed("atlas")
    cols = ["id", "source", "question_type", "label", "boxes", "split_group"]
    meta = dataset.select_columns(cols) if hasattr(dataset, "select_columns") else dataset
    images: dict[str, AtlasImage] = {}
    for i in range(len(meta)):
        r = meta[i]
        if r["source"] != "mricron_aal" or r["question_type"] != "localization":
            continue
        key = str(r["id"]).split("/")[1]
        full = dataset[i]
        if key not in images:
            img = np.asarray(full["image"].convert("L"))
            images[key] = AtlasImage(key=key, image=img.copy(), targets=[], split_group=str(r["split_group"]))
        mask = np.asarray(full["mask"].convert("L")) > 0
        images[key].targets.append(Target(label=r["label"], obj=_obj(r["label"]), mask=mask,
                                          box=[float(v) for v in r["boxes"][0]], row_id=str(r["id"])))
    return list(images.values())


def training_slice_indices(margin: int = 3, lo: int = 34, hi: int = 146) -> list[int]:
    """Axial indices in ``[lo, hi)`` at least ``margin`` slices (1 mm each) away from every VGMED slice."""
    from .data.atlas import ATLAS_SLICES

    return [k for k in range(lo, hi) if min(abs(k - s) for s in ATLAS_SLICES) >= margin]


def training_images(margin: int = 3, slices: Sequence[int] | None = None, data_dir=None) -> list[AtlasImage]:
    """Training slices rendered exactly like VGMED ``atlas`` (same windowing, masks, min. area), none of
    them within ``margin`` mm of a VGMED slice."""
    from .data.atlas import atlas_slice_samples

    ks = list(slices) if slices is not None else training_slice_indices(margin)
    return _group_atlas_samples(atlas_slice_samples(data_dir, slices=ks))


def vocabulary(images: Iterable[AtlasImage] | None = None) -> list[str]:
    """Words the tokenizer needs for every AAL structure name (split like the word-level tokenizer)."""
    import re

    from .data.schema import AAL_NAMES

    words = ["abnormality", "lesion"]
    names = list(AAL_NAMES.values())
    if images is not None:
        names += [t.obj for im in images for t in im.targets]
    for n in names + ["left", "right"]:
        for w in re.findall(r"\w+|[^\w\s]", n):
            words.append(w)
    return list(dict.fromkeys(words))


# ============================================================================================ examples
def _pick_lesion(rng, host: Target, r: float, avoid: Target | None, clearance: float, occupied: np.ndarray,
                 edge: float, tries: int = 8):
    """A lesion inside ``host`` (disc clipped to it): ``(x, y, r, footprint)`` whose footprint stays
    ``clearance`` px away from ``avoid`` and off ``occupied`` pixels; None if no room."""
    xs, ys, depth = host.candidates
    ok = depth >= min(2.0, float(depth.max()))
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    for i in rng.permutation(idx)[:tries]:
        x, y = float(xs[i]), float(ys[i])
        fp = lesion_profile(x, y, r, host.mask.shape, edge, host.mask)
        y0, y1, x0, x1, w = fp
        on = w > 0.05
        if occupied[y0:y1, x0:x1][on].any():
            continue
        if avoid is not None:
            py, px = np.nonzero(on)
            if avoid.distance_outside(px + x0, py + y0).min(initial=np.inf) < clearance:
                continue
        return x, y, r, fp
    return None


def _hosts(rng, img: AtlasImage, t: int, s: TaskSettings) -> list[int]:
    """Candidate structures for a lesion outside target ``t``, preferred first."""
    others = [j for j in range(len(img.targets)) if j != t]
    rng.shuffle(others)
    u = rng.random()
    first = []
    if u < s.p_homologue:
        h = img.homologue(t)
        first = [h] if h is not None else []
    elif u < s.p_homologue + s.p_neighbour:
        nb = img.neighbours(t)
        first = [nb[int(rng.integers(len(nb)))]] if nb else []
    return first + [j for j in others if j not in first]


def make_example(img: AtlasImage, t: int, answer: str, rng: np.random.Generator,
                 settings: TaskSettings = DEFAULT_SETTINGS, augment: bool = False, example_id: str | None = None,
                 empty: bool = False, distractors: Sequence[float] | None = None) -> dict:
    """One example for target ``t`` of ``img`` with the given ``answer`` (``"yes"``/``"no"``).

    ``empty`` (training curriculum only): a ``no`` example without any lesion. ``distractors``:
    override of ``settings.distractors`` (probabilities of 0, 1, 2, ... extra lesions).
    """
    from PIL import Image

    if answer not in ANSWERS:
        raise ValueError(f"answer must be 'yes' or 'no', got {answer!r}")
    if empty and answer != "no":
        raise ValueError("only 'no' examples can be empty")
    s = settings
    target = img.targets[t]
    probs = np.asarray(s.distractors if distractors is None else distractors, dtype=np.float64)
    n_extra = 0 if empty else int(rng.choice(len(probs), p=probs / probs.sum()))
    lesions, hosts, footprints = [], [], []
    H, W = img.image.shape
    occupied = np.zeros((H, W), dtype=bool)

    def add(host_index: int, avoid: Target | None) -> bool:
        host = img.targets[host_index]
        got = _pick_lesion(rng, host, float(rng.uniform(*s.radius)), avoid, s.clearance, occupied, s.edge)
        if got is None:
            return False
        x, y, r, fp = got
        y0, y1, x0, x1, w = fp
        from scipy import ndimage as ndi

        occupied[y0:y1, x0:x1] |= ndi.binary_dilation(w > 0.05, iterations=3)
        lesions.append((x, y, r, float(rng.uniform(*s.depth))))
        hosts.append(host.label)
        footprints.append(fp)
        return True

    if answer == "yes" and not add(t, None):
        raise RuntimeError(f"no room for a lesion in {target.label} on {img.key}")
    n_out = n_extra + (1 if answer == "no" and not empty else 0)
    for j in _hosts(rng, img, t, s):
        if n_out == 0:
            break
        if add(j, target):
            n_out -= 1
    if answer == "no" and len(lesions) == 0 and not empty:
        raise RuntimeError(f"no room for a negative lesion outside {target.label} on {img.key}")
    pixels = render_lesions(img.image, footprints, [les[3] for les in lesions])
    lesion_mask = np.zeros((H, W), dtype=bool)
    for y0, y1, x0, x1, w in footprints:
        lesion_mask[y0:y1, x0:x1] |= w > 0.5
    if augment:
        a = pixels.astype(np.float32) * float(rng.uniform(*s.gain))
        sigma = float(rng.uniform(*s.noise))
        if sigma > 0:
            a += rng.standard_normal(a.shape, dtype=np.float32) * np.float32(sigma)
        pixels = np.clip(a + 0.5, 0, 255).astype(np.uint8)
    base = target.row_id.rsplit("/", 1)[0] if target.row_id else f"train/{img.key}/{target.label}"
    return {
        "id": example_id or f"{base}/{answer}",
        "image": Image.fromarray(pixels, mode="L"),
        "mask": Image.fromarray(target.mask.astype(np.uint8) * 255, mode="L"),
        "boxes": [list(target.box)],
        "question": QUESTION.format(obj=target.obj),
        "question_type": QUESTION_TYPE,
        "answer": answer,
        "label": target.label,
        "modality": "mr",
        "source": TASK_SOURCE,
        "split_group": img.split_group,
        "image_key": img.key,
        "lesions": [[round(v, 3) for v in les] for les in lesions],
        "lesion_labels": hosts,
        "lesion_mask": Image.fromarray(lesion_mask.astype(np.uint8) * 255, mode="L"),
        "n_lesions": len(lesions),
    }


def _stable_seed(*parts) -> int:
    h = hashlib.sha1("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little")


def heldout_examples(dataset=None, split_group: str | None = "test", seed: int = 0, limit: int | None = None,
                     settings: TaskSettings = DEFAULT_SETTINGS, images: list[AtlasImage] | None = None) -> list[dict]:
    """Held-out examples on the VGMED ``atlas`` slices: one ``yes`` and one ``no`` per target.

    ``split_group``: ``"test"`` (8 slices), ``"calibration"`` (2 slices) or ``None`` (all 10).
    ``limit``: keep the first ``limit`` targets (2·limit examples; targets are interleaved across slices
    so a small limit still spans every slice). Deterministic: each example's lesions depend only on
    ``(seed, row id, answer)``.
    """
    images = images if images is not None else images_from_vgmed(dataset)
    chosen = [im for im in images if split_group is None or im.split_group == split_group]
    order = []  # round-robin over slices
    depth_ = max((len(im.targets) for im in chosen), default=0)
    for j in range(depth_):
        for im in chosen:
            if j < len(im.targets):
                order.append((im, j))
    if limit is not None:
        order = order[: int(limit)]
    out = []
    for im, j in order:
        for answer in ANSWERS:
            rid = im.targets[j].row_id
            rng = np.random.default_rng(_stable_seed(seed, rid, answer))
            out.append(make_example(im, j, answer, rng, settings))
    return out


class TrainingStream:
    """Endless, seeded stream of augmented training examples (balanced yes/no within each batch)."""

    def __init__(self, images: list[AtlasImage], seed: int = 0, settings: TaskSettings = DEFAULT_SETTINGS,
                 augment: bool = True):
        if not images:
            raise ValueError("no training images")
        self.images = images
        self.rng = np.random.default_rng(seed)
        self.settings = settings
        self.augment = augment
        self.n = 0

    def example(self, answer: str, p_empty: float = 0.0, distractors: Sequence[float] | None = None) -> dict:
        while True:
            img = self.images[int(self.rng.integers(len(self.images)))]
            t = int(self.rng.integers(len(img.targets)))
            empty = answer == "no" and p_empty > 0 and self.rng.random() < p_empty
            try:
                ex = make_example(img, t, answer, self.rng, self.settings, augment=self.augment,
                                  example_id=f"train/{self.n}", empty=empty, distractors=distractors)
            except RuntimeError:
                continue
            self.n += 1
            return ex

    def batch(self, size: int, p_empty: float = 0.0, distractors: Sequence[float] | None = None) -> list[dict]:
        """``size`` examples, half ``yes``; ``p_empty``: share of ``no`` examples without any lesion and
        ``distractors``: distractor-count probabilities (both for a training curriculum)."""
        answers = [ANSWERS[i % 2] for i in range(size)]
        self.rng.shuffle(answers)
        return [self.example(a, p_empty, distractors) for a in answers]


def balanced_accuracy_report(answers: Sequence[str], predictions: Sequence[str]) -> dict:
    """Accuracy, per-class recall and counts for yes/no predictions."""
    a = np.asarray([str(x) for x in answers])
    p = np.asarray([str(x) for x in predictions])
    rep = {"n": int(a.size), "accuracy": float((a == p).mean()) if a.size else float("nan")}
    for c in ANSWERS:
        m = a == c
        rep[f"recall_{c}"] = float((p[m] == c).mean()) if m.any() else float("nan")
        rep[f"n_{c}"] = int(m.sum())
    return rep
