"""Rank-based grounding scores: AUROC of the map against the region labels, and IoU / Dice of the map
binarised at a threshold (``oracle_size``, ``top_frac``, ``mean``, ``otsu`` or ``fixed``). Block kernels used by
:func:`hf_vgrefine.metrics.grounding_scores`; the one-score functions are :func:`~hf_vgrefine.metrics.auroc`
and :func:`~hf_vgrefine.metrics.thresholded_iou`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .names import top_k

__all__ = ["otsu_threshold", "ranked_scores"]


def otsu_threshold(vs: np.ndarray) -> np.ndarray:
    """Exact Otsu threshold per row of ascending-sorted values ``vs [K, N]`` (every gap is a candidate).

    Class 0 = the ``j`` smallest values, class 1 = the rest; the split maximising the between-class
    variance ``w0·w1·(μ0 − μ1)²`` is kept and the threshold is the smallest value of class 1. Rows
    without two distinct values get threshold = their minimum (every token selected).
    """
    k, n = vs.shape
    if n == 1:
        return vs[:, 0].copy()
    c = np.cumsum(vs, axis=-1)
    total = c[:, -1:]
    j = np.arange(1, n, dtype=np.float64)
    c0 = c[:, :-1]
    mu0 = c0 / j
    mu1 = (total - c0) / (n - j)
    var = (j / n) * (1 - j / n) * (mu0 - mu1) ** 2
    var[vs[:, 1:] <= vs[:, :-1]] = -1.0  # not a gap between distinct values
    best = np.argmax(var, axis=-1)
    has_gap = var[np.arange(k), best] >= 0
    thr = vs[np.arange(k), best + 1]
    return np.where(has_gap, thr, vs[:, 0])


def ranked_scores(mc: np.ndarray, bset: np.ndarray, nb: np.ndarray, s: np.ndarray, mn: np.ndarray, need: set[str],
                  opt: dict[str, Any], ws) -> dict[str, np.ndarray]:
    """AUROC and thresholded IoU/Dice of one block (those of ``need``), sharing one sort.

    ``mc [K, N]`` float64 maps; ``bset [K, N]`` bool region support; ``nb [K]`` region sizes; ``s [K]`` map sums;
    ``mn [K]`` map minima; ``opt``: ``threshold_mode``, ``q``, ``theta``; ``ws``: per-worker buffers
    (``ws.get(name, K, dtype)``). Rows are not yet NaN-masked (the caller applies the NaN policy)."""
    k, n = mc.shape
    out: dict[str, np.ndarray] = {}
    thr_names = need & {"thresholded_iou", "thresholded_dice"}
    mode = opt["threshold_mode"]
    vs = None
    if "auroc" in need:
        # One sort serves AUROC and the thresholds: key = (float bits << 1) | label. For non-negative
        # floats the bit pattern orders like the value (the shift drops the sign bit of -0.0), and
        # inside a tie group the negatives come first.
        keys = np.left_shift(np.ascontiguousarray(mc).view(np.uint64), np.uint64(1), out=ws.get("u1", k, np.uint64))
        keys |= bset
        keys.sort(axis=-1)
        lab = np.bitwise_and(keys, np.uint64(1), out=ws.get("u2", k, np.uint64))
        npos = nb.astype(np.float64)
        # without ties: U = Σ_positives #negatives before = Σ_j j·lab_j − npos(npos − 1)/2
        u = (lab @ np.arange(n, dtype=np.uint64)).astype(np.float64) - npos * (npos - 1) / 2
        vbits = np.right_shift(keys, np.uint64(1), out=keys)
        eq = np.equal(vbits[:, 1:], vbits[:, :-1], out=ws.get("b1", k, bool)[:, : n - 1])
        ties = eq.any(axis=-1)
        if ties.any():
            t = np.flatnonzero(ties)
            lt = lab[t].astype(np.float64)
            neg = 1.0 - lt
            before = np.cumsum(neg, axis=-1) - neg  # negatives strictly before position j
            start = np.ones(lt.shape, dtype=bool)
            start[:, 1:] = ~eq[t]
            below = np.maximum.accumulate(np.where(start, before, 0.0), axis=-1)  # in lower tie groups
            u[t] = np.einsum("ij,ij->i", lt, 0.5 * (below + before))
        out["auroc"] = np.where(nb < n, u / (npos * (n - npos)), np.nan)
        vs = vbits.view(np.float64)
    elif thr_names and mode in ("top_frac", "oracle_size", "otsu"):
        vs = ws.get("f1", k)
        np.copyto(vs, mc)
        vs.sort(axis=-1)

    if thr_names:
        rows = np.arange(k)
        if mode == "oracle_size":
            thr = vs[rows, np.clip(n - nb, 0, n - 1)]
        elif mode == "top_frac":
            thr = vs[:, n - top_k(opt["q"], n)].copy()
        elif mode == "otsu":
            thr = otsu_threshold(vs)
        elif mode == "mean":
            thr = np.minimum(s / n, mc.max(axis=-1))  # mean ≤ max, also under rounding
        if mode == "fixed":  # on min-max normalised m; a constant map selects every token
            span = (mc.max(axis=-1) - mn)[:, None]
            z = np.where(span > 0, (mc - mn[:, None]) / span, 1.0)
            sel = np.greater_equal(z, opt["theta"], out=ws.get("b2", k, bool))
        else:
            sel = np.greater_equal(mc, thr[:, None], out=ws.get("b2", k, bool))
        nsel = np.add.reduce(sel, axis=-1, dtype=np.int64)
        np.logical_and(sel, bset, out=sel)
        inter = np.add.reduce(sel, axis=-1, dtype=np.int64).astype(np.float64)
        if "thresholded_iou" in thr_names:
            out["thresholded_iou"] = inter / (nsel + nb - inter)
        if "thresholded_dice" in thr_names:
            out["thresholded_dice"] = 2.0 * inter / (nsel + nb)
    return out
