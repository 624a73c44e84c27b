"""Pieces shared by the sub-commands: the model/data/measurement options of ``measure`` and
``calibrate``, loading what they name, the per-layer table, and sub-parser creation."""

from __future__ import annotations

import argparse
import json

from ..loading import load_grounding_dataset, load_model_and_processor, select_rows
from ..measure import GT_MODES
from ..prompts import INSTRUCTION
from ..results import GroundingResults

__all__ = ["add_command", "add_common_arguments", "load_from_args", "parse_key_value", "print_layer_table"]


def add_command(subparsers, name: str, help: str, description: str, run, epilog: str | None = None):
    """A sub-parser whose description keeps its line breaks and whose ``func`` is ``run``."""
    p = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)
    return p


def parse_key_value(text: str):
    """``"KEY=VALUE"`` -> ``(KEY, VALUE parsed as JSON, else the text)``."""
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
    from .argtypes import model_id_or_path, positive_int

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


def load_from_args(args, strict_group: bool = True):
    """Model, processor and dataset rows named by the :func:`add_common_arguments` options."""
    overrides = dict(parse_key_value(s) for s in args.processor_setting)
    model, processor = load_model_and_processor(args.model, dtype=args.dtype, device=args.device,
                                                revision=args.revision, processor_overrides=overrides)
    ds = load_grounding_dataset(args.dataset, args.config, args.split)
    ds = select_rows(ds, args.split_group, args.limit, strict=strict_group)
    return model, processor, ds


def print_layer_table(res: GroundingResults, kind: str = "relative") -> None:
    """Per-layer mean of the main scores of ``res`` (``kind`` maps) as a text table on stdout."""
    if not len(res):
        print("no samples measured")
        return
    names = [s for s in ("attention_ratio", "kl_gt_attention", "js_divergence", "energy_pointing_game")
             if s in res.score_names]
    summ = res.summary(kinds=[kind] if kind in res.kinds else res.kinds[:1], scores=names, n_boot=200)
    pivot = summ.pivot_table(index="layer", columns="score", values="mean")
    print(f"mean over {len(res)} samples ({summ['kind'].iloc[0]} maps); chance AR = 1")
    print(pivot.to_string(float_format=lambda v: f"{v:.4f}"))
