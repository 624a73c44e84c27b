"""Box / mask -> image-token geometry (docs/data_formats.md).

Conventions (used everywhere in the package)
--------------------------------------------
* **Original image pixels.** ``x`` grows to the right, ``y`` grows down, the pixel with integer
  indices ``(x, y)`` covers the square ``[x, x+1) × [y, y+1)``. Image sizes are ``(W0, H0)``
  (PIL order), mask arrays are ``[H0, W0]`` (numpy order).
* **Boxes** are float ``[x, y, w, h]`` in original pixels with *exclusive* right/bottom edges
  (``box_format="xywh"``, the default), or ``[x0, y0, x1, y1]`` with exclusive ``x1, y1``
  (``box_format="xyxy"``). Inclusive max coordinates (``x_max`` = last mask pixel) must be
  converted by the caller (``x1 = x_max + 1``).
* **Canvas.** Every processor family is an affine map from original pixels to the pixels that the
  token grid covers: ``canvas_x = x·sx + ox``, ``canvas_y = y·sy + oy``. Pad-to-square, resize,
  centre crop, centre paste and LLaVA-NeXT unpadding are all folded into ``scale``/``offset``;
  ``canvas_size = (Wc, Hc)`` is the region covered by the token grid (after crop/unpad). Canvas
  points outside ``[0, Wc) × [0, Hc)`` are not seen by any token.
* **Tokens.** Token coordinates are ``(row, col)``; the grid has ``rows × cols`` cells of
  ``cell_size = (Wc/cols, Hc/rows)`` canvas pixels; the flat index is row-major
  ``k = row·cols + col``. Token masks are flat arrays of length ``rows·cols``.
  (The reference code stores ``(x, y) = (col, row)`` pairs; convert with :func:`rowcol_to_flat`.)

Token rules
-----------
* ``mode="any"``: the released cover rule (docs/data_formats.md § Box cover rule): a cell belongs to a box if the box
  touches it, even partially: ``c_lo = max(floor(x0/tw), 0)``, ``c_hi = min(ceil(x1/tw), C)``
  (exclusive), same for rows; union over boxes. Divisions are evaluated with a ``1e-9`` cell
  tolerance so that a box edge that lies on a cell border up to float rounding does not pull in
  the neighbouring cell.
* ``mode="fraction"``: exact fraction (float32 in ``[0, 1]``) of each cell's area covered by the
  union of the boxes (or by the union of the mask pixels' squares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "TokenGrid",
    "boxes_to_token_mask",
    "mask_to_token_mask",
    "token_mask_to_grid",
    "grid_to_token_mask",
    "rowcol_to_flat",
    "flat_to_rowcol",
    "token_mask_to_indices",
    "indices_to_token_mask",
]

_EPS = 1e-9  # tolerance in units of one token cell
_MODES = ("any", "fraction")
_ON_EMPTY = ("raise", "empty")


def _pair(value: Any, name: str, cast=float) -> tuple:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers, got {value!r}") from None
    return (cast(a), cast(b))


@dataclass(frozen=True)
class TokenGrid:
    """Affine map original pixels -> canvas pixels plus the ``rows × cols`` token grid on it.

    Attributes:
        rows, cols: token grid shape (R, C).
        image_size: ``(W0, H0)`` original image size in pixels.
        scale: ``(sx, sy)``; ``canvas_x = x·sx + ox``, ``canvas_y = y·sy + oy``.
        offset: ``(ox, oy)`` in canvas pixels.
        canvas_size: ``(Wc, Hc)`` canvas pixels covered by the token grid.
        approximate: ``True`` when the map is not derived from the processor's exact transform (the generic
            adapter's stretch grid for a plain square resize); exact family grids are ``False``.
    """

    rows: int
    cols: int
    image_size: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]
    canvas_size: tuple[float, float]
    approximate: bool = False

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
                raise ValueError(f"TokenGrid.{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        w0, h0 = _pair(self.image_size, "TokenGrid.image_size", float)
        if not (w0 > 0 and h0 > 0) or w0 != int(w0) or h0 != int(h0):
            raise ValueError(f"TokenGrid.image_size must be positive integers (W0, H0), got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(w0), int(h0)))
        sx, sy = _pair(self.scale, "TokenGrid.scale")
        if not (math.isfinite(sx) and math.isfinite(sy) and sx > 0 and sy > 0):
            raise ValueError(f"TokenGrid.scale must be finite and positive, got {self.scale!r}")
        object.__setattr__(self, "scale", (sx, sy))
        ox, oy = _pair(self.offset, "TokenGrid.offset")
        if not (math.isfinite(ox) and math.isfinite(oy)):
            raise ValueError(f"TokenGrid.offset must be finite, got {self.offset!r}")
        object.__setattr__(self, "offset", (ox, oy))
        wc, hc = _pair(self.canvas_size, "TokenGrid.canvas_size")
        if not (math.isfinite(wc) and math.isfinite(hc) and wc > 0 and hc > 0):
            raise ValueError(f"TokenGrid.canvas_size must be finite and positive, got {self.canvas_size!r}")
        object.__setattr__(self, "canvas_size", (wc, hc))
        object.__setattr__(self, "approximate", bool(self.approximate))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def stretch(cls, image_size: Sequence[int], rows: int, cols: int, approximate: bool = False) -> "TokenGrid":
        """Grid for an image stretched onto ``rows × cols`` tokens (canvas = the image itself)."""
        w0, h0 = _pair(image_size, "image_size", float)
        return cls(rows, cols, (int(w0), int(h0)), (1.0, 1.0), (0.0, 0.0), (w0, h0), approximate)

    # ------------------------------------------------------------------ properties
    @property
    def n_tokens(self) -> int:
        """Number of tokens ``rows·cols``."""
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return (self.rows, self.cols)

    @property
    def cell_size(self) -> tuple[float, float]:
        """``(tw, th)`` = canvas pixels per token cell along x and y."""
        return (self.canvas_size[0] / self.cols, self.canvas_size[1] / self.rows)

    # ------------------------------------------------------------------ point maps
    def to_canvas(self, xy: Any) -> np.ndarray:
        """Map original-pixel points ``[..., 2]`` (x, y) to canvas pixels ``[..., 2]`` (float64)."""
        p = np.asarray(xy, dtype=np.float64)
        if p.shape[-1:] != (2,):
            raise ValueError(f"to_canvas expects points of shape [..., 2] (x, y), got shape {p.shape}")
        return p * np.asarray(self.scale) + np.asarray(self.offset)

    def to_image(self, xy: Any) -> np.ndarray:
        """Inverse of :meth:`to_canvas`: canvas points ``[..., 2]`` -> original pixels ``[..., 2]``."""
        p = np.asarray(xy, dtype=np.float64)
        if p.shape[-1:] != (2,):
            raise ValueError(f"to_image expects points of shape [..., 2] (x, y), got shape {p.shape}")
        return (p - np.asarray(self.offset)) / np.asarray(self.scale)

    def cell_of(self, x: float, y: float) -> tuple[int, int]:
        """``(row, col)`` of the token cell containing the original-pixel point ``(x, y)``.

        Raises ValueError when the point falls outside the canvas (padding excluded, cropped away).
        """
        cx, cy = self.to_canvas([float(x), float(y)])
        tw, th = self.cell_size
        if not (0.0 <= cx < self.canvas_size[0] and 0.0 <= cy < self.canvas_size[1]):
            raise ValueError(
                f"point (x={x}, y={y}) maps to canvas ({cx:.3f}, {cy:.3f}), outside the token canvas "
                f"{self.canvas_size}: it is cropped away by the processor"
            )
        return (min(int(math.floor(cy / th)), self.rows - 1), min(int(math.floor(cx / tw)), self.cols - 1))

    def cell_center(self, row: int, col: int) -> tuple[float, float]:
        """Original-pixel ``(x, y)`` of the centre of token cell ``(row, col)``."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise ValueError(f"cell ({row}, {col}) outside the {self.rows}x{self.cols} grid")
        tw, th = self.cell_size
        x, y = self.to_image([(col + 0.5) * tw, (row + 0.5) * th])
        return (float(x), float(y))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists instead of tuples); ``approximate`` only when True."""
        d = {
            "rows": self.rows,
            "cols": self.cols,
            "image_size": list(self.image_size),
            "scale": list(self.scale),
            "offset": list(self.offset),
            "canvas_size": list(self.canvas_size),
        }
        if self.approximate:
            d["approximate"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenGrid":
        """Inverse of :meth:`to_dict`."""
        keys = ("rows", "cols", "image_size", "scale", "offset", "canvas_size")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"TokenGrid.from_dict: missing keys {missing}")
        return cls(**{k: (d[k] if k in ("rows", "cols") else tuple(d[k])) for k in keys},
                   approximate=bool(d.get("approximate", False)))


# ---------------------------------------------------------------------- validation helpers
def _check_grid(grid: Any) -> TokenGrid:
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a TokenGrid, got {type(grid).__name__}")
    return grid


def _check_choice(value: str, choices: tuple, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _as_boxes(boxes: Any, box_format: str) -> np.ndarray:
    """-> float64 [N, 4] as exclusive xyxy in original pixels (validated)."""
    _check_choice(box_format, ("xywh", "xyxy"), "box_format")
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"boxes must be numeric [4] or [N, 4], got {boxes!r}: {e}") from None
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None, :]
    elif b.ndim == 1 and b.shape[0] == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(
            f"boxes must have shape [4] or [N, 4] ({box_format}), got shape {tuple(np.shape(boxes))}; "
            "pass one box as [x, y, w, h] or several as [[x, y, w, h], ...]"
        )
    if not np.all(np.isfinite(b)):
        bad = np.where(~np.isfinite(b).all(axis=1))[0].tolist()
        raise ValueError(f"boxes contain NaN/inf values (box indices {bad}); drop or fix them before mapping")
    if box_format == "xywh":
        b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    deg = np.where((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))[0]
    if deg.size:
        i = int(deg[0])
        raise ValueError(
            f"degenerate box {i}: {np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[i].tolist()} ({box_format}) has "
            "non-positive width or height; boxes need w > 0 and h > 0 (xyxy edges are exclusive: for inclusive "
            "max coordinates use x1 = x_max + 1); also check box_format"
        )
    return b


def _finish(result: np.ndarray, grid: TokenGrid, on_empty: str, what: str) -> np.ndarray:
    if not np.any(result):
        if on_empty == "raise":
            raise ValueError(
                f"{what} covers no image token: it lies in a part of the image that the processor crops away "
                f"(token canvas {grid.canvas_size}, image->canvas scale {grid.scale}, offset {grid.offset}). "
                "Use a processor setting without centre crop (e.g. pad-to-square) or pass on_empty='empty' to "
                "get an all-False/zero token mask"
            )
    return result


# ---------------------------------------------------------------------- boxes
def boxes_to_token_mask(
    boxes: Any,
    grid: TokenGrid,
    box_format: str = "xywh",
    mode: str = "any",
    min_cells_per_box: int = 1,
    on_empty: str = "raise",
) -> np.ndarray:
    """Token mask of the union of boxes.

    Args:
        boxes: ``[4]`` or ``[N, 4]`` boxes in original pixels (``box_format`` "xywh" or exclusive
            "xyxy"). Parts outside the image are clipped away.
        grid: the image's :class:`TokenGrid`.
        mode: ``"any"`` -> bool ``[rows·cols]`` (released cover rule, docs/data_formats.md § Box cover rule);
            ``"fraction"`` -> float32 ``[rows·cols]``, covered fraction of each cell in ``[0, 1]``.
        min_cells_per_box: ``1`` (default) guarantees at least one cell for every box that
            intersects the token canvas, even if float rounding makes its cell range empty;
            ``0`` is the faithful rule (empty range kept). Ignored for ``"fraction"``.
        on_empty: ``"raise"`` (default) raises when the union covers no token (the boxes lie
            only in a part of the image that the processor crops away, or ``N = 0``);
            ``"empty"`` returns an all-False (all-zero) mask instead.

    Raises:
        ValueError: wrong shape, NaN/inf, degenerate box (w <= 0 or h <= 0), box entirely outside
            the original image, empty result with ``on_empty="raise"``.
    """
    _check_grid(grid)
    _check_choice(mode, _MODES, "mode")
    _check_choice(on_empty, _ON_EMPTY, "on_empty")
    if min_cells_per_box not in (0, 1):
        raise ValueError(f"min_cells_per_box must be 0 (faithful) or 1 (default), got {min_cells_per_box!r}")
    b = _as_boxes(boxes, box_format)
    if b.shape[0] == 0:
        if on_empty == "raise":
            raise ValueError("no boxes given (shape [0, 4]); pass on_empty='empty' to get an empty token mask")
        return np.zeros(grid.n_tokens, dtype=bool if mode == "any" else np.float32)
    w0, h0 = grid.image_size
    outside = np.where((b[:, 2] <= 0) | (b[:, 0] >= w0) | (b[:, 3] <= 0) | (b[:, 1] >= h0))[0]
    if outside.size:
        i = int(outside[0])
        raise ValueError(
            f"box {i} (xyxy {b[i].tolist()}) lies entirely outside the {w0}x{h0} (W0 x H0) image; check the box "
            "format (xywh vs xyxy), the coordinate units (pixels, not normalised) and the image size"
        )
    # clip to the original image, then map to the canvas and clip to the token canvas
    b = np.stack([np.clip(b[:, 0], 0, w0), np.clip(b[:, 1], 0, h0), np.clip(b[:, 2], 0, w0), np.clip(b[:, 3], 0, h0)], 1)
    sx, sy = grid.scale
    ox, oy = grid.offset
    wc, hc = grid.canvas_size
    cb = np.stack([b[:, 0] * sx + ox, b[:, 1] * sy + oy, b[:, 2] * sx + ox, b[:, 3] * sy + oy], axis=1)
    cb = np.stack([np.clip(cb[:, 0], 0, wc), np.clip(cb[:, 1], 0, hc), np.clip(cb[:, 2], 0, wc), np.clip(cb[:, 3], 0, hc)], 1)
    visible = (cb[:, 2] > cb[:, 0]) & (cb[:, 3] > cb[:, 1])
    R, C = grid.rows, grid.cols
    tw, th = grid.cell_size

    if mode == "any":
        out = np.zeros((R, C), dtype=bool)
        for (x0, y0, x1, y1), vis in zip(cb, visible):
            if not vis:
                continue
            c_lo = max(int(math.floor(x0 / tw + _EPS)), 0)
            c_hi = min(int(math.ceil(x1 / tw - _EPS)), C)
            r_lo = max(int(math.floor(y0 / th + _EPS)), 0)
            r_hi = min(int(math.ceil(y1 / th - _EPS)), R)
            if min_cells_per_box:
                c_lo, r_lo = min(c_lo, C - 1), min(r_lo, R - 1)
                c_hi, r_hi = max(c_hi, c_lo + 1), max(r_hi, r_lo + 1)
            out[r_lo:r_hi, c_lo:c_hi] = True
        return _finish(out.reshape(-1), grid, on_empty, f"the box union ({len(b)} box(es))")

    # fraction: exact union area per cell on the elementary grid spanned by box and cell edges
    cbv = cb[visible]
    xs = np.unique(np.concatenate([np.arange(C + 1) * tw, cbv[:, 0], cbv[:, 2]]))
    ys = np.unique(np.concatenate([np.arange(R + 1) * th, cbv[:, 1], cbv[:, 3]]))
    covered = np.zeros((len(ys) - 1, len(xs) - 1), dtype=bool)
    for x0, y0, x1, y1 in cbv:
        i0, i1 = np.searchsorted(xs, [x0, x1])
        j0, j1 = np.searchsorted(ys, [y0, y1])
        covered[j0:j1, i0:i1] = True
    cx = np.clip(np.floor(0.5 * (xs[:-1] + xs[1:]) / tw).astype(np.int64), 0, C - 1)
    cy = np.clip(np.floor(0.5 * (ys[:-1] + ys[1:]) / th).astype(np.int64), 0, R - 1)
    ax = np.zeros((len(xs) - 1, C))
    ax[np.arange(len(xs) - 1), cx] = np.diff(xs)
    ay = np.zeros((len(ys) - 1, R))
    ay[np.arange(len(ys) - 1), cy] = np.diff(ys)
    frac = ay.T @ covered.astype(np.float64) @ ax / (tw * th)
    frac = np.clip(frac, 0.0, 1.0).astype(np.float32).reshape(-1)
    return _finish(frac, grid, on_empty, f"the box union ({len(b)} box(es))")


# ---------------------------------------------------------------------- masks
def _overlap_matrix(n_pixels: int, scale: float, offset: float, canvas: float, n_cells: int) -> np.ndarray:
    """[n_pixels, n_cells] length (canvas px) of pixel ``[i, i+1)`` mapped to canvas ∩ cell ``j``."""
    edges = np.arange(n_pixels + 1, dtype=np.float64) * scale + offset
    p0 = np.clip(edges[:-1], 0.0, canvas)[:, None]
    p1 = np.clip(edges[1:], 0.0, canvas)[:, None]
    cell = canvas / n_cells
    c0 = (np.arange(n_cells, dtype=np.float64) * cell)[None, :]
    c1 = (np.arange(1, n_cells + 1, dtype=np.float64) * cell)[None, :]
    return np.maximum(np.minimum(p1, c1) - np.maximum(p0, c0), 0.0)


def mask_to_token_mask(mask: Any, grid: TokenGrid, mode: str = "any", on_empty: str = "raise") -> np.ndarray:
    """Token mask of a binary pixel mask.

    Args:
        mask: ``[H0, W0]`` array in original pixels (bool, 0/1, uint8 0/255, float); every
            non-zero pixel is foreground. Must match ``grid.image_size`` = ``(W0, H0)``.
        grid: the image's :class:`TokenGrid`.
        mode: ``"any"`` -> bool ``[rows·cols]``: a token is True if the square of any foreground
            pixel, mapped to the canvas, overlaps its cell with positive area;
            ``"fraction"`` -> float32 ``[rows·cols]``: fraction of the cell area covered by the
            (mapped) foreground pixels, in ``[0, 1]``.
        on_empty: ``"raise"`` (default) raises if the mask is empty or all its pixels are cropped
            away by the processor; ``"empty"`` returns an all-False (all-zero) mask instead.
    """
    _check_grid(grid)
    _check_choice(mode, _MODES, "mode")
    _check_choice(on_empty, _ON_EMPTY, "on_empty")
    m = np.asarray(mask)
    w0, h0 = grid.image_size
    if m.ndim != 2:
        raise ValueError(
            f"mask must be a 2-D [H0, W0] array, got shape {m.shape}; reduce channels (e.g. mask[..., 0]) first"
        )
    if m.shape != (h0, w0):
        raise ValueError(
            f"mask shape {m.shape} (H, W) does not match the grid's image size (W0, H0) = {grid.image_size}, "
            f"i.e. expected mask shape ({h0}, {w0}); the mask must be in original-image pixels"
        )
    if m.dtype.kind not in "biuf":
        raise ValueError(f"mask must be boolean or numeric, got dtype {m.dtype}")
    if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
        raise ValueError("mask contains NaN/inf values")
    fg = (m != 0).astype(np.float64)
    if not fg.any():
        if on_empty == "raise":
            raise ValueError("mask is empty (no non-zero pixel); pass on_empty='empty' to get an empty token mask")
        return np.zeros(grid.n_tokens, dtype=bool if mode == "any" else np.float32)
    ax = _overlap_matrix(w0, grid.scale[0], grid.offset[0], grid.canvas_size[0], grid.cols)  # [W0, C]
    ay = _overlap_matrix(h0, grid.scale[1], grid.offset[1], grid.canvas_size[1], grid.rows)  # [H0, R]
    tw, th = grid.cell_size
    if mode == "any":
        ix = (ax > _EPS * tw).astype(np.float64)
        iy = (ay > _EPS * th).astype(np.float64)
        out = (iy.T @ fg @ ix) > 0.5
    else:
        out = np.clip(ay.T @ fg @ ax / (tw * th), 0.0, 1.0).astype(np.float32)
    return _finish(out.reshape(-1), grid, on_empty, "the mask")


# ---------------------------------------------------------------------- flat <-> grid helpers
def _flat(flat: Any, grid: TokenGrid) -> np.ndarray:
    a = np.asarray(flat)
    if a.ndim != 1 or a.shape[0] != grid.n_tokens:
        raise ValueError(
            f"flat token array must have shape [{grid.n_tokens}] (= {grid.rows}x{grid.cols}), got {a.shape}"
        )
    return a


def token_mask_to_grid(flat: Any, grid: TokenGrid) -> np.ndarray:
    """Flat row-major token array ``[rows·cols]`` -> ``[rows, cols]`` (same dtype)."""
    from einops import rearrange

    _check_grid(grid)
    return rearrange(_flat(flat, grid), "(r c) -> r c", r=grid.rows, c=grid.cols)


def grid_to_token_mask(arr: Any, grid: TokenGrid) -> np.ndarray:
    """``[rows, cols]`` -> flat row-major ``[rows·cols]`` (inverse of :func:`token_mask_to_grid`)."""
    _check_grid(grid)
    a = np.asarray(arr)
    if a.shape != (grid.rows, grid.cols):
        raise ValueError(f"array must have shape ({grid.rows}, {grid.cols}) (rows, cols), got {a.shape}")
    from einops import rearrange

    return rearrange(a, "r c -> (r c)")


def rowcol_to_flat(rows: Any, cols: Any, grid: TokenGrid) -> np.ndarray:
    """Flat indices ``row·cols + col`` (int64, same shape as the inputs)."""
    _check_grid(grid)
    r = np.asarray(rows, dtype=np.int64)
    c = np.asarray(cols, dtype=np.int64)
    if np.any((r < 0) | (r >= grid.rows)) or np.any((c < 0) | (c >= grid.cols)):
        raise ValueError(f"(row, col) outside the {grid.rows}x{grid.cols} grid")
    return r * grid.cols + c


def flat_to_rowcol(index: Any, grid: TokenGrid) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices -> ``(rows, cols)`` int64 arrays (inverse of :func:`rowcol_to_flat`)."""
    _check_grid(grid)
    k = np.asarray(index, dtype=np.int64)
    if np.any((k < 0) | (k >= grid.n_tokens)):
        raise ValueError(f"token index outside [0, {grid.n_tokens})")
    return k // grid.cols, k % grid.cols


def token_mask_to_indices(flat: Any, grid: TokenGrid) -> np.ndarray:
    """Sorted flat indices (int64) of the non-zero tokens of a flat mask."""
    _check_grid(grid)
    return np.flatnonzero(_flat(flat, grid)).astype(np.int64)


def indices_to_token_mask(indices: Any, grid: TokenGrid) -> np.ndarray:
    """Flat bool mask ``[rows·cols]`` with the given flat indices set."""
    _check_grid(grid)
    k = np.asarray(indices, dtype=np.int64).reshape(-1)
    if np.any((k < 0) | (k >= grid.n_tokens)):
        raise ValueError(f"token index outside [0, {grid.n_tokens})")
    out = np.zeros(grid.n_tokens, dtype=bool)
    out[k] = True
    return out


# ------------------------------------------------------------------------------------ the study's box -> tokens
#: VGMED sources whose boxes are mask extents (the released preparation code's inclusive-max boxes, and the
#: package's own atlas lesions derived the same way from masks).
MASK_DERIVED_SOURCES = ("sa_med2d_20m", "polyp_db", "cxr_lungs", "unknown", "mricron_aal", "pydicom_testdata")


def released_box_end(box_xywh: Sequence[float]) -> list:
    """A mask-extent box ``[x, y, w, h]`` (``w = x_max - x_min + 1``, the package's exclusive end) as the
    released code reads it: ``[x_min, y_min, x_max, y_max]`` taken as corners, i.e. ``w - 1`` / ``h - 1``."""
    x, y, w, h = (float(v) for v in box_xywh)
    return [x, y, max(w - 1.0, 0.0), max(h - 1.0, 0.0)]


def study_token_mask(boxes: Any, grid: TokenGrid, image_size: Sequence[int] | None = None, *,
                     box_mapping: str = "processor", mask_box_end: str = "exclusive", from_mask: bool = False,
                     min_cells_per_box: int = 1, mode: str = "any", on_empty: str = "empty") -> np.ndarray:
    """Ground-truth token mask of ``boxes`` (xywh, original pixels) for the study's metrics.

    ``box_mapping``: ``"processor"`` (default: ``grid`` as the processor really maps the image, e.g.
    pad-to-square aware) or ``"stretch"`` (``VGRefineConfig.huatuo_box_mapping="stretch"``: the released
    metric script's plain stretch of the original ``image_size`` onto ``grid.rows x grid.cols``, ignoring
    padding and cropping). ``mask_box_end``: ``"exclusive"`` (default) or ``"inclusive_max"``
    (``faithful=True``: boxes that are mask extents, ``from_mask=True``, end at the last mask pixel,
    :func:`released_box_end`). ``min_cells_per_box``, ``mode``, ``on_empty``: as :func:`boxes_to_token_mask`.
    """
    _check_choice(box_mapping, ("processor", "pad", "stretch"), "box_mapping")
    _check_choice(mask_box_end, ("exclusive", "inclusive_max"), "mask_box_end")
    if box_mapping == "stretch":
        if image_size is None:
            raise ValueError("box_mapping='stretch' needs the original image_size (W, H)")
        grid = TokenGrid.stretch(image_size, grid.rows, grid.cols)
    b = [list(map(float, x)) for x in boxes]
    if not (mask_box_end == "inclusive_max" and from_mask):
        return boxes_to_token_mask(b, grid, box_format="xywh", mode=mode, min_cells_per_box=min_cells_per_box,
                                   on_empty=on_empty)
    b = [released_box_end(x) for x in b]
    proper = [x for x in b if x[2] > 0 and x[3] > 0]
    out = (boxes_to_token_mask(proper, grid, box_format="xywh", mode=mode, min_cells_per_box=min_cells_per_box,
                               on_empty="empty") if proper else
           np.zeros(grid.n_tokens, dtype=bool if mode == "any" else np.float32))
    if mode == "any":   # a one-pixel-wide mask gives a zero-width released box: the cover rule on its line
        sx, sy = grid.scale
        ox, oy = grid.offset
        wc, hc = grid.canvas_size
        tw, th = grid.cell_size
        cells = out.reshape(grid.rows, grid.cols)
        for x, y, w, h in (x for x in b if not (x[2] > 0 and x[3] > 0)):
            x0, x1 = np.clip([x * sx + ox, (x + w) * sx + ox], 0, wc)
            y0, y1 = np.clip([y * sy + oy, (y + h) * sy + oy], 0, hc)
            c_lo, c_hi = max(int(math.floor(x0 / tw + _EPS)), 0), min(int(math.ceil(x1 / tw - _EPS)), grid.cols)
            r_lo, r_hi = max(int(math.floor(y0 / th + _EPS)), 0), min(int(math.ceil(y1 / th - _EPS)), grid.rows)
            if min_cells_per_box:
                c_lo, r_lo = min(c_lo, grid.cols - 1), min(r_lo, grid.rows - 1)
                c_hi, r_hi = max(c_hi, c_lo + 1), max(r_hi, r_lo + 1)
            cells[r_lo:r_hi, c_lo:c_hi] = True
    return _finish(out, grid, on_empty, f"the box union ({len(b)} box(es))")


def study_geometry(config: Any) -> dict:
    """``measure_grounding`` keyword arguments for the box → token rule of a ``VGRefineConfig``
    (``faithful=True``: stretch mapping, inclusive-max mask boxes, no minimum cell)."""
    return {"box_mapping": "stretch" if config.huatuo_box_mapping == "stretch" else "processor",
            "mask_box_end": config.mask_box_end, "min_cells_per_box": int(config.min_cells_per_box)}
