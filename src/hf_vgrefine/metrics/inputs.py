"""Input handling of the grounding scores: attention maps and ground-truth regions (masks, coverages, index
lists; numpy, torch or lists) to float64 / bool arrays, validated, flattened to ``[rows, N]``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["PreparedInputs", "check_non_negative", "gt_to_numpy", "indices_to_mask", "is_torch", "map_to_numpy"]


def is_torch(x: Any) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def map_to_numpy(m: Any, what: str = "attention map") -> np.ndarray:
    """Array view of a map; float32/float64 are kept as they are (converted to float64 block-wise)."""
    if is_torch(m):
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


def check_non_negative(m: np.ndarray, what: str = "attention map") -> None:
    """``ValueError`` when ``m`` has a negative finite value."""
    neg = m < 0
    if neg.any() and (neg & np.isfinite(m)).any():
        raise ValueError(
            f"{what} has negative values (min {np.nanmin(np.where(np.isfinite(m), m, np.nan)):.3g}); "
            "attention maps must be non-negative"
        )


def gt_to_numpy(gt: Any, n: int) -> tuple[np.ndarray, bool, tuple[int, int] | None]:
    """Return ``(w, soft, grid)``: ``w`` is bool (binary) or float64 (soft) with last axis ``n``."""
    if is_torch(gt):
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
        return indices_to_mask(arr, n), False, None
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


def indices_to_mask(idx: np.ndarray, n: int) -> np.ndarray:
    """Bool ``[n]`` mask of flat token indices (out-of-range or duplicate indices raise)."""
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


class PreparedInputs:
    """Map(s) and mask(s) flattened to ``[rows, N]`` (or ``[1, N]`` when broadcast).

    ``m``: float32/float64 ``[rows|1, N]``; ``w``: bool (binary) or float64 (soft) ``[rows|1, N]``; ``lead``:
    the broadcast leading shape of the outputs; ``grid``: ``(R, C)`` when known."""

    def __init__(self, m: Any, gt: Any, grid: tuple[int, int] | None = None):
        m = map_to_numpy(m)
        n = m.shape[-1]
        w, soft, gt_grid = gt_to_numpy(gt, n)
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
