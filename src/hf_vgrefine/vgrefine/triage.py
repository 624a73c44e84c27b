"""Step I of VGRefine (attention triage): relative attention of the sensitive heads → knocked-out tokens.

Pure tensor functions (no model, no host read: they run on the maps' device and never synchronise):
given captured question-prompt maps and generic-prompt maps, compute the triage score ``s`` over the ``N``
image tokens and the knockout set ``K``. Leading batch axes are allowed everywhere.
"""

from __future__ import annotations

import math

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
    """Triage score ``s`` ``[..., N]`` (fp32).

    ``question``/``generic``: ``[..., n_layers, H, N]`` probabilities captured at ``layers`` (all heads).
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
        a = q[..., i, :, :].mean(-2)
        return (a / (g[..., i, :, :].mean(-2) + config.eps) if config.generic_norm != "none" else a).float()
    H = q.shape[-2]
    li = _index([idx[l] for l, _ in config.sensitive_heads], q.device)
    flat = _index([idx[l] * H + h for l, h in config.sensitive_heads], q.device)
    a = q.flatten(-3, -2).index_select(-2, flat)                   # [..., k, N]
    if config.generic_norm == "layer_mean":
        a = a / (g.mean(-2).index_select(-2, li) + config.eps)
    elif config.generic_norm == "per_head":
        a = a / (g.flatten(-3, -2).index_select(-2, flat) + config.eps)
    return a.mean(-2).float()


def _index(values: list, device) -> torch.Tensor:
    """Long index tensor on ``device`` (an asynchronous host-to-device copy, never a synchronisation)."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def knockout_set(scores: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[..., N]`` knock-out mask (True = blocked) and the threshold used (``[...]``, float64).

    Percentile mode: ``tau = quantile(s, P/100)`` (linear interpolation, = ``numpy.percentile``) and
    ``K = {i : s_i < tau}`` (strict). Magnitude mode: ``K = {i : (s_i - min)/(max - min) < t}``.
    Non-finite scores count as ``+inf`` (always kept); a constant map gives ``K = {}`` (threshold NaN);
    :func:`triage_flags` reports both. ``config.zero_division == "notebook"``: :func:`notebook_knockout_set`.
    """
    if getattr(config, "zero_division", "eps") == "notebook":
        return notebook_knockout_set(scores, config)
    s = scores.double()
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, math.inf))
    N = s.shape[-1]
    if config.percentile is not None:
        v = torch.sort(s, dim=-1).values
        pos = float(config.percentile) / 100.0 * (N - 1)
        lo = int(pos // 1)
        hi = min(lo + 1, N - 1)
        frac = pos - lo
        v_lo, v_hi = v[..., lo], v[..., hi]
        tau = v_lo if frac == 0 else torch.where(v_hi == v_lo, v_lo, v_lo + (v_hi - v_lo) * frac)
        return s < tau[..., None], tau
    fin = torch.isfinite(s)
    lo = torch.where(fin, s, torch.full_like(s, math.inf)).amin(-1, keepdim=True)
    hi = torch.where(fin, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True)
    varies = hi > lo                                               # False: constant map or nothing finite
    t = float(config.magnitude_threshold)
    K = ((s - lo) / torch.where(varies, hi - lo, torch.ones_like(hi)) < t) & varies
    tau = torch.where(varies[..., 0], torch.full_like(s[..., 0], t), torch.full_like(s[..., 0], math.nan))
    return K, tau


def notebook_knockout_set(scores: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The knockout rule as the submission notebook ``eval_RAD.ipynb`` runs it (``zero_division="notebook"``).

    Scores come from plain division ``a / g`` (``eps=0``): 0/0 gives NaN, x/0 gives inf. The threshold is
    ``numpy.percentile`` over **all** scores (NaN propagates: tau = NaN) and ``K = {i : s_i < tau}``, so a
    single NaN score means no token is knocked out. Magnitude mode: ``(s - min) / (max - min) < t`` with
    numpy's NaN propagation. Runs numpy on the host (a faithful-reproduction path, not the fast one).
    """
    import numpy as np

    flat = scores.detach().to("cpu").double().reshape(-1, scores.shape[-1]).numpy()
    Ks, taus = [], []
    with np.errstate(invalid="ignore", divide="ignore"):
        for s in flat:
            if config.percentile is not None:
                tau = float(np.percentile(s, float(config.percentile)))
                K = s < tau
            else:
                tau = float(config.magnitude_threshold)
                K = (s - s.min()) / (s.max() - s.min()) < tau
            Ks.append(torch.from_numpy(np.asarray(K)))
            taus.append(tau)
    K = torch.stack(Ks).reshape(scores.shape).to(scores.device)
    tau = torch.tensor(taus, dtype=torch.float64).reshape(scores.shape[:-1]).to(scores.device)
    return K, tau


def triage_flags(scores: torch.Tensor, config) -> list:
    """Warnings about one sample's scores ``[N]``: non-finite entries, constant map (reads the host)."""
    flags = []
    s = scores.double()
    if getattr(config, "zero_division", "eps") == "notebook":
        n_nan = int(torch.isnan(s).sum())
        return [f"nan_scores_no_knockout:{n_nan}"] if n_nan else []
    finite = torch.isfinite(s)
    n_bad = int((~finite).sum())
    if n_bad:
        flags.append(f"non_finite_scores:{n_bad}")
    if config.percentile is None:
        fin = s[finite]
        if fin.numel() == 0 or bool(fin.max() == fin.min()):
            flags.append("constant_map_no_knockout")
    return flags
