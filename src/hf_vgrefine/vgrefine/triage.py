"""Step I of VGRefine (attention triage): relative attention of the sensitive heads → knocked-out tokens.

Pure tensor functions (no model): given captured question-prompt maps and generic-prompt maps of one
sample, compute the triage score ``s`` over the ``N`` image tokens and the knockout set ``K``.
"""

from __future__ import annotations

import torch


def released_numerics(maps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Attention maps as the released code holds them: cast to the model's ``dtype`` (bf16 on GPU), so that
    every later average over heads (``maps.mean(dim)``) and division runs in that dtype
    (``VGRefineConfig.attention_dtype="model"``)."""
    return maps.to(dtype)


def head_mean(maps: torch.Tensor, dtype: torch.dtype | None = None, dim: int = -2) -> torch.Tensor:
    """Mean over the head axis ``dim``; with ``dtype`` the maps are first cast to it and averaged in it
    (torch's reduction of a bf16 tensor, as the released ``attn.mean(dim=1)``), else in fp32."""
    return (maps.float() if dtype is None else released_numerics(maps, dtype)).mean(dim)


def triage_scores(question: torch.Tensor, generic: torch.Tensor | None, layers: list, config,
                  model_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triage score ``s`` ``[N]`` (fp32) of one sample.

    ``question``/``generic``: ``[n_layers, H, N]`` probabilities captured at ``layers`` (all heads).
    ``heads`` triage: ``s = mean_{(l,h) in S} a[l,h] / (g + eps)`` with ``g`` the layer-mean generic map
    (``generic_norm="layer_mean"``, as released), the same head's generic map (``"per_head"``) or 1 (``"none"``).
    ``layer`` triage: the layer-mean map of ``att_map_layer``, normalised by the layer-mean generic map.
    With ``config.attention_dtype == "model"`` and ``model_dtype`` given, the maps are cast to ``model_dtype``
    and averaged/divided in it (:func:`released_numerics`); the result is returned as fp32.
    """
    idx = {l: i for i, l in enumerate(layers)}
    in_model = getattr(config, "attention_dtype", "float32") == "model" and model_dtype is not None
    cast = (lambda t: released_numerics(t, model_dtype)) if in_model else (lambda t: t.float())
    q = cast(question)
    g = cast(generic) if generic is not None else None
    if config.generic_norm != "none" and g is None:
        raise ValueError("generic-prompt maps are required unless generic_norm='none'")
    if config.triage_source == "layer":
        i = idx[config.att_map_layer]
        a = q[i].mean(0)
        return (a / (g[i].mean(0) + config.eps) if config.generic_norm != "none" else a).float()
    rel = []
    for l, h in config.sensitive_heads:
        a = q[idx[l], h]
        if config.generic_norm == "layer_mean":
            a = a / (g[idx[l]].mean(0) + config.eps)
        elif config.generic_norm == "per_head":
            a = a / (g[idx[l], h] + config.eps)
        rel.append(a)
    return torch.stack(rel).mean(0).float()


def knockout_set(scores: torch.Tensor, config) -> tuple[torch.Tensor, float, list]:
    """Boolean ``[N]`` knock-out mask (True = blocked), the threshold used, and flags.

    Percentile mode: ``tau = quantile(s, P/100)`` (linear interpolation, = ``numpy.percentile``) and
    ``K = {i : s_i < tau}`` (strict). Magnitude mode: ``K = {i : (s_i - min)/(max - min) < t}``.
    Non-finite scores count as ``+inf`` (always kept); a constant map gives ``K = {}``; both are flagged.
    ``config.zero_division == "notebook"``: :func:`notebook_knockout_set` instead.
    """
    if getattr(config, "zero_division", "eps") == "notebook":
        return notebook_knockout_set(scores, config)
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


def notebook_knockout_set(scores: torch.Tensor, config) -> tuple[torch.Tensor, float, list]:
    """The knockout rule as the submission notebook ``eval_RAD.ipynb`` runs it (``zero_division="notebook"``).

    Scores come from plain division ``a / g`` (``eps=0``): 0/0 gives NaN, x/0 gives inf. The threshold is
    ``numpy.percentile`` over **all** scores (NaN propagates: tau = NaN) and ``K = {i : s_i < tau}``, so a
    single NaN score means no token is knocked out. Magnitude mode: ``(s - min) / (max - min) < t`` with
    numpy's NaN propagation. Flagged ``nan_scores_no_knockout:<n>`` when NaN scores emptied ``K``.
    """
    import numpy as np

    s = scores.detach().to("cpu").double().numpy()
    flags = []
    n_nan = int(np.isnan(s).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        if config.percentile is not None:
            tau = float(np.percentile(s, float(config.percentile)))
            K = s < tau
        else:
            tau = float(config.magnitude_threshold)
            K = (s - s.min()) / (s.max() - s.min()) < tau
    if n_nan:
        flags.append(f"nan_scores_no_knockout:{n_nan}")
    return torch.from_numpy(K).to(scores.device), tau, flags
