"""Calibration of VGRefine's masked layer(s) and sensitive heads from grounding scores (docs/method.md § Calibration).

The released code only *measures* layer- and head-level scores; the ranking rule that produced the
published layer/heads is not released. This module implements the package's documented rule:

* **Maps**: relative attention of the last prompt token (``query="last"``) to the image tokens,
  question prompt ÷ generic prompt on the same image (``eps`` added to the generic map).
  Layer ranking uses **layer-mean** maps (``mean_h A_l[h]``, as ``measure_attention.py``);
  head ranking uses **per-head** maps normalised by the **same head's** generic map (as
  ``measure_attention_head.py``).
* **Layer**: ``M = [argmax_l mean_samples criterion_l]`` for a higher-is-better ``criterion``
  (``argmin`` for KL/JS); NaN samples excluded; ties → the lower layer; ``exclude_layers`` are skipped.
* **Heads**: ``S`` = the top-``k`` ``(layer, head)`` pairs by ``rank_by``:
  ``"ar_mean"`` (mean AR, descending; default), ``"ar_median"`` (median AR, descending),
  ``"ar_frac_above_1"`` (fraction of samples with AR > 1, descending), ``"js_mean"`` / ``"kl_mean"``
  (mean JS / KL, ascending). Ties → lower layer, then lower head; heads whose statistic is NaN rank
  last; heads of ``exclude_layers`` are never chosen. ``k`` larger than the number of candidate heads
  is clamped (recorded as ``k_effective``).
* **Data**: both question types pooled; rows whose ``split_group`` is ``"calibration"`` when the
  dataset has that column (``split_group=None`` uses every row).

The resulting :class:`~hf_vgrefine.vgrefine.VGRefineConfig` stores every number behind the choice in
``config.calibration`` (per-layer curves of AR/KL/JS, the layer x head statistic matrix, the ranked
heads with their values, the rule, the sample count and a fingerprint of the sample ids).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
from typing import Sequence

import numpy as np

from .jsonio import json_safe
from .loading import processor_settings, select_rows
from .measure import measure_grounding
from .results import GroundingResults
from .prompts import INSTRUCTION

__all__ = ["calibrate", "rank_heads", "choose_layer", "RANK_RULES", "HEATMAP_PNG"]

# rank_by -> (score, statistic, descending)
RANK_RULES = {
    "ar_mean": ("attention_ratio", "mean", True),
    "ar_median": ("attention_ratio", "median", True),
    "ar_frac_above_1": ("attention_ratio", "frac_above_1", True),
    "js_mean": ("js_divergence", "mean", False),
    "kl_mean": ("kl_gt_attention", "mean", False),
}
HEATMAP_PNG = "calibration_heads.png"
MEASURE_SUBDIR = "measurement"


def _stat(values: np.ndarray, stat: str) -> np.ndarray:
    """Statistic over samples (axis 0), NaNs excluded; NaN where no finite sample."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    n = finite.sum(0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if stat == "mean":
            out = np.where(finite, v, 0.0).sum(0) / n
        elif stat == "median":
            out = np.nanmedian(np.where(finite, v, np.nan), 0)
        elif stat == "frac_above_1":
            out = (np.where(finite, v, 0.0) > 1.0).sum(0) / n
        else:
            raise ValueError(f"unknown statistic {stat!r}")
    return np.where(n > 0, out, np.nan)


def choose_layer(layer_values: np.ndarray, layers: Sequence[int], higher_is_better: bool = True,
                 exclude_layers: Sequence[int] = ()) -> int:
    """Best layer of a per-layer curve ``[n_layers]`` (ties -> lower layer; NaN and excluded skipped)."""
    v = np.asarray(layer_values, dtype=np.float64)
    ok = np.isfinite(v) & ~np.isin(np.asarray(layers), list(exclude_layers))
    if not ok.any():
        raise ValueError("no layer has a finite score (empty regions or all-zero maps everywhere?)")
    key = np.where(ok, v if higher_is_better else -v, -np.inf)
    best = key.max()
    return int(np.asarray(layers)[np.flatnonzero(key == best)[0]])


def rank_heads(head_values: np.ndarray, layers: Sequence[int], heads: Sequence[int], descending: bool = True,
               exclude_layers: Sequence[int] = ()) -> list[tuple[int, int, float]]:
    """All candidate ``(layer, head, value)`` sorted best first (ties: lower layer, then lower head;
    NaN last; ``exclude_layers`` dropped). ``head_values``: ``[n_layers, n_heads]``."""
    v = np.asarray(head_values, dtype=np.float64)
    cand = []
    for li, l in enumerate(layers):
        if l in set(exclude_layers):
            continue
        for hi, h in enumerate(heads):
            x = v[li, hi]
            key = (0 if math.isfinite(x) else 1, (-x if descending else x) if math.isfinite(x) else 0.0, int(l), int(h))
            cand.append((key, (int(l), int(h), float(x))))
    cand.sort(key=lambda t: t[0])
    return [c for _, c in cand]


def _fingerprint(ids: Sequence[str]) -> str:
    h = hashlib.sha1()
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _select_split_group(dataset, split_group):
    cols = getattr(dataset, "column_names", None)
    if split_group is None or cols is None or "split_group" not in cols:
        return dataset, None
    return select_rows(dataset, split_group, None), split_group


def calibrate(model, processor, dataset, k: int = 20, criterion: str = "attention_ratio", rank_by: str = "ar_mean",
              exclude_layers: Sequence[int] = (), output_dir: str | None = None, batch_size: int = 4,
              split_group: str | None = "calibration", gt: str = "box", eps: float = 1e-10,
              instruction: str | None = INSTRUCTION, percentile: float | None = 80.0,
              results: GroundingResults | None = None, progress: bool = True, search=None, **measure_kwargs):
    """Choose VGRefine's masked layer and top-``k`` sensitive heads for ``model``.

    Ranking rule (docs/method.md § Calibration, the package's documented choice — the study released none):
    layer = argmax over layers of the mean over samples of the layer-level relative ``criterion``
    (argmin for ``kl_gt_attention`` / ``js_divergence``; ties → lower layer); heads = top-``k``
    ``(layer, head)`` by ``rank_by`` on per-head relative maps with per-head generic normalisation
    (``"ar_mean"`` default; ``"ar_median"``, ``"ar_frac_above_1"``, ``"js_mean"``, ``"kl_mean"``; ties →
    lower layer then lower head). ``exclude_layers`` removes layers from both choices.

    Args:
        dataset: grounding dataset in VGMED's schema (see :func:`hf_vgrefine.measure.measure_grounding`);
            rows with ``split_group == split_group`` are used when that column exists.
        k: number of sensitive heads (clamped to the available heads).
        criterion: score name of :mod:`hf_vgrefine.metrics` used for the layer choice.
        output_dir: writes ``vgrefine_config.json``, ``calibration_heads.png`` (layer x head heat-map) and
            the resumable measurement (``measurement/``).
        gt, eps, instruction, batch_size, measure_kwargs: passed to :func:`measure_grounding`.
        percentile: triage percentile stored in the config (80 = released default).
        results: reuse an existing per-head :class:`GroundingResults` instead of measuring.
        search: ``True``, a dict of :class:`hf_vgrefine.tuning.SearchSpace` fields or a ``SearchSpace``: then tune
            the knockout settings on the same calibration rows (closed questions with answers) with accuracy
            gain as objective (:func:`hf_vgrefine.tuning.search_knockout`), starting from the grounding choice,
            and return the tuned config (report in ``output_dir/search``; the tuned config is also written to
            ``output_dir``).
    Returns:
        :class:`~hf_vgrefine.vgrefine.VGRefineConfig` with ``masked_layers``, ``sensitive_heads`` and
        ``calibration`` (scores behind the choice).
    """
    from .adapters import get_adapter
    from .metrics import ALIASES, HIGHER_IS_BETTER
    from .vgrefine.config import VGRefineConfig

    if rank_by not in RANK_RULES:
        raise ValueError(f"rank_by must be one of {sorted(RANK_RULES)}, got {rank_by!r}")
    canon = ALIASES.get(criterion, criterion)
    if canon not in HIGHER_IS_BETTER:
        raise ValueError(f"criterion must be a score name of hf_vgrefine.metrics ({sorted(HIGHER_IS_BETTER)}), "
                         f"got {criterion!r}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    adapter = get_adapter(model)
    exclude = sorted({int(x) for x in exclude_layers})
    used_group = None
    if results is None:
        dataset, used_group = _select_split_group(dataset, split_group)
        results = measure_grounding(model, processor, dataset, layers="all", per_head=True, relative=True,
                                    batch_size=batch_size, gt=gt, eps=eps, instruction=instruction,
                                    head_norm="per_head", progress=progress,
                                    output_dir=None if output_dir is None else os.path.join(output_dir, MEASURE_SUBDIR),
                                    **measure_kwargs)
        if results is None:  # non-main process of a distributed run
            return None
    if not results.has_heads or "relative" not in results.kinds:
        raise ValueError("calibration needs per-head relative scores (measure_grounding(per_head=True, relative=True))")
    if len(results) == 0:
        raise ValueError("no samples to calibrate on")

    layers, heads = results.layers, results.heads
    layer_curves = {s: _stat(results.get(s, "relative"), "mean")
                    for s in ("attention_ratio", "kl_gt_attention", "js_divergence", "energy_pointing_game", criterion)
                    if s in results.score_names}
    best = choose_layer(layer_curves[criterion], layers, HIGHER_IS_BETTER[canon], exclude)
    order = np.argsort(-layer_curves[criterion] if HIGHER_IS_BETTER[canon] else layer_curves[criterion],
                       kind="stable")
    layer_ranking = [int(layers[i]) for i in order if np.isfinite(layer_curves[criterion][i]) and layers[i] not in exclude]

    score, stat, desc = RANK_RULES[rank_by]
    head_matrix = _stat(results.get(score, "relative", per_head=True), stat)      # [L, H]
    ranked = rank_heads(head_matrix, layers, heads, desc, exclude)
    k_eff = min(int(k), len(ranked))
    if k_eff < int(k):
        warnings.warn(f"k={k} but the model has only {len(ranked)} candidate heads; selecting {k_eff}", stacklevel=2)
    selected = [[l, h] for l, h, _ in ranked[:k_eff]]
    n_valid = int(np.isfinite(results.get("attention_ratio", "relative")).any(1).sum())
    rule = (f"masked layer = argmax over layers of the mean over samples of the layer-mean relative {criterion} "
            f"({'higher' if HIGHER_IS_BETTER[canon] else 'lower'} is better; ties -> lower layer); "
            f"sensitive heads = top-{k_eff} (layer, head) by {stat} of per-head relative {score} with per-head "
            f"generic normalisation ({'descending' if desc else 'ascending'}; ties -> lower layer, lower head; NaN last)"
            + (f"; excluded layers {exclude}" if exclude else ""))
    calibration = {
        "rule": rule, "criterion": criterion, "rank_by": rank_by, "k": int(k), "k_effective": k_eff,
        "exclude_layers": exclude, "n_samples": len(results), "n_valid": n_valid,
        "split_group": used_group, "sample_ids_sha1": _fingerprint(results.ids),
        "question_types": sorted({str(x) for x in results.question_type}),
        "gt": results.info.get("gt", gt), "eps": results.info.get("eps", eps),
        "query": results.info.get("query", "last"), "head_norm": "per_head", "layer_maps": "layer_mean",
        "layers": layers, "heads": heads,
        "layer_curves": {s: v.tolist() for s, v in layer_curves.items()},
        "layer_ranking": layer_ranking, "top3_layers": layer_ranking[:3],
        "head_statistic": {"score": score, "stat": stat, "matrix": head_matrix.tolist()},
        "ranked_heads": [{"layer": l, "head": h, "value": v} for l, h, v in ranked[:max(k_eff, 3 * k_eff)]],
        "model": results.info.get("model", {}),
    }
    from ._version import __version__

    calibration["package_version"] = __version__
    proc_settings = processor_settings(processor)        # image-processor attributes (settable as-is)
    calibration["image_processor_class"] = proc_settings.pop("image_processor_class", None)
    cfg = VGRefineConfig(
        masked_layers=[best], sensitive_heads=selected, percentile=percentile,
        query=results.info.get("query", "last"), calibration_eps=float(results.info.get("eps", eps)),
        instruction=results.info.get("instruction", instruction),
        model_id=str(getattr(model.config, "_name_or_path", "") or "") or None,
        processor_settings=proc_settings, calibration=json_safe(calibration),
        notes=f"calibrated by hf_vgrefine.calibrate on {len(results)} samples ({rank_by}, criterion {criterion})")
    cfg.check_model(adapter.num_layers, adapter.num_heads, adapter.attention_layers)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        png = os.path.join(output_dir, HEATMAP_PNG)
        from .viz import plot_head_heatmap

        plot_head_heatmap(head_matrix, path=png, selected=selected, chosen_layers=[best], layers=layers, heads=heads,
                          label=f"{stat} {score} (relative, per-head norm)",
                          title=f"top-{k_eff} heads (white) by {rank_by}; masked layer {best} (red)")
        cfg.calibration["heatmap"] = HEATMAP_PNG
        cfg.save_pretrained(output_dir)
    if search is not None and search is not False:
        from .tuning import search_knockout

        res = search_knockout(model, processor, dataset, cfg, space=search, split_group=used_group or split_group,
                              batch_size=batch_size, progress=progress,
                              output_dir=None if output_dir is None else os.path.join(output_dir, "search"))
        cfg = res.config
        if output_dir is not None:
            cfg.save_pretrained(output_dir)
    return cfg


# ``hf_vgrefine.calibrate`` is both this module and the function: importing the submodule makes Python bind
# the package attribute ``calibrate`` to the module, so ``from hf_vgrefine import calibrate`` can give either.
# The module is made callable (and introspectable) as the function, so ``calibrate(model, ...)`` always works.
class _CallableModule(type(sys.modules[__name__])):
    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(calibrate)


sys.modules[__name__].__class__ = _CallableModule
