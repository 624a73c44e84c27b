"""Results container of a grounding measurement (:class:`GroundingResults`) and its files.

One model on one dataset: per-sample scores ``[S, n_layers]`` (``[S, n_layers, n_heads]`` per head),
sample metadata, the run settings; summaries with bootstrap CIs; ``per_sample.parquet`` /
``summary.json`` / ``layers.png`` persistence (atomic writes) and plots. Produced by
:func:`hf_vgrefine.measure.measure_grounding`.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Sequence

import numpy as np

from .atomic import atomic_write
from .jsonio import json_safe, write_json

__all__ = ["GroundingResults", "META_COLUMNS", "PER_SAMPLE_FILE", "SUMMARY_FILE", "LAYERS_PNG", "MAP_KINDS"]

MAP_KINDS = ("relative", "raw")
PER_SAMPLE_FILE = "per_sample.parquet"
SUMMARY_FILE = "summary.json"
LAYERS_PNG = "layers.png"
META_KEY = b"hf_vgrefine.grounding"
#: Per-sample metadata columns, in table order.
META_COLUMNS = ("id", "index", "question_type", "modality", "source", "label", "f", "n_gt_tokens", "n_tokens",
                "grid_rows", "grid_cols", "gt_source", "gt_error")


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
        return table.replace_schema_metadata({META_KEY: json.dumps(json_safe(meta)).encode()})

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
        md = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
        if "layers" not in md:
            raise ValueError(f"{path} is not a GroundingResults parquet file (no {META_KEY.decode()} metadata)")
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
        write_json(os.path.join(directory, SUMMARY_FILE), self.summary_dict(n_boot=n_boot))
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


    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def empty(cls, settings: dict, score_names: Sequence[str]) -> "GroundingResults":
        """No samples, with the score keys and axes a run with ``settings`` (``layers``, ``heads``,
        ``relative``, ``per_head``) would produce."""
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
        return cls(pd.DataFrame({c: [] for c in META_COLUMNS}), settings["layers"], scores, settings["heads"],
                   settings)

    def to_payload(self) -> dict:
        """Plain Python objects (for ``accelerate.utils.gather_object``); inverse of :meth:`from_payload`."""
        return {"meta": self.meta.to_dict("list"), "layers": self.layers, "heads": self.heads,
                "scores": {k: v.tolist() for k, v in self.scores.items()}, "info": json_safe(self.info)}

    @classmethod
    def from_payload(cls, payload: dict) -> "GroundingResults":
        import pandas as pd

        return cls(pd.DataFrame(payload["meta"]), payload["layers"],
                   {k: np.asarray(v, dtype=np.float64) for k, v in payload["scores"].items()},
                   payload["heads"], payload["info"])
