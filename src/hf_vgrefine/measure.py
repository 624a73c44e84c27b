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

Output (:class:`GroundingResults`): per-sample arrays ``[S, n_layers]`` (``[S, n_layers, n_heads]``),
sample metadata (id, question_type, modality, source, label, region fraction ``f``), a summary per layer
(mean, median, 95 % bootstrap CI of the mean, n, chance level; :func:`hf_vgrefine.metrics.aggregate`),
parquet/JSON persistence and a per-layer PNG.

Resumable: with ``output_dir`` every processed batch is appended as a parquet shard
(``shards/rank<r>-<seq>.parquet``, atomic rename); a rerun skips ids already present. Data-parallel:
under ``accelerate launch`` each process takes the samples ``i % world == rank``; the main process
merges the shards and writes ``per_sample.parquet``, ``summary.json`` and ``layers.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import time
from typing import Iterable, Sequence

import numpy as np

from .atomic import atomic_write
from .generic_cache import GenericMapCache
from .prompts import GENERIC_QUESTION, INSTRUCTION, build_inputs, generic_inputs, to_model_inputs

__all__ = ["GroundingResults", "measure_grounding", "load_grounding_dataset", "load_model_and_processor",
           "parse_layers", "add_cli", "GT_MODES", "MAP_KINDS"]

GT_MODES = ("box", "mask_cells", "soft_mask")
MAP_KINDS = ("relative", "raw")
PER_SAMPLE_FILE = "per_sample.parquet"
SUMMARY_FILE = "summary.json"
LAYERS_PNG = "layers.png"
RUN_FILE = "run.json"
SHARD_DIR = "shards"
_META_KEY = b"hf_vgrefine.grounding"
_META_COLUMNS = ("id", "index", "question_type", "modality", "source", "label", "f", "n_gt_tokens", "n_tokens",
                 "grid_rows", "grid_cols", "gt_source", "gt_error")


# ============================================================================================ utilities
def _json_safe(obj):
    """NaN/inf -> None, numpy -> python, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _atomic_write_json(path: str, obj) -> None:
    atomic_write(path, (json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


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


def _image_hash(img) -> str:
    h = hashlib.sha1()
    h.update(f"{img.mode}|{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _rgb(img):
    if img is None:
        raise ValueError("sample has no image")
    if not hasattr(img, "mode"):
        from PIL import Image

        img = Image.fromarray(np.asarray(img))
    return img if img.mode == "RGB" else img.convert("RGB")


def _dist():
    """(rank, world, PartialState or None). Plain single process needs no accelerate config."""
    try:
        from accelerate import PartialState

        st = PartialState()
        return int(st.process_index), int(st.num_processes), st
    except Exception:  # accelerate missing or not initialisable: single process
        return 0, 1, None


def _model_fingerprint(model, adapter) -> dict:
    cfg = model.config
    return {"name_or_path": str(getattr(cfg, "_name_or_path", "") or ""), "class": type(model).__name__,
            "model_type": str(getattr(cfg, "model_type", "")), "num_layers": adapter.num_layers,
            "num_heads": adapter.num_heads, "dtype": str(getattr(model, "dtype", ""))}


_PROC_KEYS = ("size", "crop_size", "do_pad", "do_resize", "do_center_crop", "min_pixels", "max_pixels", "patch_size",
              "merge_size", "image_grid_pinpoints", "do_pan_and_scan")


def processor_settings(processor) -> dict:
    """Geometry-relevant image-processor settings (JSON-able) — recorded with results and configs."""
    ip = getattr(processor, "image_processor", processor)
    out = {"image_processor_class": type(ip).__name__}
    for k in _PROC_KEYS:
        v = getattr(ip, k, None)
        if v is None:
            continue
        if dataclasses.is_dataclass(v) and not isinstance(v, type):    # transformers SizeDict
            v = {kk: vv for kk, vv in dataclasses.asdict(v).items() if vv is not None}
        elif hasattr(v, "items"):
            v = {kk: vv for kk, vv in dict(v).items() if vv is not None}
        elif isinstance(v, tuple):
            v = list(v)
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[k] = v
    return out


# ============================================================================================ results
class GroundingResults:
    """Per-sample grounding scores of one model on one dataset.

    Attributes:
        meta: ``pandas.DataFrame`` with one row per sample: ``id``, ``index`` (row in the dataset),
            ``question_type``, ``modality``, ``source``, ``label``, ``f`` (region fraction ``|B|/N``, or
            ``Σw/N`` for soft GT), ``n_gt_tokens``, ``n_tokens`` (``N``), ``grid_rows``, ``grid_cols``,
            ``gt_source`` (``box`` / ``mask_cells`` / ``soft_mask`` / ``box_fraction``), ``gt_error``.
        layers: decoder layer indices of the layer axis.
        heads: query-head indices of the head axis (``None`` without per-head scores).
        scores: ``{"<kind>/<score>": float64 [S, n_layers]}`` and ``{"<kind>_head/<score>": [S, n_layers,
            n_heads]}``, ``kind`` in ``("relative", "raw")``; NaN per the metrics NaN policy (empty region,
            all-zero or non-finite map).
        info: run settings (model, processor settings, gt mode, eps, query, prompts, counters).
    """

    def __init__(self, meta, layers: Sequence[int], scores: dict, heads: Sequence[int] | None = None,
                 info: dict | None = None):
        import pandas as pd

        self.meta = meta.reset_index(drop=True) if isinstance(meta, pd.DataFrame) else pd.DataFrame(meta)
        self.layers = [int(x) for x in layers]
        self.heads = None if heads is None else [int(h) for h in heads]
        self.scores = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
        self.info = dict(info or {})
        S = len(self.meta)
        for k, v in self.scores.items():
            exp = (S, len(self.layers)) if "_head/" not in k else (S, len(self.layers), len(self.heads or []))
            if v.shape != exp:
                raise ValueError(f"score {k!r} has shape {v.shape}, expected {exp}")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.meta)

    def __repr__(self) -> str:
        return (f"GroundingResults(n_samples={len(self)}, layers={len(self.layers)}, "
                f"heads={None if self.heads is None else len(self.heads)}, scores={self.score_names}, "
                f"kinds={self.kinds})")

    @property
    def ids(self) -> list[str]:
        return [str(x) for x in self.meta["id"]]

    @property
    def f(self) -> np.ndarray:
        """Region fraction per sample ``[S]``."""
        return self.meta["f"].to_numpy(dtype=np.float64)

    @property
    def question_type(self) -> np.ndarray:
        return self.meta["question_type"].to_numpy()

    @property
    def modality(self) -> np.ndarray:
        return self.meta["modality"].to_numpy()

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(k.split("/")[0] for k in self.scores if "_head/" not in k))

    @property
    def score_names(self) -> list[str]:
        return list(dict.fromkeys(k.split("/", 1)[1] for k in self.scores))

    @property
    def has_heads(self) -> bool:
        return any("_head/" in k for k in self.scores)

    def get(self, score: str = "attention_ratio", kind: str = "relative", per_head: bool = False) -> np.ndarray:
        """Per-sample array: ``[S, n_layers]`` or, with ``per_head``, ``[S, n_layers, n_heads]``."""
        key = f"{kind}_head/{score}" if per_head else f"{kind}/{score}"
        if key not in self.scores:
            raise KeyError(f"no {key!r} in these results; available: {sorted(self.scores)}")
        return self.scores[key]

    def select(self, mask) -> "GroundingResults":
        """Subset of samples (boolean ``[S]`` or integer indices)."""
        idx = np.arange(len(self))[np.asarray(mask)] if np.asarray(mask).dtype == bool else np.asarray(mask, int)
        return GroundingResults(self.meta.iloc[idx], self.layers, {k: v[idx] for k, v in self.scores.items()},
                                self.heads, self.info)

    @classmethod
    def concat(cls, parts: Sequence["GroundingResults"]) -> "GroundingResults":
        """Concatenate results of the same run (e.g. shards of several processes)."""
        import pandas as pd

        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.layers != first.layers or p.heads != first.heads or set(p.scores) != set(first.scores):
                raise ValueError("cannot concatenate results with different layers/heads/scores")
        meta = pd.concat([p.meta for p in parts], ignore_index=True)
        scores = {k: np.concatenate([p.scores[k] for p in parts]) for k in first.scores}
        return cls(meta, first.layers, scores, first.heads, first.info)

    def sort_by_index(self) -> "GroundingResults":
        order = np.argsort(self.meta["index"].to_numpy(), kind="stable")
        return self.select(order)

    # ------------------------------------------------------------------ summary
    def summary(self, per_head: bool = False, by: str | None = None, kinds: Sequence[str] | None = None,
                scores: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0):
        """Aggregated scores as a long ``pandas.DataFrame``.

        One row per (``[by]``, ``kind``, ``score``, ``layer`` [, ``head``]) with ``mean``, ``median``,
        ``ci_low``/``ci_high`` (95 % percentile bootstrap of the mean, ``n_boot`` seeded resamples),
        ``n`` (finite samples), ``n_nan``, ``chance`` (mean per-sample chance level from ``f``),
        ``n_skipped_empty_gt`` and ``higher_is_better``. ``by``: a meta column (``"question_type"``,
        ``"modality"``, ``"source"``) to break the summary down.
        """
        import pandas as pd

        from .metrics import ALIASES, HIGHER_IS_BETTER, aggregate

        if by is not None:
            if by not in self.meta.columns:
                raise KeyError(f"cannot break down by {by!r}; meta columns: {list(self.meta.columns)}")
            frames = []
            for val in dict.fromkeys(self.meta[by].tolist()):
                sub = self.select((self.meta[by] == val).to_numpy())
                d = sub.summary(per_head=per_head, kinds=kinds, scores=scores, n_boot=n_boot, seed=seed)
                d.insert(0, by, val)
                frames.append(d)
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        kinds = self.kinds if kinds is None else list(kinds)
        names = self.score_names if scores is None else list(scores)
        rows = []
        f = self.f
        for kind in kinds:
            per = {}
            for s in names:
                key = f"{kind}_head/{s}" if per_head else f"{kind}/{s}"
                if key in self.scores:
                    per[s] = self.scores[key]
            if not per or len(self) == 0:
                continue
            agg = aggregate(per, f=f, n_boot=n_boot, seed=seed, **self.info.get("chance_options", {}))
            for s, st in agg.items():
                for li, layer in enumerate(self.layers):
                    hs = list(enumerate(self.heads)) if per_head else [(None, None)]
                    for hi, head in hs:
                        ix = (li, hi) if per_head else (li,)
                        row = {"kind": kind, "score": s, "layer": layer}
                        if per_head:
                            row["head"] = head
                        for stat in ("mean", "median", "ci_low", "ci_high"):
                            row[stat] = float(np.asarray(st[stat])[ix])
                        row["n"] = int(np.asarray(st["n"])[ix])
                        row["n_nan"] = int(np.asarray(st["n_nan"])[ix])
                        row["chance"] = float(st.get("chance", math.nan))
                        row["n_skipped_empty_gt"] = int(st.get("n_skipped_empty_gt", 0))
                        row["higher_is_better"] = bool(HIGHER_IS_BETTER.get(ALIASES.get(s, s), True))
                        rows.append(row)
        return pd.DataFrame(rows)

    def summary_dict(self, n_boot: int = 1000, seed: int = 0, breakdowns: Sequence[str] = ("question_type", "modality")):
        """JSON-ready summary: run info, layer summary records, breakdowns, head summary (when present)."""
        out = {"n_samples": len(self), "layers": self.layers, "heads": self.heads, "info": self.info,
               "n_gt_errors": int((self.meta["gt_error"].astype(str) != "").sum()) if "gt_error" in self.meta else 0,
               "layer_summary": self.summary(n_boot=n_boot, seed=seed).to_dict("records")}
        for col in breakdowns:
            if col in self.meta.columns and self.meta[col].nunique() > 0:
                out[f"by_{col}"] = self.summary(by=col, n_boot=n_boot, seed=seed).to_dict("records")
        if self.has_heads:
            out["head_summary"] = self.summary(per_head=True, n_boot=n_boot, seed=seed).to_dict("records")
        return out

    # ------------------------------------------------------------------ persistence
    def _table(self):
        import pyarrow as pa

        cols = {}
        for c in self.meta.columns:
            cols[c] = pa.array(self.meta[c].tolist())
        for k, v in self.scores.items():   # one fixed-size list per sample, built without Python loops
            flat = np.ascontiguousarray(v, dtype=np.float64).reshape(len(self), -1)
            cols[k] = (pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]) if flat.shape[1]
                       else pa.array([[]] * len(self), type=pa.list_(pa.float64())))
        table = pa.table(cols)
        meta = {"layers": self.layers, "heads": self.heads, "info": self.info, "score_keys": list(self.scores)}
        return table.replace_schema_metadata({_META_KEY: json.dumps(_json_safe(meta)).encode()})

    def to_parquet(self, path: str) -> str:
        """Write the per-sample table (meta columns + one list column per score key) atomically."""
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(self._table(), buf)
        atomic_write(path, buf.getvalue())
        return path

    @classmethod
    def from_parquet(cls, path: str) -> "GroundingResults":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        md = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
        if "layers" not in md:
            raise ValueError(f"{path} is not a GroundingResults parquet file (no {_META_KEY.decode()} metadata)")
        layers, heads = md["layers"], md["heads"]
        S = table.num_rows
        scores = {}
        for k in md["score_keys"]:
            col = table.column(k).combine_chunks()      # fixed-size (or, older files, variable) list of float64
            if col.null_count:
                raise ValueError(f"{path}: column {k!r} has missing rows")
            arr = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
            shape = (S, len(layers), len(heads)) if "_head/" in k else (S, len(layers))
            scores[k] = arr.reshape(shape)
        meta = table.drop_columns(md["score_keys"]).to_pandas()
        return cls(meta, layers, scores, heads, md.get("info", {}))

    def save(self, directory: str, n_boot: int = 1000, plot: bool = True) -> dict:
        """Write ``per_sample.parquet``, ``summary.json`` (and ``layers.png``) into ``directory`` atomically.

        Returns ``{"per_sample": path, "summary": path, "plot": path | None}``."""
        os.makedirs(directory, exist_ok=True)
        paths = {"per_sample": self.to_parquet(os.path.join(directory, PER_SAMPLE_FILE))}
        _atomic_write_json(os.path.join(directory, SUMMARY_FILE), self.summary_dict(n_boot=n_boot))
        paths["summary"] = os.path.join(directory, SUMMARY_FILE)
        paths["plot"] = None
        if plot and len(self):
            paths["plot"] = os.path.join(directory, LAYERS_PNG)
            self.plot_layers(paths["plot"], n_boot=n_boot)
        return paths

    @classmethod
    def load(cls, directory: str) -> "GroundingResults":
        """Read results written by :meth:`save` (or a ``per_sample.parquet`` path)."""
        path = directory if str(directory).endswith(".parquet") else os.path.join(directory, PER_SAMPLE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {PER_SAMPLE_FILE} in {directory}")
        return cls.from_parquet(path)

    # ------------------------------------------------------------------ plots
    def plot_layers(self, path: str | None = None, scores: Sequence[str] | None = None,
                    kinds: Sequence[str] | None = None, title: str | None = None, n_boot: int = 1000):
        """PNG of the per-layer curves: one panel/line per score (relative solid, raw dotted), 95 % CI
        band, chance level dashed. Returns the matplotlib ``Figure``."""
        from .viz import plot_layer_curves

        summ = self.summary(kinds=kinds, scores=scores, n_boot=n_boot)
        model = self.info.get("model", {})
        name = model.get("name_or_path") or model.get("class", "")
        if name and os.path.isabs(str(name)):        # a local folder: its name, not the absolute path
            name = os.path.basename(str(name).rstrip("/")) or str(name)
        title = title if title is not None else f"{name} — {len(self)} samples, gt={self.info.get('gt', '?')}"
        return plot_layer_curves(summ, path=path, scores=scores, kinds=kinds, title=title)

    def plot_heads(self, path: str | None = None, score: str = "attention_ratio", kind: str = "relative",
                   stat: str = "mean", selected=(), chosen_layers=()):
        """Layer x head heat-map of the per-sample ``stat`` (``mean``/``median``, NaNs excluded) of ``score``."""
        from .viz import plot_head_heatmap

        arr = self.get(score, kind, per_head=True)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mat = np.nanmean(arr, 0) if stat == "mean" else np.nanmedian(arr, 0)
        return plot_head_heatmap(mat, path=path, selected=selected, chosen_layers=chosen_layers, layers=self.layers,
                                 heads=self.heads, label=f"{stat} {score} ({kind})")


# ============================================================================================ measurement
def _first_spans(adapter, inputs):
    spans = adapter.image_spans(inputs)
    for b, sp in enumerate(spans):
        if not sp:
            raise ValueError(f"sample {b} has no image tokens")
    return [[sp[0]] for sp in spans]


def _capture(model, adapter, inputs, layers, query):
    from .grounding_pass import GroundingPass, PromptLayout

    spans = _first_spans(adapter, inputs)
    cap = GroundingPass(model, adapter=adapter).run(inputs, PromptLayout.read(adapter, inputs, spans=spans),
                                                    layers=layers, query=query, early_exit=True).question
    maps = cap.maps.detach().float().cpu().numpy()  # [B, nL, H, Nmax]
    return [maps[b, :, :, : cap.n_tokens[b]] for b in range(maps.shape[0])], spans


def _sample_gt(row, grid, gt: str, min_cells_per_box: int, image_size=None, settings: dict | None = None):
    """-> (token mask [N] bool or float32, gt_source, error message).

    ``settings["box_mapping"]`` / ``settings["mask_box_end"]`` (absent = defaults): the study's box rule of
    :func:`hf_vgrefine.geometry.study_token_mask` (``faithful=True``: stretch, inclusive-max mask boxes)."""
    from .geometry import MASK_DERIVED_SOURCES, mask_to_token_mask, study_token_mask

    boxes = row.get("boxes")
    boxes = [] if boxes is None else [list(map(float, b)) for b in boxes]
    mask = row.get("mask")
    marr = None
    if mask is not None:
        marr = np.asarray(mask)
        if marr.ndim == 3:
            marr = marr[..., 0]
    fraction = gt == "soft_mask"
    mode = "fraction" if fraction else "any"
    use_mask = marr is not None and (gt in ("mask_cells", "soft_mask") or not boxes)
    try:
        if use_mask:
            tm = mask_to_token_mask(marr, grid, mode=mode, on_empty="empty")
            src = "soft_mask" if fraction else "mask_cells"
        elif boxes:
            st = settings or {}
            tm = study_token_mask(boxes, grid, image_size, box_mapping=st.get("box_mapping", "processor"),
                                  mask_box_end=st.get("mask_box_end", "exclusive"),
                                  from_mask=str(row.get("source", "")) in MASK_DERIVED_SOURCES, mode=mode,
                                  min_cells_per_box=min_cells_per_box, on_empty="empty")
            src = "box_fraction" if fraction else "box"
        else:
            return np.zeros(grid.n_tokens, dtype=bool), "none", "sample has neither boxes nor a mask"
    except ValueError as e:
        return np.zeros(grid.n_tokens, dtype=bool), "error", str(e)
    return tm, src, ""


def _score_sample(maps_q, maps_g, gt_mask, grid, relative: bool, per_head: bool, head_norm: str, eps: float,
                  score_names, metric_options):
    from .metrics import grounding_scores, relative_attention

    q = maps_q.astype(np.float64)                      # [nL, H, N]
    out = {}
    kinds = {"raw": (q.mean(1), q if per_head else None)}
    if relative:
        g = maps_g.astype(np.float64)                  # [nL, H or 1, N]
        g_layer = g.mean(1)
        rel_layer = relative_attention(q.mean(1), g_layer, eps)
        rel_head = None
        if per_head:
            if head_norm == "per_head":
                if g.shape[1] != q.shape[1]:
                    raise RuntimeError("per-head generic maps missing from the cache")
                rel_head = relative_attention(q, g, eps)
            elif head_norm == "layer_mean":
                rel_head = relative_attention(q, g_layer[:, None, :], eps)
            else:
                raise ValueError(f"head_norm must be 'per_head' or 'layer_mean', got {head_norm!r}")
        kinds = {"relative": (rel_layer, rel_head), **kinds}
    gt = np.asarray(gt_mask)
    opts = dict(metric_options)
    opts.setdefault("grid", (grid.rows, grid.cols))
    for kind, (lay, head) in kinds.items():
        res = grounding_scores(lay, np.broadcast_to(gt, lay.shape), score_names, **opts)
        for s, v in res.items():
            out[f"{kind}/{s}"] = np.asarray(v, dtype=np.float64)
        if head is not None:
            res = grounding_scores(head, np.broadcast_to(gt, head.shape), score_names, **opts)
            for s, v in res.items():
                out[f"{kind}_head/{s}"] = np.asarray(v, dtype=np.float64)
    return out


def _row_get(row: dict, key: str, default=""):
    v = row.get(key, default)
    return default if v is None else v


def _existing_shards(output_dir: str) -> list[str]:
    d = os.path.join(output_dir, SHARD_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet") and not f.startswith("."))


def _done_ids(output_dir: str) -> set:
    import pyarrow.parquet as pq

    done = set()
    for p in _existing_shards(output_dir):
        done.update(str(x) for x in pq.read_table(p, columns=["id"]).column("id").to_pylist())
    return done


def _check_run(output_dir: str, settings: dict, is_main: bool, state) -> None:
    path = os.path.join(output_dir, RUN_FILE)
    if is_main:
        os.makedirs(os.path.join(output_dir, SHARD_DIR), exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            diff = {k: (old.get(k), v) for k, v in _json_safe(settings).items() if old.get(k) != v}
            if diff and _existing_shards(output_dir):
                raise ValueError(f"{output_dir} holds a measurement with different settings {diff}; use a new "
                                 "output directory (or delete it) to measure with these settings")
        _atomic_write_json(path, settings)
    if state is not None:
        state.wait_for_everyone()


def measure_grounding(model, processor, dataset, layers="all", per_head: bool = False, relative: bool = True,
                      batch_size: int = 4, output_dir: str | None = None, query: str = "last", gt: str = "box",
                      eps: float = 1e-10, instruction: str | None = INSTRUCTION,
                      generic_question: str = GENERIC_QUESTION, head_norm: str = "per_head",
                      scores: Iterable[str] | None = None, metric_options: dict | None = None,
                      min_cells_per_box: int = 1, chat_template: str | None = None, generic_cache_size: int = 1024,
                      progress: bool = True, n_boot: int = 1000, plot: bool = True,
                      on_error: str = "raise", box_mapping: str = "processor",
                      mask_box_end: str = "exclusive") -> GroundingResults:
    """Measure attention-vs-region grounding of ``model`` on ``dataset``, per layer (and per head).

    Args:
        model: a VLM of a supported family (:func:`hf_vgrefine.get_adapter`), in eval mode.
        processor: its ``AutoProcessor`` (chat template; the tokenizer is used with left padding).
        dataset: ``datasets.Dataset`` or a sequence of dicts with VGMED columns: ``image`` (PIL),
            ``question``, ``boxes`` (``[[x, y, w, h], ...]`` original pixels) and/or ``mask``
            (PIL ``L``, same size as the image); optional ``id`` (unique; default the row index),
            ``question_type``, ``modality``, ``source``, ``label``.
        layers: ``"all"``, ``"0,3,5-7"`` or a list of decoder-layer indices (0-based).
        per_head: also score every (layer, query head) map.
        relative: compute relative maps (needs the generic pass); raw maps are always scored.
        batch_size: prompts per forward pass (left-padded).
        output_dir: resumable run folder (shards, ``per_sample.parquet``, ``summary.json``, ``layers.png``).
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
        generic_cache_size: images whose generic maps stay cached in memory (LRU).
        n_boot, plot: bootstrap resamples of the saved summary; write ``layers.png`` (with ``output_dir``).
        box_mapping / mask_box_end: box → token rule (:func:`hf_vgrefine.geometry.study_token_mask`);
            ``**hf_vgrefine.geometry.study_geometry(config)`` gives a VGRefine config's (``faithful=True``:
            the released stretch mapping and inclusive-max mask boxes).
        on_error: a row whose image cannot be read (corrupt or truncated file): ``"raise"`` (default; the
            error names the row) or ``"skip"`` (go on; skipped rows are listed in ``results.info["skipped"]``
            and, with ``output_dir``, in ``skipped.json``; a rerun retries them).
    Returns:
        :class:`GroundingResults` (on the main process: all samples, merged over processes).
    """
    from .adapters import get_adapter
    from .metrics import ALL

    if gt not in GT_MODES:
        raise ValueError(f"gt must be one of {GT_MODES}, got {gt!r}")
    if query not in ("last", "post_image"):
        raise ValueError(f"query must be 'last' or 'post_image', got {query!r}")
    if head_norm not in ("per_head", "layer_mean"):
        raise ValueError(f"head_norm must be 'per_head' or 'layer_mean', got {head_norm!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError("dataset must support len() and indexing (a datasets.Dataset or a list of dicts); "
                        "for an IterableDataset, materialise it first (e.g. Dataset.from_list(list(ds.take(n))))")
    adapter = get_adapter(model)
    layer_list = parse_layers(layers, adapter.num_layers)
    score_names = list(ALL if scores is None else ([scores] if isinstance(scores, str) else scores))
    metric_options = dict(metric_options or {})
    rank, world, state = _dist()
    is_main = rank == 0

    n = len(dataset)
    ids = _dataset_ids(dataset)
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"dataset ids must be unique (resuming relies on them); duplicates: {dup}")
    settings = {"model": _model_fingerprint(model, adapter), "processor": processor_settings(processor),
                "layers": layer_list, "heads": list(range(adapter.num_heads)) if per_head else None,
                "per_head": bool(per_head), "relative": bool(relative), "query": query, "gt": gt, "eps": float(eps),
                "instruction": instruction, "generic_question": generic_question, "head_norm": head_norm,
                "scores": score_names, "metric_options": metric_options, "min_cells_per_box": int(min_cells_per_box),
                "chat_template": chat_template}
    if box_mapping not in ("processor", "pad", "stretch") or mask_box_end not in ("exclusive", "inclusive_max"):
        raise ValueError(f"box_mapping={box_mapping!r} (processor | stretch), mask_box_end={mask_box_end!r} "
                         "(exclusive | inclusive_max)")
    if box_mapping == "stretch":            # recorded only when not the default (older runs stay resumable)
        settings["box_mapping"] = "stretch"
    if mask_box_end != "exclusive":
        settings["mask_box_end"] = mask_box_end
    done: set = set()
    if output_dir is not None:
        _check_run(output_dir, settings, is_main, state)
        done = _done_ids(output_dir)
    todo = [i for i in range(n) if i % world == rank and ids[i] not in done]

    cache = GenericMapCache(generic_cache_size)     # per image hash: float32 [n_layers, n_heads or 1, N]
    counters = {"question_passes": 0, "generic_passes": 0, "generic_images": 0, "measured": len(todo),
                "skipped_done": sum(1 for i in range(n) if i % world == rank and ids[i] in done)}
    shard_seq = len([p for p in _existing_shards(output_dir) if os.path.basename(p).startswith(f"rank{rank:03d}-")]) \
        if output_dir is not None else 0
    local_parts = []
    bar = _progress(len(todo), progress and (state is None or state.is_local_main_process))
    t0 = time.time()
    skipped = []
    try:
        for start in range(0, len(todo), int(batch_size)):
            idx, rows = [], []
            for i in todo[start:start + int(batch_size)]:
                row, err = _fetch_row(dataset, i, ids[i])
                if err is None:
                    idx.append(i)
                    rows.append(row)
                elif on_error == "skip":
                    skipped.append({"index": i, "id": ids[i], "error": err})
                else:
                    raise ValueError(f"{err}; fix or drop that row, or pass on_error='skip' (CLI: --on-error skip) to "
                                     "skip such rows and list them in the results")
            if not rows:
                bar.update(len(todo[start:start + int(batch_size)]))
                continue
            part = _measure_batch(model, processor, adapter, rows, idx, [ids[i] for i in idx], layer_list, per_head,
                                  relative, query, gt, eps, instruction, generic_question, head_norm, score_names,
                                  metric_options, min_cells_per_box, chat_template, cache, counters, int(batch_size),
                                  settings)
            if output_dir is not None:
                shard_seq += 1
                part.to_parquet(os.path.join(output_dir, SHARD_DIR, f"rank{rank:03d}-{shard_seq:06d}.parquet"))
            else:
                local_parts.append(part)
            bar.update(len(todo[start:start + int(batch_size)]))
    finally:
        bar.close()
    counters["seconds"] = round(time.time() - t0, 3)
    counters["skipped"] = len(skipped)
    if skipped and world > 1:
        from accelerate.utils import gather_object

        skipped = list(gather_object(skipped))
    counters["generic_cache_hits"] = cache.hits

    if state is not None and world > 1:
        state.wait_for_everyone()
    if output_dir is not None:
        if not is_main:
            return None  # the main process merges the shards
        results = _load_shards(output_dir, settings)
        if results is None:
            results = _empty_results(settings, score_names)
        results.info["last_run"] = counters
        results.info["skipped"] = skipped
        if skipped:
            _atomic_write_json(os.path.join(output_dir, "skipped.json"), skipped)
        results.save(output_dir, n_boot=n_boot, plot=plot)
        return results
    if world > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([p._table_payload() for p in local_parts] if local_parts else [])
        if not is_main:
            return None
        local_parts = [GroundingResults._from_payload(x) for x in gathered]
    results = GroundingResults.concat(local_parts).sort_by_index() if local_parts else _empty_results(settings, score_names)
    results.info["last_run"] = counters
    results.info["skipped"] = skipped
    return results


def _fetch_row(dataset, i: int, row_id) -> tuple[dict | None, str | None]:
    """Row ``i`` with its image decoded (RGB, pixels loaded), or ``(None, message naming the row)``."""
    try:
        row = dataset[i]
        img = _rgb(row["image"])
        img.load()
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:
        return None, f"row {i} (id {row_id!r}): its image cannot be read ({type(e).__name__}: {e})"
    row = dict(row)
    row["image"] = img
    return row, None


def _dataset_ids(dataset) -> list[str]:
    n = len(dataset)
    cols = getattr(dataset, "column_names", None)
    if cols is not None:
        return [str(x) for x in dataset["id"]] if "id" in cols else [str(i) for i in range(n)]
    out = []
    for i in range(n):
        row = dataset[i]
        out.append(str(row["id"]) if isinstance(row, dict) and row.get("id") is not None else str(i))
    return out


def _has_column(dataset, name: str) -> bool:
    cols = getattr(dataset, "column_names", None)
    if cols is not None:
        return name in cols
    return len(dataset) > 0 and isinstance(dataset[0], dict) and name in dataset[0]


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=not enabled, desc="measure", unit="sample")
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def _empty_results(settings, score_names) -> GroundingResults:
    import pandas as pd

    L = len(settings["layers"])
    H = len(settings["heads"] or [])
    kinds = ["relative", "raw"] if settings["relative"] else ["raw"]
    scores = {}
    for k in kinds:
        for s in score_names:
            scores[f"{k}/{s}"] = np.zeros((0, L))
            if settings["per_head"]:
                scores[f"{k}_head/{s}"] = np.zeros((0, L, H))
    return GroundingResults(pd.DataFrame({c: [] for c in _META_COLUMNS}), settings["layers"], scores,
                            settings["heads"], settings)


def _load_shards(output_dir: str, settings) -> GroundingResults | None:
    paths = _existing_shards(output_dir)
    if not paths:
        return None
    parts = [GroundingResults.from_parquet(p) for p in paths]
    res = GroundingResults.concat(parts).sort_by_index()
    res.info = dict(settings)
    return res


def _measure_batch(model, processor, adapter, rows, idx, ids, layers, per_head, relative, query, gt, eps,
                   instruction, generic_question, head_norm, score_names, metric_options, min_cells_per_box,
                   chat_template, cache, counters, batch_size, settings) -> GroundingResults:
    import pandas as pd

    images = [_rgb(r["image"]) for r in rows]
    inputs = build_inputs(processor, images, [str(r["question"]) for r in rows], instruction=instruction,
                          chat_template=chat_template)
    q_maps, spans = _capture(model, adapter, to_model_inputs(inputs, model), layers, query)
    counters["question_passes"] += 1

    g_maps = [None] * len(rows)
    if relative:
        hashes = [_image_hash(im) for im in images]
        local, missing = {}, {}                        # this batch's generic maps; unique uncached images
        for h, im in zip(hashes, images):
            if h in local or h in missing:
                continue
            hit = cache.get(h)
            if hit is not None:
                local[h] = hit
            else:
                missing[h] = im
        missing = list(missing.items())
        for s in range(0, len(missing), batch_size):
            chunk = missing[s:s + batch_size]
            ginp = generic_inputs(processor, [im for _, im in chunk], instruction=instruction,
                                  generic_question=generic_question, chat_template=chat_template)
            maps, _ = _capture(model, adapter, to_model_inputs(ginp, model), layers, query)
            counters["generic_passes"] += 1
            counters["generic_images"] += len(chunk)
            for (h, _), m in zip(chunk, maps):
                local[h] = m if per_head and head_norm == "per_head" else m.mean(1, keepdims=True)
                cache.put(h, local[h])
        g_maps = [local[h] for h in hashes]

    meta_rows, per = [], {}
    for b, row in enumerate(rows):
        span = spans[b][0]
        grid = adapter.token_grid(processor, images[b].size, span=span, inputs=inputs)
        N = q_maps[b].shape[-1]
        if grid.n_tokens != N:
            raise RuntimeError(f"sample {ids[b]}: token grid {grid.rows}x{grid.cols} != {N} captured image tokens")
        if g_maps[b] is not None and g_maps[b].shape[-1] != N:
            raise RuntimeError(f"sample {ids[b]}: generic pass has {g_maps[b].shape[-1]} image tokens, question pass "
                               f"{N}: the two prompts must see the same image geometry")
        tm, src, err = _sample_gt(row, grid, gt, min_cells_per_box, images[b].size, settings)
        tm_f = np.asarray(tm, dtype=np.float64)
        res = _score_sample(q_maps[b], g_maps[b], tm, grid, relative, per_head, head_norm, eps, score_names,
                            metric_options)
        for k, v in res.items():
            per.setdefault(k, []).append(v)
        meta_rows.append({"id": ids[b], "index": int(idx[b]), "question_type": str(_row_get(row, "question_type")),
                          "modality": str(_row_get(row, "modality")), "source": str(_row_get(row, "source")),
                          "label": str(_row_get(row, "label")), "f": float(tm_f.sum() / N),
                          "n_gt_tokens": int(np.count_nonzero(tm_f)), "n_tokens": int(N), "grid_rows": grid.rows,
                          "grid_cols": grid.cols, "gt_source": src, "gt_error": err})
    scores = {k: np.stack(v) for k, v in per.items()}
    heads = list(range(adapter.num_heads)) if per_head else None
    return GroundingResults(pd.DataFrame(meta_rows, columns=list(_META_COLUMNS)), layers, scores, heads, settings)


# payload helpers for gather_object (plain python objects)
def _table_payload(self):
    return {"meta": self.meta.to_dict("list"), "layers": self.layers, "heads": self.heads,
            "scores": {k: v.tolist() for k, v in self.scores.items()}, "info": _json_safe(self.info)}


def _from_payload(payload):
    import pandas as pd

    return GroundingResults(pd.DataFrame(payload["meta"]), payload["layers"],
                            {k: np.asarray(v, dtype=np.float64) for k, v in payload["scores"].items()},
                            payload["heads"], payload["info"])


GroundingResults._table_payload = _table_payload
GroundingResults._from_payload = staticmethod(_from_payload)


# ============================================================================================ loading
def load_model_and_processor(model_id: str, dtype: str = "auto", device: str | None = None,
                             revision: str | None = None, processor_overrides: dict | None = None):
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` from a hub id or a local folder, in eval mode.

    ``dtype``: ``"auto"`` (checkpoint dtype), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    ``device``: e.g. ``"cuda:0"`` (default: the accelerate process device, else CPU).
    ``processor_overrides``: image-processor attributes to set (e.g. ``{"size": {...}, "do_pad": True}``);
    they must match those used at calibration (docs/data_formats.md). Tokenizer padding is set to left.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .outdir import model_reference_error

    err = model_reference_error(str(model_id))
    if err:
        raise ValueError(err)
    kw = {"revision": revision} if revision else {}
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch_dtype, **kw)
    processor = AutoProcessor.from_pretrained(model_id, **kw)
    if device is None:
        _, _, st = _dist()
        device = str(st.device) if st is not None else "cpu"
    model = model.to(device).eval()
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    ip = getattr(processor, "image_processor", None)
    for k, v in (processor_overrides or {}).items():
        if ip is None or not hasattr(ip, k):
            raise ValueError(f"image processor {type(ip).__name__} has no setting {k!r}")
        cur = getattr(ip, k)
        if isinstance(v, dict) and dataclasses.is_dataclass(cur) and not isinstance(cur, type):
            v = type(cur)(**v)                       # keep transformers' SizeDict type
        setattr(ip, k, v)
    return model, processor


def load_grounding_dataset(name_or_path: str, config: str | None = None, split: str | None = "test"):
    """A grounding dataset (VGMED schema) as a ``datasets.Dataset``.

    * a folder written by ``Dataset.save_to_disk`` -> ``load_from_disk`` (a ``DatasetDict`` -> ``split``);
    * any other local folder or a hub name -> ``load_dataset(name_or_path, config, split=split)``
      (parquet + dataset card, as written by ``hf_vgrefine.data.build_vgmed``);
    * ``"vgmed"`` with no such local folder -> ``hf_vgrefine.data.load_vgmed(config, split=split)`` (the package's
      builder; ``atlas`` is built offline on first use, other configurations need ``hf-vgrefine build-vgmed``).
    """
    import datasets

    p = os.path.expanduser(name_or_path)
    if os.path.isdir(p) and (os.path.exists(os.path.join(p, "state.json")) or
                             os.path.exists(os.path.join(p, "dataset_dict.json"))):
        ds = datasets.load_from_disk(p)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in {p} (splits: {list(ds)})")
            ds = ds[split]
        return ds
    if not os.path.exists(p) and name_or_path == "vgmed":
        from .data import load_vgmed  # builds the offline `atlas` configuration on first use

        kw = {"split": split} if split else {}
        return load_vgmed(config, **kw) if config else load_vgmed(**kw)
    ds = datasets.load_dataset(p if os.path.exists(p) else name_or_path, config, split=split)
    return ds


def _filter_dataset(ds, split_group: str | None, limit: int | None, strict: bool = True):
    if split_group and split_group != "all" and "split_group" not in ds.column_names and not strict:
        import warnings

        warnings.warn(f"the dataset has no split_group column: using all rows instead of {split_group!r}", stacklevel=2)
        split_group = None
    if split_group and split_group != "all":
        if "split_group" not in ds.column_names:
            raise ValueError(f"--split-group {split_group}: the dataset has no split_group column (use 'all')")
        groups = ds["split_group"]
        keep = [i for i, g in enumerate(groups) if g == split_group]
        if not keep:
            raise ValueError(f"no rows with split_group == {split_group!r} (values: {sorted(set(groups))})")
        ds = ds.select(keep)
    if limit is not None:
        ds = ds.select(range(min(int(limit), len(ds))))
    return ds


# ============================================================================================ CLI
def _kv(text: str):
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    return k.strip(), val


def add_common_arguments(p) -> None:
    """Options shared by ``measure`` and ``calibrate``."""
    from .outdir import model_id_or_path, positive_int

    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="ID_OR_PATH", type=model_id_or_path,
                   help="model to load with AutoModelForImageTextToText + AutoProcessor: a hub id or a local folder "
                        "written by save_pretrained")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    g.add_argument("--dataset", required=True, metavar="NAME_OR_PATH",
                   help="grounding dataset in VGMED's schema (image, question, boxes [x,y,w,h] pixels, optional mask): "
                        "a local folder (parquet + card, or save_to_disk output) or a hub name; 'vgmed' builds/loads "
                        "the package's VGMED")
    g.add_argument("--config", default=None, metavar="CFG", help="dataset configuration name (e.g. atlas, slake, full)")
    g.add_argument("--split", default="test", help="dataset split (default: test)")
    g.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N rows (after --split-group)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights dtype (attention is always captured in fp32)")
    g.add_argument("--device", default=None, help="device (default: the accelerate process device, else cpu)")
    g.add_argument("--processor-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="set an image-processor attribute before processing, VALUE parsed as JSON, e.g. "
                        "size='{\"shortest_edge\": 784, \"longest_edge\": 50176}' or do_pad=true; repeatable. "
                        "Use the same settings for calibration and inference")
    m = p.add_argument_group("measurement")
    m.add_argument("--layers", default="all", help="decoder layers: 'all' or a list like 0,4,10-15 (default all)")
    m.add_argument("--batch-size", type=positive_int, default=4, help="prompts per forward pass (default 4)")
    m.add_argument("--gt", default="box", choices=list(GT_MODES),
                   help="ground-truth tokens: box = cells touched by a box (default); mask_cells = cells touching a "
                        "mask pixel; soft_mask = covered fraction per cell")
    m.add_argument("--query", default="last", choices=["last", "post_image"],
                   help="query row: last prompt token (default) or mean over the rows after the image")
    m.add_argument("--eps", type=float, default=1e-10,
                   help="epsilon added to the generic map in relative attention (default 1e-10; 0 = released scripts)")
    m.add_argument("--instruction", default=INSTRUCTION,
                   help=f"suffix appended to every prompt with one space (default: {INSTRUCTION!r})")
    m.add_argument("--no-instruction", action="store_true", help="do not append any instruction suffix")
    m.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    m.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="a row whose image cannot be read: stop naming the row (raise, default) or skip it and list "
                        "it in skipped.json / the results (skip)")


def _load_from_args(args, strict_group: bool = True):
    overrides = dict(_kv(s) for s in args.processor_setting)
    model, processor = load_model_and_processor(args.model, dtype=args.dtype, device=args.device,
                                                revision=args.revision, processor_overrides=overrides)
    ds = load_grounding_dataset(args.dataset, args.config, args.split)
    ds = _filter_dataset(ds, args.split_group, args.limit, strict=strict_group)
    return model, processor, ds


def _print_layer_table(res: GroundingResults, kind: str = "relative") -> None:
    if not len(res):
        print("no samples measured")
        return
    names = [s for s in ("attention_ratio", "kl_gt_attention", "js_divergence", "energy_pointing_game")
             if s in res.score_names]
    summ = res.summary(kinds=[kind] if kind in res.kinds else res.kinds[:1], scores=names, n_boot=200)
    pivot = summ.pivot_table(index="layer", columns="score", values="mean")
    print(f"mean over {len(res)} samples ({summ['kind'].iloc[0]} maps); chance AR = 1")
    print(pivot.to_string(float_format=lambda v: f"{v:.4f}"))


def _run_measure(args) -> int:
    model, processor, ds = _load_from_args(args)
    res = measure_grounding(model, processor, ds, layers=args.layers, per_head=args.per_head,
                            relative=not args.raw_only, batch_size=args.batch_size, output_dir=args.out,
                            query=args.query, gt=args.gt, eps=args.eps,
                            instruction=None if args.no_instruction else args.instruction,
                            progress=not args.no_progress, on_error=args.on_error)
    if res is None:  # non-main process
        return 0
    _print_layer_table(res)
    print(f"wrote {os.path.join(args.out, PER_SAMPLE_FILE)}, {os.path.join(args.out, SUMMARY_FILE)}, "
          f"{os.path.join(args.out, LAYERS_PNG)}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``hf-vgrefine measure``."""
    import argparse

    p = subparsers.add_parser(
        "measure", help="measure attention-vs-region grounding per layer (and head)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run every sample's question prompt and the generic prompt on its image, capture the last-token\n"
            "attention to the image tokens, map the sample's boxes/mask onto the token grid and compute every\n"
            "grounding score (attention ratio, KL, JS, soft-Dice ratio, energy pointing game, pointing game,\n"
            "thresholded IoU/Dice, AUROC) per layer for relative (question / generic) and raw maps.\n\n"
            "Writes into --out: per_sample.parquet, summary.json (mean, median, 95% bootstrap CI, n, chance per\n"
            "layer, by question type and modality), layers.png, run.json, shards/. Rerunning with the same --out\n"
            "skips samples already measured. Multi-GPU: accelerate launch -m hf_vgrefine.cli measure ..."),
        epilog="example: hf-vgrefine measure --model ./tiny-llava --dataset ./vgmed --config atlas --out runs/m1")
    add_common_arguments(p)
    p.add_argument("--split-group", default="all", choices=["all", "calibration", "test"],
                   help="use only rows of this VGMED split_group (default all; the study reports on test)")
    p.add_argument("--per-head", action="store_true", help="also score every (layer, head) map (per-head generic norm)")
    p.add_argument("--raw-only", action="store_true", help="skip the generic pass: raw attention maps only")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")
    p.set_defaults(func=_run_measure)
