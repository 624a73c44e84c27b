"""Names, directions and constants of the grounding scores."""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["ALIASES", "ALL", "CLIP", "EPS", "HIGHER_IS_BETTER", "THRESHOLD_MODES", "canonical", "top_k"]

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

THRESHOLD_MODES = ("top_frac", "oracle_size", "mean", "otsu", "fixed")


def canonical(names: Iterable[str]) -> list[tuple[str, str]]:
    """``[(asked name, canonical score)]``; ``ValueError`` for an unknown name."""
    out = []
    for name in names:
        canon = ALIASES.get(name, name)
        if canon not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown score {name!r}; known: {sorted(HIGHER_IS_BETTER) + sorted(ALIASES)}")
        out.append((name, canon))
    return out


def top_k(q: float, n: int) -> int:
    """Tokens kept by ``top_frac`` ``q`` of ``N = n`` tokens: ``ceil(q·n)`` clamped to ``[1, n]``."""
    if not 0 < q <= 1:
        raise ValueError(f"top_frac q must be in (0, 1], got {q}")
    return int(min(n, max(1, math.ceil(round(q * n, 9)))))
