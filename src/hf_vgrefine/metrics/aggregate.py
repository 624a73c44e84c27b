"""Summaries of per-sample grounding scores: mean, median, percentile-bootstrap CI of the mean, counts, and
the chance level of each score for the samples' region fractions (docs/method.md § Grounding scores)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .names import ALIASES

__all__ = ["aggregate", "bootstrap_means", "chance_levels"]


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
    """Summarise per-sample scores (docs/method.md § Grounding scores).

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
                boot = bootstrap_means(v0, valid.astype(np.float64), n_boot, rng)
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


def bootstrap_means(v0: np.ndarray, valid: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
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
    """A flat statistic back to the trailing shape (a Python scalar for 1-D input)."""
    if tail == ():
        return kind(a.reshape(-1)[0])
    return a.reshape(tail).astype(np.int64 if kind is int else np.float64)
