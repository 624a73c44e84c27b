"""Attention capture and attention blocking through one registered attention function.

The package registers ``"vgrefine"`` in ``transformers.AttentionInterface`` (and ``sdpa_mask`` under the same
name in ``AttentionMaskInterface``, so layers keep receiving their causal/padding/bidirectional masks).
The function always lets SDPA compute the layer output; when a :class:`_State` is active (a
``contextvars.ContextVar`` set by :class:`AttentionProbe`) it additionally

* **captures** post-softmax probabilities, in fp32, of chosen query rows x chosen heads of chosen layers,
  gathered at the image-key columns — the same numbers eager ``output_attentions=True`` gives at those
  rows/columns, without materialising ``T x T`` maps; optionally stops the forward after the last needed
  layer (early exit);
* **blocks** keys: :class:`KeyBlock` (batched, device tensors: the knockout) removes chosen (query row, key)
  pairs; :class:`KeyBias` adds a per-sample bias (finite or ``-inf``) on chosen key columns. Blocks are
  applied as a boolean mask composed (AND) with the mask the layer received, so the kernel stays SDPA and
  blocked keys get exactly zero probability.

Every tensor the function builds lives on the device of the layer's ``query`` (layers may sit on different
devices under ``device_map``); masks are built once per (layer mask, shape, device) and reused by every
layer that receives the same mask. While ``torch.compile``/``torch.export`` trace the model, the function is
plain SDPA (no state lookup), so a model left on ``"vgrefine"`` compiles with ``fullgraph=True``.

Shapes: ``query`` ``[B, H, q, d]``; ``key``/``value`` ``[B, H_kv, kv, d]`` (cache included); masks
``[B|1, 1, q, kv]`` (bool = allowed, or additive float) or ``None`` (plain causal).
"""

from __future__ import annotations

import contextvars
import math
import weakref
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTN_NAME = "vgrefine"
_STATE: contextvars.ContextVar = contextvars.ContextVar("hf_vgrefine_attention_state", default=None)
_REGISTERED = False


class EarlyExit(Exception):
    """Raised by the attention function after the last layer a capture needs (caught by the caller)."""


# --------------------------------------------------------------------------------------------- blocks
@dataclass
class KeyBias:
    """Additive bias on attention logits (before softmax) of one sample.

    For sample ``batch_index`` (index into the batch given to the probe; beam/sample expansion of
    ``generate`` is followed automatically), in every layer of ``layers``, query rows at absolute
    positions ``[row_start, row_stop)`` (``row_stop=None``: open-ended, decode steps included) get
    ``value`` added on the logits of key positions ``cols``. ``value=-inf`` blocks those keys exactly.
    ``heads=None``: all query heads. A bias of ``0.0`` is a no-op and is skipped.
    """

    layers: tuple
    batch_index: int
    row_start: int
    row_stop: int | None
    cols: torch.Tensor
    value: float = -math.inf
    heads: tuple | None = None

    def __post_init__(self):
        self.layers = tuple(int(x) for x in self.layers)
        self.cols = torch.as_tensor(self.cols, dtype=torch.long).flatten()
        if self.heads is not None:
            self.heads = tuple(int(h) for h in self.heads)

    def applies(self, layer: int) -> bool:
        return layer in self.layers and self.value != 0.0


@dataclass(eq=False)
class KeyBlock:
    """Batched hard block (the knockout): query rows at absolute positions ``row_lo[b] <= i < row_hi[b]``
    may not attend to the keys ``j`` with ``keys[b, j]`` True, in every layer of ``layers``.

    ``row_lo``: long ``[B]``; ``row_hi``: long ``[B]`` or ``None`` (open-ended: decode steps too);
    ``keys``: bool ``[B, K]`` (positions ``>= K`` are never blocked); ``heads``: query heads, ``None`` = all.
    ``B`` is the probe's batch (``generate``'s beam/sample expansion is followed). ``row_hi = T`` (the prompt
    length) is how "prefill only" is expressed: decode-step queries sit at positions ``>= T``; ``rows_end``
    (optional) states the same bound on the host, so that a decode step whose position is known there
    (no mask: ``kv - 1``) skips the block without building a mask.
    """

    layers: frozenset
    row_lo: torch.Tensor
    row_hi: torch.Tensor | None
    keys: torch.Tensor
    heads: tuple | None = None
    rows_end: int | None = None          # host bound: no row at a position >= this is blocked (None: unknown)
    _on: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.layers = frozenset(int(x) for x in self.layers)

    def applies(self, layer: int) -> bool:
        return layer in self.layers

    def on(self, device, rep: int):
        """``(row_lo, row_hi, keys)`` on ``device``, each sample repeated ``rep`` times (memoised)."""
        key = (str(device), rep)
        got = self._on.get(key)
        if got is None:
            def move(t):
                if t is None:
                    return None
                t = t.to(device, non_blocking=True)
                return t.repeat_interleave(rep, 0) if rep > 1 else t
            got = self._on[key] = (move(self.row_lo), move(self.row_hi), move(self.keys))
        return got

    def head_mask(self, n_heads: int, device) -> torch.Tensor:
        """Bool ``[n_heads]``, True on :attr:`heads` (memoised per device)."""
        key = ("heads", str(device), n_heads)
        if key not in self._on:
            m = torch.zeros(n_heads, dtype=torch.bool)
            m[list(self.heads)] = True
            self._on[key] = m.to(device, non_blocking=True)
        return self._on[key]


# --------------------------------------------------------------------------------------------- state
@dataclass
class CapturePlan:
    """What one forward captures. ``rows`` ``[B, r]`` absolute query positions; ``weights`` ``[B, G, r]``
    (``G`` groups of rows, each averaged: the packed generic prompt is group 1); ``cols`` ``[B, N]`` absolute
    key positions (padding columns point at any valid key); ``heads`` ``[h]`` query heads."""

    layers: frozenset
    heads: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    cols: torch.Tensor
    stop_after: int | None
    after_bias: bool = True
    record_kv_below: int = 0             # also keep (key, value) of every layer < this (prefix sharing)
    split: tuple | None = None           # packed call: (T, number of question rows)
    captured: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)
    _on: dict = field(default_factory=dict, repr=False)
    _rowmask: dict = field(default_factory=dict, repr=False)
    one_row_per_group: bool = False      # every group is one row (weight 1): captured as is, no averaging
    pending_groups: dict = field(default_factory=dict, repr=False)   # deferred raw scores: see defer(), finish()
    chunks: list = field(default_factory=list, repr=False)   # stored (layers, [n, B, G, h, N]) in store order
    all_heads: bool = False              # heads == 0..h-1 (every head of the layer when h == H): no head index

    def on(self, device, rep: int, groups: int):
        key = (str(device), rep, groups)
        got = self._on.get(key)
        if got is None:
            def move(t):
                t = t.to(device, non_blocking=True)
                return t.repeat_interleave(rep, 0) if rep > 1 else t
            heads = self.heads.to(device, non_blocking=True)
            got = self._on[key] = (move(self.rows), move(self.weights), move(self.cols), heads, heads // groups)
        return got

    def row_index(self, rows, off: int, h: int, d: int) -> torch.Tensor:
        """Gather index ``[B, h, r, d]`` of the captured rows in a layer's query (memoised per call shape)."""
        key = (id(rows), off, h, d)
        got = self._on.get(key)
        if got is None or got[0] is not rows:
            got = self._on[key] = (rows, (rows - off)[:, None, :, None].expand(rows.shape[0], h, rows.shape[1], d))
        return got[1]

    def split_masks(self, ok, add):
        """Packed call: ``((ok, add) of the question rows over keys [0, T), (ok, add) of the tail rows)``
        (memoised per row mask, so that layers sharing a mask share these too)."""
        key = ("split", id(ok), id(add))
        got = self._on.get(key)
        if got is None or got[0] is not ok:
            T, r_q = self.split
            got = self._on[key] = (ok, ((ok[..., :r_q, :T].contiguous(), None if add is None else add[..., :r_q, :T]),
                                        (ok[..., r_q:, :], None if add is None else add[..., r_q:, :])))
        return got[1]

    def store(self, layers: list, img: torch.Tensor, weights) -> None:
        """``captured[layer]`` = ``[B, G, h, N]`` from image probabilities ``[n, B, h, r, N]`` of ``layers``
        (also kept whole in :attr:`chunks`, so that the caller can concatenate them without a copy per layer)."""
        if self.one_row_per_group:       # one row per group ("last", packed or not): no averaging needed
            out = img.transpose(-3, -2)
        else:
            out = torch.stack([torch.einsum("bhrn,bgr->bghn", x, weights) for x in img.unbind(0)])
        self.captured.update(zip(layers, out.unbind(0)))
        self.chunks.append((list(layers), out))

    def defer(self, layer: int, parts: list, extra: tuple, weights) -> None:
        """Compute layer ``layer``'s raw scores into its group's buffer (one allocation per group and call:
        ``[n_captured_layers, B, h, r, kv]`` fp32 per part); ``parts``: ``[(q_sel, k_sel, ok, add)]``."""
        shapes = [(*q.shape[:-1], k.shape[-2]) for q, k, _, _ in parts]
        gkey = (str(parts[0][0].device), tuple(shapes), tuple((id(o), id(a)) for _, _, o, a in parts),
                extra[:2], id(extra[2]))
        group = self.pending_groups.get(gkey)
        if group is None:
            dev = parts[0][0].device
            bufs = [torch.empty((len(self.layers), *sh), dtype=torch.float32, device=dev) for sh in shapes]
            group = self.pending_groups[gkey] = {"layers": [], "bufs": bufs, "masks": [(o, a) for _, _, o, a in parts],
                                                 "extra": extra, "weights": weights}
        i = len(group["layers"])
        if i == group["bufs"][0].shape[0]:       # a layer module called more than once per forward: no room left
            img = torch.cat([_finish(_scores(q, k), o, a, *extra) for q, k, o, a in parts], -2)
            self.store([layer], img[None], weights)
            return
        for (q, k, _, _), buf in zip(parts, group["bufs"]):
            _scores(q, k, out=buf[i])
        group["layers"].append(layer)

    def finish(self) -> None:
        """Turn the deferred per-layer scores into probabilities: one batched pass per group of layers that
        share device, masks and shapes (usually one group; sliding-window and full layers form two)."""
        groups, self.pending_groups = self.pending_groups, {}
        for g in groups.values():
            n = len(g["layers"])
            for c0 in range(0, n, _FINISH_CHUNK):    # chunks bound the softmax's transient copy
                c1 = min(n, c0 + _FINISH_CHUNK)
                imgs = [_finish(buf[c0:c1], ok, add, *g["extra"]) for buf, (ok, add) in zip(g["bufs"], g["masks"])]
                img = torch.cat(imgs, -2) if len(imgs) > 1 else imgs[0]             # [c, B, h, r, N]
                self.store(g["layers"][c0:c1], img, g["weights"])

    def row_mask(self, attention_mask, rows, off: int, kv: int, device):
        """Allowed-key mask of the captured rows ``[B, 1, r, kv]`` (bool) and the additive part of a float
        mask (or ``None``); built once per layer mask and reused by every layer that receives it."""
        key = (id(attention_mask), kv, str(device), rows.shape[0])
        got = self._rowmask.get(key)
        if got is not None and got[0] is attention_mask:
            return got[1], got[2]
        B, r = rows.shape
        add = None
        if attention_mask is None:            # plain causal: only the captured rows are built
            ok = (torch.arange(kv, device=device) <= (rows + off)[:, :, None])[:, None]
        else:
            q = attention_mask.shape[-2]
            m = attention_mask[..., :kv].expand(B, 1, q, kv).gather(2, rows[:, None, :, None].expand(B, 1, r, kv))
            ok = allowed_matrix(m, r, kv, device)
            if m.dtype != torch.bool:
                add = torch.where(ok, m.float(), torch.zeros((), dtype=torch.float32, device=device))
        if len(self._rowmask) > 8:
            self._rowmask.clear()
        self._rowmask[key] = (attention_mask, ok, add)
        return ok, add


@dataclass
class _State:
    capture: CapturePlan | None = None
    biases: list = field(default_factory=list)    # KeyBias and KeyBlock objects
    batch_size: int | None = None
    replace_mask: bool = False                     # reference semantics: fresh causal mask in blocked layers
    calls: dict = field(default_factory=dict)      # layer -> number of blocked calls (diagnostics)
    split: int | None = None                       # packed call: rows [0, split) attend keys [0, split) only
    tail_keys_from: int | None = None              # packed call: tail rows see no key in [this, split)
    _masks: dict = field(default_factory=dict, repr=False)

    def biases_for(self, layer: int) -> list:
        return [b for b in self.biases if b.applies(layer)]


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


def _query_positions(attention_mask, allowed, q: int, kv: int, off: int, device) -> torch.Tensor:
    """Absolute position of every query row, ``[B|1, q]``, on the device (no host read).

    With a mask it is read from the rows' last allowed keys, which is right for dynamic and static caches
    alike: the last query row (the newest token) sees itself last, and row ``i`` sits ``q - 1 - i`` before it.
    Each row's own last allowed key caps it (left-padding rows see nothing: 0). Rows of a bidirectional prefix
    (PaliGemma's prefix-LM mask) see keys after themselves, so their own last key alone would place them too
    late. Without a mask: ``off + arange(q)``."""
    if attention_mask is None:
        return torch.arange(off, off + q, device=device)[None]
    idx = torch.arange(kv, device=device)
    last = torch.where(allowed[:, 0], idx, torch.zeros((), dtype=idx.dtype, device=device)).amax(-1)   # [B|1, q]
    return torch.minimum(last, last[:, -1:] - torch.arange(q - 1, -1, -1, device=device))


def _blocked(blocks, query, pos: torch.Tensor, kv: int, rep: int):
    """Bool ``[B, 1|H, q, kv]``: True where a :class:`KeyBlock` removes the pair (vectorised over samples);
    ``pos`` ``[B|1, q]``: the query rows' absolute positions."""
    B, H = query.shape[:2]
    dev = query.device
    out = None
    for blk in blocks:
        lo, hi, keys = blk.on(dev, rep)
        rows = pos >= lo[:, None]                                              # [B, q]
        if hi is not None:
            rows = rows & (pos < hi[:, None])
        keys = keys[:, :kv]
        if keys.shape[1] < kv:
            keys = torch.cat([keys, keys.new_zeros(keys.shape[0], kv - keys.shape[1])], 1)
        bl = rows[:, None, :, None] & keys[:, None, None, :]                   # [B, 1, q, kv]
        if blk.heads is not None:
            bl = bl & blk.head_mask(H, dev)[None, :, None, None]
        out = bl if out is None else out | bl
    return out


def _compose(attention_mask, biases, query, kv: int, state: _State):
    """The layer's mask with every active block/bias applied (cached per layer mask, shape and device)."""
    B, H, q, _ = query.shape
    key = (id(attention_mask), q, kv, str(query.device), B, tuple(id(b) for b in biases))
    got = state._masks.get(key)
    if got is not None and got[0] is attention_mask:
        return got[1]
    rep = _expand_index(state, B)
    original = attention_mask
    if state.replace_mask:
        if B != 1:
            raise RuntimeError("compose_with_model_mask=False (faithful mask replacement) supports batch size 1 only")
        attention_mask = None
    off = _q_offset(attention_mask, q, kv)
    allowed = allowed_matrix(attention_mask, q, kv, query.device)
    blocks = [b for b in biases if isinstance(b, KeyBlock)]
    per_sample = [b for b in biases if isinstance(b, KeyBias)]
    if blocks:
        pos = _query_positions(attention_mask, allowed, q, kv, off, query.device)
        allowed = allowed & ~_blocked(blocks, query, pos, kv, rep)
    hard = all(math.isinf(b.value) and b.value < 0 and b.heads is None for b in per_sample)
    if hard:
        mask = allowed.expand(B, -1, q, kv)
        if per_sample:
            mask = mask.clone()
    else:
        neg = torch.finfo(query.dtype).min
        mask = torch.zeros(B, H, q, kv, dtype=query.dtype, device=query.device)
        mask.masked_fill_(~allowed.expand(B, H, q, kv), neg)
    for bias in per_sample:
        r0 = max(bias.row_start - off, 0)
        r1 = q if bias.row_stop is None else min(bias.row_stop - off, q)
        if r1 <= r0:
            continue
        cols = bias.cols.to(query.device, non_blocking=True)
        cols = cols[cols < kv]
        for b in range(bias.batch_index * rep, (bias.batch_index + 1) * rep):
            if hard:
                mask[b, :, r0:r1, cols] = False
                continue
            val = neg if math.isinf(bias.value) and bias.value < 0 else bias.value
            for h in (range(H) if bias.heads is None else bias.heads):
                block = mask[b, h, r0:r1]                      # view [r, kv]
                block[:, cols] = (block[:, cols] + val).clamp_min(neg)
    if len(state._masks) > 8:
        state._masks.clear()
    state._masks[key] = (original, mask)
    return mask


# --------------------------------------------------------------------------------------------- capture
_DEFER_ROWS = 4     # plans with at most this many query rows keep per-layer scores and finish them in one batch
_FINISH_CHUNK = 8   # layers per batched finishing step


def _capture(module, query, key, attention_mask, scaling, plan: CapturePlan, state: _State, kw):
    """Store ``[B, G, h, N]`` fp32 probabilities of the plan's rows (averaged per group) at its columns.

    Plans with few rows (``"last"``: one per group) keep only the raw fp32 scores here (a gather, an
    index and one matmul per layer) and :meth:`CapturePlan.finish` turns every layer's scores into
    probabilities in one batched pass after the forward; the numbers are the same."""
    B, H, q, d = query.shape
    kv = key.shape[2]
    dev = query.device
    off = _q_offset(attention_mask, q, kv)
    if kw.get("position_bias") is not None:
        # an additive position bias handed to the attention function (Inkling's relative logits): folded into a
        # per-head float mask exactly as sdpa_attention_forward folds it (read by the soft-bias path below)
        attention_mask = _position_bias_mask(module, kw["position_bias"], attention_mask, query, key)
    rows, weights, cols, heads, kv_heads = plan.on(dev, _expand_index(state, B), H // key.shape[1])
    h, r = heads.shape[0], rows.shape[1]
    q_sel = query.gather(2, plan.row_index(rows, off, H, d))                                  # [B, H, r, d]
    if h != H or not plan.all_heads:
        q_sel = q_sel.index_select(1, heads)                                                  # [B, h, r, d]
    k_sel = key.index_select(1, kv_heads)                                                     # [B, h, kv, d]
    if attention_mask is not None and attention_mask.shape[1] != 1:     # per-head float mask (soft bias path)
        ridx = (rows - off)[:, None, :, None]
        add = attention_mask.index_select(1, heads)[..., :kv].expand(B, h, q, kv).gather(2, ridx.expand(B, h, r, kv))
        ok = allowed_matrix(add, r, kv, dev)
        add = torch.where(ok, add.float(), torch.zeros((), dtype=torch.float32, device=dev))
        deferred = False
    else:
        ok, add = plan.row_mask(attention_mask, rows, off, kv, dev)
        deferred = r <= _DEFER_ROWS
    sinks = _sink_logits(kw, query)
    sink = None
    if sinks is not None:      # attention sinks: one more logit per row in the softmax (see _sdpa); never packed
        ridx = (rows - off)[:, None, :, None]
        sink = sinks.float().expand(B, H, q, 1).index_select(1, heads).gather(2, ridx.expand(B, h, r, 1))
        deferred = False
    if plan.split is None:
        parts = [(q_sel, k_sel, ok, add)]
    else:   # packed call: the question rows exactly as unpacked (keys [0, T)), the tail rows over all keys
        T, r_q = plan.split
        (ok_q, add_q), (ok_t, add_t) = plan.split_masks(ok, add)
        parts = [(q_sel[:, :, :r_q].contiguous(), k_sel[:, :, :T].contiguous(), ok_q, add_q),
                 (q_sel[:, :, r_q:].contiguous(), k_sel, ok_t, add_t)]
    extra = (float(scaling), kw.get("softcap"), cols)
    if deferred:
        plan.defer(module.layer_idx, parts, extra, weights)
        return
    img = torch.cat([_finish(_scores(q, k), o, a, *extra, sink=sink) for q, k, o, a in parts], -2)
    plan.store([module.layer_idx], img[None], weights)


def _position_bias_mask(module, position_bias, attention_mask, query, key):
    """``[B|1, H, q, kv]`` float mask of ``position_bias`` where ``attention_mask`` allows (its minimum elsewhere),
    built by transformers' own ``create_position_bias_mask`` (causal when there is no mask, as SDPA runs it)."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    causal = query.shape[2] > 1 and bool(getattr(module, "is_causal", True))
    return create_position_bias_mask(position_bias[..., :key.shape[2]], attention_mask, causal, query, key)


def _scores(q_sel, k_sel, out=None):
    """Raw fp32 logits ``[..., r, kv]`` (before scaling), written into ``out`` when given."""
    if q_sel.dtype != torch.float32:
        q_sel, k_sel = q_sel.float(), k_sel.float()
    if out is None:
        return torch.matmul(q_sel, k_sel.transpose(-1, -2))
    return torch.matmul(q_sel, k_sel.transpose(-1, -2), out=out)


def _finish(scores, ok, add, scaling, softcap, cols, sink=None):
    """Probabilities at the image columns ``[..., B, h, r, N]`` from raw logits ``[..., B, h, r, kv]``: scale,
    soft-cap, additive mask, the allowed mask ``ok`` (``[B|1, 1, r, kv]``), fp32 softmax (with one more logit per
    row where ``sink`` ``[B, h, r, 1]`` is given: attention sinks); fully masked rows (padding) give 0. ``scores``
    is overwritten (in-place steps: one transient copy for the softmax)."""
    scores.mul_(scaling)
    if softcap:
        scores.div_(softcap).tanh_().mul_(softcap)
    if add is not None:
        scores.add_(add)
    scores = scores.masked_fill_(~ok, float("-inf"))
    if sink is not None:
        probs = torch.cat([scores, sink.to(scores.dtype)], -1).softmax(-1)[..., :-1]   # finite sink: no NaN rows
    else:
        probs = scores.softmax(-1).nan_to_num_(0.0)
    c = cols[:, None, None, :]
    return probs.gather(-1, c.expand(*probs.shape[:-1], c.shape[-1]))


# --------------------------------------------------------------------------------------------- the function
def sparse_index_mask(attention_mask, indices, query, key):
    """``attention_mask`` restricted to the keys that sparse-attention models (DeepSeek sparse attention: Mistral
    Large 4, GLM-5) select per query row, ``indices`` ``[B, q, top-k]``. Those models apply this restriction to
    the mask themselves for eager/SDPA only and hand any other attention function the ``indices``; this does for
    the package's function what their eager/SDPA path does (a bool mask stays bool, an additive one additive)."""
    B, q, kv = query.shape[0], query.shape[2], key.shape[2]
    keep = torch.zeros(B, 1, q, kv, dtype=torch.bool, device=query.device)
    keep.scatter_(-1, indices.long()[:, None].to(query.device), True)
    mask = allowed_matrix(None, q, kv, query.device) if attention_mask is None else attention_mask
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def vgrefine_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered attention function: SDPA output, plus capture/blocking when a probe state is active."""
    indices = kwargs.pop("indices", None)
    dense_mask = attention_mask           # query positions are read from the dense mask (rows' last allowed key)
    if indices is not None:
        attention_mask = sparse_index_mask(attention_mask, indices, query, key)
    if torch.compiler.is_compiling():      # traced graphs are plain SDPA (no context-variable lookup)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    state = _STATE.get()
    layer = getattr(module, "layer_idx", None)
    if state is None or layer is None:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, kv = query.shape[2], key.shape[2]
    own_mask = attention_mask
    biases = state.biases_for(layer) if state.biases else ()
    if biases and q_len == 1 and attention_mask is None:     # a decode step at position kv - 1
        biases = [b for b in biases if not (isinstance(b, KeyBlock) and b.rows_end is not None and kv - 1 >= b.rows_end)]
    plan = state.capture
    capture_here = plan is not None and q_len > 1 and layer in plan.layers
    packed = state.split is not None and q_len == kv and q_len > state.split
    if packed and _sink_logits(kwargs, query) is not None:
        raise RuntimeError("a packed generic tail with attention sinks is not supported (FamilyAdapter."
                           "prefix_paths_exact should be False for this model)")
    head_kv = (key[:, :, :state.split], value[:, :, :state.split]) if packed else (key, value)  # the question's
    if plan is not None and layer < plan.record_kv_below and q_len > 1:
        plan.kv[layer] = head_kv
    if capture_here and not plan.after_bias:
        _capture(module, query, key, attention_mask, scaling, plan, state, kwargs)
    if biases:
        attention_mask = _compose(dense_mask, biases, query, kv, state)
        if indices is not None:
            attention_mask = sparse_index_mask(attention_mask, indices, query, key)
        state.calls[layer] = state.calls.get(layer, 0) + 1
    if capture_here and plan.after_bias:
        _capture(module, query, key, attention_mask, scaling, plan, state, kwargs)
    if capture_here and plan.stop_after == layer:
        raise EarlyExit
    if packed:
        return _split_sdpa(module, query, key, value, head_kv, own_mask, attention_mask, state, dropout, scaling,
                           kwargs)
    return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)


def _sink_logits(kwargs, query):
    """Attention-sink logits handed to the attention function, ``[B|1, H, q, 1]``, or ``None``: ``s_aux`` (one per
    head: HunYuan V4) or ``sinks`` (one per head, or one per query row ``[B, H, q, 1]``: Inkling 2). A sink is one
    more logit in each row's softmax whose value vector is zero: it only absorbs probability mass."""
    s = kwargs.get("s_aux")
    s = kwargs.get("sinks") if s is None else s
    if s is None:
        return None
    H, q = query.shape[1], query.shape[2]
    if s.dim() == 1:
        return s.view(1, H, 1, 1).expand(1, H, q, 1)
    return s[..., -q:, :]


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """``sdpa_attention_forward``; with attention sinks (which SDPA ignores), the sink enters as one more key whose
    key and value vectors are zero and whose additive mask entry is the sink logit (exact: its logit is the sink,
    its value adds nothing), over a per-head float mask that also carries a ``position_bias``."""
    sinks = _sink_logits(kwargs, query)
    if sinks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bias = kwargs.get("position_bias")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("sinks", "s_aux", "position_bias")}
    B, H, q, _ = query.shape
    kv = key.shape[2]
    dtype, neg = query.dtype, torch.finfo(query.dtype).min
    if attention_mask is None:
        mask = torch.zeros(1, 1, q, kv, dtype=dtype, device=query.device)
        if q > 1 and getattr(module, "is_causal", True):
            mask = mask.masked_fill(~allowed_matrix(None, q, kv, query.device), neg)
    elif attention_mask.dtype == torch.bool:
        mask = torch.zeros(attention_mask.shape, dtype=dtype, device=query.device).masked_fill(~attention_mask, neg)
    else:
        mask = attention_mask.to(dtype)
    mask = mask[..., :kv]
    if bias is not None:
        mask = (mask + bias[..., :kv].to(dtype)).clamp_min(neg)
    mask = torch.cat([mask.expand(B, H, q, kv), sinks.to(dtype).expand(B, H, q, 1)], -1)
    key = torch.cat([key, key.new_zeros(*key.shape[:2], 1, key.shape[-1])], 2)
    value = torch.cat([value, value.new_zeros(*value.shape[:2], 1, value.shape[-1])], 2)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _split_sdpa(module, query, key, value, head_kv, own_mask, composed, state: _State, dropout, scaling, kwargs):
    """Packed call: rows ``[0, T)`` run exactly as the unpacked prompt (keys ``[0, T)``, the layer's own mask),
    rows ``[T, q)`` (the packed generic tail) with the composed mask over every key except ``[hidden_from, T)``
    (the question's text after the image, which the composed mask hides from every tail row anyway)."""
    T = state.split
    head_mask, tail_mask, keep = _split_masks(own_mask, composed, state, query)
    q_head, q_tail = query.split([T, query.shape[2] - T], 2)
    bias = kwargs.get("position_bias")           # [.., q, kv]: split like the rows and keys
    head_kw = kwargs if bias is None else dict(kwargs, position_bias=bias[..., :T, :T])
    out_q, _ = sdpa_attention_forward(module, q_head, head_kv[0], head_kv[1], head_mask, dropout=dropout,
                                      scaling=scaling, **head_kw)
    if bias is not None:
        bias = bias[..., T:, :]
        kwargs = dict(kwargs, position_bias=bias if keep is None else bias.index_select(-1, keep))
    if keep is not None:     # drop the hidden key columns: less work per tail row
        key, value = key.index_select(2, keep), value.index_select(2, keep)
    if query.device.type == "cpu" and kwargs.get("position_bias") is None:
        # CPU kernels take grouped KV heads as they are (no repeat_kv copies); CUDA's masked kernels do not
        out_t = torch.nn.functional.scaled_dot_product_attention(
            q_tail, key, value, attn_mask=tail_mask, dropout_p=dropout, scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1]).transpose(1, 2)
    else:
        out_t, _ = sdpa_attention_forward(module, q_tail, key, value, tail_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    return torch.cat([out_q, out_t], 1), None


def _split_masks(own_mask, composed, state: _State, query):
    """``(question rows' mask [.., T, T] or None, tail rows' mask over the kept keys, kept key index or None)``
    of a packed call, built once per (layer mask, composed mask, shape, device) and shared by the layers."""
    q, dev = query.shape[2], query.device
    key = ("split", id(own_mask), id(composed), q, str(dev))
    got = state._masks.get(key)
    if got is not None and got[0] is own_mask and got[1] is composed:
        return got[2]
    T, hidden_from = state.split, state.tail_keys_from
    head_mask = None if own_mask is None else own_mask[..., :T, :T]
    tail_mask = composed if composed is not None else allowed_matrix(None, q, q, dev)
    tail_mask = tail_mask[..., T:, :]
    keep = None
    if hidden_from is not None and hidden_from < T:
        keep = torch.cat([torch.arange(hidden_from, device=dev), torch.arange(T, q, device=dev)])
        tail_mask = tail_mask.index_select(-1, keep)
    if len(state._masks) > 8:
        state._masks.clear()
    state._masks[key] = (own_mask, composed, (head_mask, tail_mask, keep))
    return head_mask, tail_mask, keep


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
    while active; an inner probe finds the decoder already switched and switches nothing).
    ``biases``: list of :class:`KeyBlock`/:class:`KeyBias`; ``batch_size``: the batch the sample indices of
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
            _switch_text_attention(self.model, self.adapter, self._previous, ATTN_NAME)
        self._token = _STATE.set(self.state)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._token is not None:
            _STATE.reset(self._token)
            self._token = None
        if self._previous != ATTN_NAME and self._previous is not None:
            _switch_text_attention(self.model, self.adapter, ATTN_NAME, self._previous)
        return False


# one switch = the configs ``set_attn_implementation`` changed, with their values before and after
_SWITCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _all_configs(model) -> list:
    """Every config object of ``model`` (its sub-models' configs and their nested ``sub_configs``), once each."""
    from transformers import PreTrainedModel

    seen, out = set(), []
    todo = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while todo:
        cfg = todo.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        todo.extend(c for c in (getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {})) if c is not None)
    return out


def _switch_text_attention(model, adapter, current: str, target: str) -> None:
    """Switch the text decoder's attention implementation from ``current`` to ``target``.

    The first switch of a model goes through ``set_attn_implementation`` (its checks; a walk over every
    sub-module, milliseconds of host time on a 7B model) and remembers which configs it changed; later
    switches between the same two implementations set exactly those configs again (microseconds), as long as
    every one of them still holds the value the remembered switch started from.
    """
    memo = _SWITCHES.setdefault(model, {})
    plan = memo.get((current, target))
    if plan is not None and all(c._attn_implementation_internal == before for c, before, _ in plan):
        for cfg, _, after in plan:
            cfg._attn_implementation_internal = after
        return
    configs = _all_configs(model)
    before = [c._attn_implementation_internal for c in configs]
    model.set_attn_implementation(adapter.text_attn_target(target))
    plan = [(c, b, c._attn_implementation_internal) for c, b in zip(configs, before)
            if c._attn_implementation_internal != b]
    memo[(current, target)] = plan
    memo[(target, current)] = [(c, a, b) for c, b, a in plan]


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

    def sample(self, b: int) -> torch.Tensor:
        """``[n_layers, n_heads, n_tokens[b]]`` for sample ``b``."""
        return self.maps[b, ..., : self.n_tokens[b]]

    def layer_mean(self) -> torch.Tensor:
        """Mean over the captured heads: ``[batch, n_layers, n_max]``."""
        return self.maps.mean(2)


def check_indices(name, values, limit):
    """``ValueError`` naming the ``values`` outside ``[0, limit)`` (``name``: layers or heads)."""
    bad = [v for v in values if not 0 <= v < limit]
    if bad:
        raise ValueError(f"{name} {bad} out of range: the model has {limit} (valid 0..{limit - 1})")


def capture_image_attention(model, inputs: dict, layers=None, heads=None, query="last", early_exit: bool = True,
                            spans=None, adapter=None, biases=None) -> CapturedAttention:
    """Attention from query rows to image tokens, per layer and head, on SDPA.

    ``inputs``: the processor's model inputs (left-padded batch). ``layers``/``heads``: 0-based indices
    (``None`` = all); ``query``: ``"last"`` (row ``T-1``), ``"post_image"`` (mean over rows ``[v_end, T)``)
    or explicit positions (one list for all samples, or one per sample; averaged). ``early_exit``: stop
    the forward after the deepest captured layer (no logits computed). ``biases``: optional
    :class:`KeyBlock`/:class:`KeyBias` list active during the capture (post-block probabilities are captured).
    ``spans``: the adapter's image spans of ``inputs`` when already known.
    Returns :class:`CapturedAttention` with ``maps [B, n_layers, n_heads, n_max]`` on the inputs' device.
    """
    from .grounding_pass import GroundingPass, PromptLayout

    gp = GroundingPass(model, adapter=adapter)
    layout = PromptLayout.read(gp.adapter, inputs, spans=spans)
    out = gp.run(inputs, layout, layers=layers, heads=heads, query=query, early_exit=early_exit, biases=biases)
    return out.question
