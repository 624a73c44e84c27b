"""Evaluation runner: batched greedy generation per method, resumable JSONL, summary, paired tests.

Output folder (``out_dir``):

* ``predictions.jsonl`` — one record per (method, item) (merged, ordered by method then item);
  ``predictions.rank{r}.jsonl`` — per-process shards while running (flush + fsync per batch), merged
  and removed by the main process at the end. A rerun skips (method, id) pairs already recorded.
* ``summary.json`` / ``summary.md`` — rows = methods, columns = datasets + macro + micro; open-ended
  results separately; paired comparisons (exact McNemar, flipped items). No timings, so an
  interrupted-and-resumed run gives the same summary as an uninterrupted one.
* ``manifest.json`` — model, revision, library versions, seed, decoding, prompt template, scorer, methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from .protocol import MCQ_TEMPLATE, VGREFINE_INSTRUCTION, PreparedItems, build_mcq_prompt, prepare_items
from .schema import CLOSED, OPEN, MedVQAItem, open_image
from .scorers import SCORER_VERSION, get_scorer, score_open
from .stats import paired_comparison, summarise_closed, summarise_open

PREDICTIONS = "predictions.jsonl"
DECODING_PRESETS: dict[str, dict[str, Any]] = {
    # package default (docs/medvqa.md § Decoding): greedy, one letter
    "greedy": {"do_sample": False, "min_new_tokens": 1, "max_new_tokens": 1},
    # HuatuoGPT-Vision official eval (sampling); batch 1 and set_seed(42) in the original
    "huatuo_official": {"do_sample": True, "temperature": 0.2, "repetition_penalty": 1.2, "min_new_tokens": 1,
                        "max_new_tokens": 256},
}


# ---------------------------------------------------------------------------------------------------
# methods


@dataclass
class Method:
    """One way of answering: ``generate_fn(**inputs, **gen_kwargs)`` with the contract of
    ``model.generate`` (returns token ids ``(B, T_in + T_new)`` or an output with ``.sequences``).

    ``gen_kwargs`` override the run's decoding kwargs for this method; ``prompt_fn(item, prompt)`` may
    rewrite the prompt (a prompt variant); ``unsupported(item)`` returns a reason string for items the
    method cannot answer (they get an error record: excluded from accuracy, listed); ``config`` is
    recorded in the manifest.
    """

    name: str
    generate_fn: Callable[..., Any]
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_fn: Callable[[MedVQAItem, str], str] | None = None
    unsupported: Callable[[MedVQAItem], str | None] | None = None
    config: Any = None


def baseline_method(model, name: str = "baseline", **gen_kwargs) -> Method:
    """Plain ``model.generate``."""
    return Method(name, model.generate, dict(gen_kwargs))


def resolve_vgrefine_config(spec: Any):
    """VGRefine configuration from ``None`` / a ``VGRefineConfig`` / a dict / a JSON string / a preset
    name, JSON file, folder with ``vgrefine_config.json`` or Hub id (``VGRefineConfig.from_pretrained``)."""
    if spec is None or not isinstance(spec, (str, os.PathLike, dict)):
        return spec
    from hf_vgrefine.vgrefine import VGRefineConfig

    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if not s.lstrip().startswith("{"):
            return VGRefineConfig.from_pretrained(s)
        spec = json.loads(s)
    return VGRefineConfig.from_dict(spec)


def _single_image_only(item: MedVQAItem) -> str | None:
    n = len(item.images)
    return None if n == 1 else f"unsupported: VGRefine needs exactly one image per prompt ({n} given)"


def vgrefine_method(model, processor, config: Any = None, name: str = "vgrefine", generic_cache_dir=None,
                    **gen_kwargs) -> Method:
    """``VGRefineWrapper(model, config, processor=processor).generate(**inputs, **gen_kwargs)``.

    The wrapper is built once, before any generation, so a bad config fails the run at start.
    ``generic_cache_dir``: persist the generic-prompt maps there (reused by reruns and other runs of the
    same model).
    """
    from hf_vgrefine.vgrefine import VGRefineWrapper

    cfg = resolve_vgrefine_config(config)
    wrapper = VGRefineWrapper(model, cfg, processor=processor, cache_dir=generic_cache_dir)
    return Method(name, wrapper.generate, dict(gen_kwargs), unsupported=_single_image_only,
                  config=getattr(wrapper, "config", cfg))


def resolve_methods(methods: Iterable[str | Method], model, processor, vgrefine_config=None,
                    generic_cache_dir=None) -> list[Method]:
    """Names ``"baseline"`` / ``"vgrefine"`` → :class:`Method`; Method objects pass through."""
    out: list[Method] = []
    for m in methods:
        if isinstance(m, Method):
            out.append(m)
        elif m == "baseline":
            out.append(baseline_method(model))
        elif m == "vgrefine":
            out.append(vgrefine_method(model, processor, vgrefine_config, generic_cache_dir=generic_cache_dir))
        else:
            raise ValueError(f"unknown method {m!r}: use 'baseline', 'vgrefine' or a Method object")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    return out


# ---------------------------------------------------------------------------------------------------
# prompts and batches


def item_prompt(item: MedVQAItem, instruction: str | None = VGREFINE_INSTRUCTION, template: str = MCQ_TEMPLATE) -> str:
    """MCQ prompt for closed items (docs/medvqa.md), the bare question for open items; ``instruction`` appended
    after one space to both (``docs/medvqa.md`` § VGRefine and the MCQ prompt; None disables)."""
    if item.answer_type == CLOSED:
        return build_mcq_prompt(item.question, item.options, template=template, instruction=instruction)
    return f"{item.question} {instruction}" if instruction else item.question


def render_chat(processor, prompt: str, n_images: int, chat_template: str | None = None) -> str:
    """One user turn through the processor's chat template: images first, then text; generation
    prompt appended."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    kwargs = {"chat_template": chat_template} if chat_template is not None else {}
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False, **kwargs)


def build_inputs(processor, prompts: Sequence[str], images: Sequence[Sequence[Any]], chat_template: str | None = None):
    """Left-padded batch from prompts and per-item PIL images: ``input_ids``/``attention_mask``
    ``(B, T)`` plus the processor's vision tensors."""
    texts = [render_chat(processor, p, len(ims), chat_template) for p, ims in zip(prompts, images)]
    flat = [im for ims in images for im in ims]
    tok = getattr(processor, "tokenizer", processor)
    old = getattr(tok, "padding_side", None)
    tok.padding_side = "left"
    try:
        if flat:
            return processor(images=flat, text=texts, return_tensors="pt", padding=True)
        return processor(text=texts, return_tensors="pt", padding=True)
    finally:
        if old is not None:
            tok.padding_side = old


def _decode_new(processor, out, input_len: int) -> list[str]:
    seqs = out.sequences if hasattr(out, "sequences") else out
    if isinstance(seqs, Mapping):
        seqs = seqs["sequences"]
    return [s.strip() for s in processor.batch_decode(seqs[:, input_len:], skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------------
# records on disk


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(rec, dict) and "method" in rec and "id" in rec:
                out.append(rec)
    return out


def _prediction_files(out_dir: Path) -> list[Path]:
    return [out_dir / PREDICTIONS, *sorted(out_dir.glob("predictions.rank*.jsonl"))]


def read_records(out_dir: str | os.PathLike) -> list[dict]:
    """All records in ``out_dir`` (merged file and shards), de-duplicated on (method, id): a record
    without ``error`` beats one with; otherwise the later one wins."""
    best: dict[tuple[str, str], dict] = {}
    for p in _prediction_files(Path(out_dir)):
        for r in _read_jsonl(p):
            k = (r["method"], r["id"])
            old = best.get(k)
            if old is None or r.get("error") is None or old.get("error") is not None:
                best[k] = r  # a good record (or a newer error over an error) replaces the old one
    return list(best.values())


class _ShardWriter:
    """Append-only JSONL writer; every :meth:`write` is flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a+b")  # noqa: SIM115 - kept open across batches, closed by close()
        self.f.seek(0, os.SEEK_END)
        if self.f.tell() > 0:  # a crash may have left a partial last line: start on a fresh one
            self.f.seek(-1, os.SEEK_END)
            if self.f.read(1) != b"\n":
                self.f.write(b"\n")
        self.f.seek(0, os.SEEK_END)

    def write(self, records: Sequence[dict]) -> None:
        if not records:
            return
        self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, text, fsync=True)


def merge_shards(out_dir: str | os.PathLike, order: Sequence[tuple[str, str]] = (),
                 transform: Callable[[list[dict]], list[dict]] | None = None) -> list[dict]:
    """Merge shards into ``predictions.jsonl`` (atomic replace), then delete the shards.

    ``order``: (method, id) keys giving the output order; other records follow in read order.
    ``transform``: applied to the de-duplicated records before writing (e.g. re-scoring).
    """
    out = Path(out_dir)
    recs = read_records(out)
    if transform is not None:
        recs = transform(recs)
    rank = {k: i for i, k in enumerate(order)}
    recs.sort(key=lambda r: rank.get((r["method"], r["id"]), len(rank)))
    _atomic_write(out / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    for p in out.glob("predictions.rank*.jsonl"):
        p.unlink()
    return recs


# ---------------------------------------------------------------------------------------------------
# report


@dataclass
class EvalReport:
    """Result of :func:`evaluate`.

    ``summary``: the JSON written to ``summary.json`` (see :func:`build_summary`); ``records``: per-item
    records of this run's items (method order, then item order); ``manifest``; ``out_dir``.
    """

    summary: dict[str, Any]
    records: list[dict]
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def methods(self) -> list[str]:
        return list(self.summary["methods"])

    def accuracy(self, method: str, dataset: str | None = None) -> float | None:
        """Closed-ended accuracy (fraction) of ``method`` on ``dataset`` (None: micro average)."""
        row = self.summary["closed"][method]
        return row["micro"]["accuracy"] if dataset is None else row["datasets"][dataset]["accuracy"]

    def to_markdown(self) -> str:
        return summary_markdown(self.summary)


def build_summary(records: Sequence[dict], methods: Sequence[str], datasets: Sequence[str], *,
                  scorer: str, prompt_template: str, instruction: str | None, removed: Mapping[str, int] | None = None,
                  bundle_identical: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """Summary dict: per-method closed accuracy table (datasets + macro + micro, Wilson CIs, extraction
    steps), open-ended table, paired comparisons of every method against the first, failures, counts."""
    by_m: dict[str, list[dict]] = {m: [] for m in methods}
    for r in records:
        if r["method"] in by_m:
            by_m[r["method"]].append(r)
    closed = {m: summarise_closed([r for r in by_m[m] if r["answer_type"] == CLOSED], datasets) for m in methods}
    open_ = {m: summarise_open([r for r in by_m[m] if r["answer_type"] == OPEN], datasets) for m in methods}
    closed_ds = [d for d in datasets if any(closed[m]["datasets"].get(d, {}).get("n") for m in methods)]
    for m in methods:
        closed[m]["datasets"] = {d: closed[m]["datasets"][d] for d in closed_ds}
    comparisons = []
    for m in methods[1:]:
        ra = {r["id"]: r for r in by_m[methods[0]] if r["answer_type"] == CLOSED}
        rb = {r["id"]: r for r in by_m[m] if r["answer_type"] == CLOSED}
        comparisons.append(paired_comparison(ra, rb, closed_ds, methods[0], m))
    failures = [{"method": r["method"], "id": r["id"], "dataset": r["dataset"], "error": r["error"]}
                for r in records if r.get("error") is not None]
    counts: dict[str, Any] = {"items": {}, "removed": dict(removed or {})}
    for r in by_m[methods[0]] if methods else []:
        key = f"{r['dataset']} ({r['answer_type']})"
        counts["items"][key] = counts["items"].get(key, 0) + 1
    return {
        "methods": list(methods),
        "datasets": closed_ds,
        "columns": [*closed_ds, "macro", "micro"],
        "scorer": {"name": scorer, "version": SCORER_VERSION},
        "prompt": {"template": prompt_template, "instruction": instruction},
        "definitions": {"accuracy": "correct / items per dataset (closed-ended, after filtering, errors excluded)",
                        "macro": "unweighted mean of the per-dataset accuracies over the datasets shown",
                        "micro": "pooled correct / pooled items over all datasets",
                        "ci": "95% Wilson score interval",
                        "p_value": "exact two-sided McNemar test (binomial test on discordant pairs)"},
        "closed": closed,
        "open": open_,
        "comparisons": comparisons,
        "failures": failures,
        "counts": counts,
        "bundle_identical": dict(bundle_identical or {}),
    }


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown rendering of :func:`build_summary` output (study-table shape)."""
    ds, methods = summary["datasets"], summary["methods"]
    lines = ["# Med-VQA evaluation", "", "## Closed-ended accuracy (%)", "",
             "| method | " + " | ".join(ds) + " | Macro | Micro |",
             "|---|" + "---|" * (len(ds) + 2)]
    for m in methods:
        row = summary["closed"][m]
        cells = [_pct(row["datasets"][d]["accuracy"]) for d in ds]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_pct(row['macro']['accuracy'])} | "
                     f"{_pct(row['micro']['accuracy'])} |")
    lines += ["", "Items and 95% Wilson intervals:", "",
              "| method | " + " | ".join(ds) + " | Micro |", "|---|" + "---|" * (len(ds) + 1)]
    for m in methods:
        row = summary["closed"][m]
        cells = [f"{_pct(c['accuracy'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}] (n={c['n']})"
                 for c in (row["datasets"][d] for d in ds)]
        mi = row["micro"]
        lines.append(f"| {m} | " + " | ".join(cells) +
                     f" | {_pct(mi['accuracy'])} [{_pct(mi['ci_low'])}, {_pct(mi['ci_high'])}] (n={mi['n']}) |")
    d = summary["definitions"]
    lines += ["", f"Macro: {d['macro']}. Micro: {d['micro']}.",
              (f"Scorer: `{summary['scorer']['name']}` v{summary['scorer']['version']}. "
               f"Instruction appended: {summary['prompt']['instruction']!r}."), ""]
    steps = sorted({s for m in methods for s in summary["closed"][m]["steps"]})
    if steps:
        lines += ["Extraction steps (items):", "", "| method | " + " | ".join(steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for m in methods:
            st = summary["closed"][m]["steps"]
            lines.append(f"| {m} | " + " | ".join(str(st.get(s, 0)) for s in steps) + " |")
        lines.append("")
    for c in summary["comparisons"]:
        a, b = c["a"], c["b"]
        lines += [f"## Paired comparison: {b} vs {a}", "",
                  f"| dataset | n | {a} | {b} | Δ (pp) | only {a} correct | only {b} correct | McNemar p |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, cell in [*c["datasets"].items(), ("all", c["overall"])]:
            delta = "–" if cell["delta"] is None else f"{100 * cell['delta']:+.1f}"
            lines.append(f"| {name} | {cell['n']} | {_pct(cell['acc_a'])} | {_pct(cell['acc_b'])} | {delta} | "
                         f"{cell['a_only']} | {cell['b_only']} | {cell['p_value']:.4g} |")
        gained = sum(f["change"] == "gained" for f in c["flipped"])
        lines += ["", (f"Flipped items: {len(c['flipped'])} ({gained} gained, {len(c['flipped']) - gained} lost); "
                       "listed in summary.json."), ""]
    if any(summary["open"][m] for m in methods):
        lines += ["## Open-ended (reported separately)", "", "| method | dataset | n | exact match (%) | token recall (%) |",
                  "|---|---|---|---|---|"]
        for m in methods:
            for dname, cell in summary["open"][m].items():
                lines.append(f"| {m} | {dname} | {cell['n']} | {_pct(cell['exact_match'])} | {_pct(cell['recall'])} |")
        lines.append("")
    counts = summary["counts"]
    lines += ["## Items", "", ", ".join(f"{k}: {v}" for k, v in counts["items"].items()) or "none"]
    if counts["removed"]:
        lines.append("Removed by filtering: " + ", ".join(f"{k} {v}" for k, v in sorted(counts["removed"].items())))
    not_bundle = [k for k, v in summary.get("bundle_identical", {}).items() if not v]
    if not_bundle:
        lines.append("Not bundle-identical (raw loaders; yes/no converted to two-option MCQ): " + ", ".join(not_bundle))
    if summary["failures"]:
        lines += ["", f"## Failures ({len(summary['failures'])} items excluded)", ""]
        lines += [f"- {f['method']} {f['id']}: {f['error']}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


def compare(report_a: EvalReport, report_b: EvalReport | None = None, method_a: str | None = None,
            method_b: str | None = None) -> dict[str, Any]:
    """Paired comparison (per-dataset deltas, exact McNemar, flipped items) of two methods, either both
    in ``report_a`` (default: its first two methods) or one from each report."""
    if report_b is None:
        report_b = report_a
        method_a = method_a or report_a.methods[0]
        method_b = method_b or report_a.methods[1]
    method_a = method_a or report_a.methods[0]
    method_b = method_b or report_b.methods[0]
    ra = {r["id"]: r for r in report_a.records if r["method"] == method_a and r["answer_type"] == CLOSED}
    rb = {r["id"]: r for r in report_b.records if r["method"] == method_b and r["answer_type"] == CLOSED}
    datasets = list(dict.fromkeys([*report_a.summary["datasets"], *report_b.summary["datasets"]]))
    return paired_comparison(ra, rb, datasets, method_a, method_b)


# ---------------------------------------------------------------------------------------------------
# manifest


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if hasattr(x, "to_dict") and callable(x.to_dict):
        try:
            return _jsonable(x.to_dict())
        except Exception:  # noqa: BLE001
            return repr(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("hf_vgrefine", "torch", "transformers", "datasets", "accelerate", "tokenizers", "huggingface-hub",
                 "pillow", "numpy", "scipy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_manifest(model, processor, *, model_id, revision, methods: Sequence[Method], decoding: str,
                   gen_kwargs: Mapping, seed: int, scorer: str, template: str, instruction: str | None,
                   chat_template: str | None, example_prompt: str | None, batch_size: int, world_size: int,
                   limit: int | None, answer_types: Sequence[str], removed: Mapping[str, int]) -> dict[str, Any]:
    """Run manifest (JSON-able)."""
    cfg = getattr(model, "config", None)
    tmpl = chat_template or getattr(processor, "chat_template", None)
    ip = getattr(processor, "image_processor", None)
    return _jsonable({
        "model": {"id": model_id or getattr(cfg, "_name_or_path", None) or type(model).__name__,
                  "revision": revision or getattr(cfg, "_commit_hash", None),
                  "class": type(model).__name__, "dtype": str(getattr(model, "dtype", "")),
                  "device": str(getattr(model, "device", ""))},
        "processor": {"class": type(processor).__name__,
                      "image_processor": ip.to_dict() if ip is not None and hasattr(ip, "to_dict") else None,
                      "chat_template_sha1": hashlib.sha1(tmpl.encode()).hexdigest() if isinstance(tmpl, str) else None,
                      "chat_template_override": chat_template is not None},
        "libraries": _library_versions(),
        "seed": seed,
        "decoding": {"preset": decoding, **dict(gen_kwargs)},
        "prompt": {"template": template, "instruction": instruction, "example": example_prompt,
                   "chat": "processor chat template, one user turn: images first, then text; generation prompt "
                           "appended; left padding"},
        "scorer": {"name": scorer, "version": SCORER_VERSION, "open_ended": "exact match + token recall"},
        "methods": [{"name": m.name, "gen_kwargs": m.gen_kwargs, "prompt_variant": m.prompt_fn is not None,
                     "config": m.config} for m in methods],
        "batch_size": batch_size, "world_size": world_size, "limit_per_dataset": limit,
        "answer_types": list(answer_types), "removed_by_filter": dict(removed),
        "resume_keys": {m.name: resume_key(model, m, model_id=model_id, revision=revision, gen_kwargs=gen_kwargs,
                                           template=template, instruction=instruction, chat_template=tmpl)
                        for m in methods},
    })


def resume_key(model, method: Method, *, model_id, revision, gen_kwargs: Mapping, template: str,
               instruction: str | None, chat_template: str | None) -> dict[str, Any]:
    """What must not change between runs that share an ``out_dir`` for ``method`` (JSON-able): model,
    decoding, prompt template/instruction, chat template, method kwargs / config. The scorer may change:
    stored responses are re-scored."""
    cfg = getattr(model, "config", None)
    return _jsonable({
        "model": model_id or getattr(cfg, "_name_or_path", None) or type(model).__name__,
        "revision": revision or getattr(cfg, "_commit_hash", None), "class": type(model).__name__,
        "dtype": str(getattr(model, "dtype", "")),
        "decoding": {**dict(gen_kwargs), **method.gen_kwargs}, "template": template, "instruction": instruction,
        "chat_template_sha1": hashlib.sha1(chat_template.encode()).hexdigest() if isinstance(chat_template, str) else None,
        "prompt_variant": method.prompt_fn is not None, "config": method.config,
    })


def _check_resume(out: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Raise if ``out`` holds results of a method made with other settings; returns the old keys."""
    path = out / "manifest.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("resume_keys", {})
    except (json.JSONDecodeError, OSError):
        return {}
    for name, key in manifest["resume_keys"].items():
        if name in old and old[name] != key:
            diff = sorted(k for k in set(key) | set(old[name]) if key.get(k) != old[name].get(k))
            raise ValueError(f"{out} already holds results of method {name!r} made with different settings "
                             f"({', '.join(diff)}); use another out_dir or the original settings")
    return old


# ---------------------------------------------------------------------------------------------------
# evaluate


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def partial_state():
    """``accelerate.PartialState`` (works without ``accelerate launch``: one process).

    ``ACCELERATE_USE_CPU=1`` selects CPU processes (gloo) — needed for several CPU processes, e.g.
    ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m hf_vgrefine.medvqa.cli …``.
    ``accelerate launch --cpu --num_processes N`` starts only one process unless MPI is configured
    (``--mpirun_hostfile``); that case is detected and reported with a warning.
    """
    import warnings

    from accelerate import PartialState

    state = PartialState(cpu=_env_flag("ACCELERATE_USE_CPU"))
    if (state.num_processes == 1 and _env_flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR")
            and not os.environ.get("WORLD_SIZE")):
        warnings.warn("accelerate launch --cpu with several processes needs MPI (--mpirun_hostfile); running as ONE "
                      "process. For several CPU processes use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                      "--num_processes N -m hf_vgrefine.medvqa.cli ...", RuntimeWarning, stacklevel=2)
    return state


def evaluate(model, processor, items: Sequence[MedVQAItem] | PreparedItems,
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

    state = partial_state()
    world, rank = state.num_processes, state.process_index
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
        old_keys = _check_resume(out, manifest)
        done = {(r["method"], r["id"]) for r in read_records(out) if r.get("error") is None}
        state.wait_for_everyone()  # every process has read the old manifest before it is replaced
        manifest["resume_keys"] = {**old_keys, **manifest["resume_keys"]}
        if state.is_main_process:
            _atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        writer = _ShardWriter(out / f"predictions.rank{rank}.jsonl")
    my_items = [it for i, it in enumerate(all_items) if i % world == rank]
    t0 = time.time()
    n_generated = 0
    try:
        for method in method_objs:
            todo = [it for it in my_items if (method.name, it.id) not in done]
            kwargs = {**run_kwargs, **method.gen_kwargs}
            bar = tqdm(total=len(todo), desc=f"{method.name} [{rank}/{world}]", disable=not (progress and state.is_main_process),
                       unit="item")
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                recs = _run_batch(model, processor, method, batch, prompts, kwargs, chat_template, score_closed)
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

    def rescore(recs: list[dict]) -> list[dict]:
        return [_rescore(r, by_id.get(r["id"]), score_closed, scorer) for r in recs]

    if out is not None:
        state.wait_for_everyone()
        if state.is_main_process:
            merge_shards(out, order, transform=rescore)
        state.wait_for_everyone()
        records = read_records(out)
    else:
        records = rescore(memory)
    wanted = set(order)
    pos = {k: i for i, k in enumerate(order)}
    records = sorted((r for r in records if (r["method"], r["id"]) in wanted), key=lambda r: pos[(r["method"], r["id"])])
    summary = build_summary(records, method_names, datasets, scorer=scorer, prompt_template=template,
                            instruction=instruction, removed=prepared.removed, bundle_identical=bundle_flags)
    manifest["timing"] = {"seconds_this_process": round(elapsed, 3), "generated_this_process": n_generated,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if out is not None and state.is_main_process:
        _atomic_write(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        _atomic_write(out / "summary.md", summary_markdown(summary))
        _atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return EvalReport(summary=summary, records=records, manifest=manifest, out_dir=out)


def _run_batch(model, processor, method: Method, batch: Sequence[MedVQAItem], prompts: Mapping[str, str],
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
            recs[i] = _record(method.name, it, prompt, None, error=reason)
            continue
        try:
            ims = [open_image(im) for im in it.images]
        except Exception as e:  # noqa: BLE001 - fail loudly: recorded, excluded, listed
            recs[i] = _record(method.name, it, prompt, None, error=f"image: {type(e).__name__}: {e}")
            continue
        ok_idx.append(i)
        ok_prompts.append(prompt)
        ok_images.append(ims)
    if ok_idx:
        inputs = build_inputs(processor, ok_prompts, ok_images, chat_template)
        device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
        if device is not None:
            inputs = inputs.to(device=device, dtype=dtype) if dtype is not None and dtype.is_floating_point \
                else inputs.to(device)
        with torch.inference_mode():
            out = method.generate_fn(**inputs, **gen_kwargs)
        responses = _decode_new(processor, out, inputs["input_ids"].shape[1])
        for i, prompt, resp in zip(ok_idx, ok_prompts, responses):
            it = batch[i]
            if it.answer_type == CLOSED:
                s = score_closed(resp, it)
                recs[i] = _record(method.name, it, prompt, resp, extracted=s.extracted, step=s.step,
                                  target=s.target, correct=bool(s.correct))
            else:
                s = score_open(resp, it)
                recs[i] = _record(method.name, it, prompt, resp, exact=s.exact, recall=s.recall)
    return [r for r in recs if r is not None]


def _rescore(rec: dict, item: MedVQAItem | None, score_closed, scorer: str) -> dict:
    """Score a stored response again with the current scorer (records of other items: unchanged)."""
    if item is None or rec.get("error") is not None or rec.get("response") is None:
        return rec
    rec = dict(rec)
    if item.answer_type == CLOSED:
        s = score_closed(rec["response"], item)
        rec.update(extracted=s.extracted, step=s.step, target=s.target, correct=bool(s.correct), scorer=scorer)
    else:
        s = score_open(rec["response"], item)
        rec.update(exact=s.exact, recall=s.recall, scorer="exact_match+token_recall")
    return rec


def _record(method: str, it: MedVQAItem, prompt: str, response: str | None, *, extracted=None, step=None,
            target=None, correct=None, exact=None, recall=None, error=None) -> dict:
    return {"method": method, "id": it.id, "dataset": it.dataset, "subset": it.subset, "answer_type": it.answer_type,
            "prompt": prompt, "response": response, "extracted": extracted, "step": step, "target": target,
            "answer": it.answer, "correct": correct, "exact": exact, "recall": recall, "error": error}
