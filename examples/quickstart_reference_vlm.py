#!/usr/bin/env python
"""Quickstart, fully offline: VGRefine on the package's embedded reference VLM.

The reference VLM (``hf_vgrefine/resources/reference_vlm``) is a 1.25 M-parameter LLaVA trained on the
reference grounding task "Is there an abnormality in the {structure}?" over VGMED ``atlas`` brain slices
(see its model card). This script

1. loads it with the ordinary Auto classes,
2. takes a few held-out questions of that task (VGMED ``atlas`` is built on first use, offline),
3. answers each with the plain model and with :class:`hf_vgrefine.VGRefineWrapper`,
4. prints how many image tokens VGRefine's triage kept, and saves the triage map of the first question.

The VGRefine settings are those calibrated for this model (masked layer 2, the 4 heads of layer 2,
percentile 80; ``hf-vgrefine demo`` shows how they were found).

    python examples/quickstart_reference_vlm.py --n 4 --out triage.png
"""

from __future__ import annotations

import argparse
from importlib.resources import files

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vgrefine import VGRefineConfig, VGRefineWrapper, load_vgmed
from hf_vgrefine import reference_task

SUFFIX = "Answer the question using a single word or phrase."


def reference_vlm_dir() -> str:
    """Folder of the embedded reference VLM (model + processor, ``save_pretrained`` layout)."""
    return str(files("hf_vgrefine").joinpath("resources", "reference_vlm"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4, help="held-out questions to answer (default 4)")
    p.add_argument("--seed", type=int, default=0, help="lesion placement of the held-out questions")
    p.add_argument("--percentile", type=float, default=80.0, help="triage percentile (default 80)")
    p.add_argument("--out", default="triage.png", help="where to save the first question's triage map")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    path = reference_vlm_dir()
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"          # batched prompts must end at the same position

    # held-out questions of the reference task (VGMED atlas slices, the 'test' split group)
    images = reference_task.images_from_vgmed(load_vgmed("atlas"))
    pool = reference_task.heldout_examples(images=images, split_group="test", limit=8 * args.n, seed=args.seed)
    # the pool holds a 'yes' and a 'no' example per target: every 8th target, 'yes' and 'no' in turn
    examples = [pool[16 * i + i % 2] for i in range(args.n)]

    config = VGRefineConfig(masked_layers=[2], sensitive_heads=[[2, h] for h in range(4)], percentile=args.percentile)
    refined = VGRefineWrapper(model, config, processor=processor)

    rows = []
    for i, ex in enumerate(examples):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": f"{ex['question']} {SUFFIX}"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[ex["image"].convert("RGB")], text=[prompt], return_tensors="pt")
        n_prompt = inputs["input_ids"].shape[1]
        with torch.no_grad():
            plain = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        out = refined.generate(**inputs, max_new_tokens=1, do_sample=False)   # same call and return as generate
        tri = refined.last_triage[0]
        row = {"question": ex["question"], "answer": ex["answer"],
               "baseline": processor.batch_decode(plain[:, n_prompt:], skip_special_tokens=True)[0].strip(),
               "vgrefine": processor.batch_decode(out[:, n_prompt:], skip_special_tokens=True)[0].strip(),
               "kept_tokens": int(tri.keep_mask.sum()), "image_tokens": int(tri.keep_mask.numel())}
        rows.append(row)
        print(f"[{i}] {row['question']}  (truth: {row['answer']})\n"
              f"    baseline: {row['baseline']!r}   VGRefine: {row['vgrefine']!r}   "
              f"kept {row['kept_tokens']}/{row['image_tokens']} image tokens")
        if i == 0 and args.out:
            refined.plot_triage(ex["image"], boxes=ex["boxes"], path=args.out)
            print(f"    triage map with the named structure's box -> {args.out}")
    return rows


if __name__ == "__main__":
    main()
