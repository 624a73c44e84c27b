#!/usr/bin/env python
"""VGRefine on any supported vision-language model: a hub id or a local folder.

Loads the model and its processor with the Auto classes, asks one question about one image with the plain
model and with :class:`hf_vgrefine.VGRefineWrapper`, and saves the triage map (which image tokens the
prompt may still attend to in the masked layer).

    python examples/vgrefine_hub_model.py --model FreedomIntelligence/HuatuoGPT-Vision-7B-hf \\
        --image scan.png --question "Is there a lesion in the liver?" --dtype bfloat16 --device-map auto
    python examples/vgrefine_hub_model.py --model ./my_saved_model --config ./calibration_run/

``--config`` takes a preset name (``huatuogpt-vision-7b``), the folder or JSON file written by
``hf_vgrefine.calibrate`` / ``hf-vgrefine calibrate``, a hub repo holding ``vgrefine_config.json``, or a JSON
string. Without it a known checkpoint gets its preset and any other model the depth default (with a warning
that recommends calibrating). Without ``--image`` the first VGMED ``atlas`` image is used (built offline).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vgrefine import VGRefineConfig, VGRefineWrapper

SUFFIX = "Answer the question using a single word or phrase."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="FreedomIntelligence/HuatuoGPT-Vision-7B-hf", help="hub id or local folder")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--image", default=None, help="image file (default: the first VGMED atlas image)")
    p.add_argument("--question", default=None, help="question (default: the VGMED row's question)")
    p.add_argument("--config", default=None, help="VGRefine config: preset, folder, JSON file, hub repo or JSON string")
    p.add_argument("--no-suffix", action="store_true", help=f"do not append {SUFFIX!r} to the question")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device-map", default=None, help="e.g. auto (needs accelerate) or cuda:0; default CPU")
    p.add_argument("--out", default="triage.png", help="triage map PNG ('' to skip)")
    return p.parse_args(argv)


def load_config(spec: str | None):
    if spec is None:
        return None
    if spec.lstrip().startswith("{"):
        return VGRefineConfig.from_dict(json.loads(spec))
    return VGRefineConfig.from_pretrained(spec)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = AutoModelForImageTextToText.from_pretrained(
        args.model, revision=args.revision, dtype=getattr(torch, args.dtype), device_map=args.device_map).eval()
    processor = AutoProcessor.from_pretrained(args.model, revision=args.revision)
    processor.tokenizer.padding_side = "left"

    if args.image is None:
        from hf_vgrefine import load_vgmed

        row = load_vgmed("atlas")[0]
        image, question, boxes = row["image"], args.question or row["question"], row["boxes"]
    else:
        from PIL import Image

        image, question, boxes = Image.open(args.image), args.question, None
        if question is None:
            raise SystemExit("--question is required with --image")
    image = image.convert("RGB")
    text = question if args.no_suffix else f"{question} {SUFFIX}"

    refined = VGRefineWrapper(model, load_config(args.config), processor=processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)
    n_prompt = inputs["input_ids"].shape[1]
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    with torch.no_grad():
        plain = model.generate(**inputs, **gen)
    out = refined.generate(**inputs, **gen)
    tri = refined.last_triage[0]
    result = {
        "question": text,
        "baseline": processor.batch_decode(plain[:, n_prompt:], skip_special_tokens=True)[0].strip(),
        "vgrefine": processor.batch_decode(out[:, n_prompt:], skip_special_tokens=True)[0].strip(),
        "masked_layers": refined.config.masked_layers, "n_sensitive_heads": len(refined.config.sensitive_heads),
        "kept_tokens": int(tri.keep_mask.sum()), "image_tokens": int(tri.keep_mask.numel()), "grid": list(tri.grid),
    }
    print(f"question : {result['question']}")
    print(f"baseline : {result['baseline']!r}")
    print(f"VGRefine : {result['vgrefine']!r}")
    print(f"triage   : kept {result['kept_tokens']} of {result['image_tokens']} image tokens "
          f"({tri.grid[0]}x{tri.grid[1]} grid); knockout in layer(s) {result['masked_layers']}")
    if args.out:
        refined.plot_triage(image, boxes=boxes, path=args.out)
        print(f"triage map -> {args.out}")
    return result


if __name__ == "__main__":
    main()
