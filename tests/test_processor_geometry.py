"""hf_vgrefine.processor_geometry against REAL transformers image processors (built locally, no hub).

Each case paints a solid red box into a grey image, runs the processor, recovers where the painted
pixels land in ``pixel_values`` (un-flattening Qwen's patch sequence, re-assembling LLaVA-NeXT tiles),
and compares the token cells that contain painted pixels with ``boxes_to_token_mask(mode="any")``.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hf_vgrefine.geometry import TokenGrid, boxes_to_token_mask, token_mask_to_grid
from hf_vgrefine.processor_geometry import (
    gemma3_grid,
    llava_grid,
    llava_next_grids,
    llava_next_highres_positions,
    internvl_grids,
    internvl_tile_layout,
    internvl_tile_positions,
    paligemma_grid,
    pixtral_grid,
    qwen_vl_grid,
    select_best_resolution,
    smart_resize,
)

BG, FG = (128, 128, 128), (255, 0, 0)


def proc(name, **kwargs):
    """Build a transformers image processor by class name (torchvision class falls back to *Pil)."""
    return getattr(transformers, name)(**kwargs)


def painted_image(wh, boxes_xyxy):
    w, h = wh
    a = np.empty((h, w, 3), np.uint8)
    a[:] = BG
    for x0, y0, x1, y1 in boxes_xyxy:
        a[y0:y1, x0:x1] = FG
    return Image.fromarray(a)


def redness(chw, ip):
    """[C, H, W] normalised pixel values -> [H, W] (R - G) in [0, 1] units (box ~1, background ~0)."""
    chw = np.asarray(chw, np.float64)
    mean = np.asarray(ip.image_mean, np.float64)[:, None, None]
    std = np.asarray(ip.image_std, np.float64)[:, None, None]
    rgb = chw * std + mean
    return rgb[0] - rgb[1]


def painted_cells(red, rows, cols, thr=0.5):
    h, w = red.shape
    assert h % rows == 0 and w % cols == 0
    return (red > thr).reshape(rows, h // rows, cols, w // cols).any(axis=(1, 3))


def painted_bbox(red, thr=0.5):
    ys, xs = np.nonzero(red > thr)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def expected_canvas_box(box_xyxy, grid):
    w0, h0 = grid.image_size
    b = np.clip(np.asarray(box_xyxy, np.float64), 0, [w0, h0, w0, h0])
    c = np.concatenate([grid.to_canvas(b[:2]), grid.to_canvas(b[2:])])
    return np.clip(c, 0, [*grid.canvas_size, *grid.canvas_size])


def near_edge_cells(box_xyxy, grid, delta=1.5):
    """[R, C] cells that a box edge (canvas coords) passes within `delta` canvas px of."""
    x0, y0, x1, y1 = expected_canvas_box(box_xyxy, grid)
    tw, th = grid.cell_size
    cx0 = np.arange(grid.cols)[None, :] * tw
    cy0 = np.arange(grid.rows)[:, None] * th
    touch_outer = (cx0 < x1 + delta) & (cx0 + tw > x0 - delta) & (cy0 < y1 + delta) & (cy0 + th > y0 - delta)
    inside_inner = (cx0 >= x0 + delta) & (cx0 + tw <= x1 - delta) & (cy0 >= y0 + delta) & (cy0 + th <= y1 - delta)
    return touch_outer & ~inside_inner


def check_box(red, grid, box_xyxy, exact):
    """Compare painted cells / painted bbox with the geometry."""
    pred = token_mask_to_grid(boxes_to_token_mask(box_xyxy, grid, box_format="xyxy"), grid)
    got = painted_cells(red, grid.rows, grid.cols)
    assert red.shape == (int(grid.canvas_size[1]), int(grid.canvas_size[0]))
    np.testing.assert_allclose(painted_bbox(red), expected_canvas_box(box_xyxy, grid), atol=0 if exact else 1.0)
    if exact:
        np.testing.assert_array_equal(pred, got)
    else:
        diff = pred != got
        assert not (diff & ~near_edge_cells(box_xyxy, grid)).any(), (pred.astype(int), got.astype(int))
        assert got.any() and (pred & got).any()
    return pred


LLAVA_CLASSES = ["LlavaImageProcessor", "LlavaImageProcessorPil"]
CLIP_CLASSES = ["CLIPImageProcessor", "CLIPImageProcessorPil"]


# ---------------------------------------------------------------------- LLaVA-1.5
@pytest.mark.parametrize("cls", CLIP_CLASSES + LLAVA_CLASSES)
def test_llava_shortest_edge_centre_crop_exact(cls):
    ip = proc(cls, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    wh = (240, 120)  # -> 112x56 (scale 7/15) -> crop left 28: original x in [60, 180)
    box = [75, 30, 135, 90]  # canvas [7, 14] .. [35, 42]: exactly on 7-px cell borders
    pv = ip(painted_image(wh, [box]), return_tensors="np")["pixel_values"][0]
    g = llava_grid(ip, wh, patch_size=7, vision_image_size=56)
    assert (g.rows, g.cols, g.canvas_size) == (8, 8, (56.0, 56.0))
    assert g.offset == (-28.0, 0.0)
    pred = check_box(redness(pv, ip), g, box, exact=True)
    assert {tuple(rc) for rc in np.argwhere(pred)} == {(r, c) for r in range(2, 6) for c in range(1, 5)}


@pytest.mark.parametrize("cls", ["CLIPImageProcessorPil", "LlavaImageProcessorPil"])
@pytest.mark.parametrize("wh, box", [((300, 170), [100, 40, 171, 113]), ((61, 97), [5, 20, 40, 77])])
def test_llava_shortest_edge_centre_crop_odd_sizes(cls, wh, box):
    ip = proc(cls, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    pv = ip(painted_image(wh, [box]), return_tensors="np")["pixel_values"][0]
    g = llava_grid(ip, wh, 7, 56)
    check_box(redness(pv, ip), g, box, exact=False)


def test_llava_box_fully_cropped_away():
    ip = proc("CLIPImageProcessorPil", size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    wh, box = (240, 120), [10, 10, 50, 100]  # the crop keeps x in [60, 180)
    pv = ip(painted_image(wh, [box]), return_tensors="np")["pixel_values"][0]
    assert not (redness(pv, ip) > 0.5).any()  # the processor really drops it
    g = llava_grid(ip, wh, 7, 56)
    with pytest.raises(ValueError, match="crops away"):
        boxes_to_token_mask(box, g, box_format="xyxy")
    assert not boxes_to_token_mask(box, g, box_format="xyxy", on_empty="empty").any()
    # partly cropped: clipped to the visible part
    box2 = [40, 30, 90, 60]
    pv2 = ip(painted_image(wh, [box2]), return_tensors="np")["pixel_values"][0]
    check_box(redness(pv2, ip), g, box2, exact=True)


@pytest.mark.parametrize("cls", LLAVA_CLASSES)
@pytest.mark.parametrize("wh, box, exact", [((240, 120), [30, 0, 90, 60], True),
                                            ((120, 240), [0, 150, 60, 210], True),
                                            ((97, 61), [60, 40, 97, 61], False)])
def test_llava_pad_to_square(cls, wh, box, exact):
    ip = proc(cls, do_pad=True, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    pv = ip(painted_image(wh, [box]), return_tensors="np")["pixel_values"][0]
    g = llava_grid(ip, wh, 7, 56)
    s = max(wh)
    assert g.offset == pytest.approx(((s - wh[0]) // 2 * 56 / s, (s - wh[1]) // 2 * 56 / s))
    pred = check_box(redness(pv, ip), g, box, exact=exact)
    # pad-aware mapping differs from a plain stretch (reference bug, method.md §3.3)
    stretch = TokenGrid(8, 8, wh, (56 / wh[0], 56 / wh[1]), (0.0, 0.0), (56.0, 56.0))
    assert not np.array_equal(pred.reshape(-1), boxes_to_token_mask(box, stretch, box_format="xyxy"))


def test_llava_real_sizes_and_image_input():
    ip = proc("CLIPImageProcessorPil", size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = Image.new("RGB", (640, 480))
    g = llava_grid(ip, img, 14, 336)
    assert (g.rows, g.cols, g.n_tokens, g.cell_size) == (24, 24, 576, (14.0, 14.0))
    assert g.scale == (0.7, 0.7) and g.offset == (-56.0, 0.0)  # 448x336, crop left 56


def test_llava_errors():
    ip = proc("CLIPImageProcessorPil", size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    with pytest.raises(ValueError, match="vision tower expects"):
        llava_grid(ip, (100, 80), 7, 28)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        llava_grid(ip, (100, 80), 5, 56)
    with pytest.raises(ValueError, match="image_size"):
        llava_grid(ip, (100, 0), 7, 56)
    with pytest.raises(ValueError, match="patch_size"):
        llava_grid(ip, (100, 80), 0, 56)
    with pytest.raises(TypeError, match="unsupported image processor"):
        llava_grid(proc("Qwen2VLImageProcessorPil"), (100, 80), 7, 56)
    no_crop = proc("CLIPImageProcessorPil", size={"shortest_edge": 56}, do_center_crop=False)
    with pytest.raises(ValueError, match="vision tower expects"):
        llava_grid(no_crop, (100, 80), 7, 56)
    clip_pad = proc("CLIPImageProcessorPil", size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    clip_pad.do_pad = True
    with pytest.raises(ValueError, match="pad-to-square"):
        llava_grid(clip_pad, (100, 80), 7, 56)
    weird = proc("CLIPImageProcessorPil", size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    weird.size = {"foo": 3}
    with pytest.raises(ValueError, match="unsupported image processor size"):
        llava_grid(weird, (100, 80), 7, 56)
    with pytest.raises(TypeError, match="None"):
        llava_grid(None, (100, 80), 7, 56)


def test_llava_stretch_and_small_image_crop_padding():
    # height/width stretch (no crop)
    ip = proc("CLIPImageProcessorPil", size={"height": 56, "width": 56}, do_center_crop=False)
    box = [10, 5, 60, 40]
    pv = ip(painted_image((97, 61), [box]), return_tensors="np")["pixel_values"][0]
    g = llava_grid(ip, (97, 61), 7, 56)
    assert g.scale == (56 / 97, 56 / 61)
    check_box(redness(pv, ip), g, box, exact=False)
    # crop larger than the resized image: the backend pads (numpy: ceil on the left/top)
    ip2 = proc("CLIPImageProcessorPil", size={"height": 42, "width": 49}, crop_size={"height": 56, "width": 56})
    box2 = [0, 0, 40, 30]
    pv2 = ip2(painted_image((80, 60), [box2]), return_tensors="np")["pixel_values"][0]
    g2 = llava_grid(ip2, (80, 60), 7, 56)
    assert g2.offset == (4.0, 7.0)
    check_box(redness(pv2, ip2), g2, box2, exact=False)


# ---------------------------------------------------------------------- Qwen-VL
def qwen_unpatchify(pv, thw, ip):
    """(t·h·w, C·tp·p·p) patch rows -> [C, H', W'] (first temporal copy).

    Rows are ordered (h/m, w/m, m, m) — merge groups of m×m patches are contiguous — and each row
    is (C, tp, p, p).
    """
    t, gh, gw = (int(v) for v in np.asarray(thw).reshape(-1))
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    x = np.asarray(pv).reshape(t, gh // m, gw // m, m, m, 3, tp, p, p)[0, :, :, :, :, :, 0]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)


QWEN_CLASSES = ["Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"]


@pytest.mark.parametrize("cls", QWEN_CLASSES)
def test_qwen2vl_unpatchify_is_correct(cls):
    ip = proc(cls, size={"shortest_edge": 784, "longest_edge": 50176}, image_mean=[0, 0, 0], image_std=[1, 1, 1])
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (112, 168, 3), dtype=np.uint8)  # multiple of 28: no resampling
    out = ip(Image.fromarray(a), return_tensors="np")
    img = qwen_unpatchify(out["pixel_values"], out["image_grid_thw"], ip)
    np.testing.assert_allclose(img.transpose(1, 2, 0) * 255, a, atol=1e-3)


@pytest.mark.parametrize("cls", QWEN_CLASSES)
@pytest.mark.parametrize("wh, box", [((250, 170), [60, 30, 190, 130]), ((170, 250), [20, 100, 120, 240])])
def test_qwen2vl_smart_resize_not_multiple_of_28(cls, wh, box):
    ip = proc(cls, size={"shortest_edge": 3136, "longest_edge": 50176})
    out = ip(painted_image(wh, [box]), return_tensors="np")
    g = qwen_vl_grid(ip, wh, grid_thw=out["image_grid_thw"])
    h, w = smart_resize(wh[1], wh[0], 28, 3136, 50176)
    assert (g.rows, g.cols) == (h // 28, w // 28) and g.cell_size == (28.0, 28.0)
    assert out["image_grid_thw"].tolist() == [[1, 2 * g.rows, 2 * g.cols]]
    red = redness(qwen_unpatchify(out["pixel_values"], out["image_grid_thw"], ip), ip)
    check_box(red, g, box, exact=False)


def test_qwen2vl_max_pixels_downscale_exact():
    ip = proc("Qwen2VLImageProcessorPil", size={"shortest_edge": 784, "longest_edge": 25088})
    wh, box = (448, 224), [112, 56, 336, 168]  # x0.5 -> 224x112, box on 28-px borders
    out = ip(painted_image(wh, [box]), return_tensors="np")
    g = qwen_vl_grid(ip, wh, merge_size=2, grid_thw=out["image_grid_thw"][0])
    assert (g.rows, g.cols, g.scale) == (4, 8, (0.5, 0.5))
    red = redness(qwen_unpatchify(out["pixel_values"], out["image_grid_thw"], ip), ip)
    pred = check_box(red, g, box, exact=True)
    assert {tuple(rc) for rc in np.argwhere(pred)} == {(r, c) for r in (1, 2) for c in range(2, 6)}


def test_qwen2vl_min_pixels_upscale_and_attribute_override():
    ip = proc("Qwen2VLImageProcessorPil", size={"shortest_edge": 200704, "longest_edge": 1003520})
    wh, box = (97, 61), [20, 10, 70, 50]
    out = ip(painted_image(wh, [box]), return_tensors="np")
    g = qwen_vl_grid(ip, wh, grid_thw=out["image_grid_thw"])
    assert g.scale[0] > 4
    check_box(redness(qwen_unpatchify(out["pixel_values"], out["image_grid_thw"], ip), ip), g, box, exact=False)
    # reference scripts set max_pixels as an attribute; the processor honours it, so must we
    ip2 = proc("Qwen2VLImageProcessorPil", size={"shortest_edge": 784, "longest_edge": 1003520})
    ip2.max_pixels = 50176
    with pytest.warns(FutureWarning):
        out2 = ip2(Image.new("RGB", (640, 512)), return_tensors="np")
    g2 = qwen_vl_grid(ip2, (640, 512), grid_thw=out2["image_grid_thw"])
    assert out2["image_grid_thw"].tolist() == [[1, 14, 16]] and (g2.rows, g2.cols) == (7, 8)


def test_qwen3vl_patch16():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    assert "Qwen2VLImageProcessor" in str(IMAGE_PROCESSOR_MAPPING_NAMES["qwen3_vl"])
    ip = proc("Qwen2VLImageProcessorPil", patch_size=16, merge_size=2, temporal_patch_size=2,
              image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"shortest_edge": 1024, "longest_edge": 50176})
    for wh, box, exact in [((250, 170), [60, 30, 190, 130], False), ((256, 160), [64, 32, 192, 128], True)]:
        out = ip(painted_image(wh, [box]), return_tensors="np")
        g = qwen_vl_grid(ip, wh, grid_thw=out["image_grid_thw"])
        assert g.cell_size == (32.0, 32.0)
        assert (g.rows, g.cols) == (5, 8)
        red = redness(qwen_unpatchify(out["pixel_values"], out["image_grid_thw"], ip), ip)
        check_box(red, g, box, exact=exact)


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("settings", ["defaults", "checkpoint"])
def test_qwen3_5_adapter_grid_on_its_real_processor(model_type, settings):
    """Qwen 3.5's image processor is the class transformers maps ``qwen3_5`` to (Qwen2VLImageProcessor, Pil backend
    here), with its defaults or the Qwen 3.5 checkpoints' 16-px patches; the adapter's grid (merge size from the
    model config) puts a painted box on the cells the processor really paints, and matches the spans."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    from hf_vgrefine.adapters import get_adapter
    from hf_vgrefine.testing import build_tiny_model

    names = IMAGE_PROCESSOR_MAPPING_NAMES[model_type]
    assert names["pil"] == "Qwen2VLImageProcessorPil"
    kw = {} if settings == "defaults" else dict(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip = proc(names["pil"], **kw)
    adapter = get_adapter(build_tiny_model(model_type).model)
    assert type(adapter).__name__ == "Qwen35Adapter" and adapter.exact_geometry
    cell = ip.patch_size * ip.merge_size
    for wh, box, exact in [((250, 170), [60, 30, 190, 130], False),
                           ((8 * cell, 5 * cell), [2 * cell, cell, 6 * cell, 4 * cell], True)]:
        out = ip(painted_image(wh, [box]), return_tensors="pt")
        n = int(out["image_grid_thw"][0].prod()) // ip.merge_size ** 2
        ids = torch.tensor([[1, 302] + [adapter.image_token_id] * n + [303, 40]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": out["image_grid_thw"]}
        span = adapter.image_spans(inputs)[0][0]
        g = adapter.token_grid(ip, wh, span=span, inputs=inputs)
        assert (g.rows, g.cols) == (span.rows, span.cols) and g.cell_size == (float(cell), float(cell))
        red = redness(qwen_unpatchify(out["pixel_values"].numpy(), out["image_grid_thw"].numpy(), ip), ip)
        check_box(red, g, box, exact=exact)


def test_qwen_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="200"):
                smart_resize(h, w, 28, 784, 50176)
            continue
        f = int(rng.choice([28, 32]))
        lo, hi = int(rng.choice([784, 3136, 65536])), int(rng.choice([50176, 1003520]))
        assert smart_resize(h, w, f, lo, hi) == hf_smart_resize(h, w, f, lo, hi)


def test_qwen_errors():
    ip = proc("Qwen2VLImageProcessorPil", size={"shortest_edge": 3136, "longest_edge": 50176})
    with pytest.raises(ValueError, match=r"does not match.*\[1, 12, 18\]"):
        qwen_vl_grid(ip, (250, 170), grid_thw=[[1, 12, 16]])
    with pytest.raises(ValueError, match="multi-image"):
        qwen_vl_grid(ip, (250, 170), grid_thw=[[1, 12, 18], [1, 12, 18]])
    with pytest.raises(ValueError, match="does not match"):
        qwen_vl_grid(ip, (250, 170), grid_thw=torch.tensor([[2, 12, 18]]))
    assert qwen_vl_grid(ip, (250, 170), grid_thw=torch.tensor([[1, 12, 18]])).shape == (6, 9)
    with pytest.raises(ValueError, match="merge_size"):
        qwen_vl_grid(ip, (250, 170), merge_size=4)
    with pytest.raises(TypeError, match="unsupported image processor"):
        qwen_vl_grid(proc("CLIPImageProcessorPil"), (250, 170))
    no_resize = proc("Qwen2VLImageProcessorPil", do_resize=False)
    with pytest.raises(ValueError, match="multiples"):
        qwen_vl_grid(no_resize, (250, 170))
    assert qwen_vl_grid(no_resize, (280, 168)).shape == (6, 10)


# ---------------------------------------------------------------------- Gemma 3
@pytest.mark.parametrize("cls", ["Gemma3ImageProcessor", "Gemma3ImageProcessorPil"])
@pytest.mark.parametrize("wh, box, exact", [((112, 84), [28, 21, 84, 63], True), ((97, 61), [10, 20, 60, 55], False)])
def test_gemma3_stretch(cls, wh, box, exact):
    ip = proc(cls, size={"height": 56, "width": 56})
    pv = ip(painted_image(wh, [box]), return_tensors="np")["pixel_values"][0]
    g = gemma3_grid(ip, wh, tokens_per_image=16)
    assert (g.rows, g.cols, g.cell_size, g.offset) == (4, 4, (14.0, 14.0), (0.0, 0.0))
    pred = check_box(redness(pv, ip), g, box, exact=exact)
    if exact:
        assert {tuple(rc) for rc in np.argwhere(pred)} == {(r, c) for r in (1, 2) for c in (1, 2)}


def test_gemma3_real_size_and_errors():
    ip = proc("Gemma3ImageProcessorPil", size={"height": 896, "width": 896})
    g = gemma3_grid(ip, (1000, 500), 256)
    assert (g.rows, g.cols, g.cell_size) == (16, 16, (56.0, 56.0))
    assert g.scale == (0.896, 1.792)
    with pytest.raises(ValueError, match="perfect square"):
        gemma3_grid(ip, (100, 50), 255)
    bad = proc("Gemma3ImageProcessorPil", size={"height": 56, "width": 56})
    bad.size = {"shortest_edge": 56}
    with pytest.raises(ValueError, match="stretch"):
        gemma3_grid(bad, (100, 50), 16)
    with pytest.raises(TypeError, match="unsupported image processor"):
        gemma3_grid(proc("CLIPImageProcessorPil"), (100, 50), 16)


# ---------------------------------------------------------------------- LLaVA-NeXT
PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # [[336, 672], [672, 336], [672, 672]] / 12


def next_proc(cls="LlavaNextImageProcessorPil", pinpoints=PINPOINTS):
    return proc(cls, size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                image_grid_pinpoints=pinpoints)


def test_select_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_sbr

    pts = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    rng = np.random.default_rng(0)
    for _ in range(500):
        hw = tuple(int(v) for v in rng.integers(1, 2000, 2))
        assert select_best_resolution(hw, pts) == tuple(hf_sbr(hw, pts))


@pytest.mark.parametrize("cls", ["LlavaNextImageProcessor", "LlavaNextImageProcessorPil"])
@pytest.mark.parametrize(
    "wh, box",
    [((100, 60), [30, 20, 80, 50]),  # pinpoint 56x56, rows unpadded
     ((60, 100), [10, 30, 45, 90]),  # columns unpadded
     ((120, 50), [20, 5, 100, 40]),  # pinpoint 28x56 (1x2 tiles), nothing unpadded
     ((500, 300), [150, 100, 400, 250])],
)
def test_llava_next_multi_tile(cls, wh, box):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    ip = next_proc(cls)
    out = ip(painted_image(wh, [box]), return_tensors="np")
    pv = out["pixel_values"][0]
    assert out["image_sizes"].tolist() == [[wh[1], wh[0]]]
    grids = llava_next_grids(ip, wh, PINPOINTS, patch_size=7, vision_image_size=28)
    base, hi = grids["base"], grids["highres"]
    # base block: stretched image
    assert (base.rows, base.cols, base.offset) == (4, 4, (0.0, 0.0))
    check_box(redness(pv[0], ip), base, box, exact=False)
    # high-res block: re-assemble the tiles into the padded canvas
    n_h, n_w = get_anyres_image_grid_shape((wh[1], wh[0]), PINPOINTS, 28)
    tiles = pv[1:1 + n_h * n_w]
    canvas = np.concatenate([np.concatenate(list(tiles[i * n_w:(i + 1) * n_w]), axis=2) for i in range(n_h)], axis=1)
    red_padded = redness(canvas, ip)  # [n_h*28, n_w*28]
    # cells of the padded feature grid, then the model's own unpad_image
    feat = torch.from_numpy(painted_cells(red_padded, n_h * 4, n_w * 4)[None].astype(np.float32))
    got = unpad_image(feat, torch.tensor([wh[1], wh[0]]))[0].numpy() > 0
    assert got.shape == (hi.rows, hi.cols)
    # painted pixels in the unpadded canvas coordinates
    rows_kept = unpad_image(torch.arange(n_h * 4.0)[None, :, None].expand(1, -1, n_w * 4), torch.tensor([wh[1], wh[0]]))
    cols_kept = unpad_image(torch.arange(n_w * 4.0)[None, None, :].expand(1, n_h * 4, -1), torch.tensor([wh[1], wh[0]]))
    r0, c0 = int(rows_kept[0, 0, 0]), int(cols_kept[0, 0, 0])
    red = red_padded[r0 * 7:(r0 + hi.rows) * 7, c0 * 7:(c0 + hi.cols) * 7]
    check_box(red, hi, box, exact=False)
    pred = token_mask_to_grid(boxes_to_token_mask(box, hi, box_format="xyxy"), hi)
    diff = pred != got
    assert not (diff & ~near_edge_cells(box, hi)).any()


def test_llava_next_matches_pack_image_features():
    from transformers import CLIPVisionConfig
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, get_anyres_image_grid_shape

    pts = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
    ip = next_proc(pinpoints=pts)
    stub = SimpleNamespace(config=SimpleNamespace(
        vision_config=CLIPVisionConfig(image_size=28, patch_size=7), image_grid_pinpoints=pts))
    newline = torch.tensor([-1.0, -1.0])
    rng = np.random.default_rng(0)
    checked = 0
    for wh in [(100, 60), (60, 100), (120, 50), (500, 300), (97, 61), (30, 90)] + [
        tuple(int(v) for v in rng.integers(10, 400, 2)) for _ in range(60)
    ]:
        w0, h0 = wh
        n_h, n_w = get_anyres_image_grid_shape((h0, w0), pts, 28)
        # feature vector of tile-grid cell = its (row, col) in the padded high-res feature grid
        rr, cc = np.meshgrid(np.arange(n_h * 4), np.arange(n_w * 4), indexing="ij")
        padded = torch.tensor(np.stack([rr, cc], -1), dtype=torch.float32)  # [n_h*4, n_w*4, 2]
        tiles = padded.reshape(n_h, 4, n_w, 4, 2).permute(0, 2, 1, 3, 4).reshape(n_h * n_w, 16, 2)
        feats = torch.cat([torch.full((1, 16, 2), -5.0), tiles], 0)
        try:
            g = llava_next_grids(ip, wh, pts, 7, 28)["highres"]
        except ValueError as e:  # extreme aspect: the model unpads to nothing as well
            assert "empty" in str(e)
            continue
        packed, lens = LlavaNextModel.pack_image_features(stub, [feats], torch.tensor([[h0, w0]]), "default", newline)
        packed = packed[0]
        assert packed.shape[0] == 16 + g.rows * (g.cols + 1)
        hires = packed[16:]
        pos = llava_next_highres_positions(g)
        is_nl = np.ones(len(hires), bool)
        is_nl[pos] = False
        assert (hires[torch.from_numpy(is_nl)] == -1).all()
        assert np.array_equal(llava_next_highres_positions(g, has_newline=False), np.arange(g.n_tokens))
        # centre of each grid cell, mapped independently into the padded canvas, lands in that feature
        best = select_best_resolution((h0, w0), pts)
        nh_px, nw_px = get_patch_output_size(np.zeros((h0, w0, 3)), best, input_data_format="channels_last")
        px, py = (best[1] - nw_px) // 2, (best[0] - nh_px) // 2
        for k in range(g.n_tokens):
            r, c = divmod(k, g.cols)
            x, y = g.cell_center(r, c)
            fr, fc = int((y * nh_px / h0 + py) // 7), int((x * nw_px / w0 + px) // 7)
            assert hires[pos[k]].tolist() == [fr, fc], (wh, r, c)
        checked += 1
    assert checked > 40


def test_llava_next_errors():
    ip = next_proc()
    with pytest.raises(ValueError, match="differ from the processor"):
        llava_next_grids(ip, (100, 60), [[28, 56]], 7, 28)
    assert llava_next_grids(ip, (100, 60), None, 7, 28)["highres"].shape == (4, 8)
    with pytest.raises(ValueError, match="vision tower expects"):
        llava_next_grids(ip, (100, 60), PINPOINTS, 7, 56)
    with pytest.raises(ValueError, match="pinpoints"):
        llava_next_grids(ip, (100, 60), [[28]], 7, 28)
    odd = proc("LlavaNextImageProcessorPil", size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
               image_grid_pinpoints=[[30, 60]])
    with pytest.raises(ValueError, match="not a multiple of the tile size"):
        llava_next_grids(odd, (100, 60), None, 7, 28)
    smaller_crop = proc("LlavaNextImageProcessorPil", size={"shortest_edge": 28},
                        crop_size={"height": 21, "width": 21}, image_grid_pinpoints=[[21, 42]])
    with pytest.raises(ValueError, match="unsupported processor settings|vision tower expects"):
        llava_next_grids(smaller_crop, (100, 60), None, 7, 21)
    with pytest.raises(TypeError, match="unsupported image processor"):
        llava_next_grids(proc("CLIPImageProcessorPil"), (100, 60), PINPOINTS, 7, 28)
    with pytest.raises(TypeError):
        llava_next_highres_positions((4, 4))


def test_real_size_llava_next_token_count():
    """Default LLaVA-NeXT settings (336 tiles): token count equals the processor's own count."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    ip = proc("LlavaNextImageProcessorPil", size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
              image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    stub = SimpleNamespace(image_processor=ip, patch_size=14, num_additional_image_tokens=0)
    stub._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(stub, *a)
    for wh in [(500, 300), (640, 480), (300, 500), (1000, 200), (336, 336)]:
        gs = llava_next_grids(ip, wh, None, 14, 336)
        n = LlavaNextProcessor._get_number_of_features(stub, wh[1], wh[0], 336, 336)
        assert n == gs["base"].n_tokens + gs["highres"].rows * (gs["highres"].cols + 1)


def test_resize_arithmetic_matches_transformers():
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    from hf_vgrefine.processor_geometry import _resized_hw

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 2000, 2))
        se = int(rng.integers(8, 400))
        le = se + int(rng.integers(1, 800))
        assert _resized_hw(h, w, {"shortest_edge": se, "longest_edge": le}, "t") == get_size_with_aspect_ratio((h, w), se, le)
        ref = get_resize_output_image_size(np.zeros((3, h, w)), se, default_to_square=False, input_data_format="channels_first")
        assert _resized_hw(h, w, {"shortest_edge": se}, "t") == tuple(ref)
        assert _resized_hw(h, w, {"max_height": se, "max_width": le}, "t") == get_image_size_for_max_height_width((h, w), se, le)


# ---------------------------------------------------------------------- PaliGemma
@pytest.mark.parametrize("cls", ["SiglipImageProcessor", "SiglipImageProcessorPil"])
@pytest.mark.parametrize("wh, box, exact", [((112, 84), [28, 21, 84, 63], True), ((120, 240), [0, 150, 60, 210], True),
                                            ((97, 61), [10, 20, 60, 55], False)])
def test_paligemma_stretch(cls, wh, box, exact):
    """SigLIP stretches to size (no crop, no pad); one token per 7-px patch of the 56-px tower input."""
    ip = proc(cls, size={"height": 56, "width": 56})
    pv = ip(painted_image(wh, [box]), return_tensors="np")["pixel_values"][0]
    g = paligemma_grid(ip, wh, patch_size=7, vision_image_size=56)
    assert (g.rows, g.cols, g.cell_size, g.offset) == (8, 8, (7.0, 7.0), (0.0, 0.0))
    assert g.scale == pytest.approx((56 / wh[0], 56 / wh[1]))
    check_box(redness(pv, ip), g, box, exact=exact)


def test_paligemma_adapter_grid_matches_processor_token_count():
    """The adapter's grid has as many cells as the PaliGemma processor inserts image tokens (real processor)."""
    from hf_vgrefine.adapters import get_adapter
    from hf_vgrefine.testing import build_tiny_model, tiny_tokenizer

    tiny = build_tiny_model("paligemma")
    ip = proc("SiglipImageProcessorPil", size={"height": 28, "width": 28})
    ip.image_seq_length = 16
    tok = tiny_tokenizer()
    tok.image_token, tok.image_token_id = "<image>", tiny.model.config.image_token_id
    processor = transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    out = processor(images=painted_image((90, 50), [[10, 10, 40, 30]]), text="what is shown", return_tensors="pt")
    adapter = get_adapter(tiny.model)
    assert type(adapter).__name__ == "PaliGemmaAdapter" and adapter.exact_geometry
    span = adapter.image_spans(out)[0][0]
    g = adapter.token_grid(processor, (90, 50), span=span)
    assert (g.rows, g.cols) == (span.rows, span.cols) == (4, 4)
    assert int((out["input_ids"] == tiny.model.config.image_token_id).sum()) == g.n_tokens
    assert out["token_type_ids"].eq(0).all()
    with torch.no_grad():      # the processor's output runs through the tiny model
        tiny.model(**out)


def test_paligemma_errors():
    crop = proc("SiglipImageProcessorPil", size={"height": 56, "width": 56})
    crop.do_center_crop = True
    with pytest.raises(ValueError, match="do_center_crop"):
        paligemma_grid(crop, (100, 50), 7, 56)
    with pytest.raises(ValueError, match="vision tower expects"):
        paligemma_grid(proc("SiglipImageProcessorPil", size={"height": 56, "width": 56}), (100, 50), 7, 28)
    with pytest.raises(TypeError, match="unsupported image processor"):
        paligemma_grid(proc("CLIPImageProcessorPil"), (100, 50), 7, 56)


# ---------------------------------------------------------------------- InternVL
def internvl_proc(cls="GotOcr2ImageProcessorPil", **kw):
    base = dict(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=6)
    base.update(kw)
    return proc(cls, **base)


def test_internvl_tile_layout_matches_transformers():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    ip = internvl_proc(max_patches=12)
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(5, 900, 2))
        assert internvl_tile_layout(ip, (w, h)) == tuple(get_optimal_tiled_canvas((h, w), (56, 56), 1, 12))
    for w, h in [(112, 56), (56, 112), (100, 100), (168, 56)]:     # exact aspect ties
        assert internvl_tile_layout(ip, (w, h)) == tuple(get_optimal_tiled_canvas((h, w), (56, 56), 1, 12))
    assert internvl_tile_layout(internvl_proc(crop_to_patches=False), (300, 100)) == (1, 1)


@pytest.mark.parametrize("cls", ["GotOcr2ImageProcessor", "GotOcr2ImageProcessorPil"])
@pytest.mark.parametrize("wh, box, exact", [((224, 112), [56, 28, 168, 84], True),      # 2x1 tiles + thumbnail
                                            ((112, 224), [0, 112, 56, 196], True),      # 1x2 tiles
                                            ((150, 97), [20, 30, 120, 80], False),
                                            ((84, 84), [21, 21, 63, 63], True)])        # one tile, no thumbnail
def test_internvl_tiles_and_thumbnail(cls, wh, box, exact):
    """Tiles re-assembled into the mosaic and the thumbnail: painted cells equal boxes_to_token_mask."""
    ip = internvl_proc(cls)
    out = ip(painted_image(wh, [box]), return_tensors="np")
    pv = out["pixel_values"]
    g = internvl_grids(ip, wh, patch_size=7, vision_image_size=56, downsample_ratio=0.5)
    cols, rows = g["layout"]
    assert g["tile_side"] == 4 and g["global"].shape == (4, 4) and g["global"].cell_size == (14.0, 14.0)
    n_tiles = cols * rows
    assert len(pv) == (n_tiles + 1 if n_tiles > 1 else 1)
    check_box(redness(pv[-1], ip), g["global"], box, exact=exact)           # thumbnail / the single tile
    if n_tiles > 1:
        mosaic = np.concatenate([np.concatenate(list(pv[r * cols:(r + 1) * cols]), axis=2) for r in range(rows)], axis=1)
        tiles = g["tiles"]
        assert tiles.shape == (rows * 4, cols * 4)
        check_box(redness(mosaic, ip), tiles, box, exact=exact)
    else:
        assert g["tiles"] is None


def test_internvl_pixel_shuffle_and_tile_order():
    """Token k of a tile covers the 2x2 patch block (k // side, k % side) (the model's own pixel shuffle), and
    internvl_tile_positions lists the tile-by-tile sequence in mosaic row-major order."""
    from hf_vgrefine.testing import build_tiny_model

    model = build_tiny_model("internvl").model
    rr, cc = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    feats = torch.stack([rr, cc], -1)[None]                                   # [1, 4 rows, 4 cols, 2]
    shuffled = model.model.pixel_shuffle(feats, scale_factor=0.5).reshape(4, 4, 2)   # [tokens, 2x2 patches, (r, c)]
    for k in range(4):
        assert {tuple(v) for v in shuffled[k].long().tolist()} == {(2 * (k // 2) + a, 2 * (k % 2) + b)
                                                                   for a in (0, 1) for b in (0, 1)}
    # 2 columns x 3 rows of 2x2-token tiles: tile t holds sequence offsets [4t, 4t + 4)
    pos = internvl_tile_positions((2, 3), 2).reshape(6, 4)
    for r in range(6):
        for c in range(4):
            t, rr_, cc_ = (r // 2) * 2 + c // 2, r % 2, c % 2
            assert pos[r, c] == 4 * t + 2 * rr_ + cc_


def test_internvl_adapter_with_the_real_processor():
    """The adapter's spans and grids on the output of a real InternVLProcessor (token counts, tile mosaic)."""
    from hf_vgrefine.adapters import get_adapter
    from hf_vgrefine.testing import build_tiny_model, tiny_tokenizer

    tiny = build_tiny_model("internvl")
    ip = internvl_proc(size={"height": 28, "width": 28})
    tok = tiny_tokenizer()
    # InternVLProcessor needs torchvision for its video processor here: its own image-token expansion on the real
    # image processor's output stands in for it
    processor = SimpleNamespace(image_processor=ip, start_image_token="<start_of_image>",
                                end_image_token="<end_of_image>", image_token="<image>", image_seq_length=4)

    def run_processor(image, text):
        px = ip(image, return_tensors="pt")
        block = transformers.InternVLProcessor.replace_image_token(processor, px, 0)
        enc = tok(text.replace("<image>", block), return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "pixel_values": px["pixel_values"]}

    adapter = get_adapter(tiny.model)
    assert type(adapter).__name__ == "InternVLAdapter" and adapter.exact_geometry
    for wh in [(90, 40), (30, 30)]:
        out = run_processor(painted_image(wh, [[5, 5, 20, 20]]), "<image> what is shown")
        span = adapter.image_spans(out)[0][0]
        grid = adapter.token_grid(processor, wh, span=span)
        assert (grid.rows, grid.cols) == (span.rows, span.cols) == (2, 2)
        cols, rows = internvl_tile_layout(ip, wh)
        n_tiles = cols * rows
        assert span.extra_positions["n_tiles"] == (n_tiles if n_tiles > 1 else 0)
        assert out["pixel_values"].shape[0] == (n_tiles + 1 if n_tiles > 1 else 1)
        assert torch.equal(span.positions, torch.arange(span.end - 4, span.end))
        if n_tiles > 1:
            mosaic = adapter.tile_span(span, processor, wh)
            assert (mosaic.rows, mosaic.cols) == (2 * rows, 2 * cols)
            assert sorted(mosaic.positions.tolist()) == list(range(span.start, span.start + 4 * n_tiles))
            assert mosaic.positions[1].item() == span.start + 1 and mosaic.positions[2].item() == span.start + 4
        else:
            with pytest.raises(ValueError, match="one tile"):
                adapter.token_grid(processor, wh, span=span, block="tiles")
        with pytest.raises(ValueError, match="original size"):
            adapter.token_grid(processor, (300, 30) if n_tiles <= 1 else (30, 30), span=span)
        with torch.no_grad():
            tiny.model(**out)


def test_internvl_errors():
    with pytest.raises(ValueError, match="tile size"):
        internvl_grids(internvl_proc(), (100, 50), 7, 28, 0.5)
    with pytest.raises(ValueError, match="downsample_ratio"):
        internvl_grids(internvl_proc(), (100, 50), 7, 56, 0.3)
    with pytest.raises(TypeError, match="unsupported image processor"):
        internvl_grids(proc("CLIPImageProcessorPil"), (100, 50), 7, 56, 0.5)


# ---------------------------------------------------------------------- LLaVA-OneVision
OV_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def ov_proc(cls="LlavaOnevisionImageProcessorPil", pinpoints=OV_PINPOINTS):
    return proc(cls, size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints, do_pad=False)


@pytest.mark.parametrize("cls", ["LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil"])
@pytest.mark.parametrize("wh, box", [((100, 60), [30, 20, 80, 50]), ((60, 100), [10, 30, 45, 90]),
                                     ((120, 50), [20, 5, 100, 40])])
def test_llava_onevision_tiles(cls, wh, box):
    """Base block (stretched image) and high-res tiles of the real OneVision processor (uncapped grids)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    ip = ov_proc(cls)
    out = ip(painted_image(wh, [box]), return_tensors="np")
    pv = out["pixel_values"][0]
    grids = llava_next_grids(ip, wh, OV_PINPOINTS, patch_size=7, vision_image_size=28, max_num_patches=9)
    base, hi = grids["base"], grids["highres"]
    assert (base.rows, base.cols, base.offset) == (4, 4, (0.0, 0.0))
    check_box(redness(pv[0], ip), base, box, exact=False)
    n_h, n_w = get_anyres_image_grid_shape((wh[1], wh[0]), OV_PINPOINTS, 28)
    tiles = pv[1:1 + n_h * n_w]
    canvas = np.concatenate([np.concatenate(list(tiles[i * n_w:(i + 1) * n_w]), axis=2) for i in range(n_h)], axis=1)
    red_padded = redness(canvas, ip)
    feat = torch.from_numpy(painted_cells(red_padded, n_h * 4, n_w * 4)[None].astype(np.float32))
    got = unpad_image(feat, torch.tensor([wh[1], wh[0]]))[0].numpy() > 0
    assert got.shape == (hi.rows, hi.cols)
    pred = token_mask_to_grid(boxes_to_token_mask(box, hi, box_format="xyxy"), hi)
    assert not ((pred != got) & ~near_edge_cells(box, hi)).any()


def test_llava_onevision_capped_grid_matches_pack_image_features_and_token_count():
    """anyres_max_N: the model's own pack_image_features (bilinear downscale of a (row, col) ramp) samples each
    cell of the capped grid at its centre; token counts equal the OneVision processor's own count."""
    from transformers import SiglipVisionConfig
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    pts = [[28, 28], [28, 56], [56, 28], [56, 56], [84, 84], [28, 84]]
    ip = ov_proc(pinpoints=pts)
    newline = torch.tensor([-100.0, -100.0])
    capped = 0
    for cap in (1, 2, 9):
        stub = SimpleNamespace(config=SimpleNamespace(
            vision_config=SiglipVisionConfig(image_size=28, patch_size=7), image_grid_pinpoints=pts))
        pstub = SimpleNamespace(image_processor=ip, num_image_tokens=16, vision_aspect_ratio=f"anyres_max_{cap}")
        pstub._get_unpadded_features = lambda *a, _s=pstub: LlavaOnevisionProcessor._get_unpadded_features(_s, *a)
        for wh in [(100, 60), (60, 100), (120, 50), (200, 200), (97, 61), (30, 90), (300, 120)]:
            w0, h0 = wh
            g = llava_next_grids(ip, wh, pts, 7, 28, max_num_patches=cap)["highres"]
            n = LlavaOnevisionProcessor._get_number_of_features(pstub, h0, w0, 28, 28)
            assert n == 16 + g.rows * (g.cols + 1)
            n_h, n_w = get_anyres_image_grid_shape((h0, w0), pts, 28)
            rr, cc = np.meshgrid(np.arange(n_h * 4), np.arange(n_w * 4), indexing="ij")
            padded = torch.tensor(np.stack([rr, cc], -1), dtype=torch.float32)
            tiles = padded.reshape(n_h, 4, n_w, 4, 2).permute(0, 2, 1, 3, 4).reshape(n_h * n_w, 16, 2)
            feats = torch.cat([torch.full((1, 16, 2), -5.0), tiles], 0)
            packed, _ = LlavaOnevisionModel.pack_image_features(stub, [feats], torch.tensor([[h0, w0]]), newline,
                                                                f"anyres_max_{cap}")
            hires = packed[0][16:] if isinstance(packed, (list, tuple)) else packed[16:]
            assert hires.shape[0] == g.rows * (g.cols + 1)
            pos = llava_next_highres_positions(g)
            best = select_best_resolution((h0, w0), pts)
            nh_px, nw_px = get_patch_output_size(np.zeros((h0, w0, 3)), best, input_data_format="channels_last")
            px, py = (best[1] - nw_px) // 2, (best[0] - nh_px) // 2
            is_capped = g.rows * 7 != g.canvas_size[1]       # capped: fewer cells over the same canvas
            capped += is_capped
            for k in range(g.n_tokens):
                r, c = divmod(k, g.cols)
                x, y = g.cell_center(r, c)
                fy, fx = (y * nh_px / h0 + py) / 7 - 0.5, (x * nw_px / w0 + px) / 7 - 0.5
                if is_capped:   # bilinear sample of the (row, col) ramp at the cell centre, clamped at the edges
                    vals = hires[torch.from_numpy(pos)]
                    want = torch.tensor([fy, fx]).clamp(vals.min(0).values, vals.max(0).values)
                    torch.testing.assert_close(hires[pos[k]], want, atol=1e-4, rtol=0)
                else:
                    assert hires[pos[k]].tolist() == [int(fy + 0.5), int(fx + 0.5)], (wh, cap, r, c)
    assert capped >= 5


def test_llava_onevision_adapter_spans_and_grids():
    """Adapter spans on a tiny OneVision model agree with the grids of the real image processor (capped or not)."""
    from hf_vgrefine.adapters import get_adapter
    from hf_vgrefine.testing import build_tiny_model, tiny_inputs

    tiny = build_tiny_model("llava_onevision")
    adapter = get_adapter(tiny.model)
    assert type(adapter).__name__ == "LlavaOnevisionAdapter" and adapter.max_num_patches == 2
    ip = ov_proc()
    for hw in [(40, 70), (50, 50), (28, 28)]:
        span = adapter.image_spans(tiny_inputs(tiny, [2], [hw]))[0][0]
        hi = adapter.token_grid(ip, (hw[1], hw[0]), block="highres")
        assert span.extra_positions["highres_grid"] == (hi.rows, hi.cols)
        assert adapter.token_grid(ip, (hw[1], hw[0])).shape == (4, 4)
        out = ip(painted_image((hw[1], hw[0]), [[2, 2, 10, 10]]), return_tensors="np")
        assert out["image_sizes"].tolist() == [list(hw)]


# ---------------------------------------------------------------------- Mistral 3 / Pixtral
@pytest.mark.parametrize("cls", ["PixtralImageProcessor", "PixtralImageProcessorPil"])
@pytest.mark.parametrize("wh, box, exact", [((112, 56), [28, 14, 84, 42], True),      # fits: no scaling
                                            ((224, 84), [56, 28, 168, 84], True),     # scaled down 2x
                                            ((100, 61), [10, 20, 60, 55], False),     # rounded up to whole tokens
                                            ((300, 170), [100, 40, 171, 113], False)])
def test_pixtral_resize_and_round_up(cls, wh, box, exact):
    """Mistral 3 calls the processor with patch_size·spatial_merge_size (7·2 here): painted cells = box cells."""
    ip = proc(cls, size={"longest_edge": 112}, patch_size={"height": 14, "width": 14})
    out = ip(painted_image(wh, [box]), return_tensors="np")
    g = pixtral_grid(ip, wh, patch_size=7, merge_size=2)
    h, w = out["image_sizes"][0]
    assert (g.rows * 14, g.cols * 14) == (h, w) and g.cell_size == (14.0, 14.0)
    pv = out["pixel_values"][0][:, :h, :w]
    check_box(redness(pv, ip), g, box, exact=exact)


def test_pixtral_token_layout_and_patch_merger():
    """A prompt in PixtralProcessor's row layout ([IMG] x cols + [IMG_BREAK], last [IMG_END]; the processor class
    itself needs torchvision here) for the real image processor's image_sizes: the model's own get_image_features
    gives rows·cols tokens, the adapter's spans and grid agree; the model's patch merger makes token k of an R x C
    grid the 2x2 patch block whose top-left patch is (2·(k // C), 2·(k % C))."""
    from hf_vgrefine.adapters import get_adapter
    from hf_vgrefine.testing import BOS, IMAGE, IMG_BREAK, IMG_END, build_tiny_model

    tiny = build_tiny_model("mistral3")
    ip = proc("PixtralImageProcessorPil", size={"longest_edge": 112}, patch_size={"height": 14, "width": 14})
    adapter = get_adapter(tiny.model)
    assert type(adapter).__name__ == "Mistral3Adapter" and adapter.exact_geometry
    for wh in [(100, 61), (40, 90)]:
        px = ip(painted_image(wh, [[5, 5, 20, 20]]), return_tensors="pt")
        h, w = px["image_sizes"][0].tolist()
        rows, cols = h // 14, w // 14
        block = sum(([IMAGE] * cols + [IMG_BREAK] for _ in range(rows)), [])[:-1] + [IMG_END]
        ids = torch.tensor([[BOS, 40, 41] + block + [42, 43]])
        inputs = {"input_ids": ids, "pixel_values": px["pixel_values"], "image_sizes": px["image_sizes"]}
        with torch.no_grad():
            feats = tiny.model.get_image_features(pixel_values=px["pixel_values"], image_sizes=px["image_sizes"])
        n_model = sum(f.shape[0] for f in feats.pooler_output)
        assert n_model == rows * cols
        span = adapter.image_spans(inputs)[0][0]
        g = adapter.token_grid(ip, wh, span=span)
        assert (span.rows, span.cols) == (g.rows, g.cols) == (rows, cols)
        assert torch.equal(span.positions, (ids[0] == IMAGE).nonzero().flatten())
        assert int(ids[0, span.end]) == IMG_END
        with torch.no_grad():
            tiny.model(**inputs)
        with pytest.raises(ValueError, match="image_sizes"):
            adapter.image_spans({"input_ids": ids, "image_sizes": torch.tensor([[h + 14, w]])})
    merger = tiny.model.model.multi_modal_projector.patch_merger
    lin = merger.merging_layer
    R, C = 3, 4
    rr, cc = torch.meshgrid(torch.arange(2.0 * R), torch.arange(2.0 * C), indexing="ij")
    d = lin.in_features // 4
    feats = torch.nn.functional.pad(torch.stack([rr, cc], -1).reshape(-1, 2), (0, d - 2))   # patches row-major
    saved = lin.weight.detach().clone()
    with torch.no_grad():
        try:
            sel = torch.zeros_like(lin.weight)
            sel[0, 0 * 4 + 0] = sel[1, 1 * 4 + 0] = 1.0        # unfold is channel-major: (channel, kernel position)
            lin.weight.copy_(sel)
            out = merger(feats, torch.tensor([[2 * R * 7, 2 * C * 7]]))
        finally:
            lin.weight.copy_(saved)
    for k in range(R * C):
        assert out[k, :2].tolist() == [2 * (k // C), 2 * (k % C)]


def test_pixtral_errors():
    with pytest.raises(TypeError, match="unsupported image processor"):
        pixtral_grid(proc("CLIPImageProcessorPil"), (100, 50), 7, 2)
    ip = proc("PixtralImageProcessorPil", do_resize=False)
    with pytest.raises(ValueError, match="multiples"):
        pixtral_grid(ip, (100, 50), 7, 2)
    assert pixtral_grid(ip, (112, 56), 7, 2).shape == (4, 8)
