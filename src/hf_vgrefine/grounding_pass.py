"""The grounding pass: one service that runs the question and generic prompts through the model and reads
their attention to the image, for VGRefine's triage, grounding measurement, calibration and the demo.

It owns

* :class:`PromptLayout` — where every sample's image tokens are (host integers, read once per call before
  any kernel is queued; the only host read of the pass);
* the **packed generic prompt** — when the generic prompt is the question's prefix up to the image end plus
  one common text tail, the tail is appended to the question's row and rides in the same model call: its
  rows see the image prefix and themselves only (a :class:`~hf_vgrefine.attention.KeyBlock` hides the
  question's post-image tokens from them; position ids continue from the image end as in a standalone
  generic prompt), so one forward yields both maps;
* the generic-map cache (:class:`~hf_vgrefine.generic_cache.GenericMapCache`, keyed by an image fingerprint);
* :class:`PrefixRecord` / :class:`PrefixReplay` — the question pass keeps layers ``< n``'s keys/values and
  layer ``n-1``'s output so that ``generate``'s prefill of the same prompt resumes at layer ``n``.

Shapes: maps are fp32 ``[n_layers, n_heads, N]`` per sample; positions index the left-padded row ``[0, T)``.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import torch

from .attention import AttentionProbe, CapturedAttention, KeyBlock, CapturePlan, EarlyExit, check_indices

_LAYOUT_KEYS = ("input_ids", "attention_mask", "image_grid_thw", "image_sizes")


# --------------------------------------------------------------------------------------------- layout
@dataclass
class PromptLayout:
    """Host-side layout of a left-padded batch.

    ``spans``: the adapter's :class:`~hf_vgrefine.adapters.ImageSpan` lists (host positions); ``main``: each
    sample's first grid image; ``starts``: index of each row's first real token; ``device``: the inputs'.
    """

    spans: list
    B: int
    T: int
    starts: list
    device: torch.device
    ids: torch.Tensor                    # host copy [B, T]
    left_padded: bool
    sizes: dict = field(default_factory=dict)   # host copies of the image-size inputs (image_grid_thw, image_sizes)

    @classmethod
    def read(cls, adapter, inputs: dict, spans=None) -> "PromptLayout":
        """Read the ids/mask/grid sizes once (one small device-to-host copy each when on an accelerator)."""
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError("VGRefine needs input_ids with image tokens (the processor's output for an image + "
                             "prompt); inputs_embeds alone are not supported")
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        host = {k: inputs[k].cpu() for k in _LAYOUT_KEYS if torch.is_tensor(inputs.get(k))}
        if spans is None:
            spans = adapter.image_spans({**inputs, **host})
        mask = host.get("attention_mask")
        B, T = host["input_ids"].shape
        if mask is not None:
            starts = [int(x) for x in mask.bool().int().argmax(1)]
            left = bool(mask[:, -1].bool().all())
        else:
            starts, left = [0] * B, True
        sizes = {k: v for k, v in host.items() if k not in ("input_ids", "attention_mask")}
        return cls(spans=spans, B=B, T=T, starts=starts, device=ids.device, ids=host["input_ids"], left_padded=left,
                   sizes=sizes)

    @property
    def main(self) -> list:
        """Each sample's first grid image (``block`` ``"grid"``/``"base"``)."""
        out = []
        for b, sp in enumerate(self.spans):
            grid = [s for s in sp if s.block in ("grid", "base")]
            if not grid:
                raise ValueError(f"sample {b} has no image tokens")
            out.append(grid[0])
        return out

    def require_one_image(self):
        for b, sp in enumerate(self.spans):
            n = len([s for s in sp if s.block in ("grid", "base")])
            if n != 1:
                raise ValueError(f"sample {b} has {n} images; VGRefine supports one image per prompt")

    def require_left_padding(self):
        if not self.left_padded:
            raise ValueError("attention capture needs left padding (the last column of attention_mask must be 1 for "
                             "every sample): set processor.tokenizer.padding_side = 'left'")

    def columns(self, spans=None, pad: int = 0) -> tuple[torch.Tensor, list]:
        """Host ``[B, N_max]`` image-token positions (all images of ``spans``, sequence order; padded with ``pad``)
        and the per-sample counts."""
        spans = self.spans if spans is None else spans
        pos = [torch.cat([s.positions for s in sp]) if sp else torch.empty(0, dtype=torch.long) for sp in spans]
        n = [len(p) for p in pos]
        cols = torch.full((len(pos), max(n) if n else 0), pad, dtype=torch.long)
        for b, p in enumerate(pos):
            cols[b, : len(p)] = p
        return cols, n

    def key_mask(self, token_masks: list, device) -> torch.Tensor:
        """Bool ``[B, T]`` on ``device``: True at the positions of the main image's tokens where
        ``token_masks[b]`` (bool ``[N_b]``, on ``device``) is True. No host read."""
        cols, n = self.columns([[s] for s in self.main], pad=self.T)
        cols = cols.to(device, non_blocking=True)
        vals = torch.zeros(self.B, cols.shape[1], dtype=torch.bool, device=device)
        for b, m in enumerate(token_masks):
            vals[b, : n[b]] = m
        out = torch.zeros(self.B, self.T + 1, dtype=torch.bool, device=device)
        out.scatter_(1, cols, vals)
        return out[:, : self.T]


def query_rows(query, layout: PromptLayout, spans) -> tuple[torch.Tensor, torch.Tensor]:
    """Host absolute query rows ``[B, r]`` and their averaging weights ``[B, r]`` (rows sum to 1)."""
    B, T = layout.B, layout.T
    if isinstance(query, str) and query == "last":
        return torch.full((B, 1), T - 1, dtype=torch.long), torch.ones(B, 1)
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
    per_sample = isinstance(query, (list, tuple)) and len(query) == B and not isinstance(query[0], int)
    q = [torch.as_tensor(x, dtype=torch.long).cpu().flatten() for x in (query if per_sample else [query] * B)]
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


# --------------------------------------------------------------------------------------------- images
def tensor_fingerprint(t: torch.Tensor) -> str:
    """Identity of one tensor's content: host tensors by the SHA-1 of their bytes; accelerator tensors by
    the SHA-1 of four float64 random projections computed on the device (one small copy back instead of the
    whole image)."""
    h = hashlib.sha1()
    t = t.detach()
    h.update(str(tuple(t.shape)).encode())
    h.update(str(t.dtype).encode())
    if t.device.type == "cpu":
        t = t.contiguous()
        h.update(t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    else:
        x = t.reshape(-1).double()
        g = torch.Generator(device=t.device).manual_seed(1234)
        w = torch.randn(4, x.numel(), generator=g, device=t.device, dtype=torch.float64)
        h.update((w @ x).cpu().numpy().tobytes())
    return h.hexdigest()


def host_sizes(inputs: dict) -> dict:
    """Host copies of the image-size inputs (``image_grid_thw``, ``image_sizes``) present in ``inputs``."""
    return {k: inputs[k].cpu() for k in _LAYOUT_KEYS[2:] if torch.is_tensor(inputs.get(k))}


def image_fingerprints(adapter, inputs: dict, b: int, sizes: dict | None = None) -> dict:
    """``{input name: fingerprint}`` of sample ``b``'s image inputs without batch padding. ``sizes``: host copies
    of the image-size inputs (:func:`host_sizes`, :attr:`PromptLayout.sizes`), so that splitting flattened
    patches per image reads nothing back from the device."""
    if sizes:
        inputs = {**inputs, **sizes}
    return {k: tensor_fingerprint(v) for k, v in sorted(adapter.image_content(inputs, b).items())}


def common_tail(q_layout: PromptLayout, g_layout: PromptLayout):
    """The generic prompt's ids after the image (host ``[t]``) if every sample's generic prompt is the
    question's prefix up to the image end followed by one common tail; else ``None``."""
    tails = []
    for b, (q_span, g_span) in enumerate(zip(q_layout.main, g_layout.main)):
        q_ids = q_layout.ids[b, q_layout.starts[b]:q_span.end]
        g_ids = g_layout.ids[b, g_layout.starts[b]:g_span.end]
        if not torch.equal(q_ids, g_ids):
            return None
        tails.append(g_layout.ids[b, g_span.end:])
    if not tails or any(not torch.equal(t, tails[0]) for t in tails[1:]) or tails[0].numel() == 0:
        return None
    return tails[0]


# --------------------------------------------------------------------------------------------- prefix record / replay
@dataclass
class PrefixRecord:
    """Layers ``< n_layers`` of a question prefill: ``kv[layer] = (key, value)`` ``[B, H_kv, T, d]`` (post-RoPE, as
    cached) and ``hidden`` ``[B, T, D]``, the output of layer ``n_layers - 1``; ``seq_len = T``."""

    n_layers: int
    kv: dict
    hidden: torch.Tensor
    seq_len: int
    vision: list = field(default_factory=list)    # [(argument signature, output)] of the vision encoder's calls


def _signature(args, kwargs) -> tuple:
    """Host-side description of a call's arguments (tensors by shape, dtype, device; plain values as they are;
    anything else by type; ``use_cache``, which a plain forward passes and ``generate`` does not, left out): no
    device read."""
    def one(x):
        if isinstance(x, torch.Tensor):
            return tuple(x.shape), x.dtype, x.device
        return x if isinstance(x, (bool, int, float, str, type(None))) else type(x).__name__
    return tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items() if k != "use_cache"))


class _ReplayVision(torch.nn.Module):
    """Stands in for the vision encoder during one prefill: a call with the recorded arguments' shapes returns
    the recorded output (the replayed layers ignore the embeddings it feeds); any other call runs the encoder."""

    def __init__(self, inner, calls: list):
        super().__init__()
        self.inner = inner
        self._calls = list(calls)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, *args, **kwargs):
        if self._calls and self._calls[0][0] == _signature(args, kwargs):
            return copy.copy(self._calls.pop(0)[1])
        self._calls = []
        return self.inner(*args, **kwargs)


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
            if rep > 1:
                k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            cache.update(k, v, r["layer_idx"])
        if r["hidden"] is None:
            return hidden_states
        out = r["hidden"].to(device=hidden_states.device, dtype=hidden_states.dtype)
        return out.repeat_interleave(rep, 0) if rep > 1 else out


class PrefixReplay:
    """Context manager: the next prefill of the same prompt starts at layer ``n`` from a :class:`PrefixRecord`.

    Layers ``< n`` of the text decoder are temporarily replaced (restored on exit, also after an exception)
    by stand-ins that write the recorded keys/values into the generation cache and hand over the recorded
    hidden states; decode steps run the real layers. Valid only when the recorded pass saw exactly the
    same inputs (ids, mask, images, position ids) and no block below layer ``n``.
    """

    def __init__(self, adapter, record: PrefixRecord):
        self.layers = adapter.decoder_layers
        self.vision = adapter.vision_encoder() if record.vision else None
        self.record = record
        self._orig = []
        self._orig_vision = None

    def __enter__(self):
        n = self.record.n_layers
        self._orig = [self.layers[i] for i in range(n)]
        for i in range(n):
            hidden = self.record.hidden if i == n - 1 else None
            self.layers[i] = _ReplayLayer(self._orig[i], i, self.record.kv[i], hidden, self.record.seq_len)
        if self.vision is not None:
            parent, name = self.vision
            self._orig_vision = getattr(parent, name)
            setattr(parent, name, _ReplayVision(self._orig_vision, self.record.vision))
        return self

    def __exit__(self, *exc):
        for i, layer in enumerate(self._orig):
            self.layers[i] = layer
        self._orig = []
        if self._orig_vision is not None:
            parent, name = self.vision
            setattr(parent, name, self._orig_vision)
            self._orig_vision = None
        return False

    def all_used(self) -> bool:
        return all(not self.layers[i]._replay["armed"] for i in range(len(self._orig)))


def is_compiled(model) -> bool:
    """True when ``model``'s forward is compiled (``model.compile()`` or ``torch.compile(model.forward)``)."""
    return getattr(model, "_compiled_call_impl", None) is not None or hasattr(model.forward, "_torchdynamo_orig_callable")


_WARNED = set()


def eager_if_compiled(model):
    """``torch.compiler.set_stance("force_eager")`` while ``model``'s forward is compiled (capture and knockout
    are Python-side state that a compiled graph does not read), with a one-line message once per model; else a
    no-op context."""
    import contextlib
    import logging

    if not is_compiled(model):
        return contextlib.nullcontext()
    if id(model) not in _WARNED:
        _WARNED.add(id(model))
        logging.getLogger("hf_vgrefine").warning(
            "hf_vgrefine: the model's forward is compiled; VGRefine and attention capture run it eagerly")
    return torch.compiler.set_stance("force_eager")


# --------------------------------------------------------------------------------------------- the pass
@dataclass
class PassResult:
    """``question``: :class:`CapturedAttention` of the question rows; ``generic``: the same for the packed
    generic prompt (``None`` without a tail); ``record``: :class:`PrefixRecord` or ``None``."""

    question: CapturedAttention
    generic: CapturedAttention | None = None
    record: PrefixRecord | None = None
    timings: dict = field(default_factory=dict)


class GroundingPass:
    """Runs prompts through ``model`` and reads their attention to the image (see the module docstring).

    ``cache``: optional :class:`~hf_vgrefine.generic_cache.GenericMapCache` of generic-prompt maps.
    """

    def __init__(self, model, adapter=None, cache=None):
        from .adapters import get_adapter

        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.cache = cache

    # ------------------------------------------------------------------ one model call
    def run(self, inputs: dict, layout: PromptLayout, layers=None, heads=None, query="last", early_exit=True,
            biases=None, tail: torch.Tensor | None = None, record_prefix: int = 0,
            generate_positions: bool = False) -> PassResult:
        """One forward of ``inputs`` (optionally with the generic ``tail`` packed behind each row) that
        captures the question rows (and the tail's rows) at ``layers`` x ``heads``.

        ``record_prefix=n``: keep a :class:`PrefixRecord` of layers ``< n`` (``generate``-equal position ids
        are then passed, as they are with ``generate_positions=True`` or a tail).
        """
        adapter = self.adapter
        L, H = adapter.num_layers, adapter.num_heads
        layers = list(adapter.attention_layers) if layers is None else sorted({int(x) for x in layers})
        heads = list(range(H)) if heads is None else [int(h) for h in heads]
        check_indices("layers", layers, L)
        check_indices("heads", heads, H)
        no_attn = [l for l in layers if l not in adapter.attention_layers]
        if no_attn:
            raise ValueError(f"layers {no_attn} have no softmax attention to capture (linear-attention / recurrent layers "
                             f"of a hybrid model); attention layers: {adapter.attention_layers}")
        if not layers:
            raise ValueError("layers is empty")
        if record_prefix and record_prefix >= L:
            raise ValueError(f"record_prefix={record_prefix} must be < the number of layers ({L})")
        if "attention_mask" in inputs:
            layout.require_left_padding()
        B, T, dev = layout.B, layout.T, layout.device
        rows, w = query_rows(query, layout, layout.spans)
        cols, n_tokens = layout.columns()
        kwargs = dict(inputs)
        blocks = list(biases or [])
        t = 0 if tail is None else int(tail.numel())
        groups, r_q = 1, rows.shape[1]
        if t or record_prefix or generate_positions:
            pos = adapter.position_ids(inputs)                          # [..., B, T]
            if t:
                ends = torch.tensor([s.end for s in layout.main]).to(dev, non_blocking=True)
                start = pos.gather(-1, ends.view(*([1] * (pos.dim() - 2)), B, 1).expand(*pos.shape[:-2], B, 1))
                pos = torch.cat([pos, start + torch.arange(t, device=dev)], -1)
            kwargs["position_ids"] = pos
        if t:
            ids = torch.cat([inputs["input_ids"], tail.to(dev, non_blocking=True)[None].expand(B, t)], 1)
            mask = inputs.get("attention_mask")
            mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
            kwargs["input_ids"] = ids
            kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(B, t)], 1)
            kwargs.update(adapter.id_derived(ids, inputs, appended=t))
            hide = torch.zeros(B, T, dtype=torch.bool)
            for b, s in enumerate(layout.main):
                hide[b, s.end:] = True
            blocks.append(KeyBlock(layers=range(L), row_lo=torch.full((B,), T, dtype=torch.long).to(dev, non_blocking=True),
                                   row_hi=None, keys=hide.to(dev, non_blocking=True)))
            if isinstance(query, str) and query == "post_image":
                t_rows = torch.arange(T, T + t)[None].expand(B, t)
            else:
                t_rows = torch.full((B, 1), T + t - 1, dtype=torch.long)
            r_q, r_t = rows.shape[1], t_rows.shape[1]
            rows = torch.cat([rows, t_rows], 1)
            w = torch.cat([torch.stack([w, torch.zeros(B, r_q)], 1),
                           torch.stack([torch.zeros(B, r_t), torch.full((B, r_t), 1.0 / r_t)], 1)], 2)
            groups = 2
        else:
            w = w[:, None, :]
        stop = max(layers + [record_prefix]) if record_prefix else max(layers)
        plan = CapturePlan(layers=frozenset(layers) | ({stop} if record_prefix else frozenset()),
                            heads=torch.tensor(heads), rows=rows, weights=w, cols=cols,
                            stop_after=stop if (early_exit or record_prefix) else None,
                            record_kv_below=record_prefix, split=(T, r_q) if t else None,
                            one_row_per_group=rows.shape[1] == groups,   # a one-row group's weight is 1
                            all_heads=heads == list(range(len(heads))))
        kwargs["use_cache"] = False
        if not (early_exit or record_prefix):
            kwargs["logits_to_keep"] = 1
        hidden = {}
        hooks = []
        vision_calls = []
        if record_prefix:
            hooks.append(adapter.decoder_layers[record_prefix - 1].register_forward_hook(
                lambda mod, args, out: hidden.update(h=out[0] if isinstance(out, tuple) else out,
                                                     tuple=isinstance(out, tuple))))
            encoder = adapter.vision_encoder()
            if encoder is not None:
                hooks.append(getattr(*encoder).register_forward_hook(
                    lambda mod, args, kw, out: vision_calls.append((_signature(args, kw), copy.copy(out))),
                    with_kwargs=True))   # a copy: callers reassign fields of the output object
        probe = AttentionProbe(self.model, biases=blocks, batch_size=B, adapter=adapter)
        probe.state.capture = plan
        probe.state.split = T if t else None
        probe.state.tail_keys_from = max(s.end for s in layout.main) if t else None
        try:
            with torch.no_grad(), probe, eager_if_compiled(self.model):
                try:
                    self.model(**kwargs)
                except EarlyExit:
                    pass
        finally:
            for h in hooks:
                h.remove()
        plan.finish()
        missing = [l for l in layers if l not in plan.captured]
        if missing:
            raise RuntimeError(f"layers {missing} were not captured: the model's text attention did not go through the "
                               "registered function (is the text decoder using attn_implementation='vgrefine', and is "
                               "the forward not compiled?)")
        outs = [out for _, out in plan.chunks]
        if [l for ls, _ in plan.chunks for l in ls] == layers and all(o.device == dev for o in outs):
            maps = (torch.cat(outs, 0) if len(outs) > 1 else outs[0]).permute(1, 2, 0, 3, 4).contiguous()
        else:
            maps = torch.stack([plan.captured[l].to(dev) for l in layers], 2).float()
        for b, n in enumerate(n_tokens):
            if n < maps.shape[-1]:
                maps[b, ..., n:] = float("nan")
        question = CapturedAttention(maps=maps[:, 0], layers=layers, heads=heads, n_tokens=n_tokens,
                                     spans=layout.spans)
        generic = None
        if groups == 2:
            generic = CapturedAttention(maps=maps[:, 1], layers=layers, heads=heads, n_tokens=n_tokens,
                                        spans=layout.spans)
        record = None
        if record_prefix:
            kv = dict(plan.kv)          # the question's keys/values only (a packed call records [0, T))
            record = PrefixRecord(n_layers=record_prefix, kv=kv, hidden=hidden["h"][:, :T] if t else hidden["h"], seq_len=T,
                                  vision=vision_calls)
            if hidden["tuple"]:
                # decoder layers that return a tuple hand more than the hidden states to the next layer (Mistral
                # Large 4's sparse-attention top-k): the stand-ins of PrefixReplay cannot, so no replay
                record = None
        return PassResult(question=question, generic=generic, record=record)

    # ------------------------------------------------------------------ question + generic maps
    def question_and_generic(self, inputs: dict, layout: PromptLayout, layers, query="last", *, generic=None,
                             generic_layout: PromptLayout | None = None, tail=None, keys=None, record_prefix=0,
                             early_exit=True, pack=True) -> tuple:
        """Question maps and per-sample generic maps ``[n_layers, H, N]`` (from the cache where ``keys`` hit).

        The generic maps of the misses come from ``tail`` packed into the question's call (when given and
        ``pack``), else from a separate pass over ``generic`` (inputs of the generic prompts, same images, same
        order) — one row per distinct key. Returns ``(PassResult, generic_maps list, cache hits)``.
        """
        B = layout.B
        maps = [None] * B
        found = {}
        if keys is not None and self.cache is not None:
            for b, key in enumerate(keys):
                if key not in found:
                    found[key] = self.cache.get(key)
                if found[key] is not None:
                    maps[b] = found[key].to(layout.device, non_blocking=True)
        hits = sum(m is not None for m in maps)
        need = [b for b in range(B) if maps[b] is None]
        use_tail = bool(need) and pack and tail is not None
        res = self.run(inputs, layout, layers=layers, query=query, early_exit=early_exit,
                       tail=tail if use_tail else None, record_prefix=record_prefix)
        if use_tail:
            for b in need:
                maps[b] = res.generic.sample(b)
        elif need:
            if callable(generic):
                generic = generic()
            if generic is None:
                raise ValueError("generic-prompt maps are needed: pass the generic prompt's inputs")
            uniq: dict = {}
            for b in need:
                uniq.setdefault(keys[b] if keys is not None else ("sample", b), []).append(b)
            reps = [m[0] for m in uniq.values()]
            batch = self.select(generic, reps)
            g_layout = (generic_layout if generic_layout is not None and reps == list(range(B))
                        else PromptLayout.read(self.adapter, batch))
            for i, r in enumerate(reps):
                if g_layout.main[i].n_tokens != layout.main[r].n_tokens:
                    raise ValueError(f"generic prompt of sample {r} has {g_layout.main[i].n_tokens} image tokens, the "
                                     f"question prompt {layout.main[r].n_tokens}: both must use the same image inputs")
            cap = self.run(batch, g_layout, layers=layers, query=query, early_exit=early_exit).question
            for i, members in enumerate(uniq.values()):
                for b in members:
                    maps[b] = cap.sample(i)
        if keys is not None and self.cache is not None:
            stored = set()
            for b in need:
                if keys[b] not in stored:
                    self.cache.put(keys[b], maps[b].clone())
                    stored.add(keys[b])
        return res, maps, hits

    def select(self, inputs: dict, rows: list) -> dict:
        """Sub-batch ``rows`` of a (left-padded) model-input dict, image inputs included."""
        if rows == list(range(inputs["input_ids"].shape[0])):
            return inputs
        idx = torch.tensor(rows).to(inputs["input_ids"].device, non_blocking=True)
        out = {"input_ids": inputs["input_ids"].index_select(0, idx)}
        if "attention_mask" in inputs:
            out["attention_mask"] = inputs["attention_mask"].index_select(0, idx)
        out.update(self.adapter.select_images(inputs, rows))
        out.update(self.adapter.id_derived(out["input_ids"], inputs))
        return out
