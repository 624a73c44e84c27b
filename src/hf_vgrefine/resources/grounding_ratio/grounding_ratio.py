# Copyright 2026 The hf_vgrefine authors. Licensed under the Apache License, Version 2.0.
"""grounding_ratio: grounding scores of attention maps against region masks, as an evaluate module.

Thin adaptor: every number is computed by ``hf_vgrefine.metrics`` (the package's numpy core), so the
module, the package API and the command line always agree. Keep one import per line (evaluate's
dependency scanner reads import lines literally).
"""

import datasets
import evaluate

from hf_vgrefine import metrics as grounding_core
from hf_vgrefine.citation import STUDY_CITATION as _CITATION


_DESCRIPTION = """\
Grounding scores of a model's attention over image tokens against the ground-truth region: attention
ratio (mean attention inside the region / mean over all tokens), KL(g || p), Jensen-Shannon
divergence, the VGMED soft-Dice ratio ("IoU" in VGMED, not an IoU), energy-based pointing game
(attention mass inside the region), pointing game (argmax inside the region), IoU and Dice of the
thresholded map, and ROC-AUC of the attention as a token classifier. Maps are 2-D token grids and may
differ in size between examples. A sample whose region is empty, whose attention sums to zero or
contains NaN/inf scores NaN and is left out of the means (counted in `n_nan`).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 2-D attention maps [R, C] over the image-token grid (non-negative floats;
        raw attention or relative attention). Sizes may differ between examples.
    references: list of region masks on the same grid as the matching prediction: 0/1, or the
        fraction of each token cell covered by the region (soft ground truth, values in [0, 1]).
    scores: names of the scores to compute (default: all of them). Known names: attention_ratio,
        kl_gt_attention, js_divergence, soft_dice_ratio (alias vgmed_iou), energy_pointing_game
        (alias relevance_mass_ratio), pointing_game, thresholded_iou, thresholded_dice, auroc.
    return_per_sample: also return every sample's value under "per_sample".
    tolerance: pointing-game tolerance in tokens (Chebyshev distance), default 0.
    ties: pointing-game tie rule, "first" (default) or "any".
    threshold_mode: binarisation of the map for thresholded_iou / thresholded_dice: "oracle_size"
        (default; keep as many tokens as the region has), "top_frac", "mean", "otsu" or "fixed".
    q: kept fraction for "top_frac" (default 0.1). theta: threshold on the min-max normalised map
        for "fixed" (default 0.5).
Returns:
    one float per score (mean over the samples where it is finite), "n" (number of samples),
    "n_nan" ({score: number of NaN samples}) and, on request, "per_sample" ({score: [float]}).
Examples:
    >>> metric = evaluate.load("grounding_ratio")
    >>> out = metric.compute(predictions=[[[0.9, 0.1], [0.0, 0.0]]], references=[[[1, 0], [0, 0]]],
    ...                      scores=["attention_ratio", "pointing_game"])
    >>> round(out["attention_ratio"], 3), out["pointing_game"]
    (3.6, 1.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GroundingRatio(evaluate.Metric):
    """Attention-vs-region grounding scores (delegates to ``hf_vgrefine.metrics``)."""

    def _info(self):
        grid = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": grid, "references": grid}),
            reference_urls=["https://arxiv.org/abs/2603.14323"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of maps and masks (numpy, torch or nested lists; converted to float32 grids)."""
        return super().add_batch(
            predictions=grounding_core.as_float32_grids(predictions, "predictions"),
            references=grounding_core.as_float32_grids(references, "references"),
            **kwargs,
        )

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one map and its mask (numpy, torch or nested lists; converted to a float32 grid)."""
        return super().add(
            prediction=grounding_core.as_float32_grid(prediction, "prediction"),
            reference=grounding_core.as_float32_grid(reference, "reference"),
            **kwargs,
        )

    def _compute(
        self,
        predictions,
        references,
        scores=None,
        return_per_sample=False,
        tolerance=0,
        ties="first",
        threshold_mode="oracle_size",
        q=0.1,
        theta=0.5,
    ):
        return grounding_core.compute_from_maps(
            predictions,
            references,
            scores=scores,
            return_per_sample=return_per_sample,
            tolerance=tolerance,
            ties=ties,
            threshold_mode=threshold_mode,
            q=q,
            theta=theta,
        )
