"""Figures: attention heat-maps over the original image, per-layer curves, layer x head heat-maps.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot, no global backend
change, safe in headless jobs and threads). Every function returns the ``Figure`` and, with ``path``,
writes a PNG atomically (temp file + rename).

Heat-maps over the image are mapped back through the processor geometry: original pixel ``(x, y)``
(centre ``(x+0.5, y+0.5)``) goes to canvas ``(x·sx + ox, y·sy + oy)`` and takes the value of the
token cell it lands in; pixels that land outside the token canvas (cropped away by the processor)
stay transparent. Pad-only canvas regions never show, because only original pixels are drawn.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from .atomic import atomic_output

__all__ = ["token_map_to_pixels", "plot_attention_overlay", "plot_triage_overlay", "plot_layer_grid", "plot_layer_curves",
           "plot_head_heatmap", "save_figure"]


# --------------------------------------------------------------------------------------------- helpers
def new_figure(figsize):
    """A matplotlib ``Figure`` of ``figsize`` inches on the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, bbox_inches: str | None = "tight") -> str:
    """Write ``fig`` as PNG to ``path`` atomically (temp file in the same folder, then rename)."""
    path = os.fspath(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches=bbox_inches)
    return path


def image_array(image) -> np.ndarray:
    """An image (PIL or array) as a ``[H, W]`` or ``[H, W, C]`` array for ``imshow``."""
    a = np.asarray(image)
    if a.ndim not in (2, 3):
        raise ValueError(f"image must be a PIL image or an [H, W] / [H, W, C] array, got shape {a.shape}")
    return a


def _map2d(token_map, grid) -> np.ndarray:
    m = token_map.detach().cpu().numpy() if hasattr(token_map, "detach") else np.asarray(token_map)
    m = m.astype(np.float64)
    if m.shape == (grid.rows, grid.cols):
        return m
    if m.ndim == 1 and m.shape[0] == grid.n_tokens:
        from einops import rearrange

        return rearrange(m, "(r c) -> r c", r=grid.rows, c=grid.cols)
    raise ValueError(f"token map of shape {m.shape} does not fit the {grid.rows}x{grid.cols} token grid "
                     f"(expected [{grid.n_tokens}] or [{grid.rows}, {grid.cols}])")


def token_map_to_pixels(token_map, grid) -> np.ndarray:
    """``[R·C]`` or ``[R, C]`` token values -> float64 ``[H0, W0]`` over original pixels (NaN off-canvas)."""
    m = _map2d(token_map, grid)
    w0, h0 = grid.image_size
    sx, sy = grid.scale
    ox, oy = grid.offset
    wc, hc = grid.canvas_size
    tw, th = grid.cell_size
    cx = (np.arange(w0) + 0.5) * sx + ox
    cy = (np.arange(h0) + 0.5) * sy + oy
    vx = (cx >= 0) & (cx < wc)
    vy = (cy >= 0) & (cy < hc)
    col = np.clip(np.floor(cx / tw).astype(np.int64), 0, grid.cols - 1)
    row = np.clip(np.floor(cy / th).astype(np.int64), 0, grid.rows - 1)
    out = m[row[:, None], col[None, :]]
    out[~(vy[:, None] & vx[None, :])] = np.nan
    return out


def _draw_gt(ax, boxes, mask, w0, h0, color):
    from matplotlib.patches import Rectangle

    if boxes is not None:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        for x, y, w, h in b:
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.5))
    if mask is not None:
        mk = np.asarray(mask)
        if mk.ndim == 3:
            mk = mk[..., 0]
        if mk.shape != (h0, w0):
            raise ValueError(f"mask shape {mk.shape} does not match the image (H, W) = ({h0}, {w0})")
        fg = (mk != 0).astype(np.float64)
        if fg.any() and not fg.all():
            ax.contour(np.arange(w0) + 0.5, np.arange(h0) + 0.5, fg, levels=[0.5], colors=[color], linewidths=1.2)


# --------------------------------------------------------------------------------------------- overlays
def plot_attention_overlay(image, token_map, grid, boxes=None, mask=None, ax=None, path=None, cmap: str = "jet",
                           alpha: float = 0.5, vmin: float | None = None, vmax: float | None = None,
                           title: str | None = None, colorbar: bool = True, gt_color: str = "lime",
                           colorbar_label: str | None = "attention (relative to the generic prompt)"):
    """Heat-map of one token map drawn over the original image, with the ground-truth contour.

    Args:
        image: PIL image or array ``[H0, W0(, C)]`` (the original image, size = ``grid.image_size``).
        token_map: ``[N]`` (row-major) or ``[R, C]`` values, e.g. relative attention (unit-free).
        grid: the image's :class:`~hf_vgrefine.geometry.TokenGrid` (``adapter.token_grid``).
        boxes: ``[4]`` or ``[K, 4]`` xywh boxes in original pixels (drawn as rectangles).
        mask: ``[H0, W0]`` region mask (drawn as a contour).
        ax: an existing Axes to draw into (otherwise a new figure is made).
        path: write a PNG there.
        vmin, vmax: colour range (default: the map's finite min/max).
    Returns the matplotlib ``Figure``.
    """
    img = image_array(image)
    h0, w0 = img.shape[:2]
    if (w0, h0) != tuple(grid.image_size):
        raise ValueError(f"image size (W, H) = ({w0}, {h0}) differs from grid.image_size {grid.image_size}: "
                         "build the grid for this image (adapter.token_grid(processor, image.size))")
    heat = token_map_to_pixels(token_map, grid)
    finite = heat[np.isfinite(heat)]
    lo = float(finite.min()) if vmin is None and finite.size else vmin
    hi = float(finite.max()) if vmax is None and finite.size else vmax
    if ax is None:
        fig = new_figure((4.0, 4.0 * h0 / max(w0, 1) + 0.4))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    extent = (0, w0, h0, 0)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=extent, interpolation="nearest")
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    im = ax.imshow(np.ma.masked_invalid(heat), cmap=cm, alpha=alpha, vmin=lo, vmax=hi, extent=extent,
                   interpolation="nearest")
    _draw_gt(ax, boxes, mask, w0, h0, gt_color)
    ax.set_xlim(0, w0)
    ax.set_ylim(h0, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, format="%.3g")
        if colorbar_label:
            cb.set_label(colorbar_label, fontsize=7)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_triage_overlay(image, triage_map, keep_mask, grid, boxes=None, mask=None, ax=None, path=None,
                        title: str | None = "VGRefine triage (white: kept tokens)", keep_color: str = "white",
                        **overlay_kwargs):
    """VGRefine's triage map over the image with the outline of the kept (not knocked-out) tokens.

    ``triage_map``: ``[N]`` relative scores; ``keep_mask``: bool ``[N]`` (True = kept), both row-major over
    ``grid`` (``SampleTriage.triage_map`` / ``.keep_mask``); the rest as :func:`plot_attention_overlay`.
    Returns the ``Figure``.
    """
    keep = np.asarray(keep_mask, dtype=np.float64).reshape(-1)
    if keep.size != grid.rows * grid.cols:
        raise ValueError(f"keep_mask has {keep.size} cells, the grid {grid.rows}x{grid.cols}")
    fig = plot_attention_overlay(image, triage_map, grid, boxes=boxes, mask=mask, ax=ax, title=title,
                                 **overlay_kwargs)
    ax = ax if ax is not None else fig.axes[0]
    kp = token_map_to_pixels(keep.reshape(grid.rows, grid.cols), grid)
    kp = np.where(np.isfinite(kp), kp, 0.0)
    if kp.max() > 0 and kp.min() < 1:
        h0, w0 = kp.shape
        ax.contour(np.arange(w0) + 0.5, np.arange(h0) + 0.5, kp, levels=[0.5], colors=[keep_color], linewidths=1.0)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_layer_grid(image, maps, grid, layers: Sequence | None = None, boxes=None, mask=None, ncols: int = 4,
                    path=None, title: str | None = None, shared_scale: bool = False, **overlay_kwargs):
    """Several token maps (e.g. one per layer) over the same image in one figure.

    ``maps``: ``[n_maps, N]`` / ``[n_maps, R, C]`` array or a ``{label: map}`` dict. ``layers``: panel
    labels (default: the dict keys or ``0..n_maps-1``). ``shared_scale``: one colour range for all
    panels (default: each panel its own min-max). Returns the ``Figure``.
    """
    if isinstance(maps, dict):
        labels = list(maps) if layers is None else list(layers)
        arrs = [maps[k] for k in maps]
    else:
        a = maps.detach().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps)
        arrs = [a[i] for i in range(a.shape[0])]
        labels = list(range(len(arrs))) if layers is None else list(layers)
    if len(labels) != len(arrs):
        raise ValueError(f"{len(arrs)} maps but {len(labels)} labels")
    if not arrs:
        raise ValueError("no maps to plot")
    vmin = vmax = None
    if shared_scale:
        vals = np.concatenate([np.asarray(_map2d(a, grid)).ravel() for a in arrs])
        vals = vals[np.isfinite(vals)]
        if vals.size:
            vmin, vmax = float(vals.min()), float(vals.max())
    ncols = max(1, min(int(ncols), len(arrs)))
    nrows = math.ceil(len(arrs) / ncols)
    img = image_array(image)
    h0, w0 = img.shape[:2]
    cell_h = 2.6 * h0 / max(w0, 1) + 0.4
    fig = new_figure((2.8 * ncols, cell_h * nrows + (0.4 if title else 0)))
    for i, (lab, a) in enumerate(zip(labels, arrs)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        plot_attention_overlay(img, a, grid, boxes=boxes, mask=mask, ax=ax, vmin=vmin, vmax=vmax,
                               title=f"layer {lab}" if isinstance(lab, (int, np.integer)) else str(lab),
                               colorbar=not shared_scale, **overlay_kwargs)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------------------------- curves
_PRETTY = {
    "attention_ratio": "attention ratio (AR)",
    "kl_gt_attention": "KL(g || p) [nats]",
    "js_divergence": "JS divergence [nats]",
    "soft_dice_ratio": "soft-Dice ratio (VGMED 'IoU')",
    "energy_pointing_game": "energy pointing game",
    "pointing_game": "pointing game (hit rate)",
    "thresholded_iou": "IoU of top-|B| tokens",
    "thresholded_dice": "Dice of top-|B| tokens",
    "auroc": "AUROC",
}


def plot_layer_curves(summary, path=None, scores: Sequence[str] | None = None, kinds: Sequence[str] | None = None,
                      title: str | None = None, ncols: int = 3):
    """Per-layer curves, one panel and one line per score (and map kind), with 95% CI band and chance.

    ``summary``: a layer-level summary table (``GroundingResults.summary()``: columns ``kind, score,
    layer, mean, ci_low, ci_high, chance``). ``kinds``: map kinds to draw (``"relative"`` solid,
    ``"raw"`` dotted). The chance level (mean over samples of the per-sample chance value) is the
    dashed black line. Returns the ``Figure``.
    """
    from matplotlib.ticker import MaxNLocator

    df = summary
    scores = list(dict.fromkeys(df["score"])) if scores is None else list(scores)
    kinds = list(dict.fromkeys(df["kind"])) if kinds is None else list(kinds)
    if not scores:
        raise ValueError("summary has no scores to plot")
    ncols = max(1, min(ncols, len(scores)))
    nrows = math.ceil(len(scores) / ncols)
    fig = new_figure((4.2 * ncols, 3.0 * nrows + (0.4 if title else 0)))
    styles = {"relative": dict(color="C0", linestyle="-"), "raw": dict(color="C1", linestyle=":")}
    for i, s in enumerate(scores):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        chance = math.nan
        for kind in kinds:
            d = df[(df["score"] == s) & (df["kind"] == kind)].sort_values("layer")
            if d.empty:
                continue
            st = styles.get(kind, dict(color=f"C{2 + kinds.index(kind)}", linestyle="--"))
            x = d["layer"].to_numpy()
            ax.plot(x, d["mean"].to_numpy(dtype=float), marker="o", markersize=3, label=f"{kind} map", **st)
            lo, hi = d["ci_low"].to_numpy(dtype=float), d["ci_high"].to_numpy(dtype=float)
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=st["color"], alpha=0.15, linewidth=0)
            c = d["chance"].to_numpy(dtype=float)
            if np.isfinite(c).any():
                chance = float(np.nanmean(c))
        if math.isfinite(chance):
            ax.axhline(chance, color="k", linestyle="--", linewidth=1, label="chance")
        ax.set_title(_PRETTY.get(s, s), fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, bbox_inches=None)
    return fig


def plot_head_heatmap(matrix, path=None, selected: Sequence[Sequence[int]] = (), chosen_layers: Sequence[int] = (),
                      layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                      label: str = "mean attention ratio", title: str | None = None, cmap: str = "viridis"):
    """Layer x head heat-map (``matrix [n_layers, n_heads]``), selected ``(layer, head)`` pairs boxed in
    white, chosen layers marked with a red bracket on the left. ``layers``/``heads``: axis indices
    (default ``0..n-1``). NaN cells are grey. Returns the ``Figure``."""
    from matplotlib.patches import Rectangle

    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"matrix must be [n_layers, n_heads], got shape {m.shape}")
    L, H = m.shape
    layers = list(range(L)) if layers is None else list(layers)
    heads = list(range(H)) if heads is None else list(heads)
    fig = new_figure((max(4.0, 0.28 * H + 2.2), max(3.0, 0.24 * L + 1.4)))
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cm, aspect="auto", interpolation="nearest", origin="upper")
    li = {l: i for i, l in enumerate(layers)}
    hi = {h: i for i, h in enumerate(heads)}
    for l, h in selected:
        if l in li and h in hi:
            ax.add_patch(Rectangle((hi[h] - 0.5, li[l] - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.5))
    for l in chosen_layers:
        if l in li:
            ax.add_patch(Rectangle((-0.5, li[l] - 0.5), H, 1, fill=False, edgecolor="red", linewidth=1.5,
                                   linestyle="--"))
    step_l = max(1, L // 16)
    step_h = max(1, H // 16)
    ax.set_yticks(range(0, L, step_l), [str(layers[i]) for i in range(0, L, step_l)])
    ax.set_xticks(range(0, H, step_h), [str(heads[i]) for i in range(0, H, step_h)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label=label)
    if title:
        ax.set_title(title, fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig
