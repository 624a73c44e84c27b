"""Grounding scores: how much of an attention map over visual tokens lies on a ground-truth region.

Pure numpy (docs/method.md § Grounding scores). Modules: :mod:`.names` (score names, directions, constants), :mod:`.inputs`
(maps and regions to arrays), :mod:`.core` (all scores of a batch together; one function per score),
:mod:`.thresholded` (AUROC, thresholded IoU/Dice), :mod:`.aggregate` (summaries with bootstrap CIs, chance
levels), :mod:`.grids` (variable-size 2-D maps, for the evaluate module). Every score is computed in float64, per sample, vectorised over
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

from .aggregate import aggregate, chance_levels
from .core import (
    attention_ratio,
    auroc,
    energy_pointing_game,
    grounding_scores,
    js_divergence,
    kl_gt_attention,
    pointing_game,
    region_fraction,
    relative_attention,
    relevance_mass_ratio,
    soft_dice_ratio,
    thresholded_iou,
    vgmed_iou,
)
from .grids import as_float32_grid, as_float32_grids, compute_from_maps
from .names import ALIASES, ALL, CLIP, EPS, HIGHER_IS_BETTER

__all__ = [
    "CLIP",
    "EPS",
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
