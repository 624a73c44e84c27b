"""Attention capture and attention-logit biasing through one registered attention function.

The package registers ``"vgrefine"`` in ``transformers.AttentionInterface`` (and ``sdpa_mask`` under the same
name in ``AttentionMaskInterface``, so layers keep receiving their causal/padding/bidirectional masks).
The function always lets SDPA compute the layer output; when a :class:`_State` is active (a
``contextvars.ContextVar`` set by :class:`AttentionProbe`) it additionally

* **captures** post-softmax probabilities, in fp32, of chosen query rows x chosen heads of chosen layers,
  gathered at the image-key columns — the same numbers eager ``output_attentions=True`` gives at those
  rows/columns, without materialising ``T x T`` maps; optionally stops the forward after the last needed
  layer (early exit);
* **biases** attention logits of chosen (layer, sample, query rows, key columns) — :class:`KeyBias`;
  a ``-inf`` bias is applied as a boolean mask composed (AND) with the mask the layer received, so the
  kernel stays SDPA and blocked keys get exactly zero probability.

Shapes: ``query`` ``[B, H, q, d]``; ``key``/``value`` ``[B, H_kv, kv, d]`` (cache included); masks
``[B|1, 1, q, kv]`` (bool = allowed, or additive float) or ``None`` (plain causal).
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field

import torch

ATTN_NAME = "vgrefine"
_STATE: contextvars.ContextVar = contextvars.ContextVar("hf_vgrefine_attention_state", default=None)
_REGISTERED = False


class _EarlyExit(Exception):
    """Raised by the attention function after the last layer a capture needs (caught by the caller)."""


# --------------------------------------------------------------------------------------------- state
@dataclass
class KeyBias:
    """Additive bias on attention logits (before softmax).

    For sample ``batch_index`` (index into the batch given to the probe; beam/sample expansion of
    ``generate`` is followed automatically), in every layer of ``layers``, query rows at absolute
    positions ``[row_start, row_stop)`` (``row_stop=None``: open-ended, decode steps included) get
    ``value`` added on the logits of key positions ``cols``. ``value=-inf`` blocks those keys exactly.
    ``heads=None``: all query heads. ``prefill_only=True``: only applied when the query length is > 1.
    A bias of ``0.0`` is a no-op and is skipped.
    """

    layers: tuple
    batch_index: int
    row_start: int
    row_stop: int | None
    cols: torch.Tensor
    value: float = -math.inf
    heads: tuple | None = None
    prefill_only: bool = False

    def __post_init__(self):
        self.layers = tuple(int(x) for x in self.layers)
        self.cols = torch.as_tensor(self.cols, dtype=torch.long).flatten()
        if self.heads is not None:
            self.heads = tuple(int(h) for h in self.heads)


@dataclass
class _CapturePlan:
    layers: frozenset
    heads: torch.Tensor | None          # [h_sel] query-head indices, None = all
    rows: torch.Tensor                  # [B, r] absolute query positions
    row_weights: torch.Tensor           # [B, r] averaging weights (rows sum to 1)
    cols: torch.Tensor                  # [B, N] absolute key positions (padded with 0)
    stop_after: int | None
    after_bias: bool = True
    record_kv_below: int = 0             # also keep (key, value) of every layer < this (prefix sharing)
    captured: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)


@dataclass
class _State:
    capture: _CapturePlan | None = None
    biases: list = field(default_factory=list)
    batch_size: int | None = None
    bias_enabled: bool = True
    replace_mask: bool = False                  # reference semantics: fresh causal mask in biased layers
    calls: dict = field(default_factory=dict)   # layer -> number of biased calls (diagnostics)

    def biases_for(self, layer: int, q_len: int):
        if not self.bias_enabled:
            return []
        return [b for b in self.biases if layer in b.layers and b.value != 0.0 and not (b.prefill_only and q_len == 1)]


def current_state() -> _State | None:
    """The active probe state (``None`` outside any :class:`AttentionProbe`)."""
    return _STATE.get()


# --------------------------------------------------------------------------------------------- masks
def _q_offset(attention_mask, q: int, kv: int) -> int:
    """Absolute position of query row 0 (static-cache prefill without mask is upper-left aligned)."""
    if attention_mask is None and q > 1 and kv > q:
        return 0
    return kv - q


def allowed_matrix(attention_mask, q: int, kv: int, device) -> torch.Tensor:
    """Boolean ``[B|1, 1, q, kv]``: True where the layer's own mask lets query row attend to key."""
    if attention_mask is None:
        off = _q_offset(None, q, kv)
        i = torch.arange(q, device=device)[:, None] + off
        j = torch.arange(kv, device=device)[None, :]
        return (j <= i)[None, None]
    m = attention_mask[..., :kv]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def _expand_index(state: _State, B: int) -> int:
    """Repeat factor between the probe's batch and the layer's batch (beam search / num_return_sequences)."""
    base = state.batch_size or B
    if B % base:
        raise RuntimeError(f"attention batch {B} is not a multiple of the probed batch {base}")
    return B // base


def _compose(attention_mask, biases, query, kv: int, state: _State):
    B, H, q, _ = query.shape
    rep = _expand_index(state, B)
    if state.replace_mask:
        if B != 1:
            raise RuntimeError("compose_with_model_mask=False (faithful mask replacement) supports batch size 1 only")
        attention_mask = None
    off = _q_offset(attention_mask, q, kv)
    allowed = allowed_matrix(attention_mask, q, kv, query.device)
    hard = all(math.isinf(b.value) and b.value < 0 and b.heads is None for b in biases)
    if hard:
        mask = allowed.expand(B, 1, q, kv).clone()
    else:
        neg = torch.finfo(query.dtype).min
        mask = torch.zeros(B, H, q, kv, dtype=query.dtype, device=query.device)
        mask.masked_fill_(~allowed.expand(B, H, q, kv), neg)
    for bias in biases:
        r0 = max(bias.row_start - off, 0)
        r1 = q if bias.row_stop is None else min(bias.row_stop - off, q)
        if r1 <= r0:
            continue
        cols = bias.cols.to(query.device)
        cols = cols[cols < kv]
        rows_b = range(bias.batch_index * rep, (bias.batch_index + 1) * rep)
        for b in rows_b:
            if hard:
                mask[b, 0, r0:r1, cols] = False
                continue
            val = neg if math.isinf(bias.value) and bias.value < 0 else bias.value
            for h in (range(H) if bias.heads is None else bias.heads):
                block = mask[b, h, r0:r1]                      # view [r, kv]
                block[:, cols] = (block[:, cols] + val).clamp_min(neg)
    return mask


# --------------------------------------------------------------------------------------------- capture
def _capture(module, query, key, attention_mask, scaling, plan: _CapturePlan, state: _State, kw):
    B, H, q, d = query.shape
    kv = key.shape[2]
    off = _q_offset(attention_mask, q, kv)
    rep = _expand_index(state, B)
    rows = plan.rows.to(query.device).repeat_interleave(rep, 0) - off          # [B, r] local rows
    cols = plan.cols.to(query.device).repeat_interleave(rep, 0)               # [B, N]
    weights = plan.row_weights.to(query.device).repeat_interleave(rep, 0)     # [B, r]
    heads = plan.heads.to(query.device) if plan.heads is not None else torch.arange(H, device=query.device)
    groups = H // key.shape[1]
    r = rows.shape[1]
    q_sel = query[:, heads].gather(2, rows[:, None, :, None].expand(B, heads.numel(), r, d))    # [B, h, r, d]
    k_sel = key[:, heads // groups]                                                          # [B, h, kv, d]
    scores = torch.matmul(q_sel.float(), k_sel.float().transpose(-1, -2)) * float(scaling)   # [B, h, r, kv]
    softcap = kw.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:            # plain causal: only the captured rows are built, [B, 1, r, kv]
        ok_rows = (torch.arange(kv, device=query.device) <= (rows + off)[:, :, None])[:, None]
    elif attention_mask.shape[1] != 1:    # per-head float mask (soft bias path)
        add = attention_mask[:, heads, :, :kv].expand(B, -1, q, kv).gather(
            2, rows[:, None, :, None].expand(B, heads.numel(), r, kv))
        ok_rows = allowed_matrix(add, r, kv, query.device)
        scores = scores + torch.where(ok_rows, add.float(), torch.zeros_like(add, dtype=torch.float32))
    else:
        m_rows = attention_mask[..., :kv].expand(B, 1, q, kv).gather(2, rows[:, None, :, None].expand(B, 1, r, kv))
        ok_rows = allowed_matrix(m_rows, r, kv, query.device)
        if m_rows.dtype != torch.bool:
            scores = scores + torch.where(ok_rows, m_rows.float(), torch.zeros_like(m_rows, dtype=torch.float32))
    probs = scores.masked_fill(~ok_rows, float("-inf")).softmax(-1)
    probs = torch.nan_to_num(probs, nan=0.0)                                   # fully masked (padding) rows
    img = probs.gather(-1, cols[:, None, None, :].expand(B, heads.numel(), r, cols.shape[1]))  # [B, h, r, N]
    plan.captured[module.layer_idx] = (img * weights[:, None, :, None]).sum(2)                # [B, h, N]


# --------------------------------------------------------------------------------------------- the function
def vgrefine_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered attention function: SDPA output, plus capture/bias when a probe state is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _STATE.get()
    layer = getattr(module, "layer_idx", None)
    if state is None or layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, kv = query.shape[2], key.shape[2]
    biases = state.biases_for(layer, q_len)
    plan = state.capture
    capture_here = plan is not None and layer in plan.layers and q_len > 1
    if plan is not None and layer < plan.record_kv_below and q_len > 1:
        plan.kv[layer] = (key, value)
    if capture_here and not plan.after_bias:
        _capture(module, query, key, attention_mask, scaling, plan, state, kwargs)
    if biases:
        attention_mask = _compose(attention_mask, biases, query, kv, state)
        state.calls[layer] = state.calls.get(layer, 0) + 1
    if capture_here and plan.after_bias:
        _capture(module, query, key, attention_mask, scaling, plan, state, kwargs)
    if capture_here and plan.stop_after == layer:
        raise _EarlyExit
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register_attention() -> str:
    """Register ``"vgrefine"`` in both transformers registries (idempotent). Returns the name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(ATTN_NAME, vgrefine_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _REGISTERED = True
    return ATTN_NAME


# --------------------------------------------------------------------------------------------- probe
class AttentionProbe:
    """Context manager: switch the text decoder to ``"vgrefine"`` attention and activate a state.

    On exit (also after an exception) the state is cleared and the model's original attention
    implementation of the text decoder is restored. Nesting is supported (inner probes replace the state
    while active). ``biases``: list of :class:`KeyBias`; ``batch_size``: the batch the sample indices of
    biases/capture refer to (``generate`` may expand it for beams).
    """

    def __init__(self, model, biases=None, batch_size: int | None = None, adapter=None):
        from .adapters import get_adapter

        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.state = _State(biases=list(biases or []), batch_size=batch_size)
        self._token = None
        self._previous = None

    def _text_impl(self):
        return getattr(self.adapter.text_config, "_attn_implementation", None)

    def __enter__(self):
        register_attention()
        self._previous = self._text_impl()
        if self._previous != ATTN_NAME:
            self.model.set_attn_implementation(self.adapter.text_attn_target(ATTN_NAME))
        self._token = _STATE.set(self.state)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._token is not None:
            _STATE.reset(self._token)
            self._token = None
        if self._previous != ATTN_NAME and self._previous is not None:
            self.model.set_attn_implementation(self.adapter.text_attn_target(self._previous))
        return False


# --------------------------------------------------------------------------------------------- capture API
@dataclass
class CapturedAttention:
    """Captured attention to image tokens.

    ``maps``: float32 ``[batch, n_layers, n_heads, n_max]`` post-softmax probabilities (over the full key
    sequence, not renormalised) from the chosen query rows to each sample's image tokens, NaN-padded past
    ``n_tokens[b]``. Several images in one sample: their grid tokens are concatenated in sequence order
    (``spans[b]`` gives each image's size). ``layers``/``heads``: the indices the axes refer to.
    """

    maps: torch.Tensor
    layers: list
    heads: list
    n_tokens: list
    spans: list
    prefix: dict | None = None

    def sample(self, b: int) -> torch.Tensor:
        """``[n_layers, n_heads, n_tokens[b]]`` for sample ``b``."""
        return self.maps[b, ..., : self.n_tokens[b]]

    def layer_mean(self) -> torch.Tensor:
        """Mean over the captured heads: ``[batch, n_layers, n_max]``."""
        return self.maps.mean(2)


def _query_rows(query, input_ids, attention_mask, spans, past: int = 0):
    """Absolute query rows ``[B, r]`` and their averaging weights; ``past`` = cached tokens before ``input_ids``."""
    B, T = input_ids.shape
    if past:
        if not (isinstance(query, str) and query == "last"):
            raise ValueError("with a cache only query='last' is supported")
        return torch.full((B, 1), past + T - 1, dtype=torch.long), torch.ones(B, 1)
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention capture needs left padding (the last column of attention_mask must be 1 for "
                         "every sample): set processor.tokenizer.padding_side = 'left'")
    if isinstance(query, str) and query == "last":
        rows = torch.full((B, 1), T - 1, dtype=torch.long)
        return rows, torch.ones(B, 1)
    if isinstance(query, str) and query == "post_image":
        v_end = [max(s.end for s in sp) for sp in spans]
        start = min(v_end)
        rows = torch.arange(start, T)[None].expand(B, -1).clone()
        w = torch.stack([(torch.arange(start, T) >= v).float() for v in v_end])
        if (w.sum(1) == 0).any():
            raise ValueError("query='post_image' needs at least one token after the image in every sample")
        return rows, w / w.sum(1, keepdim=True)
    if isinstance(query, str):
        raise ValueError(f"query must be 'last', 'post_image' or explicit positions, got {query!r}")
    q = [torch.as_tensor(x, dtype=torch.long).flatten() for x in (query if isinstance(query, (list, tuple)) and
                                                                   len(query) == B and not isinstance(query[0], int)
                                                                   else [query] * B)]
    r = max(len(x) for x in q)
    rows = torch.full((B, r), T - 1, dtype=torch.long)
    w = torch.zeros(B, r)
    for b, x in enumerate(q):
        x = torch.where(x < 0, x + T, x)
        if len(x) == 0 or (x < 0).any() or (x >= T).any():
            raise ValueError(f"query positions for sample {b} must be non-empty and within [0, {T})")
        rows[b, : len(x)] = x
        w[b, : len(x)] = 1.0 / len(x)
    return rows, w


def _check_indices(name, values, limit):
    bad = [v for v in values if not 0 <= v < limit]
    if bad:
        raise ValueError(f"{name} {bad} out of range: the model has {limit} (valid 0..{limit - 1})")


def capture_image_attention(model, inputs: dict, layers=None, heads=None, query="last", early_exit: bool = True,
                            spans=None, adapter=None, biases=None, record_prefix: int = 0,
                            record_kv: int = 0, cache=None) -> CapturedAttention:
    """Attention from query rows to image tokens, per layer and head, on SDPA.

    ``inputs``: the processor's model inputs (left-padded batch). ``layers``/``heads``: 0-based indices
    (``None`` = all); ``query``: ``"last"`` (row ``T-1``), ``"post_image"`` (mean over rows ``[v_end, T)``)
    or explicit positions (one list for all samples, or one per sample; averaged). ``early_exit``: stop
    the forward after the deepest captured layer (no logits computed). ``biases``: optional
    :class:`KeyBias` list active during the capture (post-bias probabilities are captured).
    ``record_prefix=n``: also keep every layer ``< n``'s keys/values and layer ``n-1``'s output hidden
    states (``result.prefix = {"kv": {layer: (k, v)}, "hidden": [B, T, D]}``) so that a later prefill of the
    same inputs can resume at layer ``n`` (see :class:`PrefixReplay`). ``record_kv=m``: keep keys/values of
    every layer ``< m`` too (``result.prefix["kv"]``). ``cache``: a filled ``transformers`` cache the
    inputs continue (then ``inputs`` hold only the new tokens plus the full 2-D ``attention_mask``, query
    and image positions are absolute, i.e. counted from the start of the cached sequence).
    Returns :class:`CapturedAttention` with ``maps [B, n_layers, n_heads, n_max]``.
    """
    from .adapters import get_adapter

    adapter = adapter or get_adapter(model)
    L, H = adapter.num_layers, adapter.num_heads
    layers = list(range(L)) if layers is None else sorted({int(x) for x in layers})
    heads = list(range(H)) if heads is None else [int(h) for h in heads]
    _check_indices("layers", layers, L)
    _check_indices("heads", heads, H)
    input_ids = inputs["input_ids"]
    B = input_ids.shape[0]
    past = cache.get_seq_length() if cache is not None else 0
    if past and spans is None:
        raise ValueError("with a cache, pass the image spans of the cached sequence (spans=...)")
    spans = spans if spans is not None else adapter.image_spans(inputs)
    positions = [torch.cat([s.positions for s in sp]) for sp in spans]
    n_tokens = [len(p) for p in positions]
    cols = torch.zeros(B, max(n_tokens), dtype=torch.long)
    for b, p in enumerate(positions):
        cols[b, : len(p)] = p
    rows, weights = _query_rows(query, input_ids, inputs.get("attention_mask"), spans, past)
    stop = max(layers + [record_prefix]) if record_prefix else max(layers)
    if record_prefix and stop >= L:
        raise ValueError(f"record_prefix={record_prefix} must be < the number of layers ({L})")
    plan = _CapturePlan(layers=frozenset(layers) | ({stop} if record_prefix else frozenset()),
                        heads=torch.tensor(heads), rows=rows, row_weights=weights, cols=cols,
                        stop_after=stop if (early_exit or record_prefix) else None,
                        record_kv_below=max(record_prefix, record_kv))
    probe = AttentionProbe(model, biases=biases, batch_size=B, adapter=adapter)
    probe.state.capture = plan
    kwargs = dict(inputs)
    kwargs["use_cache"] = cache is not None
    if cache is not None:
        import inspect

        kwargs["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"] = cache
    if not early_exit:
        kwargs["logits_to_keep"] = 1
    hidden = {}
    hook = None
    if record_prefix:
        hook = adapter.decoder_layers[record_prefix - 1].register_forward_hook(
            lambda mod, args, out: hidden.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad(), probe:
            try:
                model(**kwargs)
            except _EarlyExit:
                pass
    finally:
        if hook is not None:
            hook.remove()
    missing = [l for l in layers if l not in plan.captured]
    if missing:
        raise RuntimeError(f"layers {missing} were not captured: the model's text attention did not go through the "
                           "registered function (is the text decoder using attn_implementation='vgrefine'?)")
    maps = torch.stack([plan.captured[l] for l in layers], 1).float()   # [B, L_sel, H_sel, N]
    for b, n in enumerate(n_tokens):
        maps[b, ..., n:] = float("nan")
    prefix = None
    if record_prefix or record_kv:
        prefix = {"kv": plan.kv, "hidden": hidden.get("h"), "n_layers": record_prefix}
    return CapturedAttention(maps=maps, layers=layers, heads=heads, n_tokens=n_tokens, spans=spans, prefix=prefix)


# --------------------------------------------------------------------------------------------- prefix replay
class _ReplayLayer(torch.nn.Module):
    """Stands in for decoder layer ``i < n`` during one prefill: writes the recorded keys/values into the
    cache and (for layer ``n-1``) returns the recorded output; any other call runs the real layer."""

    def __init__(self, inner, layer_idx: int, kv, hidden, seq_len: int):
        super().__init__()
        self.inner = inner
        self._replay = {"layer_idx": layer_idx, "kv": kv, "hidden": hidden, "T": seq_len, "armed": True}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states, *args, **kwargs):
        r = self._replay
        if not (r["armed"] and hidden_states.shape[1] == r["T"]):
            return self.inner(hidden_states, *args, **kwargs)
        r["armed"] = False
        rep = hidden_states.shape[0] // r["kv"][0].shape[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            k, v = r["kv"]
            cache.update(k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0), r["layer_idx"])
        if r["hidden"] is None:
            return hidden_states
        return r["hidden"].to(hidden_states.dtype).repeat_interleave(rep, 0)


class PrefixReplay:
    """Context manager: the next prefill of the same inputs starts at layer ``n`` from a recorded prefix.

    Layers ``< n`` of the text decoder are temporarily replaced (restored on exit, also after an exception)
    by stand-ins that write the recorded keys/values into the generation cache and hand over the recorded
    hidden states; decode steps run the real layers. Valid only when the recorded pass saw exactly the
    same inputs (ids, mask, images, position ids) and no bias below layer ``n``.
    """

    def __init__(self, adapter, prefix: dict, seq_len: int):
        self.layers = adapter.decoder_layers
        self.prefix = prefix
        self.T = seq_len
        self._orig = []

    def __enter__(self):
        n = self.prefix["n_layers"]
        self._orig = [self.layers[i] for i in range(n)]
        for i in range(n):
            hidden = self.prefix["hidden"] if i == n - 1 else None
            self.layers[i] = _ReplayLayer(self._orig[i], i, self.prefix["kv"][i], hidden, self.T)
        return self

    def __exit__(self, *exc):
        for i, layer in enumerate(self._orig):
            self.layers[i] = layer
        self._orig = []
        return False

    def all_used(self) -> bool:
        return all(not self.layers[i]._replay["armed"] for i in range(len(self._orig)))
