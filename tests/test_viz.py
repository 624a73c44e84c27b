"""Heat-maps over the original image through the processor geometry, layer grids, curves, heat-maps."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hf_vgrefine.geometry import TokenGrid
from hf_vgrefine.viz import (plot_attention_overlay, plot_head_heatmap, plot_layer_curves, plot_layer_grid,
                             token_map_to_pixels)

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_pixels_pad_to_square_grid():
    # 40x20 (W x H) image padded to 40x40 (y offset 10), resized to 20x20, 2x2 tokens of 10 canvas px
    g = TokenGrid(rows=2, cols=2, image_size=(40, 20), scale=(0.5, 0.5), offset=(0.0, 5.0), canvas_size=(20.0, 20.0))
    px = token_map_to_pixels(np.array([1.0, 2.0, 3.0, 4.0]), g)
    assert px.shape == (20, 40)
    # canvas y = y*0.5 + 5: rows y < 10 -> token row 0, y >= 10 -> row 1; x < 20 -> col 0
    assert px[0, 0] == 1 and px[9, 39] == 2 and px[10, 0] == 3 and px[19, 39] == 4
    assert np.isfinite(px).all()                            # padding never shows: only original pixels drawn


def test_pixels_center_crop_is_transparent():
    # 60x30 image: shortest edge 30 -> 30, centre crop 30x30 -> x offset -15; 3x3 tokens of 10 px
    g = TokenGrid(rows=3, cols=3, image_size=(60, 30), scale=(1.0, 1.0), offset=(-15.0, 0.0), canvas_size=(30.0, 30.0))
    px = token_map_to_pixels(np.arange(9.0).reshape(3, 3), g)
    assert np.isnan(px[:, :15]).all() and np.isnan(px[:, 45:]).all()
    assert px[0, 15] == 0 and px[29, 44] == 8 and px[12, 30] == 4
    with pytest.raises(ValueError, match="does not fit"):
        token_map_to_pixels(np.zeros(8), g)


def test_overlay_and_layer_grid(tmp_path):
    img = Image.fromarray((np.random.default_rng(0).random((30, 60)) * 255).astype(np.uint8))
    g = TokenGrid(rows=3, cols=3, image_size=(60, 30), scale=(1.0, 1.0), offset=(-15.0, 0.0), canvas_size=(30.0, 30.0))
    mask = np.zeros((30, 60), dtype=np.uint8)
    mask[5:15, 20:35] = 255
    fig = plot_attention_overlay(img, np.arange(9.0), g, boxes=[[20, 5, 15, 10]], mask=mask, path=tmp_path / "o.png",
                                 title="layer 3")
    assert _png(tmp_path / "o.png")
    ax = fig.axes[0]
    assert len(ax.images) == 2 and len(ax.patches) == 1
    assert ax.images[1].get_array().mask[:, :15].all()      # off-canvas pixels transparent
    # drawing into a caller's axes
    fig2 = plot_layer_grid(img.convert("RGB"), np.random.default_rng(1).random((5, 9)), g, layers=[0, 4, 8, 12, 16],
                           boxes=[20, 5, 15, 10], ncols=3, path=tmp_path / "grid.png", shared_scale=True)
    assert _png(tmp_path / "grid.png") and len(fig2.axes) == 5
    plot_attention_overlay(img, np.ones((3, 3)), g, ax=fig2.axes[0], colorbar=False)
    with pytest.raises(ValueError, match="image size"):
        plot_attention_overlay(img.resize((50, 30)), np.ones(9), g)


def test_curves_and_heatmap(tmp_path):
    rows = []
    for kind in ("relative", "raw"):
        for s, chance in (("attention_ratio", 1.0), ("js_divergence", 0.3)):
            for l in range(4):
                rows.append(dict(kind=kind, score=s, layer=l, mean=1 + 0.1 * l, ci_low=0.9 + 0.1 * l,
                                 ci_high=1.1 + 0.1 * l, chance=chance))
    fig = plot_layer_curves(pd.DataFrame(rows), path=tmp_path / "c.png")
    assert _png(tmp_path / "c.png") and len(fig.axes) == 2
    ax = fig.axes[0]
    assert len(ax.lines) == 3                                # relative, raw, chance
    assert ax.lines[-1].get_ydata()[0] == 1.0
    m = np.arange(12.0).reshape(3, 4)
    m[0, 0] = np.nan
    fig = plot_head_heatmap(m, path=tmp_path / "h.png", selected=[(2, 3), (1, 0)], chosen_layers=[2])
    assert _png(tmp_path / "h.png") and len(fig.axes[0].patches) == 3
