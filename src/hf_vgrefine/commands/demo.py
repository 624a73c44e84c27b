"""``hf-vgrefine demo``: the offline end-to-end run (:func:`hf_vgrefine.demo.run_demo`)."""

from __future__ import annotations

from ..demo import run_demo
from .argtypes import model_id_or_path, percentile_value, positive_int
from .common import add_command


HELP = "offline end-to-end run on the embedded default (build, measure, calibrate, refine, report)"
DESCRIPTION = """\
Offline end-to-end run: build/load VGMED atlas, measure where the model looks (per layer, relative
attention vs the named structure), calibrate VGRefine's masked layer and heads, compare baseline and
VGRefine on held-out yes/no questions, and write report.md/report.html with figures and results.json.
Default model: the package's small reference VLM trained on the atlas grounding task (CPU, about 30-40 s
on 2 cores). Output goes to --out (default ./hf_vgrefine_demo); a folder holding files the demo did not
write is refused unless --overwrite (other files are then kept)."""


def run(args) -> int:
    """Run the demo with the parsed options."""
    argv = ["hf-vgrefine", "demo"] + ([f"--model {args.model}"] if args.model else []) + \
           ([f"--limit {args.limit}"] if args.limit is not None else [])
    run_demo(model=args.model, out_dir=args.out, limit=args.limit, calibration_limit=args.calibration_limit,
             k=args.k, percentile=args.percentile, batch_size=args.batch_size, seed=args.seed,
             html_report=not args.no_html, progress=not args.no_progress, dtype=args.dtype, device=args.device,
             threads=args.threads, command=" ".join(argv), tune=not args.no_tune, overwrite=args.overwrite)
    return 0


def add_cli(subparsers) -> None:
    """Register ``hf-vgrefine demo``."""
    p = add_command(subparsers, "demo", HELP, DESCRIPTION, run)
    p.add_argument("--model", default=None, metavar="ID_OR_PATH", type=model_id_or_path,
                   help="hub id or local folder (AutoModelForImageTextToText + AutoProcessor); default: the shipped "
                        "reference VLM")
    p.add_argument("--out", default="hf_vgrefine_demo", metavar="DIR", help="report folder (default ./hf_vgrefine_demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing --out folder that holds files the demo did not write (they are kept)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N test targets (2 examples each; default all 226)")
    p.add_argument("--calibration-limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N calibration targets (default all 48)")
    p.add_argument("--k", type=positive_int, default=None, help="sensitive heads to calibrate (default min(20, layers*heads/4))")
    p.add_argument("--percentile", type=percentile_value, default=80.0, help="VGRefine triage percentile (default 80)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out lesion placement (default 0)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="device (default cpu, or the accelerate device)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: 1 for the reference model, else torch's choice)")
    p.add_argument("--no-html", action="store_true", help="write report.md only")
    p.add_argument("--no-tune", action="store_true",
                   help="skip the knockout search (VGRefine tuned on a calibration split, hf_vgrefine.tuning)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage messages")
