"""``hf-vgrefine capture``: where does a model look? Per-layer attention of the last prompt token to the image.

Prints, for every decoder layer, the attention mass on the image tokens (sum over the image, mean over
heads), the relative-attention peak cell on the token grid and, with ``--box``, the attention ratio of
the box region (1 = chance). Without ``--model`` it runs offline on a tiny random-weight LLaVA built
locally (a smoke test of the pipeline, numbers without meaning).
"""

from __future__ import annotations

import argparse
import json

from ..layer_summary import capture_summary


TINY_NOTICE = ("no --model given: using a tiny random-weight LLaVA built offline (a smoke test of the pipeline; "
               "the numbers have no meaning). Pass --model ID_OR_PATH for a real model.")


def add_cli(subparsers):
    """Register ``hf-vgrefine capture``."""
    from .argtypes import model_id_or_path, torch_device

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


def load_model(model_id, device):
    """Model + processor of ``model_id``, or (``None``) the tiny random-weight LLaVA built offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if model_id is None:
        from ..testing import build_tiny_model, tiny_processor

        return build_tiny_model("llava", num_hidden_layers=4).model.to(device).eval(), tiny_processor("llava")
    model = AutoModelForImageTextToText.from_pretrained(model_id).to(device).eval()
    return model, AutoProcessor.from_pretrained(model_id)


def load_image(path):
    """RGB image from ``path``, or (``None``) a synthetic 96x64 test image with one bright blob."""
    import numpy as np
    from PIL import Image

    if path:
        return Image.open(path).convert("RGB")
    yy, xx = np.mgrid[0:64, 0:96]
    arr = (40 + 120 * np.exp(-((xx - 30) ** 2 + (yy - 20) ** 2) / 120.0)).astype("uint8")
    return Image.fromarray(np.stack([arr] * 3, -1))


def run(args) -> int:
    if args.model is None:
        print(TINY_NOTICE)
    model, processor = load_model(args.model, args.device)
    rows = capture_summary(model, processor, load_image(args.image), args.question, box=args.box,
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
