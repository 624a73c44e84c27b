"""Figure labelling of issue 12: colour bars say what they show; layers.png is titled with the model's name."""

from __future__ import annotations

import numpy as np


def test_overlay_colorbar_has_a_label():
    from hf_vgrefine.geometry import TokenGrid
    from hf_vgrefine.viz import plot_attention_overlay, plot_triage_overlay

    img = np.zeros((32, 32), np.uint8)
    grid = TokenGrid.stretch((32, 32), 4, 4)
    fig = plot_attention_overlay(img, np.arange(16.0), grid)
    assert fig.axes[-1].get_ylabel() == "attention (relative to the generic prompt)"
    fig = plot_triage_overlay(img, np.arange(16.0), np.ones(16, bool), grid, colorbar_label="triage score")
    assert fig.axes[-1].get_ylabel() == "triage score"


def test_layers_plot_title_uses_the_model_name_not_its_path(tmp_path):
    from transformers import AutoModelForImageTextToText

    from hf_vgrefine.measure import measure_grounding
    from hf_vgrefine.testing import build_tiny_model, tiny_processor

    from _grounding_fixtures import load_fixture

    folder = tmp_path / "deep" / "path" / "my-tiny-llava"
    build_tiny_model("llava").model.save_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    res = measure_grounding(model, tiny_processor("llava"), load_fixture(), layers=[0], relative=False, progress=False)
    fig = res.plot_layers()
    title = fig._suptitle.get_text() if fig._suptitle is not None else fig.axes[0].get_title()
    assert title.startswith("my-tiny-llava — ") and str(tmp_path) not in title
