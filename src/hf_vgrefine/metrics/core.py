"""The grounding scores of one or many attention maps against a region, computed together in blocks of rows.

:func:`grounding_scores` shares the work between scores (one sum, one sort, ...); the one-score functions
(:func:`attention_ratio`, :func:`kl_gt_attention`, ...) call it. Distribution scores (AR, KL, JS, soft-Dice
ratio, energy pointing game) and the pointing game are computed here; AUROC and the thresholded scores in
:mod:`.thresholded`. Shapes, input forms and the NaN policy: :mod:`hf_vgrefine.metrics`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .inputs import PreparedInputs, check_non_negative, map_to_numpy
from .names import ALL, CLIP, EPS, THRESHOLD_MODES, canonical, top_k
from .thresholded import ranked_scores

__all__ = ["attention_ratio", "auroc", "energy_pointing_game", "grounding_scores", "js_divergence",
           "kl_gt_attention", "pointing_game", "region_fraction", "relative_attention", "relevance_mass_ratio",
           "soft_dice_ratio", "thresholded_iou", "vgmed_iou"]

CHUNK_ELEMENTS = 1 << 17  # elements per processing block (1 MiB of float64): keeps work in cache


def dilate(mask: np.ndarray, grid: tuple[int, int], d: int) -> np.ndarray:
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


class Workspace:
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
        check_non_negative(mc[suspicious])
    return mn


def _block_scores(
    mc: np.ndarray,
    wc: np.ndarray,
    soft: bool,
    need: set[str],
    opt: dict[str, Any],
    grid_fn,
    ws: Workspace,
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
        target = dilate(np.ascontiguousarray(bset), grid_fn(), tol) if tol > 0 else bset
        if opt["ties"] == "first":
            hit = target[np.arange(k), np.argmax(mc, axis=-1)]
        else:
            top = np.equal(mc, mc.max(axis=-1)[:, None], out=ws.get("b1", k, bool))
            hit = np.logical_and(top, target, out=top).any(axis=-1)
        out["pointing_game"] = hit.astype(np.float64)

    out.update(ranked_scores(mc, bset, nb, s, mn, need, opt, ws))

    for key, val in out.items():
        out[key] = np.where(ok, val, np.nan)
    return out


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
    names = canonical(scores)
    if ties not in ("first", "any"):
        raise ValueError(f"ties must be 'first' or 'any', got {ties!r}")
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
    if int(tolerance) != tolerance or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative integer number of tokens, got {tolerance}")
    if threshold_mode == "top_frac":
        top_k(q, 1)
    prep = PreparedInputs(m, gt, grid)
    need = {canon for _, canon in names}
    opt = {"tolerance": int(tolerance), "ties": ties, "threshold_mode": threshold_mode, "q": q, "theta": theta}
    if "pointing_game" in need and opt["tolerance"] > 0:
        prep.resolve_grid()
    results = {canon: np.empty(prep.rows, dtype=np.float64) for canon in need}
    step = max(1, CHUNK_ELEMENTS // prep.n)
    starts = range(0, prep.rows, step)
    n_threads = max(1, min(int(n_threads or os.cpu_count() or 1), len(starts)))
    local = threading.local()

    def run(i: int) -> None:
        ws = getattr(local, "ws", None)
        if ws is None:
            ws = local.ws = Workspace(min(step, prep.rows), prep.n)
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
    prep = PreparedInputs(m, gt)
    w = prep.w if prep.soft else prep.w.astype(np.float64)
    f = np.broadcast_to(w.sum(axis=-1) / prep.n, (prep.rows,))
    return np.array(f).reshape(prep.lead)[()]


def relative_attention(question_attn: Any, generic_attn: Any, eps: float = 1e-10) -> np.ndarray:
    """Relative attention ``â = a(question) / (a(generic) + eps)`` (docs/method.md), element-wise, float64.

    Shapes broadcast (e.g. per-head ``[L, H, N]`` ÷ layer-mean ``[L, 1, N]``). ``eps=0`` reproduces the
    calibration scripts; a zero generic value then gives inf/NaN, which the scores report as NaN."""
    q = map_to_numpy(question_attn, "question attention").astype(np.float64, copy=False)
    g = map_to_numpy(generic_attn, "generic attention").astype(np.float64, copy=False)
    check_non_negative(q, "question attention")
    check_non_negative(g, "generic attention")
    try:
        np.broadcast_shapes(q.shape, g.shape)
    except ValueError:
        raise ValueError(f"question attention {q.shape} and generic attention {g.shape} do not broadcast") from None
    with np.errstate(divide="ignore", invalid="ignore"):
        return q / (g + eps)
