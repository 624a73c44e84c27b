"""Grounding scores: how much of an attention map over visual tokens lies on a ground-truth region.

Pure numpy core (docs/method.md § Grounding scores). Every score is computed in float64, per sample, vectorised over
leading axes.

Inputs
------
``m``  attention map(s), shape ``[..., N]`` (``N`` visual tokens, row-major over an ``R x C`` grid).
       numpy array, torch tensor (any dtype, any device) or nested list; converted to float64.
       Values must be non-negative (probabilities or relative attention ``â``, unit-free).
``gt`` ground-truth region, one of

       * a boolean mask ``[N]`` or ``[R, C]`` (``R*C == N``), or a batched mask ``[..., N]`` /
         ``[..., R, C]`` whose leading axes broadcast against those of ``m``;
       * an integer 0/1 mask with at least 2 dimensions (``[R, C]`` or batched);
       * a list / tuple / range / set of flat token indices, or a 1-D integer array of indices
         (duplicate indices raise, because they almost always mean a 0/1 mask passed as int);
       * a float mask in ``[0, 1]``. If every value is 0 or 1 it is a binary mask; otherwise it is a
         *soft* ground truth (token coverage ``w``, docs/method.md): ``g = w / Σw`` in KL/JS/soft-Dice,
         ``AR = (Σ w·m / Σ w) / mean(m)``, ``EPG = Σ w·p``; the set-based scores (pointing game,
         thresholded IoU/Dice, AUROC) use the support ``B = {w > 0}``.

Outputs
-------
Arrays of shape ``broadcast(m.shape[:-1], gt.shape[:-1])`` (a numpy float64 scalar for one map).

NaN policy (never an exception for these)
-----------------------------------------
A sample's score is NaN when its region is empty (``Σw = 0``), when ``Σm = 0``, or when ``m``
contains a non-finite value (NaN, ±inf). AUROC is also NaN when the region covers every token.
Invalid *inputs* raise ``ValueError`` with a message: shapes of map and mask that do not match or
broadcast, negative finite attention values, mask values outside ``[0, 1]`` or NaN, indices out of
range or duplicated, unknown score names or modes.

Constants are those of the reference code: ``p = m / (Σm + 1e-8)``, ``1e-8`` in AR and JS,
clipping to ``[1e-12, 1]`` in KL.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = [
    "ALIASES",
    "ALL",
    "HIGHER_IS_BETTER",
    "aggregate",
    "as_float32_grid",
    "as_float32_grids",
    "attention_ratio",
    "auroc",
    "chance_levels",
    "compute_from_maps",
    "energy_pointing_game",
    "grounding_scores",
    "js_divergence",
    "kl_gt_attention",
    "pointing_game",
    "region_fraction",
    "relative_attention",
    "relevance_mass_ratio",
    "soft_dice_ratio",
    "thresholded_iou",
    "vgmed_iou",
]

EPS = 1e-8  # normaliser of p, AR denominator, JS smoothing (reference constants)
CLIP = 1e-12  # KL clipping floor (reference constant)

#: Scores computed by default, in output order.
ALL: tuple[str, ...] = (
    "attention_ratio",
    "kl_gt_attention",
    "js_divergence",
    "soft_dice_ratio",
    "energy_pointing_game",
    "pointing_game",
    "thresholded_iou",
    "thresholded_dice",
    "auroc",
)

#: Accepted alternative names -> canonical score. Output keys keep the name that was asked for.
ALIASES: dict[str, str] = {
    "vgmed_iou": "soft_dice_ratio",  # the VGMED "IoU" is a soft-Dice ratio, not an IoU (docs/method.md)
    "relevance_mass_ratio": "energy_pointing_game",
}

#: Direction of each canonical score.
HIGHER_IS_BETTER: dict[str, bool] = {
    "attention_ratio": True,
    "kl_gt_attention": False,
    "js_divergence": False,
    "soft_dice_ratio": True,
    "energy_pointing_game": True,
    "pointing_game": True,
    "thresholded_iou": True,
    "thresholded_dice": True,
    "auroc": True,
}

_THRESHOLD_MODES = ("top_frac", "oracle_size", "mean", "otsu", "fixed")
_CHUNK_ELEMENTS = 1 << 17  # elements per processing block (1 MiB of float64): keeps work in cache


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------
def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _map_to_numpy(m: Any, what: str = "attention map") -> np.ndarray:
    """Array view of a map; float32/float64 are kept as they are (converted to float64 block-wise)."""
    if _is_torch(m):
        t = m.detach().cpu()
        m = t.numpy() if str(t.dtype) in ("torch.float32", "torch.float64") else t.double().numpy()
    try:
        arr = np.asarray(m)
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a numeric array-like, got {type(m).__name__}: {err}") from None
    if arr.ndim == 0:
        raise ValueError(f"{what} must have at least one dimension [..., N], got a scalar")
    if arr.shape[-1] == 0:
        raise ValueError(f"{what} has no tokens (last dimension is 0)")
    return arr


def _check_non_negative(m: np.ndarray, what: str = "attention map") -> None:
    neg = m < 0
    if neg.any() and (neg & np.isfinite(m)).any():
        raise ValueError(
            f"{what} has negative values (min {np.nanmin(np.where(np.isfinite(m), m, np.nan)):.3g}); "
            "attention maps must be non-negative"
        )


def _gt_to_numpy(gt: Any, n: int) -> tuple[np.ndarray, bool, tuple[int, int] | None]:
    """Return ``(w, soft, grid)``: ``w`` is bool (binary) or float64 (soft) with last axis ``n``."""
    if _is_torch(gt):
        t = gt.detach().cpu()
        gt = t.double().numpy() if t.dtype.is_floating_point else t.numpy()
    if isinstance(gt, (set, frozenset)):
        gt = sorted(gt)
    if isinstance(gt, range):
        gt = list(gt)
    from_sequence = isinstance(gt, (list, tuple))
    arr = np.asarray(gt)
    if from_sequence and arr.size == 0:
        return np.zeros(n, dtype=bool), False, None
    if arr.dtype == object:
        raise ValueError("ground truth must be a mask array or a list of flat token indices (ragged input given)")
    if arr.dtype.kind in "iu" and arr.ndim == 1:
        return _indices_to_mask(arr, n), False, None
    if arr.ndim == 0:
        raise ValueError("ground truth must be a mask [..., N] / [..., R, C] or a list of flat indices, got a scalar")
    grid = None
    if arr.shape[-1] != n:
        if arr.ndim >= 2 and arr.shape[-2] * arr.shape[-1] == n:
            grid = (int(arr.shape[-2]), int(arr.shape[-1]))
            arr = arr.reshape(arr.shape[:-2] + (n,))
        else:
            raise ValueError(
                f"ground-truth mask of shape {tuple(np.shape(gt))} does not match the attention map's "
                f"N={n} tokens (expected [..., {n}] or [..., R, C] with R*C={n})"
            )
    if arr.dtype == bool:
        return arr, False, grid
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError("integer ground-truth masks must contain only 0 and 1")
        return arr.astype(bool), False, grid
    if arr.dtype.kind != "f":
        raise ValueError(f"unsupported ground-truth dtype {arr.dtype}")
    w = arr.astype(np.float64, copy=False)
    if not np.isfinite(w).all():
        raise ValueError("ground-truth mask contains NaN or inf")
    if w.size and (w.min() < 0 or w.max() > 1):
        raise ValueError("ground-truth coverage values must lie in [0, 1]")
    binary = bool(((w == 0) | (w == 1)).all())
    if binary:
        return w == 1, False, grid
    return w, True, grid


def _indices_to_mask(idx: np.ndarray, n: int) -> np.ndarray:
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"flat token indices must lie in [0, {n}), got min {idx.min()} max {idx.max()}")
    if np.unique(idx).size != idx.size:
        raise ValueError(
            "duplicate flat token indices; a 1-D integer ground truth is read as a list of indices - "
            "pass a boolean mask (e.g. gt.astype(bool)) if this is a 0/1 mask"
        )
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return mask


class _Prepared:
    """Map(s) and mask(s) flattened to ``[rows, N]`` (or ``[1, N]`` when broadcast)."""

    def __init__(self, m: Any, gt: Any, grid: tuple[int, int] | None = None):
        m = _map_to_numpy(m)
        n = m.shape[-1]
        w, soft, gt_grid = _gt_to_numpy(gt, n)
        try:
            lead = np.broadcast_shapes(m.shape[:-1], w.shape[:-1])
        except ValueError:
            raise ValueError(
                f"attention map of shape {m.shape} and ground truth of shape {w.shape} (as [..., N]) "
                "have leading axes that do not broadcast"
            ) from None
        self.n = n
        self.lead = tuple(lead)
        self.rows = int(math.prod(self.lead))
        self.m = self._flat(m)
        self.w = self._flat(w)
        self.soft = soft
        self.grid = tuple(grid) if grid is not None else gt_grid
        if self.grid is not None and self.grid[0] * self.grid[1] != n:
            raise ValueError(f"grid {self.grid} does not have N={n} cells")

    def _flat(self, a: np.ndarray) -> np.ndarray:
        if a.shape[:-1] == self.lead:
            return np.ascontiguousarray(a.reshape(self.rows, self.n))
        if math.prod(a.shape[:-1]) == 1:
            return np.ascontiguousarray(a.reshape(1, self.n))
        return np.ascontiguousarray(np.broadcast_to(a, self.lead + (self.n,)).reshape(self.rows, self.n))

    def block(self, a: np.ndarray, i: int, j: int) -> np.ndarray:
        if a.shape[0] == 1 and self.rows != 1:
            return np.broadcast_to(a, (j - i, self.n))
        return a[i:j]

    def resolve_grid(self) -> tuple[int, int]:
        if self.grid is not None:
            return self.grid
        r = math.isqrt(self.n)
        if r * r == self.n:
            return (r, r)
        raise ValueError(
            f"pointing-game tolerance needs the token grid: N={self.n} is not a square; pass grid=(R, C) "
            "or give the mask as [R, C]"
        )


def _canonical(names: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for name in names:
        canon = ALIASES.get(name, name)
        if canon not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown score {name!r}; known: {sorted(HIGHER_IS_BETTER) + sorted(ALIASES)}")
        out.append((name, canon))
    return out


def _top_k(q: float, n: int) -> int:
    if not 0 < q <= 1:
        raise ValueError(f"top_frac q must be in (0, 1], got {q}")
    return int(min(n, max(1, math.ceil(round(q * n, 9)))))


# --------------------------------------------------------------------------------------------------
# block computation (all scores for one [K, N] block)
# --------------------------------------------------------------------------------------------------
def _dilate(mask: np.ndarray, grid: tuple[int, int], d: int) -> np.ndarray:
    """Chebyshev dilation by ``d`` cells of a ``[K, N]`` bool mask on an ``R x C`` grid."""
    k = mask.shape[0]
    a = mask.reshape(k, grid[0], grid[1])
    out = a.copy()
    for s in range(1, min(d, grid[0] - 1) + 1):
        out[:, s:, :] |= a[:, :-s, :]
        out[:, :-s, :] |= a[:, s:, :]
    rows = out.copy()
    for s in range(1, min(d, grid[1] - 1) + 1):
        out[:, :, s:] |= rows[:, :, :-s]
        out[:, :, :-s] |= rows[:, :, s:]
    return out.reshape(k, -1)


def _otsu_threshold(vs: np.ndarray) -> np.ndarray:
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


class _Workspace:
    """Reusable ``[rows, N]`` buffers of one worker (avoids page faults of fresh allocations)."""

    def __init__(self, rows: int, n: int):
        self.rows, self.n = rows, n
        self._bufs: dict[tuple[str, Any], np.ndarray] = {}

    def get(self, name: str, k: int, dtype: Any = np.float64) -> np.ndarray:
        key = (name, np.dtype(dtype).str)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = np.empty((self.rows, self.n), dtype=dtype)
        return buf[:k]


def _validate_block(mc: np.ndarray) -> np.ndarray:
    """Per-row minimum; raises on negative finite values (rows with NaN are checked element-wise)."""
    mn = mc.min(axis=-1)
    suspicious = ~(mn >= 0)
    if suspicious.any():
        _check_non_negative(mc[suspicious])
    return mn


def _block_scores(
    mc: np.ndarray,
    wc: np.ndarray,
    soft: bool,
    need: set[str],
    opt: dict[str, Any],
    grid_fn,
    ws: _Workspace,
) -> dict[str, np.ndarray]:
    """All requested scores of one block: ``mc [K, N]`` float64, ``wc [K|1, N]`` bool or float64."""
    k, n = mc.shape
    mn = _validate_block(mc)
    s = mc.sum(axis=-1)
    ok = np.isfinite(s) & (s > 0)
    if soft:
        wf = np.broadcast_to(wc, (k, n))
        bset = np.greater(wf, 0, out=ws.get("bset", k, bool))
        b = wf.sum(axis=-1)
        nb = np.add.reduce(bset, axis=-1, dtype=np.int64)
    else:
        bset = np.broadcast_to(wc, (k, n))
        wf = None
        nb = np.add.reduce(bset, axis=-1, dtype=np.int64)
        b = nb.astype(np.float64)
    ok &= b > 0
    d = s + EPS
    inv_b = 1.0 / b
    out: dict[str, np.ndarray] = {}

    def wfloat() -> np.ndarray:
        nonlocal wf
        if wf is None:
            wf = ws.get("w", k)
            np.copyto(wf, bset)
        return wf

    if need & {"attention_ratio", "energy_pointing_game", "soft_dice_ratio"}:
        wm = np.einsum("ij,ij->i", mc, wfloat())
        if "attention_ratio" in need:
            out["attention_ratio"] = wm / ((s / n) * b + EPS)
        if "energy_pointing_game" in need:
            out["energy_pointing_game"] = wm / d
        if "soft_dice_ratio" in need:
            # Σp·g and Σ((p+g)/2)² expanded: ¼(Σp² + 2Σpg + Σg²), all terms non-negative
            sum_p2 = np.einsum("ij,ij->i", mc, mc) / (d * d)
            inter = wm / (d * b)
            sum_g2 = np.einsum("ij,ij->i", wf, wf) / (b * b) if soft else inv_b
            out["soft_dice_ratio"] = inter / (0.25 * (sum_p2 + 2.0 * inter + sum_g2))

    if need & {"kl_gt_attention", "js_divergence"}:
        p = np.divide(mc, d[:, None], out=ws.get("p", k))
        g = wfloat() * inv_b[:, None] if soft else None
        if "kl_gt_attention" in need:
            lp = np.maximum(p, CLIP, out=ws.get("f1", k))  # p ≤ 1 always, so only the lower clip acts
            np.log(lp, out=lp)
            if soft:
                gc = np.clip(g, CLIP, 1.0)
                out["kl_gt_attention"] = np.einsum("ij,ij->i", gc, np.log(gc) - lp)
            else:
                # g_c = 1/|B| on B, 1e-12 elsewhere: Σ g_c ln g_c and Σ g_c ln p_c in closed form
                cross = (inv_b - CLIP) * np.einsum("ij,ij->i", lp, wfloat()) + CLIP * lp.sum(axis=-1)
                ent = -np.log(b) + (n - b) * CLIP * math.log(CLIP)
                out["kl_gt_attention"] = ent - cross
        if "js_divergence" in need:
            if soft:
                lme = np.add(p, g, out=ws.get("f2", k))  # ln(M + 1e-8), M = (p + g)/2
                lme *= 0.5
                lme += EPS
                np.log(lme, out=lme)
                lpe = np.add(p, EPS, out=ws.get("f1", k))
                np.log(lpe, out=lpe)
                lpe -= lme
                t12 = np.einsum("ij,ij->i", p, lpe) + np.einsum("ij,ij->i", g, np.log(g + EPS) - lme)
            else:
                # Off the region M = p/2, so p·ln((p+e)/(M+e)) = p·[ln 2 + ln((p+e)/(p+2e))] for every
                # token; the region's tokens are then corrected on a gathered 1-D array.
                r = np.add(p, EPS, out=ws.get("f2", k))
                r /= np.add(p, 2 * EPS, out=ws.get("f1", k))
                np.log(r, out=r)
                t12 = math.log(2.0) * (s / d) + np.einsum("ij,ij->i", p, r)
                idx = np.flatnonzero(bset)
                row = idx // n
                pb = p.reshape(-1)[idx]
                gb = inv_b[row]
                corr = pb * np.log(0.5 * pb + EPS) - (pb + gb) * np.log(0.5 * (pb + gb) + EPS)
                t12 += np.bincount(row, weights=corr, minlength=k) + np.log(inv_b + EPS)
            # rounding can leave -4e-14 for identical maps: clamp to the documented range [0, ln 2] (NaN kept)
            out["js_divergence"] = np.clip(0.5 * t12, 0.0, math.log(2.0))

    if "pointing_game" in need:
        tol = opt["tolerance"]
        target = _dilate(np.ascontiguousarray(bset), grid_fn(), tol) if tol > 0 else bset
        if opt["ties"] == "first":
            hit = target[np.arange(k), np.argmax(mc, axis=-1)]
        else:
            top = np.equal(mc, mc.max(axis=-1)[:, None], out=ws.get("b1", k, bool))
            hit = np.logical_and(top, target, out=top).any(axis=-1)
        out["pointing_game"] = hit.astype(np.float64)

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
            thr = vs[:, n - _top_k(opt["q"], n)].copy()
        elif mode == "otsu":
            thr = _otsu_threshold(vs)
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

    for key, val in out.items():
        out[key] = np.where(ok, val, np.nan)
    return out


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def grounding_scores(
    m: Any,
    gt: Any,
    scores: Iterable[str] = ALL,
    *,
    tolerance: int = 0,
    grid: tuple[int, int] | None = None,
    ties: str = "first",
    threshold_mode: str = "oracle_size",
    q: float = 0.1,
    theta: float = 0.5,
    n_threads: int | None = 1,
) -> dict[str, Any]:
    """Several grounding scores at once, sharing the work (one sum, one sort, ...).

    ``m [..., N]``, ``gt`` as in the module docstring. ``scores``: names from :data:`ALL` or
    :data:`ALIASES`. Keyword options are those of :func:`pointing_game` (``tolerance``, ``grid``,
    ``ties``) and :func:`thresholded_iou` (``threshold_mode``, ``q``, ``theta``). ``n_threads``:
    worker threads over blocks of rows (``None`` = all CPUs; results do not depend on it).
    Returns ``{name: float64 array [...]}`` (numpy scalars for a single map); NaN per the NaN policy.
    """
    if isinstance(scores, str):
        scores = (scores,)
    names = _canonical(scores)
    if ties not in ("first", "any"):
        raise ValueError(f"ties must be 'first' or 'any', got {ties!r}")
    if threshold_mode not in _THRESHOLD_MODES:
        raise ValueError(f"threshold mode must be one of {_THRESHOLD_MODES}, got {threshold_mode!r}")
    if int(tolerance) != tolerance or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative integer number of tokens, got {tolerance}")
    if threshold_mode == "top_frac":
        _top_k(q, 1)
    prep = _Prepared(m, gt, grid)
    need = {canon for _, canon in names}
    opt = {"tolerance": int(tolerance), "ties": ties, "threshold_mode": threshold_mode, "q": q, "theta": theta}
    if "pointing_game" in need and opt["tolerance"] > 0:
        prep.resolve_grid()
    results = {canon: np.empty(prep.rows, dtype=np.float64) for canon in need}
    step = max(1, _CHUNK_ELEMENTS // prep.n)
    starts = range(0, prep.rows, step)
    n_threads = max(1, min(int(n_threads or os.cpu_count() or 1), len(starts)))
    local = threading.local()

    def run(i: int) -> None:
        ws = getattr(local, "ws", None)
        if ws is None:
            ws = local.ws = _Workspace(min(step, prep.rows), prep.n)
        j = min(prep.rows, i + step)
        mc = prep.block(prep.m, i, j)
        if mc.dtype != np.float64:
            mc = np.copyto(ws.get("m64", j - i), mc) or ws.get("m64", j - i)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            block = _block_scores(mc, prep.block(prep.w, i, j), prep.soft, need, opt, prep.resolve_grid, ws)
        for canon, val in block.items():
            results[canon][i:j] = val

    if n_threads == 1:
        for i in starts:
            run(i)
    else:  # numpy releases the GIL in the heavy kernels (ufuncs, sort, einsum)
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(run, starts))
    return {name: results[canon].reshape(prep.lead)[()] for name, canon in names}


def attention_ratio(m: Any, gt: Any) -> Any:
    """AR = mean of ``m`` inside the region ÷ mean over all tokens (``Σ_B m / ((Σm/N)·|B| + 1e-8)``).

    ``[..., N] -> [...]``; unit-free, chance 1, perfect ``1/f``."""
    return grounding_scores(m, gt, ("attention_ratio",))["attention_ratio"]


def kl_gt_attention(m: Any, gt: Any) -> Any:
    """``KL(g ‖ p)`` in nats, ``p = m/(Σm+1e-8)``, ``g`` uniform on the region, both clipped to
    ``[1e-12, 1]``. ``[..., N] -> [...]``; lower is better, 0 iff ``p`` uniform on the region."""
    return grounding_scores(m, gt, ("kl_gt_attention",))["kl_gt_attention"]


def js_divergence(m: Any, gt: Any) -> Any:
    """Jensen-Shannon divergence of ``p`` and ``g`` in nats with the reference ``+1e-8`` smoothing.

    ``[..., N] -> [...]``; range ``[0, ln 2]``, lower is better."""
    return grounding_scores(m, gt, ("js_divergence",))["js_divergence"]


def soft_dice_ratio(m: Any, gt: Any) -> Any:
    """VGMED "IoU": ``Σ p·g / Σ ((p+g)/2)²`` (= ``2D/(1+D)`` of the soft Dice ``D``; not an IoU).

    ``[..., N] -> [...]``; range ``[0, 1]``, 1 iff ``p = g``."""
    return grounding_scores(m, gt, ("soft_dice_ratio",))["soft_dice_ratio"]


vgmed_iou = soft_dice_ratio


def energy_pointing_game(m: Any, gt: Any) -> Any:
    """EPG = attention mass inside the region, ``Σ_B p`` (soft GT: ``Σ w·p``). ``[..., N] -> [...]``, in [0, 1]."""
    return grounding_scores(m, gt, ("energy_pointing_game",))["energy_pointing_game"]


relevance_mass_ratio = energy_pointing_game


def pointing_game(
    m: Any, gt: Any, tolerance: int = 0, grid: tuple[int, int] | None = None, ties: str = "first"
) -> Any:
    """Hit (1.0) if the argmax token lies in the region, else 0.0. ``[..., N] -> [...]``.

    ``tolerance``: a hit also when the argmax cell is within Chebyshev distance ``tolerance`` (tokens)
    of a region cell; needs the grid (``grid=(R, C)``, a ``[R, C]`` mask, or a square ``N``).
    ``ties="first"``: the first maximum in row-major order decides; ``"any"``: hit if any maximal
    token is (near) the region."""
    return grounding_scores(m, gt, ("pointing_game",), tolerance=tolerance, grid=grid, ties=ties)["pointing_game"]


def thresholded_iou(
    m: Any,
    gt: Any,
    mode: str = "oracle_size",
    q: float = 0.1,
    theta: float = 0.5,
    metric: str = "iou",
) -> Any:
    """IoU (or Dice with ``metric="dice"``) of the binarised map ``S = {i : m_i ≥ θ}`` with the region.

    ``mode``: ``"top_frac"`` θ = the ``⌈qN⌉``-th largest value; ``"oracle_size"`` θ = the ``|B|``-th
    largest value; ``"mean"`` θ = mean of ``m``; ``"otsu"`` exact Otsu threshold over the sorted
    values (every gap between distinct values is a candidate, no histogram binning); ``"fixed"``
    ``S = {i : (m_i − min)/(max − min) ≥ theta}`` (a constant map selects every token). Ties at θ
    are all kept, so ``|S|`` can exceed ``k``. ``[..., N] -> [...]``, in [0, 1]."""
    if metric not in ("iou", "dice"):
        raise ValueError(f"metric must be 'iou' or 'dice', got {metric!r}")
    name = "thresholded_iou" if metric == "iou" else "thresholded_dice"
    return grounding_scores(m, gt, (name,), threshold_mode=mode, q=q, theta=theta)[name]


def auroc(m: Any, gt: Any) -> Any:
    """ROC-AUC of the scores ``m`` against labels ``1[i ∈ B]`` (Mann-Whitney U, average ranks for
    ties). ``[..., N] -> [...]``; chance 0.5; NaN if the region is empty or covers every token."""
    return grounding_scores(m, gt, ("auroc",))["auroc"]


def region_fraction(m: Any, gt: Any) -> Any:
    """``f = Σw / N`` (``|B|/N`` for a binary region) broadcast like the scores: ``[..., N] -> [...]``."""
    prep = _Prepared(m, gt)
    w = prep.w if prep.soft else prep.w.astype(np.float64)
    f = np.broadcast_to(w.sum(axis=-1) / prep.n, (prep.rows,))
    return np.array(f).reshape(prep.lead)[()]


def relative_attention(question_attn: Any, generic_attn: Any, eps: float = 1e-10) -> np.ndarray:
    """Relative attention ``â = a(question) / (a(generic) + eps)`` (docs/method.md), element-wise, float64.

    Shapes broadcast (e.g. per-head ``[L, H, N]`` ÷ layer-mean ``[L, 1, N]``). ``eps=0`` reproduces the
    calibration scripts; a zero generic value then gives inf/NaN, which the scores report as NaN."""
    q = _map_to_numpy(question_attn, "question attention").astype(np.float64, copy=False)
    g = _map_to_numpy(generic_attn, "generic attention").astype(np.float64, copy=False)
    _check_non_negative(q, "question attention")
    _check_non_negative(g, "generic attention")
    try:
        np.broadcast_shapes(q.shape, g.shape)
    except ValueError:
        raise ValueError(f"question attention {q.shape} and generic attention {g.shape} do not broadcast") from None
    with np.errstate(divide="ignore", invalid="ignore"):
        return q / (g + eps)


def chance_levels(
    f: Any,
    *,
    threshold_mode: str = "oracle_size",
    q: float = 0.1,
    tolerance: int = 0,
) -> dict[str, Any]:
    """Chance level of every score for region fraction(s) ``f = |B|/N`` (array or scalar).

    Uniform attention for AR (1), KL (``ln 1/f``), JS, soft-Dice ratio (``4f/(1+3f)``) and EPG (``f``);
    a uniformly random argmax for the pointing game (``f``, NaN when ``tolerance > 0``); a random
    selection of the same size for thresholded IoU/Dice (``oracle_size``: ``f/(2−f)`` and ``f``;
    ``top_frac``: ``qf/(q+f−qf)`` and ``2qf/(q+f)``; NaN for data-dependent thresholds); 0.5 for AUROC.
    NaN where ``f`` is 0 (and for AUROC where ``f`` is 1). Exact for binary regions.
    """
    f = np.asarray(f, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        valid = (f > 0) & (f <= 1)
        fv = np.where(valid, f, np.nan)
        nan = np.full_like(fv, np.nan)
        if threshold_mode == "oracle_size":
            t_iou, t_dice = fv / (2 - fv), fv
        elif threshold_mode == "top_frac":
            t_iou, t_dice = q * fv / (q + fv - q * fv), 2 * q * fv / (q + fv)
        else:
            t_iou, t_dice = nan, nan
        out = {
            "attention_ratio": np.where(valid, 1.0, np.nan),
            "kl_gt_attention": np.log(1.0 / fv),
            "js_divergence": 0.5
            * (fv * np.log(2 * fv / (1 + fv)) + (1 - fv) * math.log(2) + np.log(2 / (1 + fv))),
            "soft_dice_ratio": 4 * fv / (1 + 3 * fv),
            "energy_pointing_game": fv,
            "pointing_game": fv if tolerance == 0 else nan,
            "thresholded_iou": t_iou,
            "thresholded_dice": t_dice,
            "auroc": np.where(valid & (f < 1), 0.5, np.nan),
        }
    for alias, canon in ALIASES.items():
        out[alias] = out[canon]
    return {k: np.asarray(v)[()] for k, v in out.items()}


def aggregate(
    per_sample: Mapping[str, Any],
    f: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    **chance_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Summarise per-sample scores (docs/method.md § Grounding scores, aggregation).

    ``per_sample``: ``{name: array [S, ...]}`` with samples on axis 0 (trailing axes such as layers or
    heads are kept). ``f``: per-sample region fractions ``[S]`` (for the chance level), optional.
    Returns ``{name: {"mean", "median", "ci_low", "ci_high", "n", "n_nan", "chance"}}`` where the
    statistics have the trailing shape (floats for 1-D input), NaNs are excluded, the CI is the
    percentile bootstrap of the mean (``n_boot`` resamples of the samples, seeded), and ``chance`` is
    the mean over samples of :func:`chance_levels` (NaN without ``f``). With ``f`` given, each entry
    also has ``n_skipped_empty_gt`` (samples with ``f == 0``).
    """
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    chance = None
    if f is not None:
        f = np.asarray(f, dtype=np.float64).reshape(-1)
        chance = chance_levels(f, **chance_kwargs)
    rng = np.random.default_rng(seed)
    result: dict[str, dict[str, Any]] = {}
    for name, values in per_sample.items():
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 0:
            v = v.reshape(1)
        s = v.shape[0]
        tail = v.shape[1:]
        flat = v.reshape(s, -1)
        valid = np.isfinite(flat)
        n_valid = valid.sum(axis=0)
        v0 = np.where(valid, flat, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = v0.sum(axis=0) / n_valid
            median = np.array(
                [np.median(flat[valid[:, c], c]) if n_valid[c] else np.nan for c in range(flat.shape[1])]
            )
            lo = np.full(flat.shape[1], np.nan)
            hi = np.full(flat.shape[1], np.nan)
            if n_boot > 0 and s > 0:
                boot = _bootstrap_means(v0, valid.astype(np.float64), n_boot, rng)
                alpha = (1 - confidence) / 2
                ok = np.isfinite(boot).any(axis=0)
                if ok.any():
                    lo[ok], hi[ok] = np.nanquantile(boot[:, ok], [alpha, 1 - alpha], axis=0)
        entry: dict[str, Any] = {
            "mean": _shaped(mean, tail),
            "median": _shaped(median, tail),
            "ci_low": _shaped(lo, tail),
            "ci_high": _shaped(hi, tail),
            "n": _shaped(n_valid, tail, int),
            "n_nan": _shaped(s - n_valid, tail, int),
        }
        canon = ALIASES.get(name, name)
        if chance is not None and canon in chance:
            if f.shape[0] != s:
                raise ValueError(f"f has {f.shape[0]} samples but {name!r} has {s}")
            c = np.asarray(chance[canon], dtype=np.float64).reshape(-1)
            entry["chance"] = float(np.nanmean(c)) if np.isfinite(c).any() else math.nan
            entry["n_skipped_empty_gt"] = int(np.count_nonzero(f == 0))
        else:
            entry["chance"] = math.nan
        result[name] = entry
    return result


def _bootstrap_means(v0: np.ndarray, valid: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, K]`` means of resampled rows via resample counts (NaN-free sums / valid counts)."""
    s = v0.shape[0]
    step = max(1, min(n_boot, (1 << 22) // max(s, 1)))
    outs = []
    done = 0
    while done < n_boot:
        c = min(step, n_boot - done)
        idx = rng.integers(0, s, size=(c, s))
        idx += (np.arange(c) * s)[:, None]
        counts = np.bincount(idx.ravel(), minlength=c * s).reshape(c, s).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            outs.append((counts @ v0) / (counts @ valid))
        done += c
    return np.concatenate(outs, axis=0)


def _shaped(a: np.ndarray, tail: tuple[int, ...], kind=float) -> Any:
    if tail == ():
        return kind(a.reshape(-1)[0])
    return a.reshape(tail).astype(np.int64 if kind is int else np.float64)


# --------------------------------------------------------------------------------------------------
# variable-size maps (used by the evaluate module)
# --------------------------------------------------------------------------------------------------
def as_float32_grid(x: Any, what: str = "map") -> Any:
    """One map or mask (numpy, torch, nested list; any numeric or bool dtype) -> 2-D float32 ndarray.

    Anything but a 2-D grid ``[rows, cols]`` raises a ``ValueError`` that names the offending input."""
    if x is None:
        return None
    if _is_torch(x):
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
    _canonical(names)
    n = len(predictions)
    per = {name: np.full(n, np.nan) for name in names}
    groups: dict[tuple[int, ...], list[int]] = {}
    maps, masks = [], []
    for i, (p, r) in enumerate(zip(predictions, references)):
        a = _map_to_numpy(p, f"prediction {i}")
        b = np.asarray(r.detach().cpu().numpy() if _is_torch(r) else r)
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
