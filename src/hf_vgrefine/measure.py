"""Grounding measurement over a dataset: attention-vs-region scores per layer (and per layer x head).

For each sample (one image, one question, boxes and/or a mask in VGMED's schema) the model is run on
the **question prompt** and on the **generic prompt** with the same image (docs/method.md § Prompts); the
attention of the query row(s) to the image tokens is captured with
:func:`hf_vgrefine.attention.capture_image_attention` (SDPA, fp32 probabilities, early exit), the
sample's boxes/mask are mapped to the token grid with the family adapter's
:class:`~hf_vgrefine.geometry.TokenGrid`, and every score of :mod:`hf_vgrefine.metrics` is computed

* per layer on the **layer-mean** maps ``a_l = mean_h A_l[h, q*, V]`` — ``relative``:
  ``a_l(question) / (a_l(generic) + eps)``; ``raw``: ``a_l(question)``;
* per layer x head when ``per_head=True`` — ``relative``: per-head generic normalisation
  ``A_l[h](question) / (A_l[h](generic) + eps)`` (``head_norm="per_head"``, as the released head script)
  or the layer-mean generic map (``head_norm="layer_mean"``, as VGRefine's triage); ``raw``: ``A_l[h]``.

The generic pass depends only on the image: it is cached per image content hash (in memory, LRU) and
batched over the unique uncached images of each batch.

Output (:class:`~hf_vgrefine.results.GroundingResults`): per-sample arrays ``[S, n_layers]`` (``[S, n_layers, n_heads]``),
sample metadata (id, question_type, modality, source, label, region fraction ``f``), a summary per layer
(mean, median, 95 % bootstrap CI of the mean, n, chance level; :func:`hf_vgrefine.metrics.aggregate`),
parquet/JSON persistence and a per-layer PNG.

Resumable: with ``output_dir`` every processed batch is appended as a parquet shard
(``shards/rank<r>-<seq>.parquet``, atomic rename; :mod:`hf_vgrefine.measure_store`); a rerun skips ids
already present. Data-parallel (:mod:`hf_vgrefine.sharding`): under ``accelerate launch`` each process
takes the samples ``i % world == rank``; the main process merges the shards and writes
``per_sample.parquet``, ``summary.json`` and ``layers.png``.

The settings of a measurement are one :class:`MeasureSettings`; :func:`measure_grounding` takes them as
that object or as keywords.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from typing import Any, Iterable

import numpy as np

from .generic_cache import GenericMapCache
from .loading import load_grounding_dataset, load_model_and_processor, processor_settings
from .measure_store import MeasureFolder
from .prompts import GENERIC_QUESTION, INSTRUCTION, build_inputs, generic_inputs, to_model_inputs
from .results import MAP_KINDS, META_COLUMNS, GroundingResults
from .sample_scores import sample_token_mask, score_sample
from .sharding import RunShard

__all__ = ["GroundingResults", "MeasureSettings", "measure_grounding", "load_grounding_dataset",
           "load_model_and_processor", "parse_layers", "processor_settings", "GT_MODES", "MAP_KINDS"]

GT_MODES = ("box", "mask_cells", "soft_mask")
_SETTING_CHOICES = {"gt": GT_MODES, "query": ("last", "post_image"), "head_norm": ("per_head", "layer_mean"),
                    "on_error": ("raise", "skip"), "box_mapping": ("processor", "pad", "stretch"),
                    "mask_box_end": ("exclusive", "inclusive_max")}


@dataclasses.dataclass
class MeasureSettings:
    """What a grounding measurement computes (recorded in ``run.json``; a rerun must use the same).

    Attributes:
        layers: ``"all"``, ``"0,3,5-7"`` or a list of decoder-layer indices (0-based); ``"all"`` of a hybrid
            model (Qwen 3.5) is its softmax-attention layers, a linear-attention layer is refused.
        per_head: also score every (layer, query head) map.
        relative: compute relative maps (needs the generic pass); raw maps are always scored.
        batch_size: prompts per forward pass (left-padded).
        query: ``"last"`` (row ``T-1``) or ``"post_image"`` (mean of rows ``[v_end, T)``).
        gt: ``"box"`` (cover rule on the boxes; the mask is used only if there are no boxes),
            ``"mask_cells"`` (cells touching a mask pixel; boxes when there is no mask) or ``"soft_mask"``
            (covered fraction of each cell, from the mask or else the boxes).
        eps: added to the generic map (``1e-10`` default; ``0.0`` = released calibration scripts).
        instruction / generic_question: prompt parts (docs/method.md § Prompts); ``instruction=None`` drops the suffix.
        head_norm: generic normalisation of per-head relative maps: ``"per_head"`` or ``"layer_mean"``.
        scores: score names of :data:`hf_vgrefine.metrics.ALL` (default all); ``metric_options`` go to
            :func:`hf_vgrefine.metrics.grounding_scores` (``threshold_mode``, ``tolerance``, ...).
        min_cells_per_box: 1 (default) or 0 (faithful degenerate-box rule, docs/data_formats.md § Box cover rule).
        chat_template: a template string overriding the processor's.
        generic_cache_size: images whose generic maps stay cached in memory (LRU).
        on_error: a row whose image cannot be read (corrupt or truncated file): ``"raise"`` (default; the
            error names the row) or ``"skip"`` (go on; skipped rows are listed in ``results.info["skipped"]``
            and, with an output folder, in ``skipped.json``; a rerun retries them).
        box_mapping / mask_box_end: box → token rule (:func:`hf_vgrefine.geometry.study_token_mask`);
            ``**hf_vgrefine.geometry.study_geometry(config)`` gives a VGRefine config's (``faithful=True``:
            the released stretch mapping and inclusive-max mask boxes).
    """

    # what is scored
    layers: Any = "all"
    per_head: bool = False
    relative: bool = True
    head_norm: str = "per_head"
    scores: Iterable[str] | None = None
    metric_options: dict | None = None
    query: str = "last"
    eps: float = 1e-10
    # the two prompts
    instruction: str | None = INSTRUCTION
    generic_question: str = GENERIC_QUESTION
    chat_template: str | None = None
    # the ground-truth region on the token grid
    gt: str = "box"
    min_cells_per_box: int = 1
    box_mapping: str = "processor"
    mask_box_end: str = "exclusive"
    # how the run goes
    batch_size: int = 4
    generic_cache_size: int = 1024
    on_error: str = "raise"

    def __post_init__(self):
        for name, allowed in _SETTING_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def score_names(self) -> list[str]:
        from .metrics import ALL

        s = self.scores
        return list(ALL if s is None else ([s] if isinstance(s, str) else s))

    def record(self, model, processor, adapter, layers: list[int]) -> dict:
        """The run's settings as recorded with the results (and checked on resume)."""
        rec = {"model": model_fingerprint(model, adapter), "processor": processor_settings(processor),
               "layers": layers, "heads": list(range(adapter.num_heads)) if self.per_head else None,
               "per_head": bool(self.per_head), "relative": bool(self.relative), "query": self.query, "gt": self.gt,
               "eps": float(self.eps), "instruction": self.instruction, "generic_question": self.generic_question,
               "head_norm": self.head_norm, "scores": self.score_names, "metric_options": dict(self.metric_options or {}),
               "min_cells_per_box": int(self.min_cells_per_box), "chat_template": self.chat_template}
        if self.box_mapping == "stretch":            # recorded only when not the default (older runs stay resumable)
            rec["box_mapping"] = "stretch"
        if self.mask_box_end != "exclusive":
            rec["mask_box_end"] = self.mask_box_end
        return rec


def model_fingerprint(model, adapter) -> dict:
    """Name, class, type, depth, heads and dtype of ``model`` (recorded with results)."""
    cfg = model.config
    return {"name_or_path": str(getattr(cfg, "_name_or_path", "") or ""), "class": type(model).__name__,
            "model_type": str(getattr(cfg, "model_type", "")), "num_layers": adapter.num_layers,
            "num_heads": adapter.num_heads, "dtype": str(getattr(model, "dtype", ""))}


def parse_layers(spec, num_layers: int) -> list[int]:
    """``"all"`` / ``None`` -> all layers; ``"0,3,5-7"`` or an iterable of ints -> sorted unique list.
    Negative indices count from the end (``-1`` = last layer)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(num_layers))
    if isinstance(spec, str):
        out = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        spec = out
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    layers = sorted({(int(x) + num_layers) if int(x) < 0 else int(x) for x in spec})
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise ValueError(f"layers {spec!r} invalid for a model with {num_layers} decoder layers (valid 0..{num_layers - 1})")
    return layers


def image_hash(img) -> str:
    """SHA-1 of a PIL image's mode, size and pixels (the generic-map cache key)."""
    h = hashlib.sha1()
    h.update(f"{img.mode}|{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def rgb_image(img):
    """A sample's image as an RGB PIL image (arrays are converted); ``ValueError`` when missing."""
    if img is None:
        raise ValueError("sample has no image")
    if not hasattr(img, "mode"):
        from PIL import Image

        img = Image.fromarray(np.asarray(img))
    return img if img.mode == "RGB" else img.convert("RGB")


def fetch_row(dataset, i: int, row_id) -> tuple[dict | None, str | None]:
    """Row ``i`` with its image decoded (RGB, pixels loaded), or ``(None, message naming the row)``."""
    try:
        row = dataset[i]
        img = rgb_image(row["image"])
        img.load()
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:
        return None, f"row {i} (id {row_id!r}): its image cannot be read ({type(e).__name__}: {e})"
    row = dict(row)
    row["image"] = img
    return row, None


def dataset_ids(dataset) -> list[str]:
    """The ``id`` of every row as a string (the row index where there is no ``id``)."""
    n = len(dataset)
    cols = getattr(dataset, "column_names", None)
    if cols is not None:
        return [str(x) for x in dataset["id"]] if "id" in cols else [str(i) for i in range(n)]
    out = []
    for i in range(n):
        row = dataset[i]
        out.append(str(row["id"]) if isinstance(row, dict) and row.get("id") is not None else str(i))
    return out


def capture_maps(model, adapter, inputs, layers, query) -> tuple[list[np.ndarray], list]:
    """Query-row attention to the first image of each row: ``B`` float32 arrays ``[n_layers, H, N_b]``, and
    that image's token span per row."""
    from .grounding_pass import GroundingPass, PromptLayout

    spans = adapter.image_spans(inputs)
    for b, sp in enumerate(spans):
        if not sp:
            raise ValueError(f"sample {b} has no image tokens")
    spans = [[sp[0]] for sp in spans]
    cap = GroundingPass(model, adapter=adapter).run(inputs, PromptLayout.read(adapter, inputs, spans=spans),
                                                    layers=layers, query=query, early_exit=True).question
    maps = cap.maps.detach().float().cpu().numpy()  # [B, nL, H, Nmax]
    return [maps[b, :, :, : cap.n_tokens[b]] for b in range(maps.shape[0])], [sp[0] for sp in spans]


def _row_text(row: dict, key: str) -> str:
    v = row.get(key, "")
    return "" if v is None else str(v)


class _BatchMeasurer:
    """Scores batches of rows with one model and one :class:`MeasureSettings`; keeps the generic-map cache
    (per image hash: float32 ``[n_layers, H or 1, N]``) and the pass counters across batches."""

    def __init__(self, model, processor, adapter, settings: MeasureSettings, layers: list[int], record: dict):
        self.model, self.processor, self.adapter = model, processor, adapter
        self.s, self.layers, self.record = settings, layers, record
        self.cache = GenericMapCache(settings.generic_cache_size)
        self.counters = {"question_passes": 0, "generic_passes": 0, "generic_images": 0}

    def _capture(self, inputs) -> tuple[list[np.ndarray], list]:
        return capture_maps(self.model, self.adapter, to_model_inputs(inputs, self.model), self.layers, self.s.query)

    def generic_maps(self, images) -> list[np.ndarray]:
        """Generic-prompt maps of ``images`` (cached; the unique uncached images run in batches)."""
        s = self.s
        hashes = [image_hash(im) for im in images]
        local, missing = {}, {}                        # this batch's generic maps; unique uncached images
        for h, im in zip(hashes, images):
            if h in local or h in missing:
                continue
            hit = self.cache.get(h)
            if hit is not None:
                local[h] = hit
            else:
                missing[h] = im
        missing = list(missing.items())
        for start in range(0, len(missing), int(s.batch_size)):
            chunk = missing[start:start + int(s.batch_size)]
            ginp = generic_inputs(self.processor, [im for _, im in chunk], instruction=s.instruction,
                                  generic_question=s.generic_question, chat_template=s.chat_template)
            maps, _ = self._capture(ginp)
            self.counters["generic_passes"] += 1
            self.counters["generic_images"] += len(chunk)
            for (h, _), m in zip(chunk, maps):
                local[h] = m if s.per_head and s.head_norm == "per_head" else m.mean(1, keepdims=True)
                self.cache.put(h, local[h])
        return [local[h] for h in hashes]

    def __call__(self, rows: list[dict], idx: list[int], ids: list[str]) -> GroundingResults:
        import pandas as pd

        s = self.s
        images = [rgb_image(r["image"]) for r in rows]
        inputs = build_inputs(self.processor, images, [str(r["question"]) for r in rows], instruction=s.instruction,
                              chat_template=s.chat_template)
        q_maps, spans = self._capture(inputs)
        self.counters["question_passes"] += 1
        g_maps = self.generic_maps(images) if s.relative else [None] * len(rows)
        meta_rows, per = [], {}
        for b, row in enumerate(rows):
            grid = self.adapter.token_grid(self.processor, images[b].size, span=spans[b], inputs=inputs)
            N = q_maps[b].shape[-1]
            if grid.n_tokens != N:
                raise RuntimeError(f"sample {ids[b]}: token grid {grid.rows}x{grid.cols} != {N} captured image tokens")
            if g_maps[b] is not None and g_maps[b].shape[-1] != N:
                raise RuntimeError(f"sample {ids[b]}: generic pass has {g_maps[b].shape[-1]} image tokens, question "
                                   f"pass {N}: the two prompts must see the same image geometry")
            tm, src, err = sample_token_mask(row, grid, s.gt, s.min_cells_per_box, images[b].size, self.record)
            tm_f = np.asarray(tm, dtype=np.float64)
            res = score_sample(q_maps[b], g_maps[b], tm, grid, s.relative, s.per_head, s.head_norm, s.eps,
                               self.record["scores"], self.record["metric_options"])
            for k, v in res.items():
                per.setdefault(k, []).append(v)
            meta_rows.append({"id": ids[b], "index": int(idx[b]), "question_type": _row_text(row, "question_type"),
                              "modality": _row_text(row, "modality"), "source": _row_text(row, "source"),
                              "label": _row_text(row, "label"), "f": float(tm_f.sum() / N),
                              "n_gt_tokens": int(np.count_nonzero(tm_f)), "n_tokens": int(N), "grid_rows": grid.rows,
                              "grid_cols": grid.cols, "gt_source": src, "gt_error": err})
        scores = {k: np.stack(v) for k, v in per.items()}
        heads = list(range(self.adapter.num_heads)) if s.per_head else None
        return GroundingResults(pd.DataFrame(meta_rows, columns=list(META_COLUMNS)), self.layers, scores, heads,
                                self.record)


def measure_grounding(model, processor, dataset, settings: MeasureSettings | None = None, *,
                      output_dir: str | None = None, progress: bool = True, n_boot: int = 1000, plot: bool = True,
                      **options) -> GroundingResults | None:
    """Measure attention-vs-region grounding of ``model`` on ``dataset``, per layer (and per head).

    Args:
        model: a VLM of a supported family (:func:`hf_vgrefine.get_adapter`), in eval mode.
        processor: its ``AutoProcessor`` (chat template; the tokenizer is used with left padding).
        dataset: ``datasets.Dataset`` or a sequence of dicts with VGMED columns: ``image`` (PIL),
            ``question``, ``boxes`` (``[[x, y, w, h], ...]`` original pixels) and/or ``mask``
            (PIL ``L``, same size as the image); optional ``id`` (unique; default the row index),
            ``question_type``, ``modality``, ``source``, ``label``.
        settings: a :class:`MeasureSettings`; ``**options`` (its field names, e.g. ``layers="0-3"``,
            ``per_head=True``) are applied on top of it (or of the defaults).
        output_dir: resumable run folder (shards, ``per_sample.parquet``, ``summary.json``, ``layers.png``).
        progress: tqdm bar on the local main process.
        n_boot, plot: bootstrap resamples of the saved summary; write ``layers.png`` (with ``output_dir``).
    Returns:
        :class:`GroundingResults` on the main process (all samples, merged over processes); ``None`` on the
        other processes.
    """
    from .adapters import get_adapter

    if settings is not None and not isinstance(settings, MeasureSettings):
        raise TypeError(f"settings must be a MeasureSettings, got {type(settings).__name__}; give other options "
                        "by keyword (e.g. layers=..., per_head=True)")
    fields = {f.name for f in dataclasses.fields(MeasureSettings)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"measure_grounding() got unexpected keyword argument(s) {unknown}; "
                        f"the measurement settings are: {sorted(fields)}")
    s = dataclasses.replace(settings, **options) if settings is not None else MeasureSettings(**options)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError("dataset must support len() and indexing (a datasets.Dataset or a list of dicts); "
                        "for an IterableDataset, materialise it first (e.g. Dataset.from_list(list(ds.take(n))))")
    adapter = get_adapter(model)
    layers = parse_layers(s.layers, adapter.num_layers)
    if adapter.hybrid:
        if s.layers is None or (isinstance(s.layers, str) and s.layers.strip().lower() == "all"):
            layers = list(adapter.attention_layers)
        linear = [l for l in layers if l not in adapter.attention_layers]
        if linear:
            raise ValueError(f"layers {linear} are linear-attention layers of this hybrid model (no attention map); "
                             f"its softmax-attention layers are {adapter.attention_layers}")
    shard = RunShard.current()

    ids = dataset_ids(dataset)
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"dataset ids must be unique (resuming relies on them); duplicates: {dup}")
    record = s.record(model, processor, adapter, layers)
    folder, done = None, set()
    if output_dir is not None:
        folder = MeasureFolder(output_dir, shard.rank)
        folder.check_settings(record, shard.is_main)
        shard.wait()
        done = folder.done_ids()
    todo = shard.take(ids, done)
    measure = _BatchMeasurer(model, processor, adapter, s, layers, record)
    counters = measure.counters
    counters.update(measured=len(todo), skipped_done=len(shard.take(ids)) - len(todo))
    local_parts, skipped = [], []
    bar = _progress(len(todo), progress and shard.is_local_main)
    t0 = time.time()
    bs = int(s.batch_size)
    try:
        for start in range(0, len(todo), bs):
            idx, rows = [], []
            for i in todo[start:start + bs]:
                row, err = fetch_row(dataset, i, ids[i])
                if err is None:
                    idx.append(i)
                    rows.append(row)
                elif s.on_error == "skip":
                    skipped.append({"index": i, "id": ids[i], "error": err})
                else:
                    raise ValueError(f"{err}; fix or drop that row, or pass on_error='skip' (CLI: --on-error skip) to "
                                     "skip such rows and list them in the results")
            if rows:
                part = measure(rows, idx, [ids[i] for i in idx])
                if folder is not None:
                    folder.write_shard(part)
                else:
                    local_parts.append(part)
            bar.update(len(todo[start:start + bs]))
    finally:
        bar.close()
    counters["seconds"] = round(time.time() - t0, 3)
    counters["skipped"] = len(skipped)
    if skipped and shard.world > 1:
        skipped = shard.gather(skipped)
    counters["generic_cache_hits"] = measure.cache.hits
    if shard.world > 1:
        shard.wait()
    if folder is not None:
        if not shard.is_main:
            return None  # the main process merges the shards
        results = folder.merged(record)
        if results is None:
            results = GroundingResults.empty(record, record["scores"])
        results.info["last_run"] = counters
        results.info["skipped"] = skipped
        if skipped:
            folder.write_skipped(skipped)
        results.save(output_dir, n_boot=n_boot, plot=plot)
        return results
    if shard.world > 1:
        gathered = shard.gather([p.to_payload() for p in local_parts])
        if not shard.is_main:
            return None
        local_parts = [GroundingResults.from_payload(x) for x in gathered]
    results = GroundingResults.concat(local_parts).sort_by_index() if local_parts else \
        GroundingResults.empty(record, record["scores"])
    results.info["last_run"] = counters
    results.info["skipped"] = skipped
    return results


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="measure", unit="sample")
