"""``VGRefineWrapper``: VGRefine around any supported HF VLM, inside ``generate``.

Per call:

1. **Triage** (step I): capture the question prompt's attention to the image at the sensitive heads'
   layers (early exit after the deepest one), and the generic prompt's at the same layers (cached per
   image content); compute the relative map and the knockout set per sample (:mod:`.triage`).
2. **Knockout** (step II): during ``model.generate`` the registered attention function blocks the
   post-image prompt rows ``[v_end, T)`` from attending to the knocked-out image keys in the masked
   layers (all heads by default), composed with the layer's own mask; prefill only by default.

The passes run through :class:`hf_vgrefine.grounding_pass.GroundingPass` (prompt layout, packed generic
prompt, generic-map cache, prefix record/replay). Between the start of the triage and the answer's first
token nothing is read back to the host except the prompt's layout and image fingerprints, read once before
the first kernel. Everything goes through :class:`hf_vgrefine.attention.AttentionProbe`: the model's
attention implementation is restored on exit, also after an exception.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList

from ..adapters import get_adapter
from ..attention import AttentionProbe, KeyBlock
from ..generic_cache import GenericMapCache, model_fingerprint
from ..grounding_pass import (GroundingPass, PrefixRecord, PrefixReplay, PromptLayout, common_tail,
                              eager_if_compiled, host_sizes, image_fingerprints)
from .config import VGRefineConfig
from .logits import VGRefineLogitsProcessor
from .triage import knockout_set, triage_flags, triage_scores

logger = logging.getLogger(__name__)


@dataclass
class SampleTriage:
    """Triage result of one sample (tensors on the model's device).

    ``keep_mask``: bool ``[N]`` (True = kept image token, row-major over ``grid``); ``triage_map``: float
    ``[N]`` relative score; ``threshold``: the percentile value (or magnitude threshold), a 0-d tensor
    (``float(t.threshold)`` reads it). ``knocked_out`` (token indices in ``[0, N)``),
    ``knocked_out_positions`` (the same as positions in the padded sequence) and ``flags`` are computed on
    first access (they read the device).
    """

    keep_mask: torch.Tensor
    triage_map: torch.Tensor
    threshold: torch.Tensor
    grid: tuple
    query_rows: tuple
    positions: torch.Tensor = field(repr=False, default=None)
    config: object = field(repr=False, default=None)
    _flags: list | None = field(repr=False, default=None)

    @property
    def knocked_out(self) -> torch.Tensor:
        return (~self.keep_mask).nonzero().flatten()

    @property
    def knocked_out_positions(self) -> torch.Tensor:
        return self.positions.to(self.keep_mask.device)[~self.keep_mask]

    @property
    def flags(self) -> list:
        if self._flags is None:
            self._flags = triage_flags(self.triage_map, self.config)
        return self._flags

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
    """Per-sample :class:`SampleTriage` plus the knockout (``biases``: :class:`~hf_vgrefine.attention.KeyBlock`
    list), timings, generic-cache hits and the question pass's :class:`~hf_vgrefine.grounding_pass.PrefixRecord`."""

    samples: list
    biases: list
    timings: dict
    generic_cache_hits: int = 0
    prefix: PrefixRecord | None = None
    seq_len: int = 0

    def __getitem__(self, i):
        return self.samples[i]

    def __len__(self):
        return len(self.samples)


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
        config.check_model(self.adapter.num_layers, self.adapter.num_heads, self.adapter.attention_layers)
        self._cache = GenericMapCache(cache_size, directory=cache_dir, namespace=lambda: model_fingerprint(model))
        self.grounding = GroundingPass(model, adapter=self.adapter, cache=self._cache)
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
        """Token ids (host) of the generic prompt after the image tokens, rendered with the processor's
        template (memoised per generic prompt, instruction and processor)."""
        memo_key = (self.config.generic_prompt, self.config.instruction, id(self.processor))
        if self._tail_memo is None or self._tail_memo[0] != memo_key:
            tail = self._render_generic_tail()
            self._tail_memo = (memo_key, tail, hashlib.sha1(tail.numpy().tobytes()).hexdigest())
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
        tail = (self.adapter.image_suffix_text(self.processor) + rendered.split(placeholder, 1)[1]
                + self.adapter.prompt_end_text(self.processor))
        return self.processor.tokenizer(tail, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    def _generic_batch(self, inputs: dict, layout: PromptLayout, samples: list) -> dict:
        """Generic-prompt inputs of ``samples``: each one's prefix up to its image end + the generic tail (ids
        from the layout's host copy: no second read of the device tensors)."""
        tail = self._generic_tail()
        rows = [torch.cat([layout.ids[b, layout.starts[b]:layout.main[b].end], tail]) for b in samples]
        pad = getattr(getattr(self.processor, "tokenizer", None), "pad_token_id", None)
        pad = pad if pad is not None else (self.adapter.text_config.pad_token_id or 0)
        ids, att = left_pad(rows, pad)
        dev = inputs["input_ids"].device
        batch = {"input_ids": ids.to(dev), "attention_mask": att.to(dev), **self.adapter.select_images(inputs, samples)}
        batch.update(self.adapter.id_derived(batch["input_ids"], inputs))
        return batch

    def _check_same_images(self, inputs, generic_inputs, q_prints: list) -> None:
        """Raise unless ``generic_inputs`` carry the same image inputs as ``inputs`` (per sample)."""
        B = inputs["input_ids"].shape[0]
        if generic_inputs["input_ids"].shape[0] != B:
            raise ValueError(f"generic_inputs has {generic_inputs['input_ids'].shape[0]} samples, the inputs "
                             f"{B}: pass one generic prompt per sample, same order")
        sizes = host_sizes(generic_inputs)
        for b in range(B):
            g = image_fingerprints(self.adapter, generic_inputs, b, sizes)
            for key, val in q_prints[b].items():
                if g.get(key) != val:
                    raise ValueError(f"generic_inputs sample {b}: {key!r} differs from the question's; the generic "
                                     "prompt must use the same image inputs (build both with the same image, e.g. "
                                     "hf_vgrefine.prompts.generic_inputs(processor, image))")

    def _generic_key(self, prints: dict, generic_layout: PromptLayout | None, b: int) -> tuple:
        """Cache key of sample ``b``'s generic map: image fingerprint, query mode, layers and generic prompt."""
        if generic_layout is None:   # the rendered generic text after the image (template included)
            self._generic_tail()
            prompt = self._tail_memo[2]
        else:
            row = generic_layout.ids[b, generic_layout.starts[b]:]
            prompt = hashlib.sha1(row.numpy().tobytes()).hexdigest()
        image = hashlib.sha1(repr(sorted(prints.items())).encode()).hexdigest()
        return (image, self.config.query, tuple(self.config.triage_layers), prompt)

    # ------------------------------------------------------------------ step I
    def refine_inputs(self, generic_inputs: dict | None = None, gt_token_masks=None, **inputs) -> TriageResult:
        """Triage of a (left-padded) batch: per sample the kept/knocked-out image tokens and the map.

        ``generic_inputs``: optional generic-prompt inputs (same images, same order) instead of building
        them with the processor. ``gt_token_masks``: list of bool ``[N]`` per sample, needed for
        ``knockout_set="oracle"`` (K = every image token outside the ground truth).
        """
        cfg = self.config
        t0 = time.perf_counter()
        layout = PromptLayout.read(self.adapter, inputs)          # the one host read of the call
        layout.require_one_image()
        main = layout.main
        B, T, dev = layout.B, layout.T, layout.device
        timings, hits, record = {}, 0, None
        if cfg.knockout_set == "oracle":
            if gt_token_masks is None:
                raise ValueError("knockout_set='oracle' needs gt_token_masks (one bool [N] per sample)")
            K, scores, tau = [], [], []
            for b, span in enumerate(main):
                gt = torch.as_tensor(gt_token_masks[b], dtype=torch.bool).flatten()
                if gt.numel() != span.n_tokens:
                    raise ValueError(f"gt_token_masks[{b}] has {gt.numel()} cells, the image has {span.n_tokens} tokens")
                gt = gt.to(dev, non_blocking=True)
                K.append(~gt)
                scores.append(gt.float())
                tau.append(torch.full((), float("nan"), dtype=torch.float64, device=dev))
        else:
            need_generic = cfg.generic_norm != "none"
            g_layout = None
            q_prints = None
            if need_generic and (generic_inputs is not None or cfg.cache_generic):
                q_prints = [image_fingerprints(self.adapter, inputs, b, layout.sizes) for b in range(B)]
            if need_generic and generic_inputs is not None:
                self._check_same_images(inputs, generic_inputs, q_prints)
                g_layout = PromptLayout.read(self.adapter, generic_inputs)
            layers = cfg.triage_layers
            # hybrid models (Qwen 3.5), sparse attention (DSA), short convolutions (Inkling): no shared prefix, the
            # generic prompt runs in its own pass and the answer's prefill in full (FamilyAdapter.prefix_paths_exact);
            # latent-KV caches (adapter.can_replay_prefix False): the generic tail still packs, no prefix record
            share = cfg.share_prefix and self.adapter.prefix_paths_exact
            record_n = (min(cfg.masked_layers) if share and self.adapter.can_replay_prefix
                        and min(cfg.masked_layers) > 0 else 0)
            if need_generic:
                keys = [self._generic_key(q_prints[b], g_layout, b) for b in range(B)] if cfg.cache_generic else None
                tail = None
                # prefix-LM: the image keys see the text; hybrid: the linear layers' state carries the question
                pack = share and not self.adapter.prefix_lm
                if pack:
                    tail = self._generic_tail() if generic_inputs is None else common_tail(layout, g_layout)
                generic = generic_inputs if generic_inputs is not None else (
                    lambda: self._generic_batch(inputs, layout, list(range(B))))
                res, g_maps, hits = self.grounding.question_and_generic(
                    inputs, layout, layers, query=cfg.query, generic=generic, generic_layout=g_layout, tail=tail,
                    keys=keys, record_prefix=record_n, early_exit=cfg.early_exit, pack=pack)
            else:
                res = self.grounding.run(inputs, layout, layers=layers, query=cfg.query, early_exit=cfg.early_exit,
                                         record_prefix=record_n)
                g_maps = None
            record = res.record
            timings["triage_pass_s"] = time.perf_counter() - t0
            q = res.question
            # attention_dtype="model": the released numerics in the decoder's dtype (bf16 on GPU)
            dtype = next(self.adapter.decoder_layers.parameters()).dtype if cfg.attention_dtype == "model" else None
            if len(set(q.n_tokens)) == 1:                      # one batched triage on the device
                g = torch.stack(g_maps) if g_maps is not None else None
                s = triage_scores(q.maps, g, q.layers, cfg, model_dtype=dtype)
                k, t = knockout_set(s, cfg)
                scores, K, tau = list(s), list(k), list(t)
            else:
                scores, K, tau = [], [], []
                for b in range(B):
                    s = triage_scores(q.sample(b), g_maps[b] if g_maps is not None else None, q.layers, cfg,
                                      model_dtype=dtype)
                    k, t = knockout_set(s, cfg)
                    scores.append(s)
                    K.append(k)
                    tau.append(t)
        keys_blocked = layout.key_mask(K, dev)
        v_end = torch.tensor([s.end for s in main]).to(dev, non_blocking=True)
        row_hi = torch.full((B,), T, dtype=torch.long, device=dev) if cfg.knockout_scope == "prefill" else None
        rows_end = T if row_hi is not None else None
        if cfg.knockout_heads == "all":
            biases = [KeyBlock(layers=cfg.masked_layers, row_lo=v_end, row_hi=row_hi, keys=keys_blocked,
                               rows_end=rows_end)]
        else:
            biases = []
            for l in cfg.masked_layers:
                hs = tuple(h for ll, h in cfg.sensitive_heads if ll == l)
                if hs:
                    biases.append(KeyBlock(layers=(l,), row_lo=v_end, row_hi=row_hi, keys=keys_blocked, heads=hs,
                                           rows_end=rows_end))
        samples = [SampleTriage(keep_mask=~K[b], triage_map=scores[b].float(), threshold=tau[b],
                                grid=(span.rows, span.cols), query_rows=(span.end, T), positions=span.positions,
                                config=cfg) for b, span in enumerate(main)]
        timings["triage_s"] = time.perf_counter() - t0
        result = TriageResult(samples=samples, biases=biases, timings=timings, generic_cache_hits=hits,
                              prefix=record, seq_len=T)
        self.last_triage = result
        return result

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
        if kwargs.get("use_cache") is False:
            raise ValueError("VGRefine's knockout is defined on the prefill and its KV cache: generate with "
                             "use_cache=True (the default)")
        model_inputs = {k: v for k, v in kwargs.items() if k in self._input_keys(kwargs)}
        user_lp = kwargs.pop("logits_processor", None)
        outer = self._probe is not None
        if not outer:
            self.__enter__()
        try:
            triage = self.refine_inputs(generic_inputs=generic_inputs, gt_token_masks=gt_token_masks, **model_inputs)
            lp = self.logits_processor(answer_choices=answer_choices, triage=triage, **model_inputs)
            procs = LogitsProcessorList(list(user_lp or []) + [lp])
            if self.config.knockout_scope == "all_steps":
                kwargs.setdefault("disable_compile", True)   # compiled decode steps would skip the knockout
            t0 = time.perf_counter()
            with self._eager_if_compiled():
                if triage.prefix is not None and self._can_replay(kwargs):
                    with PrefixReplay(self.adapter, triage.prefix) as replay:
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

    def _eager_if_compiled(self):
        return eager_if_compiled(self.model)

    def __call__(self, generic_inputs: dict | None = None, gt_token_masks=None, **inputs):
        """One refined forward (prefill with the knockout); returns the model's output.

        ``gt_token_masks``: per-sample bool ``[N]`` ground-truth token masks (``knockout_set="oracle"``)."""
        probe = AttentionProbe(self.model, batch_size=inputs["input_ids"].shape[0], adapter=self.adapter)
        probe.state.replace_mask = not self.config.compose_with_model_mask
        with torch.no_grad(), probe, self._eager_if_compiled():
            triage = self.refine_inputs(generic_inputs=generic_inputs, gt_token_masks=gt_token_masks,
                                        **{k: v for k, v in inputs.items() if k in self._input_keys(inputs)})
            probe.state.biases = list(triage.biases)
            return self.model(**inputs)

    def plot_triage(self, image, index: int = 0, triage: TriageResult | None = None, path=None, boxes=None,
                    mask=None, **overlay_kwargs):
        """Draw sample ``index``'s triage (map + outline of the kept tokens) over its original ``image``.

        Uses :attr:`last_triage` unless ``triage`` is given; the token grid comes from the processor's
        settings for this image size (``adapter.token_grid``). ``boxes`` (xywh) / ``mask``: a region to
        outline. ``path``: also write a PNG. Returns the matplotlib ``Figure``.
        """
        from ..viz import image_array, plot_triage_overlay

        triage = triage or self.last_triage
        if triage is None:
            raise ValueError("no triage yet: call generate(...), refine_inputs(...) or the wrapper first")
        if not 0 <= index < len(triage):
            raise ValueError(f"index {index} out of range: the triage has {len(triage)} samples")
        if self.processor is None:
            raise ValueError("plot_triage maps tokens to pixels with the processor's settings: "
                             "VGRefineWrapper(model, config, processor=processor)")
        img = image_array(image)
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

    def _input_keys(self, kwargs) -> set:
        """The keys of ``kwargs`` that are the prompt's model inputs (the adapter's ``model_input_keys``)."""
        if "input_ids" not in kwargs:
            raise ValueError("VGRefine needs input_ids with image tokens (the processor's output for an image + "
                             "prompt); inputs_embeds alone are not supported")
        return set(self.adapter.model_input_keys) & set(kwargs)
