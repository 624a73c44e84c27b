"""Loading for measurement and calibration: a model + processor (hub id or local folder), a grounding
dataset in VGMED's schema, its rows of one split group, and the image-processor settings recorded with results.
"""

from __future__ import annotations

import dataclasses
import json
import os

from .sharding import RunShard

__all__ = ["load_model_and_processor", "load_grounding_dataset", "select_rows", "processor_settings"]


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
        shard_device = RunShard.current().device
        device = str(shard_device) if shard_device is not None else "cpu"
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


def select_rows(ds, split_group: str | None, limit: int | None, strict: bool = True):
    """Rows of ``ds`` whose ``split_group`` is ``split_group`` (``None`` / ``"all"``: every row), then the first
    ``limit``. Without a ``split_group`` column: ``ValueError`` (``strict``) or a warning and every row."""
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
