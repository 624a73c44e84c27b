"""``VGRefineWrapper``: VGRefine around any supported HF VLM, inside ``generate``.

Per call:

1. **Triage** (step I): capture the question prompt's attention to the image at the sensitive heads'
   layers (early exit after the deepest one), and the generic prompt's at the same layers (cached per
   image content); compute the relative map and the knockout set per sample (:mod:`.triage`).
2. **Knockout** (step II): during ``model.generate`` the registered attention function blocks the
   post-image prompt rows ``[v_end, T)`` from attending to the knocked-out image keys in the masked
   layers (all heads by default), composed with the layer's own mask; prefill only by default.

Everything goes through :class:`hf_vgrefine.attention.AttentionProbe`: the model's attention
implementation is restored on exit, also after an exception.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList

from ..adapters import get_adapter
from ..generic_cache import GenericMapCache, model_fingerprint
from ..attention import AttentionProbe, KeyBias, PrefixReplay, capture_image_attention
from .config import VGRefineConfig
from .logits import VGRefineLogitsProcessor
from .triage import knockout_set, triage_scores


@dataclass
class SampleTriage:
    """Triage result of one sample.

    ``keep_mask``: bool ``[N]`` (True = kept image token, row-major over ``grid``); ``triage_map``: float
    ``[N]`` relative score; ``knocked_out``: token indices in ``[0, N)``; ``knocked_out_positions``: the
    same as positions in the padded sequence; ``threshold``: percentile value (or magnitude threshold).
    """

    keep_mask: torch.Tensor
    triage_map: torch.Tensor
    knocked_out: torch.Tensor
    knocked_out_positions: torch.Tensor
    threshold: float
    grid: tuple
    query_rows: tuple
    flags: list = field(default_factory=list)

    @property
    def n_visual(self) -> int:
        return int(self.keep_mask.numel())

    @property
    def keep_grid(self) -> torch.Tensor:
        return self.keep_mask.view(*self.grid)

    @property
    def map_grid(self) -> torch.Tensor:
        return self.triage_map.view(*self.grid)


@dataclass
class TriageResult:
    samples: list
    biases: list
    timings: dict
    generic_cache_hits: int = 0
    prefix: dict | None = None
    seq_len: int = 0

    def __getitem__(self, i):
        return self.samples[i]

    def __len__(self):
        return len(self.samples)


def _image_key(adapter, inputs, b: int) -> str:
    h = hashlib.sha1()
    for k, v in sorted(adapter.image_content(inputs, b).items()):
        t = v.detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _take_rows(adapter, inputs: dict, rows: list) -> dict:
    """Sub-batch ``rows`` of a (left-padded) model-input dict, image inputs included."""
    if rows == list(range(inputs["input_ids"].shape[0])):
        return inputs
    out = {"input_ids": inputs["input_ids"][rows]}
    if "attention_mask" in inputs:
        out["attention_mask"] = inputs["attention_mask"][rows]
    out.update(adapter.select_images(inputs, rows))
    out.update(adapter.id_derived(out["input_ids"], inputs))
    return out


def _check_same_images(adapter, inputs: dict, generic_inputs: dict, samples: list):
    """Raise unless ``generic_inputs`` carry the same image inputs as ``inputs`` for ``samples``."""
    if generic_inputs["input_ids"].shape[0] != inputs["input_ids"].shape[0]:
        raise ValueError(f"generic_inputs has {generic_inputs['input_ids'].shape[0]} samples, the inputs "
                         f"{inputs['input_ids'].shape[0]}: pass one generic prompt per sample, same order")
    for b in samples:
        q, g = adapter.image_content(inputs, b), adapter.image_content(generic_inputs, b)
        for key, val in q.items():
            other = g.get(key)
            if other is None or other.shape != val.shape or not torch.equal(other.to(val.device), val):
                raise ValueError(f"generic_inputs sample {b}: {key!r} differs from the question's; the generic "
                                 "prompt must use the same image inputs (build both with the same image, e.g. "
                                 "hf_vgrefine.prompts.generic_inputs(processor, image))")


def _common_tail(inputs, spans, generic_inputs, adapter):
    """The generic prompt's ids after the image if every sample's generic prompt is the question's prefix
    (up to the image end) followed by one common tail; else ``None`` (then a full generic pass runs).
    The image inputs are already known to be the same (:func:`_check_same_images` runs first)."""
    g_spans = adapter.image_spans(generic_inputs)
    tails = []
    for b, sp in enumerate(spans):
        q_ids, g_ids = inputs["input_ids"][b], generic_inputs["input_ids"][b]
        q_start = int(inputs["attention_mask"][b].float().argmax()) if "attention_mask" in inputs else 0
        g_start = int(generic_inputs["attention_mask"][b].float().argmax()) if "attention_mask" in generic_inputs else 0
        g_end = g_spans[b][0].end
        if not torch.equal(q_ids[q_start:sp[0].end], g_ids[g_start:g_end]):
            return None
        tails.append(g_ids[g_end:])
    if any(not torch.equal(t, tails[0]) for t in tails[1:]):
        return None
    return tails[0]


def generation_position_ids(inputs: dict) -> torch.Tensor:
    """The ``position_ids`` ``generate`` gives the prefill: cumulative count of real tokens − 1 (pads → 0)."""
    mask = inputs.get("attention_mask")
    if mask is None:
        T = inputs["input_ids"].shape[1]
        return torch.arange(T, device=inputs["input_ids"].device)[None].expand(inputs["input_ids"].shape[0], T)
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(rows: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of 1-D id tensors → ``input_ids``, ``attention_mask`` ``[B, T]``."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


class VGRefineWrapper:
    """VGRefine around ``model`` (a supported HF VLM, e.g. ``LlavaForConditionalGeneration``).

    ``config``: :class:`VGRefineConfig`, a preset name, a path/hub id with ``vgrefine_config.json``.
    ``processor``: the model's processor; needed to build the generic prompt unless
    ``generic_norm="none"`` or ``generic_inputs=`` is passed to the calls.

    ``generate(**inputs, **generation_kwargs)`` has the signature and return type of ``model.generate``;
    ``__call__(**inputs)`` is one refined forward; ``refine_inputs(**inputs)`` returns the triage only.
    ``with wrapper:`` keeps the model on the package's attention function for several calls.
    """

    def __init__(self, model, config=None, processor=None, cache_size: int = 512, cache_dir=None):
        if config is None or processor is None:   # preset / depth default and the model's own processor
            from .defaults import resolve
            config, processor = resolve(model, config, processor)
        if not isinstance(config, VGRefineConfig):
            config = VGRefineConfig.from_pretrained(config)
        self.model = model
        self.config = config
        self.processor = processor
        self.adapter = get_adapter(model)
        config.check_model(self.adapter.num_layers, self.adapter.num_heads)
        self._cache = GenericMapCache(cache_size, directory=cache_dir, namespace=lambda: model_fingerprint(model))
        self._tail_memo: tuple | None = None
        self.last_triage: TriageResult | None = None
        self._probe: AttentionProbe | None = None

    # ------------------------------------------------------------------ context use
    def __enter__(self):
        self._probe = AttentionProbe(self.model, adapter=self.adapter)
        self._probe.__enter__()
        return self

    def __exit__(self, *exc):
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.__exit__(*exc)
        return False

    # ------------------------------------------------------------------ generic prompt
    def _generic_tail(self) -> torch.Tensor:
        """Token ids of the generic prompt after the image tokens, rendered with the processor's template
        (memoised per generic prompt, instruction and processor)."""
        memo_key = (self.config.generic_prompt, self.config.instruction, id(self.processor))
        if self._tail_memo is None or self._tail_memo[0] != memo_key:
            self._tail_memo = (memo_key, self._render_generic_tail())
        return self._tail_memo[1]

    def _render_generic_tail(self) -> torch.Tensor:
        if self.processor is None:
            raise ValueError("building the generic prompt needs the model's processor: "
                             "VGRefineWrapper(model, config, processor=processor), or pass generic_inputs=, or "
                             "set generic_norm='none'")
        text = self.config.generic_prompt
        if self.config.instruction:
            text = f"{text} {self.config.instruction}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        rendered = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        placeholder = self.adapter.image_placeholder(self.processor)
        if placeholder not in rendered:
            raise ValueError(f"the processor's chat template did not emit the image placeholder {placeholder!r}; "
                             "pass generic_inputs= built with your own template")
        tail = self.adapter.image_suffix_text(self.processor) + rendered.split(placeholder, 1)[1]
        ids = self.processor.tokenizer(tail, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        return ids

    def _generic_batch(self, inputs, spans, samples):
        """Generic-prompt inputs for ``samples``: each sample's prefix up to its image end + generic tail."""
        tail = self._generic_tail()
        rows = []
        for b in samples:
            valid = inputs["attention_mask"][b].bool() if "attention_mask" in inputs else None
            ids = inputs["input_ids"][b]
            start = int(valid.float().argmax()) if valid is not None else 0
            rows.append(torch.cat([ids[start:spans[b][0].end], tail]))
        pad = getattr(getattr(self.processor, "tokenizer", None), "pad_token_id", None)
        pad = pad if pad is not None else (self.adapter.text_config.pad_token_id or 0)
        ids, mask = left_pad(rows, pad)
        batch = {"input_ids": ids, "attention_mask": mask, **self.adapter.select_images(inputs, samples)}
        batch.update(self.adapter.id_derived(ids, inputs))
        return batch

    # ------------------------------------------------------------------ step I
    def refine_inputs(self, generic_inputs: dict | None = None, gt_token_masks=None, **inputs) -> TriageResult:
        """Triage of a (left-padded) batch: per sample the kept/knocked-out image tokens and the map.

        ``generic_inputs``: optional generic-prompt inputs (same images, same order) instead of building
        them with the processor. ``gt_token_masks``: list of bool ``[N]`` per sample, needed for
        ``knockout_set="oracle"`` (K = every image token outside the ground truth).
        """
        cfg = self.config
        t0 = time.perf_counter()
        spans = self.adapter.image_spans(inputs)
        B, T = inputs["input_ids"].shape
        for b, sp in enumerate(spans):
            main = [s for s in sp if s.block in ("grid", "base")]
            if len(main) != 1:
                raise ValueError(f"sample {b} has {len(main)} images; VGRefine supports one image per prompt")
        if generic_inputs is not None and cfg.generic_norm != "none" and cfg.knockout_set == "triage":
            _check_same_images(self.adapter, inputs, generic_inputs, list(range(B)))
        layers = cfg.triage_layers
        timings, hits = {}, 0
        q_maps = g_maps = None
        share = cfg.share_prefix and min(cfg.masked_layers) > 0
        share_generic = (cfg.share_prefix and cfg.generic_norm != "none" and cfg.query == "last"
                         and cfg.knockout_set == "triage")
        tail_ids = None
        if share_generic:
            tail_ids = self._generic_tail() if generic_inputs is None else _common_tail(inputs, spans, generic_inputs,
                                                                                          self.adapter)
            share_generic = tail_ids is not None
        positions = None
        if cfg.knockout_set == "triage":
            q_inputs = inputs
            if cfg.share_prefix:
                positions = self.adapter.position_ids(inputs)
                if self.adapter.explicit_position_ids:
                    # same position ids as generate's prefill, so the recorded prefix can be replayed
                    q_inputs = dict(inputs, position_ids=positions)
            n_kv = max(layers + ([min(cfg.masked_layers)] if share else [])) + 1 if share_generic else 0
            q_maps = capture_image_attention(self.model, q_inputs, layers=layers, query=cfg.query,
                                             early_exit=cfg.early_exit, spans=spans, adapter=self.adapter,
                                             record_prefix=min(cfg.masked_layers) if share else 0, record_kv=n_kv)
            timings["question_pass_s"] = time.perf_counter() - t0
            if cfg.generic_norm != "none":
                t1 = time.perf_counter()
                shared = (q_maps.prefix, positions, tail_ids) if share_generic else None
                g_maps, hits = self._generic_maps(inputs, spans, layers, generic_inputs, shared)
                timings["generic_pass_s"] = time.perf_counter() - t1
        samples, biases = [], []
        for b, sp in enumerate(spans):
            span = sp[0]
            n = span.n_tokens
            if cfg.knockout_set == "oracle":
                if gt_token_masks is None:
                    raise ValueError("knockout_set='oracle' needs gt_token_masks (one bool [N] per sample)")
                gt = torch.as_tensor(gt_token_masks[b], dtype=torch.bool).flatten()
                if gt.numel() != n:
                    raise ValueError(f"gt_token_masks[{b}] has {gt.numel()} cells, the image has {n} tokens")
                scores, K, tau, flags = gt.float(), ~gt, float("nan"), ["oracle"]
            else:
                qm = q_maps.sample(b)[..., :n]
                gm = g_maps[b] if g_maps is not None else None
                scores = triage_scores(qm, gm, q_maps.layers, cfg)
                K, tau, flags = knockout_set(scores, cfg)
            ko = K.nonzero().flatten()
            pos = span.positions[ko]
            row_stop = T if cfg.knockout_scope == "prefill" else None
            if cfg.knockout_heads == "all":
                biases.append(KeyBias(layers=tuple(cfg.masked_layers), batch_index=b, row_start=span.end,
                                      row_stop=row_stop, cols=pos))
            else:
                for l in cfg.masked_layers:
                    hs = tuple(h for ll, h in cfg.sensitive_heads if ll == l)
                    if hs:
                        biases.append(KeyBias(layers=(l,), batch_index=b, row_start=span.end, row_stop=row_stop,
                                              cols=pos, heads=hs))
            samples.append(SampleTriage(keep_mask=~K, triage_map=scores.float(), knocked_out=ko,
                                        knocked_out_positions=pos, threshold=tau, grid=(span.rows, span.cols),
                                        query_rows=(span.end, T), flags=flags))
        timings["triage_s"] = time.perf_counter() - t0
        result = TriageResult(samples=samples, biases=biases, timings=timings, generic_cache_hits=hits,
                              prefix=q_maps.prefix if q_maps is not None else None, seq_len=T)
        self.last_triage = result
        return result

    def _generic_key(self, inputs, generic_inputs, b: int, layers) -> tuple:
        """Cache key of sample ``b``'s generic map: image content, query mode, layers and generic prompt."""
        if generic_inputs is None:   # the rendered generic text after the image (template included)
            prompt = hashlib.sha1(self._generic_tail().numpy().tobytes()).hexdigest()
        else:
            row = generic_inputs["input_ids"][b]
            if "attention_mask" in generic_inputs:
                row = row[generic_inputs["attention_mask"][b].bool()]
            prompt = hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()
        return (_image_key(self.adapter, inputs, b), self.config.query, tuple(layers), prompt)

    def _generic_maps(self, inputs, spans, layers, generic_inputs, shared=None):
        """Generic-prompt maps ``[n_layers, H, N]`` per sample (LRU-cached per image and prompt) and the
        number of cache hits. One pass per distinct (image, prompt) among the misses."""
        cfg = self.config
        B = inputs["input_ids"].shape[0]
        keys = [self._generic_key(inputs, generic_inputs, b, layers) if cfg.cache_generic else ("sample", b)
                for b in range(B)]
        maps = [None] * B
        device = inputs["input_ids"].device
        found: dict = {}
        for b, key in enumerate(keys):
            if key[0] != "sample":
                if key not in found:
                    found[key] = self._cache.get(key)
                maps[b] = None if found[key] is None else found[key].to(device)
        hits = sum(m is not None for m in maps)
        uniq: dict = {}
        for b in range(B):
            if maps[b] is None:
                uniq.setdefault(keys[b], []).append(b)
        if not uniq:
            return maps, hits
        reps = [v[0] for v in uniq.values()]
        if shared is not None:
            cap = self._generic_tail_capture(inputs, spans, layers, reps, *shared)
        else:
            if generic_inputs is not None:
                batch = _take_rows(self.adapter, generic_inputs, reps)
            else:
                batch = self._generic_batch(inputs, spans, reps)
            g_spans = self.adapter.image_spans(batch)
            for i, r in enumerate(reps):
                if g_spans[i][0].n_tokens != spans[r][0].n_tokens:
                    raise ValueError(f"generic prompt of sample {r} has {g_spans[i][0].n_tokens} image tokens, the "
                                     f"question prompt {spans[r][0].n_tokens}: both must use the same image inputs")
            cap = capture_image_attention(self.model, batch, layers=layers, query=cfg.query,
                                          early_exit=cfg.early_exit, spans=g_spans, adapter=self.adapter)
        self._store_generic(cap, uniq, maps)
        return maps, hits

    def _store_generic(self, cap, uniq: dict, maps: list):
        for i, (key, members) in enumerate(uniq.items()):
            m = cap.sample(i).clone()
            for b in members:
                maps[b] = m
            if key[0] != "sample":
                self._cache.put(key, m)

    def _generic_tail_capture(self, inputs, spans, layers, reps, prefix, positions, tail):
        """Generic-prompt maps from the question pass's cached image prefix: only the generic prompt's
        text after the image is run (``[v_end, T)`` of the question is masked out), with the position ids
        it has in a standalone generic prompt. Equal to a full generic pass (tested)."""
        from transformers import DynamicCache

        tail = tail.to(inputs["input_ids"].device)
        n, t = len(reps), tail.numel()
        idx = torch.tensor(reps, device=tail.device)
        cache = DynamicCache()
        for layer in range(max(layers) + 1):
            k, v = prefix["kv"][layer]
            cache.update(k[idx], v[idx], layer)
        mask = inputs["attention_mask"][idx].clone() if "attention_mask" in inputs else \
            torch.ones_like(inputs["input_ids"][idx])
        for i, b in enumerate(reps):
            mask[i, spans[b][0].end:] = 0
        mask = torch.cat([mask, mask.new_ones(n, t)], 1)
        ends = torch.tensor([spans[b][0].end for b in reps], device=tail.device)
        start = positions[..., idx, :].gather(-1, ends.view(*([1] * (positions.dim() - 2)), n, 1).expand(
            *positions.shape[:-2], n, 1))
        pos = start + torch.arange(t, device=tail.device)
        ids = tail[None].expand(n, t)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        batch.update(self.adapter.id_derived(ids, inputs))
        return capture_image_attention(self.model, batch, layers=layers, query="last", early_exit=True,
                                       spans=[spans[b] for b in reps], adapter=self.adapter, cache=cache)

    # ------------------------------------------------------------------ step II
    def logits_processor(self, answer_choices=None, triage: TriageResult | None = None, generic_inputs=None,
                         **inputs) -> VGRefineLogitsProcessor:
        """Run the triage on ``inputs`` and arm the knockout in the active ``with wrapper:`` context.

        Returns the :class:`VGRefineLogitsProcessor` to put in ``generate``'s ``logits_processor`` list.
        """
        if self._probe is None:
            raise RuntimeError("use inside `with wrapper:` (the knockout must be active during model.generate)")
        triage = triage or self.refine_inputs(generic_inputs=generic_inputs, **inputs)
        state = self._probe.state
        state.biases = list(triage.biases)
        state.batch_size = inputs["input_ids"].shape[0]
        state.bias_enabled = True
        state.replace_mask = not self.config.compose_with_model_mask
        state.calls.clear()
        state.capture = None
        return VGRefineLogitsProcessor(state, knockout_scope=self.config.knockout_scope,
                                       answer_choices=answer_choices, masked_layers=self.config.masked_layers)

    def generate(self, generic_inputs: dict | None = None, answer_choices=None, gt_token_masks=None, **kwargs):
        """``model.generate`` with VGRefine; same arguments and return value as ``model.generate``.

        Extra keywords: ``generic_inputs`` (see :meth:`refine_inputs`), ``answer_choices`` (token ids the
        first answer token is restricted to), ``gt_token_masks`` (oracle knockout).
        """
        model_inputs = {k: v for k, v in kwargs.items() if k in self._input_keys(kwargs)}
        if kwargs.get("use_cache") is False:
            raise ValueError("VGRefine's knockout is defined on the prefill and its KV cache: generate with "
                             "use_cache=True (the default)")
        triage = self.refine_inputs(generic_inputs=generic_inputs, gt_token_masks=gt_token_masks, **model_inputs)
        user_lp = kwargs.pop("logits_processor", None)
        outer = self._probe is not None
        if not outer:
            self.__enter__()
        try:
            lp = self.logits_processor(answer_choices=answer_choices, triage=triage, **model_inputs)
            procs = LogitsProcessorList(list(user_lp or []) + [lp])
            t0 = time.perf_counter()
            if triage.prefix is not None and triage.prefix.get("hidden") is not None and self._can_replay(kwargs):
                with PrefixReplay(self.adapter, triage.prefix, triage.seq_len) as replay:
                    out = self.model.generate(**kwargs, logits_processor=procs)
                if not replay.all_used():
                    raise RuntimeError("share_prefix: the answer prefill did not consume the recorded prefix "
                                       "(inputs changed between triage and generate?)")
            else:
                out = self.model.generate(**kwargs, logits_processor=procs)
            triage.timings["generate_s"] = time.perf_counter() - t0
            triage.timings["steps"] = lp.steps
        finally:
            if not outer:
                self.__exit__(None, None, None)
        return out

    def __call__(self, generic_inputs: dict | None = None, gt_token_masks=None, **inputs):
        """One refined forward (prefill with the knockout); returns the model's output.

        ``gt_token_masks``: per-sample bool ``[N]`` ground-truth token masks (``knockout_set="oracle"``)."""
        triage = self.refine_inputs(generic_inputs=generic_inputs, gt_token_masks=gt_token_masks,
                                    **{k: v for k, v in inputs.items() if k in self._input_keys(inputs)})
        probe = AttentionProbe(self.model, biases=triage.biases, batch_size=inputs["input_ids"].shape[0],
                               adapter=self.adapter)
        probe.state.replace_mask = not self.config.compose_with_model_mask
        with torch.no_grad(), probe:
            return self.model(**inputs)

    def plot_triage(self, image, index: int = 0, triage: TriageResult | None = None, path=None, boxes=None,
                    mask=None, **overlay_kwargs):
        """Draw sample ``index``'s triage (map + outline of the kept tokens) over its original ``image``.

        Uses :attr:`last_triage` unless ``triage`` is given; the token grid comes from the processor's
        settings for this image size (``adapter.token_grid``). ``boxes`` (xywh) / ``mask``: a region to
        outline. ``path``: also write a PNG. Returns the matplotlib ``Figure``.
        """
        from ..viz import _image_array, plot_triage_overlay

        triage = triage or self.last_triage
        if triage is None:
            raise ValueError("no triage yet: call generate(...), refine_inputs(...) or the wrapper first")
        if not 0 <= index < len(triage):
            raise ValueError(f"index {index} out of range: the triage has {len(triage)} samples")
        if self.processor is None:
            raise ValueError("plot_triage maps tokens to pixels with the processor's settings: "
                             "VGRefineWrapper(model, config, processor=processor)")
        img = _image_array(image)
        grid = self.adapter.token_grid(self.processor, (img.shape[1], img.shape[0]))
        t = triage[index]
        if (grid.rows, grid.cols) != tuple(t.grid):
            raise ValueError(f"this image gives a {grid.rows}x{grid.cols} token grid, sample {index} was triaged on "
                             f"{t.grid[0]}x{t.grid[1]}: pass the image of that sample")
        return plot_triage_overlay(img, t.triage_map.cpu().numpy(), t.keep_mask.cpu().numpy(), grid, boxes=boxes,
                                   mask=mask, path=path, **overlay_kwargs)

    def _can_replay(self, kwargs) -> bool:
        """Prefix replay writes into a dynamic cache; other cache set-ups run the full prefill."""
        if any(k in kwargs for k in ("past_key_values", "cache")) or kwargs.get("use_cache") is False:
            return False
        gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        impl = kwargs.get("cache_implementation", getattr(gc, "cache_implementation", None))
        return impl in (None, "dynamic")

    @staticmethod
    def _input_keys(kwargs) -> set:
        known = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "image_sizes", "mm_token_type_ids",
                 "token_type_ids", "pixel_attention_mask"}
        if "input_ids" not in kwargs:
            raise ValueError("VGRefine needs input_ids with image tokens (the processor's output for an image + "
                             "prompt); inputs_embeds alone are not supported")
        return known & set(kwargs)
