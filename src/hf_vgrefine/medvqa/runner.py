"""Evaluation runner: batched greedy generation per method, resumable JSONL, summary, paired tests.

Output folder (``out_dir``):

* ``predictions.jsonl`` — one record per (method, item) (merged, ordered by method then item);
  ``predictions.rank{r}.jsonl`` — per-process shards while running (flush + fsync per batch), merged
  and removed by the main process at the end. A rerun skips (method, id) pairs already recorded.
* ``summary.json`` / ``summary.md`` — rows = methods, columns = datasets + macro + micro; open-ended
  results separately; paired comparisons (exact McNemar, flipped items). No timings, so an
  interrupted-and-resumed run gives the same summary as an uninterrupted one.
* ``manifest.json`` — model, revision, library versions, seed, decoding, prompt template, scorer, methods.

The pieces live in :mod:`.methods`, :mod:`.records` (JSONL on disk), :mod:`.report` (summary) and
:mod:`.manifest`; process sharding is :mod:`hf_vgrefine.sharding`.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..prompts import chat_inputs
from ..sharding import RunShard
from .manifest import build_manifest, check_resume
from .methods import Method, resolve_methods
from .protocol import MCQ_TEMPLATE, VGREFINE_INSTRUCTION, PreparedItems, build_mcq_prompt, prepare_items
from .records import PREDICTIONS, ShardWriter, make_record, merge_shards, read_records, rescore
from .report import EvalReport, build_summary, summary_markdown
from .schema import CLOSED, MedVQAItem, open_image
from .scorers import get_scorer, score_open

__all__ = ["DECODING_PRESETS", "PREDICTIONS", "evaluate_medvqa", "evaluate", "item_prompt", "run_batch", "decode_new"]

DECODING_PRESETS: dict[str, dict[str, Any]] = {
    # package default (docs/medvqa.md § Decoding): greedy, one letter
    "greedy": {"do_sample": False, "min_new_tokens": 1, "max_new_tokens": 1},
    # HuatuoGPT-Vision official eval (sampling); batch 1 and set_seed(42) in the original
    "huatuo_official": {"do_sample": True, "temperature": 0.2, "repetition_penalty": 1.2, "min_new_tokens": 1,
                        "max_new_tokens": 256},
}


def item_prompt(item: MedVQAItem, instruction: str | None = VGREFINE_INSTRUCTION, template: str = MCQ_TEMPLATE) -> str:
    """MCQ prompt for closed items (docs/medvqa.md), the bare question for open items; ``instruction`` appended
    after one space to both (``docs/medvqa.md`` § VGRefine and the MCQ prompt; None disables)."""
    if item.answer_type == CLOSED:
        return build_mcq_prompt(item.question, item.options, template=template, instruction=instruction)
    return f"{item.question} {instruction}" if instruction else item.question


def decode_new(processor, out, input_len: int) -> list[str]:
    """The generated text after the ``input_len`` prompt tokens of each row, stripped."""
    seqs = out.sequences if hasattr(out, "sequences") else out
    if isinstance(seqs, Mapping):
        seqs = seqs["sequences"]
    return [s.strip() for s in processor.batch_decode(seqs[:, input_len:], skip_special_tokens=True)]


def evaluate_medvqa(model, processor, items: Sequence[MedVQAItem] | PreparedItems,
                    methods: Sequence[str | Method] = ("baseline", "vgrefine"), vgrefine_config: Any = None, *,
                    scorer: str = "mcq_letter", batch_size: int = 8, max_new_tokens: int | None = None,
                    decoding: str = "greedy", gen_kwargs: Mapping[str, Any] | None = None,
                    instruction: str | None = "auto", template: str = MCQ_TEMPLATE,
                    chat_template: str | None = None, answer_types: Sequence[str] = (CLOSED,),
                    out_dir: str | os.PathLike | None = None, limit: int | None = None, seed: int = 42,
                    model_id: str | None = None, revision: str | None = None, progress: bool = True,
                    generic_cache_dir: str | os.PathLike | None = None) -> EvalReport:
    """Evaluate ``methods`` on ``items`` with the closed-ended MCQ protocol.

    Items are filtered (:func:`~.protocol.prepare_items`: ``answer_types``, no-option and duplicate
    removal, first ``limit`` per dataset). Every method sees the same items, order and prompt
    (:func:`item_prompt`: MCQ prompt + ``instruction``; ``"auto"``: the VGRefine config's ``instruction``
    when a method has one, else :data:`~.protocol.VGREFINE_INSTRUCTION`, as docs/medvqa.md requires the
    baseline to see the VGRefine answer-pass prompt; None: no suffix), rendered with the processor chat template
    (``chat_template`` overrides it) in left-padded batches of ``batch_size``.
    Decoding: ``decoding`` preset (``"greedy"``: ``do_sample=False``, 1 new token; ``"huatuo_official"``:
    sampling, 256 tokens), ``max_new_tokens`` / ``gen_kwargs`` override it, a method's own
    ``gen_kwargs`` override those. Closed items are scored with ``scorer``; open items by exact match +
    token recall. Images that cannot be opened give an error record (excluded, listed).

    Data parallel: under ``accelerate launch`` each process takes items ``i % world_size == rank``,
    appends to ``out_dir/predictions.rank{rank}.jsonl``; after ``wait_for_everyone`` the main process
    merges and writes the summary. ``out_dir`` is required with several processes; with ``out_dir``
    a rerun skips (method, id) pairs already recorded. ``generic_cache_dir``: VGRefine keeps its
    generic-prompt maps there across runs. Returns an :class:`EvalReport` on every process.
    """
    from tqdm.auto import tqdm
    from transformers import set_seed

    shard = RunShard.current(required=True)
    world, rank = shard.world, shard.rank
    if world > 1 and out_dir is None:
        raise ValueError("out_dir is required when running with several processes")
    prepared = items if isinstance(items, PreparedItems) else prepare_items(items, answer_types=answer_types, limit=limit)
    all_items = prepared.items
    score_closed = get_scorer(scorer)
    method_objs = resolve_methods(methods, model, processor, vgrefine_config, generic_cache_dir=generic_cache_dir)
    method_names = [m.name for m in method_objs]
    if instruction == "auto":
        instruction = next((m.config.instruction for m in method_objs if hasattr(m.config, "instruction")),
                           VGREFINE_INSTRUCTION)
    if decoding not in DECODING_PRESETS:
        raise ValueError(f"unknown decoding {decoding!r}; choose one of {sorted(DECODING_PRESETS)}")
    run_kwargs = dict(DECODING_PRESETS[decoding])
    if max_new_tokens is not None:
        run_kwargs["max_new_tokens"] = max_new_tokens
    run_kwargs.update(gen_kwargs or {})
    tok = getattr(processor, "tokenizer", processor)
    if "pad_token_id" not in run_kwargs:
        pad = getattr(tok, "pad_token_id", None)
        run_kwargs["pad_token_id"] = pad if pad is not None else getattr(tok, "eos_token_id", None)
    set_seed(seed)

    out = Path(out_dir) if out_dir is not None else None
    prompts = {it.id: item_prompt(it, instruction, template) for it in all_items}
    datasets = list(dict.fromkeys(it.dataset for it in all_items))
    bundle_flags: dict[str, bool] = {}
    for it in all_items:
        bundle_flags[it.dataset] = bundle_flags.get(it.dataset, True) and it.bundle_identical
    manifest = build_manifest(
        model, processor, model_id=model_id, revision=revision, methods=method_objs, decoding=decoding,
        gen_kwargs={k: v for k, v in run_kwargs.items() if k != "pad_token_id"}, seed=seed, scorer=scorer,
        template=template, instruction=instruction, chat_template=chat_template,
        example_prompt=next(iter(prompts.values()), None), batch_size=batch_size, world_size=world, limit=limit,
        answer_types=answer_types, removed=prepared.removed)

    done: set[tuple[str, str]] = set()
    memory: list[dict] = []
    writer = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        old_keys = check_resume(out, manifest)
        done = {(r["method"], r["id"]) for r in read_records(out) if r.get("error") is None}
        shard.wait()  # every process has read the old manifest before it is replaced
        manifest["resume_keys"] = {**old_keys, **manifest["resume_keys"]}
        if shard.is_main:
            atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", fsync=True)
        writer = ShardWriter(out / f"predictions.rank{rank}.jsonl")
    my_items = [all_items[i] for i in shard.take([it.id for it in all_items])]
    t0 = time.time()
    n_generated = 0
    try:
        for method in method_objs:
            todo = [it for it in my_items if (method.name, it.id) not in done]
            kwargs = {**run_kwargs, **method.gen_kwargs}
            bar = tqdm(total=len(todo), desc=f"{method.name} [{rank}/{world}]", disable=not (progress and shard.is_main),
                       unit="item")
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                recs = run_batch(model, processor, method, batch, prompts, kwargs, chat_template, score_closed)
                n_generated += sum(r.get("error") is None for r in recs)
                if writer is not None:
                    writer.write(recs)
                else:
                    memory.extend(recs)
                bar.update(len(batch))
            bar.close()
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.time() - t0

    order = [(m, it.id) for m in method_names for it in all_items]
    by_id = {it.id: it for it in all_items}

    def rescore_all(recs: list[dict]) -> list[dict]:
        return [rescore(r, by_id.get(r["id"]), score_closed, scorer) for r in recs]

    if out is not None:
        shard.wait()
        if shard.is_main:
            merge_shards(out, order, transform=rescore_all)
        shard.wait()
        records = read_records(out)
    else:
        records = rescore_all(memory)
    wanted = set(order)
    pos = {k: i for i, k in enumerate(order)}
    records = sorted((r for r in records if (r["method"], r["id"]) in wanted), key=lambda r: pos[(r["method"], r["id"])])
    summary = build_summary(records, method_names, datasets, scorer=scorer, prompt_template=template,
                            instruction=instruction, removed=prepared.removed, bundle_identical=bundle_flags)
    manifest["timing"] = {"seconds_this_process": round(elapsed, 3), "generated_this_process": n_generated,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if out is not None and shard.is_main:
        atomic_write(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n", fsync=True)
        atomic_write(out / "summary.md", summary_markdown(summary), fsync=True)
        atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", fsync=True)
    return EvalReport(summary=summary, records=records, manifest=manifest, out_dir=out)


def evaluate(*args, **kwargs) -> EvalReport:
    """Deprecated name of :func:`evaluate_medvqa` (it shadowed the ``evaluate`` library in
    ``from hf_vgrefine.medvqa import evaluate``); removed in the next release."""
    warnings.warn("hf_vgrefine.medvqa.evaluate is deprecated and will be removed in the next release; use "
                  "hf_vgrefine.medvqa.evaluate_medvqa (same arguments)", DeprecationWarning, stacklevel=2)
    return evaluate_medvqa(*args, **kwargs)


def run_batch(model, processor, method: Method, batch: Sequence[MedVQAItem], prompts: Mapping[str, str],
               gen_kwargs: Mapping[str, Any], chat_template: str | None, score_closed) -> list[dict]:
    """Generate and score one batch; items whose images fail to open get error records."""
    import torch

    recs: list[dict | None] = [None] * len(batch)
    ok_idx, ok_prompts, ok_images = [], [], []
    for i, it in enumerate(batch):
        prompt = prompts[it.id]
        if method.prompt_fn is not None:
            prompt = method.prompt_fn(it, prompt)
        reason = method.unsupported(it) if method.unsupported is not None else None
        if reason:
            recs[i] = make_record(method.name, it, prompt, None, error=reason)
            continue
        try:
            ims = [open_image(im) for im in it.images]
        except Exception as e:  # noqa: BLE001 - fail loudly: recorded, excluded, listed
            recs[i] = make_record(method.name, it, prompt, None, error=f"image: {type(e).__name__}: {e}")
            continue
        ok_idx.append(i)
        ok_prompts.append(prompt)
        ok_images.append(ims)
    if ok_idx:
        inputs = chat_inputs(processor, ok_prompts, ok_images, chat_template=chat_template)
        device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
        if device is not None:
            inputs = inputs.to(device=device, dtype=dtype) if dtype is not None and dtype.is_floating_point \
                else inputs.to(device)
        with torch.inference_mode():
            out = method.generate_fn(**inputs, **gen_kwargs)
        responses = decode_new(processor, out, inputs["input_ids"].shape[1])
        for i, prompt, resp in zip(ok_idx, ok_prompts, responses):
            it = batch[i]
            if it.answer_type == CLOSED:
                s = score_closed(resp, it)
                recs[i] = make_record(method.name, it, prompt, resp, extracted=s.extracted, step=s.step,
                                  target=s.target, correct=bool(s.correct))
            else:
                s = score_open(resp, it)
                recs[i] = make_record(method.name, it, prompt, resp, exact=s.exact, recall=s.recall)
    return [r for r in recs if r is not None]
