"""Scores of variable-size 2-D maps (one token grid ``[R_i, C_i]`` per sample), as the ``grounding_ratio``
evaluate module takes them: conversion to float32 grids with clear errors, and per-shape vectorised scoring."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .core import grounding_scores
from .inputs import is_torch, map_to_numpy
from .names import ALL, canonical

__all__ = ["as_float32_grid", "as_float32_grids", "compute_from_maps"]


def as_float32_grid(x: Any, what: str = "map") -> Any:
    """One map or mask (numpy, torch, nested list; any numeric or bool dtype) -> 2-D float32 ndarray.

    Anything but a 2-D grid ``[rows, cols]`` raises a ``ValueError`` that names the offending input."""
    if x is None:
        return None
    if is_torch(x):
        x = x.detach().cpu().float().numpy()
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} is not a numeric 2-D grid ({e}); give an array [rows, cols]") from None
    if arr.ndim != 2:
        raise ValueError(
            f"{what} has shape {tuple(arr.shape)} ({arr.ndim}-D); the grounding_ratio metric takes 2-D token grids "
            "[rows, cols] for both predictions and references: reshape a flat map of N image tokens to the "
            "model's token grid, e.g. attn.reshape(grid.rows, grid.cols)")
    return arr


def as_float32_grids(xs: Any, what: str = "map") -> Any:
    """A batch of maps or masks (list of grids, or an array ``[B, R, C]``) -> list of 2-D float32 ndarrays."""
    if xs is None:
        return None
    return [as_float32_grid(x, f"{what} {i}") for i, x in enumerate(xs)]


def compute_from_maps(
    predictions: Sequence[Any],
    references: Sequence[Any],
    scores: Iterable[str] | None = None,
    return_per_sample: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Scores of a list of 2-D attention maps ``[R_i, C_i]`` against region masks of the same shape.

    Maps may differ in size between samples (grouped by shape and vectorised). ``references`` are 0/1
    masks or coverages in [0, 1]. ``options`` are those of :func:`grounding_scores`.
    Returns ``{score: mean over samples with a finite value (NaN if none), "n": samples,
    "n_nan": {score: NaN count}}`` and, with ``return_per_sample``, ``"per_sample": {score: [float]}``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    names = list(ALL if scores is None else ([scores] if isinstance(scores, str) else scores))
    canonical(names)
    n = len(predictions)
    per = {name: np.full(n, np.nan) for name in names}
    groups: dict[tuple[int, ...], list[int]] = {}
    maps, masks = [], []
    for i, (p, r) in enumerate(zip(predictions, references)):
        a = map_to_numpy(p, f"prediction {i}")
        b = np.asarray(r.detach().cpu().numpy() if is_torch(r) else r)
        if a.shape != b.shape:
            raise ValueError(f"sample {i}: attention map shape {a.shape} != region mask shape {b.shape}")
        maps.append(a)
        masks.append(b)
        groups.setdefault(a.shape, []).append(i)
    for shape, idx in groups.items():
        mm = np.stack([maps[i].reshape(-1) for i in idx])
        gg = np.stack([masks[i].reshape(-1) for i in idx])
        if gg.dtype.kind == "f" and bool(((gg == 0) | (gg == 1)).all()):
            gg = gg == 1
        grid = (shape[0], shape[1]) if len(shape) == 2 else None
        res = grounding_scores(mm, gg, names, grid=grid, **options)
        for name in names:
            per[name][idx] = res[name]
    out: dict[str, Any] = {}
    with np.errstate(invalid="ignore"):
        for name in names:
            finite = np.isfinite(per[name])
            out[name] = float(per[name][finite].mean()) if finite.any() else math.nan
    out["n"] = n
    out["n_nan"] = {name: int(np.count_nonzero(~np.isfinite(per[name]))) for name in names}
    if return_per_sample:
        out["per_sample"] = {name: per[name].tolist() for name in names}
    return out
