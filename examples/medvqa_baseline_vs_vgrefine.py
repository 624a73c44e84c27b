#!/usr/bin/env python
"""Med-VQA accuracy of a model with and without VGRefine, on the same items, prompts and decoding.

Closed-ended multiple choice as in the HuatuoGPT-Vision protocol: "{question}\\n{A. option ...}\\nAnswer with
the option's letter from the given choices directly." (+ VGRefine's instruction suffix, for both methods),
greedy decoding of one token, the answer extracted as option letter -> option text -> most similar option.
Writes ``predictions.jsonl`` (one line per item and method, a rerun resumes), ``summary.json`` /
``summary.md`` (per-benchmark accuracy with Wilson 95% intervals, macro and micro averages, an exact McNemar
test of VGRefine against the baseline with the items that flipped) and ``manifest.json``.

    python examples/medvqa_baseline_vs_vgrefine.py --model FreedomIntelligence/HuatuoGPT-Vision-7B-hf \\
        --benchmarks vqa-rad,slake,path-vqa,pmc-vqa --vgrefine-config huatuogpt-vision-7b \\
        --dtype bfloat16 --device-map auto --out runs/medvqa
    python examples/medvqa_baseline_vs_vgrefine.py --model ./my_model --vgrefine-config ./calibration_run/ \\
        --benchmarks bundle --data-dir ./medvqa_data --limit 50 --out runs/medvqa_small

Benchmarks (``hf_vgrefine.medvqa.BENCHMARKS``): ``bundle`` (the HuatuoGPT-Vision evaluation file), ``vqa-rad``,
``slake``, ``path-vqa``, ``pmc-vqa``, ``omnimedvqa``, ``mmmu-med``; ``--data-dir`` holds local copies
(``DATA_DIR/<name>``), else the hub copy is used. ``--vgrefine-config``: preset name, ``calibrate`` output
folder / JSON file, or JSON string (required unless the model has a preset).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vgrefine import VGRefineConfig
from hf_vgrefine import medvqa


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local folder")
    p.add_argument("--benchmarks", default="vqa-rad,slake,path-vqa,pmc-vqa", help="comma-separated benchmark names")
    p.add_argument("--data-dir", default=None, help="folder with local benchmark copies (DATA_DIR/<name>)")
    p.add_argument("--vgrefine-config", default=None,
                   help="preset name, calibrate output folder or JSON file, or a JSON string")
    p.add_argument("--limit", type=int, default=None, help="first N closed items per benchmark (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device-map", default=None, help="e.g. auto or cuda:0; default CPU")
    p.add_argument("--out", default="runs/medvqa", help="output folder (a rerun resumes)")
    return p.parse_args(argv)


def load_config(spec: str | None):
    if spec is None:
        return None          # the model's preset, if it has one (the run stops with a clear error otherwise)
    if spec.lstrip().startswith("{"):
        return VGRefineConfig.from_dict(json.loads(spec))
    return VGRefineConfig.from_pretrained(spec)


def main(argv=None):
    args = parse_args(argv)
    model = AutoModelForImageTextToText.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), device_map=args.device_map).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    items = []
    for name in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        got = medvqa.load_benchmark(name, data_dir=args.data_dir)
        print(f"{name}: {len(got)} items")
        items += got

    report = medvqa.evaluate_medvqa(model, processor, items, methods=("baseline", "vgrefine"),
                                    vgrefine_config=load_config(args.vgrefine_config), batch_size=args.batch_size,
                                    limit=args.limit, out_dir=args.out, model_id=args.model, progress=False)
    print(report.to_markdown())
    comp = report.summary["comparisons"][0]["overall"]
    print(f"micro accuracy: baseline {report.accuracy('baseline'):.4f}, VGRefine {report.accuracy('vgrefine'):.4f} "
          f"({comp['b_only']} items gained, {comp['a_only']} lost; exact McNemar p = {comp['p_value']:.3g})")
    print(f"per-item predictions, summary and manifest -> {args.out}")
    return report


if __name__ == "__main__":
    main()
