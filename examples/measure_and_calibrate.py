#!/usr/bin/env python
"""Measure where a model looks on VGMED, then calibrate VGRefine's masked layer and sensitive heads.

1. **Measure** (``hf_vgrefine.measure_grounding``) on the ``test`` rows: the last prompt token's attention to
   the image tokens, question prompt divided by the generic prompt, scored per layer against each row's
   region (attention ratio: 1 = chance; KL, JS, pointing games, ...). Writes a resumable run folder with
   ``per_sample.parquet``, ``summary.json`` and ``layers.png``.
2. **Calibrate** (``hf_vgrefine.calibrate``) on the ``calibration`` rows (other images): masked layer = the
   layer with the best mean attention ratio, sensitive heads = the top-``k`` (layer, head) pairs. Writes
   ``vgrefine_config.json`` (load it with ``VGRefineConfig.from_pretrained(folder)`` or pass the folder to
   ``examples/vgrefine_hub_model.py --config``) and a layer x head heat-map.

    python examples/measure_and_calibrate.py --limit 40 --out runs/reference      # reference VLM, VGMED atlas
    python examples/measure_and_calibrate.py --model FreedomIntelligence/HuatuoGPT-Vision-7B-hf \\
        --dataset atlas --dtype bfloat16 --device-map auto --k 20 --out runs/huatuo

``--dataset`` is a VGMED configuration name (``atlas`` builds offline; ``slake``, ``full``, ``coco`` need their
sources) or a local folder that ``datasets.load_dataset`` reads (VGMED columns: image, question, boxes, mask,
split_group). Default model: the package's embedded reference VLM.
"""

from __future__ import annotations

import argparse
import os
from importlib.resources import files

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vgrefine import VGRefineConfig, calibrate, load_vgmed, measure_grounding


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id or local folder (default: the embedded reference VLM)")
    p.add_argument("--dataset", default="atlas", help="VGMED configuration name or a local dataset folder")
    p.add_argument("--limit", type=int, default=None, help="rows per split group (default: all)")
    p.add_argument("--k", type=int, default=4, help="sensitive heads to select (default 4; the study used 20)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device-map", default=None, help="e.g. auto or cuda:0; default CPU")
    p.add_argument("--out", default="runs/measure_and_calibrate", help="output folder")
    return p.parse_args(argv)


def load_rows(spec: str, limit: int | None):
    """(test rows, calibration rows) of a VGMED configuration or a local dataset folder."""
    if os.path.isdir(spec):
        from datasets import load_dataset

        ds = load_dataset(spec, split="test")
    else:
        ds = load_vgmed(spec)
    groups = ds["split_group"]
    pick = {g: [i for i, x in enumerate(groups) if x == g][:limit] for g in ("test", "calibration")}
    return ds.select(pick["test"]), ds.select(pick["calibration"])


def main(argv=None) -> VGRefineConfig:
    args = parse_args(argv)
    model_id = args.model or str(files("hf_vgrefine").joinpath("resources", "reference_vlm"))
    model = AutoModelForImageTextToText.from_pretrained(
        model_id, dtype=getattr(torch, args.dtype), device_map=args.device_map).eval()
    processor = AutoProcessor.from_pretrained(model_id)
    test, calib = load_rows(args.dataset, args.limit)
    print(f"{len(test)} test rows, {len(calib)} calibration rows")

    # 1. where does the model look? per layer, relative to the generic prompt
    res = measure_grounding(model, processor, test, layers="all", relative=True, batch_size=args.batch_size,
                            output_dir=os.path.join(args.out, "grounding"), progress=False)
    summ = res.summary()
    ar = summ[(summ["kind"] == "relative") & (summ["score"] == "attention_ratio")].sort_values("layer")
    print("layer  attention ratio (relative; chance 1)  95% CI")
    for _, r in ar.iterrows():
        print(f"{int(r['layer']):5d}  {r['mean']:10.3f}   [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  n={int(r['n'])}")
    print(f"per-sample scores, summary and per-layer figure -> {os.path.join(args.out, 'grounding')}")

    # 2. calibrate VGRefine on other images (the rows are already the calibration group)
    cfg = calibrate(model, processor, calib, k=args.k, split_group=None, batch_size=args.batch_size,
                    output_dir=os.path.join(args.out, "calibration"), progress=False)
    print(f"masked layer {cfg.masked_layers}, sensitive heads {cfg.sensitive_heads} "
          f"-> {os.path.join(args.out, 'calibration', 'vgrefine_config.json')}")
    return cfg


if __name__ == "__main__":
    main()
