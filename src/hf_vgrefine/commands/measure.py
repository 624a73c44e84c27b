"""``hf-vgrefine measure``: attention-vs-region grounding per layer (and head) of a model on a dataset."""

from __future__ import annotations

import os

from ..measure import measure_grounding
from ..results import LAYERS_PNG, PER_SAMPLE_FILE, SUMMARY_FILE
from .common import add_command, add_common_arguments, load_from_args, print_layer_table


HELP = "measure attention-vs-region grounding per layer (and head)"
DESCRIPTION = """\
Run every sample's question prompt and the generic prompt on its image, capture the last-token
attention to the image tokens, map the sample's boxes/mask onto the token grid and compute every
grounding score (attention ratio, KL, JS, soft-Dice ratio, energy pointing game, pointing game,
thresholded IoU/Dice, AUROC) per layer for relative (question / generic) and raw maps.

Writes into --out: per_sample.parquet, summary.json (mean, median, 95% bootstrap CI, n, chance per
layer, by question type and modality), layers.png, run.json, shards/. Rerunning with the same --out
skips samples already measured. Multi-GPU: accelerate launch -m hf_vgrefine.cli measure ..."""
EPILOG = "example: hf-vgrefine measure --model ./tiny-llava --dataset ./vgmed --config atlas --out runs/m1"


def run(args) -> int:
    """Measure, print the per-layer table, name the files written."""
    model, processor, ds = load_from_args(args)
    res = measure_grounding(model, processor, ds, layers=args.layers, per_head=args.per_head,
                            relative=not args.raw_only, batch_size=args.batch_size, output_dir=args.out,
                            query=args.query, gt=args.gt, eps=args.eps,
                            instruction=None if args.no_instruction else args.instruction,
                            progress=not args.no_progress, on_error=args.on_error)
    if res is None:  # non-main process
        return 0
    print_layer_table(res)
    print(f"wrote {os.path.join(args.out, PER_SAMPLE_FILE)}, {os.path.join(args.out, SUMMARY_FILE)}, "
          f"{os.path.join(args.out, LAYERS_PNG)}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``hf-vgrefine measure``."""
    p = add_command(subparsers, "measure", HELP, DESCRIPTION, run, EPILOG)
    add_common_arguments(p)
    p.add_argument("--split-group", default="all", choices=["all", "calibration", "test"],
                   help="use only rows of this VGMED split_group (default all; the study reports on test)")
    p.add_argument("--per-head", action="store_true", help="also score every (layer, head) map (per-head generic norm)")
    p.add_argument("--raw-only", action="store_true", help="skip the generic pass: raw attention maps only")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")
