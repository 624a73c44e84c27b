"""`hf-vgrefine capture`: per-layer table vs eager attention computed here, and the CLI end to end."""

import json
import subprocess
import sys

import numpy as np
import torch

from hf_vgrefine.commands.capture import load_image
from hf_vgrefine.layer_summary import capture_summary
from hf_vgrefine.prompts import build_inputs
from hf_vgrefine.testing import build_tiny_model, tiny_processor


def test_summary_matches_eager_attention():
    model = build_tiny_model("llava", num_hidden_layers=3).model
    proc = tiny_processor("llava")
    img = load_image(None)
    rows = capture_summary(model, proc, img, "Is there an abnormality ?", generic=False)
    inputs = build_inputs(proc, [img], ["Is there an abnormality ?"])
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            att = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    for layer, row in enumerate(rows):
        a = att[layer][0, :, -1, pos].mean(0).double()
        assert abs(row["image_mass"] - float(a.sum())) < 1e-5
        k = int(a.argmax())
        assert row["peak_cell"] == [k // 4, k % 4]


def test_cli_writes_json(tmp_path):
    out = tmp_path / "layers.json"
    res = subprocess.run([sys.executable, "-m", "hf_vgrefine.cli", "capture", "--box", "0", "0", "48", "64",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert all(np.isfinite(r["attention_ratio"]) for r in rows)
    assert "image mass" in res.stdout
