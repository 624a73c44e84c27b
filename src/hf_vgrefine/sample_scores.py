"""One sample of a grounding measurement: its ground-truth token mask and its scores per layer (and head).

The token mask comes from the sample's boxes (``[x, y, w, h]`` original pixels) and/or mask (``L`` image,
same size) mapped onto the model's token grid; the scores are those of :mod:`hf_vgrefine.metrics` on the
layer-mean maps and, with ``per_head``, on every head's map, for relative (question / generic) and raw maps.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sample_token_mask", "score_sample"]


def sample_token_mask(row, grid, gt: str, min_cells_per_box: int, image_size=None, settings: dict | None = None):
    """Ground-truth token mask of one sample -> ``(mask [N] bool or float32, gt_source, error message)``.

    ``settings["box_mapping"]`` / ``settings["mask_box_end"]`` (absent = defaults): the study's box rule of
    :func:`hf_vgrefine.geometry.study_token_mask` (``faithful=True``: stretch, inclusive-max mask boxes)."""
    from .geometry import MASK_DERIVED_SOURCES, mask_to_token_mask, study_token_mask

    boxes = row.get("boxes")
    boxes = [] if boxes is None else [list(map(float, b)) for b in boxes]
    mask = row.get("mask")
    marr = None
    if mask is not None:
        marr = np.asarray(mask)
        if marr.ndim == 3:
            marr = marr[..., 0]
    fraction = gt == "soft_mask"
    mode = "fraction" if fraction else "any"
    use_mask = marr is not None and (gt in ("mask_cells", "soft_mask") or not boxes)
    try:
        if use_mask:
            tm = mask_to_token_mask(marr, grid, mode=mode, on_empty="empty")
            src = "soft_mask" if fraction else "mask_cells"
        elif boxes:
            st = settings or {}
            tm = study_token_mask(boxes, grid, image_size, box_mapping=st.get("box_mapping", "processor"),
                                  mask_box_end=st.get("mask_box_end", "exclusive"),
                                  from_mask=str(row.get("source", "")) in MASK_DERIVED_SOURCES, mode=mode,
                                  min_cells_per_box=min_cells_per_box, on_empty="empty")
            src = "box_fraction" if fraction else "box"
        else:
            return np.zeros(grid.n_tokens, dtype=bool), "none", "sample has neither boxes nor a mask"
    except ValueError as e:
        return np.zeros(grid.n_tokens, dtype=bool), "error", str(e)
    return tm, src, ""


def score_sample(maps_q, maps_g, gt_mask, grid, relative: bool, per_head: bool, head_norm: str, eps: float,
                 score_names, metric_options) -> dict:
    """Every score of one sample: ``{"<kind>/<score>": [n_layers], "<kind>_head/<score>": [n_layers, H]}``.

    ``maps_q``: question-prompt maps ``[n_layers, H, N]``; ``maps_g``: generic-prompt maps ``[n_layers, H or 1,
    N]`` (None when not ``relative``); ``gt_mask``: ``[N]`` from :func:`sample_token_mask`."""
    from .metrics import grounding_scores, relative_attention

    q = maps_q.astype(np.float64)                      # [nL, H, N]
    out = {}
    kinds = {"raw": (q.mean(1), q if per_head else None)}
    if relative:
        g = maps_g.astype(np.float64)                  # [nL, H or 1, N]
        g_layer = g.mean(1)
        rel_layer = relative_attention(q.mean(1), g_layer, eps)
        rel_head = None
        if per_head:
            if head_norm == "per_head":
                if g.shape[1] != q.shape[1]:
                    raise RuntimeError("per-head generic maps missing from the cache")
                rel_head = relative_attention(q, g, eps)
            elif head_norm == "layer_mean":
                rel_head = relative_attention(q, g_layer[:, None, :], eps)
            else:
                raise ValueError(f"head_norm must be 'per_head' or 'layer_mean', got {head_norm!r}")
        kinds = {"relative": (rel_layer, rel_head), **kinds}
    gt = np.asarray(gt_mask)
    opts = dict(metric_options)
    opts.setdefault("grid", (grid.rows, grid.cols))
    for kind, (lay, head) in kinds.items():
        res = grounding_scores(lay, np.broadcast_to(gt, lay.shape), score_names, **opts)
        for s, v in res.items():
            out[f"{kind}/{s}"] = np.asarray(v, dtype=np.float64)
        if head is not None:
            res = grounding_scores(head, np.broadcast_to(gt, head.shape), score_names, **opts)
            for s, v in res.items():
                out[f"{kind}_head/{s}"] = np.asarray(v, dtype=np.float64)
    return out


