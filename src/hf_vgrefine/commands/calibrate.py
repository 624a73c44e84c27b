"""``hf-vgrefine calibrate``: VGRefine's masked layer and sensitive heads from grounding scores."""

from __future__ import annotations

import os

from ..calibrate import HEATMAP_PNG, RANK_RULES, calibrate
from .argtypes import percentile_value, positive_int
from .common import add_command, add_common_arguments, load_from_args


HELP = "choose VGRefine's masked layer and sensitive heads from grounding scores"
DESCRIPTION = """\
Measure per-layer and per-head relative attention grounding on a calibration set and choose
VGRefine's masked layer (argmax of the mean layer-level criterion, ties -> lower layer) and the top-k
sensitive (layer, head) pairs (--rank-by; per-head generic normalisation).

Writes into --out: vgrefine_config.json (loadable with VGRefineConfig.from_pretrained; the scores
behind the choice are in its 'calibration' field), calibration_heads.png (layer x head heat-map),
measurement/ (resumable per-sample scores, summary.json, layers.png)."""
EPILOG = "example: hf-vgrefine calibrate --model ./tiny-llava --dataset ./vgmed --config atlas --k 20 --out cal/"


def run(args) -> int:
    """Calibrate, print the chosen layer and heads, name the files written."""
    model, processor, ds = load_from_args(args, strict_group=False)
    cfg = calibrate(model, processor, ds, k=args.k, criterion=args.criterion, rank_by=args.rank_by,
                    exclude_layers=args.exclude_layers, output_dir=args.out, batch_size=args.batch_size,
                    split_group=None, gt=args.gt, eps=args.eps, query=args.query,
                    instruction=None if args.no_instruction else args.instruction, percentile=args.percentile,
                    progress=not args.no_progress, search=True if args.search else None,
                    on_error=args.on_error)
    if cfg is None:
        return 0
    cal = cfg.calibration
    print(f"masked layer: {cfg.masked_layers}  (criterion {cal['criterion']}, {cal['n_samples']} samples)")
    print(f"sensitive heads (top-{cal['k_effective']} by {cal['rank_by']}): {cfg.sensitive_heads}")
    print(f"wrote {os.path.join(args.out, 'vgrefine_config.json')} and {os.path.join(args.out, HEATMAP_PNG)}")
    if args.search:
        s = cal["search"]
        print(f"knockout search: {s['chosen']} (calibration gain {s['gain']:+.4f}, 95% CI [{s['gain_ci'][0]:+.4f}, "
              f"{s['gain_ci'][1]:+.4f}]; {s['n_candidates']} candidates on {s['n_calibration']} questions); report "
              f"{os.path.join(args.out, 'search', s['report'])}")
    return 0


def int_list(text: str) -> list[int]:
    """``"0,3"`` -> ``[0, 3]`` (empty text: no layers)."""
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def add_cli(subparsers) -> None:
    """Register ``hf-vgrefine calibrate``."""
    p = add_command(subparsers, "calibrate", HELP, DESCRIPTION, run, EPILOG)
    add_common_arguments(p)
    p.add_argument("--split-group", default="calibration", choices=["all", "calibration", "test"],
                   help="use only rows of this VGMED split_group (default calibration, disjoint from test images)")
    p.add_argument("--k", type=positive_int, default=20, help="number of sensitive heads (default 20)")
    p.add_argument("--criterion", default="attention_ratio",
                   help="layer-choice score: attention_ratio (default), kl_gt_attention, js_divergence, "
                        "energy_pointing_game, ... (KL/JS: lower is better)")
    p.add_argument("--rank-by", default="ar_mean", choices=sorted(RANK_RULES),
                   help="head ranking: ar_mean (default), ar_median, ar_frac_above_1 (descending), js_mean, kl_mean "
                        "(ascending)")
    p.add_argument("--exclude-layers", type=int_list, default=[], metavar="L1,L2",
                   help="layers never chosen (neither as masked layer nor for heads), e.g. 0,1")
    p.add_argument("--percentile", type=percentile_value, default=80.0,
                   help="triage percentile stored in the config (default 80, the released value)")
    p.add_argument("--search", action="store_true",
                   help="then tune the knockout settings (layers, heads, threshold, normalisation, knockout heads) on "
                        "the same rows (closed questions with answers) by accuracy gain; writes search/ (report, table, "
                        "figure) and the tuned vgrefine_config.json")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
