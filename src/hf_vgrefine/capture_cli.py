"""``hf-vgrefine capture``: where does a model look? Per-layer attention of the last prompt token to the image.

Prints, for every decoder layer, the attention mass on the image tokens (sum over the image, mean over
heads), the relative-attention peak cell on the token grid and, with ``--box``, the attention ratio of
the box region (1 = chance). Without ``--model`` it runs offline on a tiny random-weight LLaVA built
locally (a smoke test of the pipeline, numbers without meaning).
"""

from __future__ import annotations

import argparse
import json


TINY_NOTICE = ("no --model given: using a tiny random-weight LLaVA built offline (a smoke test of the pipeline; "
               "the numbers have no meaning). Pass --model ID_OR_PATH for a real model.")


def add_cli(subparsers):
    from .outdir import model_id_or_path, torch_device

    p = subparsers.add_parser("capture", help=__doc__.splitlines()[0], description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, type=model_id_or_path, help="hub id or local directory of a supported VLM (default: tiny "
                   "random LLaVA built offline)")
    p.add_argument("--image", default=None, help="image file (default: a synthetic 96x64 test image)")
    p.add_argument("--question", default="Is there an abnormality in the left lung?", help="question text")
    p.add_argument("--box", type=float, nargs=4, default=None, metavar=("X", "Y", "W", "H"),
                   help="region in original-image pixels (xywh) for the attention ratio")
    p.add_argument("--no-generic", action="store_true", help="raw attention only (skip the generic-prompt pass)")
    p.add_argument("--json", default=None, help="also write the per-layer table to this JSON file")
    p.add_argument("--device", default="cpu", type=torch_device,
                   help="torch device for the model, also the tiny default one (default: cpu)")
    p.set_defaults(func=run)
    return p


def _load(model_id, device):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if model_id is None:
        from .testing import build_tiny_model, tiny_processor

        return build_tiny_model("llava", num_hidden_layers=4).model.to(device).eval(), tiny_processor("llava")
    model = AutoModelForImageTextToText.from_pretrained(model_id).to(device).eval()
    return model, AutoProcessor.from_pretrained(model_id)


def _image(path):
    import numpy as np
    from PIL import Image

    if path:
        return Image.open(path).convert("RGB")
    yy, xx = np.mgrid[0:64, 0:96]
    arr = (40 + 120 * np.exp(-((xx - 30) ** 2 + (yy - 20) ** 2) / 120.0)).astype("uint8")
    return Image.fromarray(np.stack([arr] * 3, -1))


def capture_summary(model, processor, image, question, box=None, generic=True) -> list[dict]:
    """Per-layer rows: ``layer, image_mass, peak_cell (row, col), attention_ratio`` (AR only with ``box``)."""
    import torch

    from .adapters import get_adapter
    from .attention import capture_image_attention
    from .geometry import boxes_to_token_mask
    from .metrics import attention_ratio, relative_attention
    from .prompts import build_inputs, generic_inputs, to_model_inputs

    adapter = get_adapter(model)
    inputs = to_model_inputs(build_inputs(processor, [image], [question]), model)
    cap = capture_image_attention(model, inputs)
    q = cap.sample(0).mean(1).double()                                   # [L, N]
    rel = q
    if generic:
        g_in = to_model_inputs(generic_inputs(processor, [image]), model)
        g = capture_image_attention(model, g_in).sample(0).mean(1).double()
        rel = torch.as_tensor(relative_attention(q.numpy(), g.numpy()))
    span = cap.spans[0][0]
    region = None
    if box is not None:
        grid = adapter.token_grid(processor, image.size, span=span, inputs=inputs)
        region = boxes_to_token_mask([box], grid)
    rows = []
    for i, layer in enumerate(cap.layers):
        k = int(torch.argmax(rel[i]))
        row = {"layer": layer, "image_mass": float(q[i].sum()), "peak_cell": [k // span.cols, k % span.cols]}
        if region is not None:
            row["attention_ratio"] = float(attention_ratio(rel[i].numpy(), region))
        rows.append(row)
    return rows


def run(args) -> int:
    if args.model is None:
        print(TINY_NOTICE)
    model, processor = _load(args.model, args.device)
    rows = capture_summary(model, processor, _image(args.image), args.question, box=args.box,
                           generic=not args.no_generic)
    kind = "relative" if not args.no_generic else "raw"
    print(f"last-token attention to the image, per layer ({kind} map for peak/AR):")
    print(f"{'layer':>5} {'image mass':>11} {'peak (row,col)':>15}" + (f" {'AR':>7}" if args.box else ""))
    for r in rows:
        line = f"{r['layer']:>5} {r['image_mass']:>11.4f} {str(tuple(r['peak_cell'])):>15}"
        if args.box:
            line += f" {r['attention_ratio']:>7.3f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
