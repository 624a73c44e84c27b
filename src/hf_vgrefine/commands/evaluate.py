"""``hf-vgrefine evaluate`` — Med-VQA closed-ended evaluation, baseline vs VGRefine.

Also runnable as a module, which is what ``accelerate launch`` needs for data parallelism::

    accelerate launch --num_processes 2 -m hf_vgrefine.cli evaluate --model ID --benchmarks bundle --out DIR
    # several CPU processes (accelerate's --cpu launcher starts one process unless MPI is set up):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m hf_vgrefine.cli evaluate ...

(``-m hf_vgrefine.medvqa.cli`` takes the same arguments without the command name.)
"""

from __future__ import annotations

import argparse
import sys

from ..medvqa.protocol import VGREFINE_INSTRUCTION
from ..medvqa.scorers import SCORERS

HELP = "Med-VQA closed-ended evaluation, baseline vs VGRefine"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from .argtypes import existing_dir, model_id_or_path, nonnegative_int, positive_int
    from ..medvqa.loaders import BENCHMARKS
    from ..medvqa.runner import DECODING_PRESETS

    p.add_argument("--model", required=True, type=model_id_or_path,
                   help="Hub id or local folder of an image-text-to-text model")
    p.add_argument("--revision", default=None, help="model revision (recorded in the manifest)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights dtype (default auto)")
    p.add_argument("--benchmarks", default="bundle",
                   help=f"comma-separated: {', '.join(BENCHMARKS)} (bundle = the HuatuoGPT-Vision evaluation file)")
    p.add_argument("--data-dir", default=None, type=existing_dir,
                   help="folder holding local copies as <data-dir>/<benchmark>; missing ones come from the Hub")
    p.add_argument("--methods", default="baseline,vgrefine", help="comma-separated: baseline, vgrefine")
    p.add_argument("--vgrefine-config", default=None,
                   help="VGRefine preset name, JSON file / folder from `hf-vgrefine calibrate`, or JSON string. "
                        "Default: the preset of a known model id (FreedomIntelligence/HuatuoGPT-Vision-7B-hf -> "
                        "huatuogpt-vision-7b); for any other model with --methods including vgrefine, run "
                        "`hf-vgrefine calibrate` first and pass its output here")
    p.add_argument("--limit", type=positive_int, default=None, help="first N items per dataset")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: 1 (greedy) / 256 (huatuo_official)")
    p.add_argument("--decoding", default="greedy", choices=sorted(DECODING_PRESETS))
    p.add_argument("--scorer", default="mcq_letter", choices=sorted(SCORERS))
    p.add_argument("--instruction", default="auto",
                   help="text appended to every prompt after one space; 'auto' = the VGRefine config's instruction "
                        f"or {VGREFINE_INSTRUCTION!r}; 'none' disables")
    p.add_argument("--chat-template", default=None, help="file with a chat template overriding the processor's")
    p.add_argument("--open", action="store_true", help="also evaluate open-ended items (reported separately)")
    p.add_argument("--seed", type=nonnegative_int, default=42)
    p.add_argument("--generic-cache-dir", default=None,
                   help="folder where VGRefine keeps its generic-prompt maps across runs (per model fingerprint)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder (predictions, summary, manifest); reruns resume")


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``hf-vgrefine evaluate`` (contract of :mod:`hf_vgrefine.cli`)."""
    p = subparsers.add_parser("evaluate", help=HELP, description=HELP)
    _add_arguments(p)
    p.set_defaults(func=run, _parser=p)
    return p


def default_vgrefine_config(args, parser: argparse.ArgumentParser):
    """``--vgrefine-config``, else the preset of a known ``--model`` id; a usage error if VGRefine is asked
    for without either (no uncalibrated guess is used for reported numbers)."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.vgrefine_config is not None or "vgrefine" not in methods:
        return args.vgrefine_config
    from ..vgrefine.defaults import preset_for_model

    preset = preset_for_model(args.model)
    if preset is not None:
        return preset
    parser.error(f"--methods includes vgrefine but no --vgrefine-config was given and {args.model!r} has no preset; "
                 "run `hf-vgrefine calibrate --model ... --out CAL` first and pass --vgrefine-config CAL "
                 "(or a preset name, e.g. huatuogpt-vision-7b), or use --methods baseline")


def _load(args, device):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    processor = AutoProcessor.from_pretrained(args.model, revision=args.revision)
    model = AutoModelForImageTextToText.from_pretrained(args.model, revision=args.revision, dtype=dtype)
    return model.to(device).eval(), processor


def run(args: argparse.Namespace) -> int:
    """Load data and model, run :func:`~hf_vgrefine.medvqa.runner.evaluate_medvqa`, print the summary on the main process."""
    from ..medvqa.loaders import load_benchmark
    from ..medvqa.runner import evaluate_medvqa
    from ..sharding import partial_state

    vgrefine_config = default_vgrefine_config(args, getattr(args, "_parser", None) or argparse.ArgumentParser(
        prog="hf-vgrefine evaluate"))
    state = partial_state()
    items = []
    for name in [b for b in args.benchmarks.split(",") if b.strip()]:
        items += load_benchmark(name, data_dir=args.data_dir)
    model, processor = _load(args, state.device)
    chat_template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    instruction = None if str(args.instruction).lower() in ("", "none") else args.instruction
    report = evaluate_medvqa(
        model, processor, items, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        vgrefine_config=vgrefine_config, scorer=args.scorer, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, decoding=args.decoding, instruction=instruction,
        chat_template=chat_template, answer_types=("closed", "open") if args.open else ("closed",),
        out_dir=args.out, limit=args.limit, seed=args.seed, model_id=args.model, revision=args.revision,
        progress=not args.no_progress, generic_cache_dir=args.generic_cache_dir)
    if state.is_main_process:
        print(report.to_markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-vgrefine evaluate", description=HELP)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args._parser = parser
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
