"""Step I of VGRefine (attention triage): relative attention of the sensitive heads → knocked-out tokens.

Pure tensor functions (no model): given captured question-prompt maps and generic-prompt maps of one
sample, compute the triage score ``s`` over the ``N`` image tokens and the knockout set ``K``.
"""

from __future__ import annotations

import torch


def triage_scores(question: torch.Tensor, generic: torch.Tensor | None, layers: list, config) -> torch.Tensor:
    """Triage score ``s`` ``[N]`` (fp32) of one sample.

    ``question``/``generic``: ``[n_layers, H, N]`` probabilities captured at ``layers`` (all heads).
    ``heads`` triage: ``s = mean_{(l,h) in S} a[l,h] / (g + eps)`` with ``g`` the layer-mean generic map
    (``generic_norm="layer_mean"``, as released), the same head's generic map (``"per_head"``) or 1 (``"none"``).
    ``layer`` triage: the layer-mean map of ``att_map_layer``, normalised by the layer-mean generic map.
    """
    idx = {l: i for i, l in enumerate(layers)}
    q = question.float()
    g = generic.float() if generic is not None else None
    if config.generic_norm != "none" and g is None:
        raise ValueError("generic-prompt maps are required unless generic_norm='none'")
    if config.triage_source == "layer":
        i = idx[config.att_map_layer]
        a = q[i].mean(0)
        return a / (g[i].mean(0) + config.eps) if config.generic_norm != "none" else a
    rel = []
    for l, h in config.sensitive_heads:
        a = q[idx[l], h]
        if config.generic_norm == "layer_mean":
            a = a / (g[idx[l]].mean(0) + config.eps)
        elif config.generic_norm == "per_head":
            a = a / (g[idx[l], h] + config.eps)
        rel.append(a)
    return torch.stack(rel).mean(0)


def knockout_set(scores: torch.Tensor, config) -> tuple[torch.Tensor, float, list]:
    """Boolean ``[N]`` knock-out mask (True = blocked), the threshold used, and flags.

    Percentile mode: ``tau = quantile(s, P/100)`` (linear interpolation, = ``numpy.percentile``) and
    ``K = {i : s_i < tau}`` (strict). Magnitude mode: ``K = {i : (s_i - min)/(max - min) < t}``.
    Non-finite scores count as ``+inf`` (always kept); a constant map gives ``K = {}``; both are flagged.
    """
    flags = []
    s = scores.double()
    finite = torch.isfinite(s)
    if not bool(finite.all()):
        flags.append(f"non_finite_scores:{int((~finite).sum())}")
        s = torch.where(finite, s, torch.full_like(s, float("inf")))
    if config.percentile is not None:
        v, _ = torch.sort(s)
        pos = float(config.percentile) / 100.0 * (len(v) - 1)
        lo, hi = int(pos // 1), min(int(pos // 1) + 1, len(v) - 1)
        frac = pos - lo
        tau = v[lo] if frac == 0 or v[hi] == v[lo] else v[lo] + (v[hi] - v[lo]) * frac
        K = s < tau
        return K, float(tau), flags
    fin = s[torch.isfinite(s)]
    lo, hi = (fin.min(), fin.max()) if fin.numel() else (torch.tensor(0.0), torch.tensor(0.0))
    if hi == lo:
        flags.append("constant_map_no_knockout")
        return torch.zeros_like(s, dtype=torch.bool), float("nan"), flags
    norm = (s - lo) / (hi - lo)
    return norm < float(config.magnitude_threshold), float(config.magnitude_threshold), flags
