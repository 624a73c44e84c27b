"""Unit tests of hf_vgrefine.geometry (pure numpy; no processors)."""

import math

import numpy as np
import pytest

from hf_vgrefine.geometry import (
    TokenGrid,
    boxes_to_token_mask,
    flat_to_rowcol,
    grid_to_token_mask,
    indices_to_token_mask,
    mask_to_token_mask,
    rowcol_to_flat,
    token_mask_to_grid,
    token_mask_to_indices,
)


def unit_grid(rows=4, cols=4, cell=7.0):
    """Image == canvas, cells of `cell` px."""
    return TokenGrid(rows, cols, (int(cols * cell), int(rows * cell)), (1.0, 1.0), (0.0, 0.0),
                     (cols * cell, rows * cell))


def random_grid(rng):
    rows, cols = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    w0, h0 = int(rng.integers(5, 60)), int(rng.integers(5, 60))
    sx, sy = rng.uniform(0.3, 3.0, size=2)
    wc, hc = rng.uniform(5, 80, size=2)
    ox, oy = rng.uniform(-20, 20, size=2)
    return TokenGrid(rows, cols, (w0, h0), (sx, sy), (ox, oy), (wc, hc))


def cells(mask, grid):
    return {tuple(map(int, rc)) for rc in np.argwhere(token_mask_to_grid(mask, grid))}


# ---------------------------------------------------------------------- TokenGrid
def test_tokengrid_properties_and_serialisation():
    g = TokenGrid(6, 8, (250, 170), (252 / 250, 168 / 170), (0.0, 0.0), (252.0, 168.0))
    assert g.n_tokens == 48 and g.shape == (6, 8)
    assert g.cell_size == (31.5, 28.0)
    d = g.to_dict()
    assert TokenGrid.from_dict(d) == g
    import json

    assert TokenGrid.from_dict(json.loads(json.dumps(d))) == g
    pts = np.array([[0.0, 0.0], [250.0, 170.0], [10.5, 3.25]])
    np.testing.assert_allclose(g.to_image(g.to_canvas(pts)), pts, atol=1e-12)
    np.testing.assert_allclose(g.to_canvas([250.0, 170.0]), [252.0, 168.0])
    assert TokenGrid.stretch((97, 61), 4, 4).cell_size == (97 / 4, 61 / 4)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(rows=0), "rows"),
        (dict(cols=2.5), "cols"),
        (dict(image_size=(0, 5)), "image_size"),
        (dict(image_size=(5,)), "image_size"),
        (dict(scale=(0.0, 1.0)), "scale"),
        (dict(offset=(float("nan"), 0.0)), "offset"),
        (dict(canvas_size=(10.0, -1.0)), "canvas_size"),
    ],
)
def test_tokengrid_validation(kwargs, msg):
    base = dict(rows=2, cols=2, image_size=(10, 10), scale=(1.0, 1.0), offset=(0.0, 0.0), canvas_size=(10.0, 10.0))
    base.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        TokenGrid(**base)
    with pytest.raises(ValueError, match="missing"):
        TokenGrid.from_dict({"rows": 2})


def test_round_trip_cell_centres_random_grids():
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = random_grid(rng)
        for r in range(g.rows):
            for c in range(g.cols):
                x, y = g.cell_center(r, c)
                assert g.cell_of(x, y) == (r, c)


def test_cell_of_outside_canvas_and_bad_cell():
    g = TokenGrid(8, 8, (240, 120), (7 / 15, 7 / 15), (-28.0, 0.0), (56.0, 56.0))  # centre crop
    assert g.cell_of(60.0, 0.0) == (0, 0)
    assert g.cell_of(179.9, 119.9) == (7, 7)
    with pytest.raises(ValueError, match="cropped away"):
        g.cell_of(10.0, 10.0)
    with pytest.raises(ValueError, match="outside"):
        g.cell_center(8, 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        g.to_canvas([1.0, 2.0, 3.0])


# ---------------------------------------------------------------------- boxes: hand-computed
def test_boxes_any_hand_computed():
    g = unit_grid()  # 4x4 cells of 7 px on a 28x28 image
    assert cells(boxes_to_token_mask([7, 7, 7, 7], g), g) == {(1, 1)}
    assert cells(boxes_to_token_mask([6, 7, 2, 7], g), g) == {(1, 0), (1, 1)}
    assert cells(boxes_to_token_mask([6.5, 7, 7, 14], g, box_format="xyxy"), g) == {(1, 0)}
    assert cells(boxes_to_token_mask([0, 0, 28, 28], g), g) == {(r, c) for r in range(4) for c in range(4)}
    # union, flat index row-major
    m = boxes_to_token_mask([[0, 0, 1, 1], [27, 27, 1, 1]], g)
    assert m.dtype == bool and m.shape == (16,)
    assert np.flatnonzero(m).tolist() == [0, 15]
    # same box in both formats
    np.testing.assert_array_equal(boxes_to_token_mask([3, 4, 10, 12], g),
                                  boxes_to_token_mask([3, 4, 13, 16], g, box_format="xyxy"))


def test_boxes_pad_and_crop_hand_computed():
    # 20x10 image padded to 20x20 (offset y 5), resized to 28 -> scale 1.4, offset 7; 4x4 cells of 7
    g = TokenGrid(4, 4, (20, 10), (1.4, 1.4), (0.0, 7.0), (28.0, 28.0))
    assert cells(boxes_to_token_mask([0, 0, 20, 10], g), g) == {(r, c) for r in (1, 2) for c in range(4)}
    # centre crop: 20x10 -> resize x2.8 -> 56x28 -> crop 28x28 at left 14 (keeps original x in [5, 15))
    g = TokenGrid(4, 4, (20, 10), (2.8, 2.8), (-14.0, 0.0), (28.0, 28.0))
    assert cells(boxes_to_token_mask([5, 0, 2.5, 2.5], g), g) == {(0, 0)}  # canvas [0, 7) x [0, 7)
    assert cells(boxes_to_token_mask([5, 0, 2.6, 2.6], g), g) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # partially cropped boxes are clipped to the canvas (and to the image)
    assert cells(boxes_to_token_mask([0, 0, 7.5, 2.5], g), g) == {(0, 0)}
    assert cells(boxes_to_token_mask([12.5, 0, 100, 2.5], g), g) == {(0, 3)}


def test_boxes_clip_partially_outside_image():
    g = unit_grid()
    np.testing.assert_array_equal(boxes_to_token_mask([-5, -5, 10, 10], g), boxes_to_token_mask([0, 0, 5, 5], g))
    np.testing.assert_array_equal(boxes_to_token_mask([20, 20, 100, 100], g, box_format="xyxy"),
                                  boxes_to_token_mask([20, 20, 28, 28], g, box_format="xyxy"))


def test_min_cells_per_box_and_border_tolerance():
    g = unit_grid()
    # an edge that equals a cell border up to float rounding does not pull in the next cell
    g3 = TokenGrid(3, 3, (30, 30), (0.1, 0.1), (0.0, 0.0), (3.0, 3.0))
    assert cells(boxes_to_token_mask([0, 0, 10, 10], g3), g3) == {(0, 0)}
    assert cells(boxes_to_token_mask([10, 10, 10, 10], g3), g3) == {(1, 1)}
    # a (numerically) vanishing box on a border: empty range with the faithful rule
    tiny = [7.0, 7.0, 1e-12, 1e-12]
    assert cells(boxes_to_token_mask(tiny, g), g) == {(1, 1)}
    assert not boxes_to_token_mask(tiny, g, min_cells_per_box=0, on_empty="empty").any()
    with pytest.raises(ValueError, match="covers no image token"):
        boxes_to_token_mask(tiny, g, min_cells_per_box=0)
    # a tiny box on the last border stays inside the grid
    assert cells(boxes_to_token_mask([28 - 1e-12, 28 - 1e-12, 1e-12, 1e-12], g), g) == {(3, 3)}


def test_boxes_fraction_hand_computed():
    g = unit_grid()
    f = token_mask_to_grid(boxes_to_token_mask([3.5, 0, 7, 7], g, mode="fraction"), g)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f[0, :2], [0.5, 0.5])
    assert f.sum() == pytest.approx(1.0)
    # union is not double counted
    f2 = boxes_to_token_mask([[3.5, 0, 7, 7], [3.5, 0, 7, 7], [3.5, 0, 3.5, 7]], g, mode="fraction")
    np.testing.assert_allclose(f2, f.reshape(-1))
    f3 = token_mask_to_grid(boxes_to_token_mask([[0, 0, 7, 3.5], [0, 0, 3.5, 7]], g, mode="fraction"), g)
    assert f3[0, 0] == pytest.approx(0.75)


def supersampled_box_fraction(boxes_xyxy, g, n=64):
    """Reference: sample n x n canvas points per cell, map back, test membership in the boxes."""
    tw, th = g.cell_size
    u = (np.arange(n) + 0.5) / n
    out = np.zeros((g.rows, g.cols))
    for r in range(g.rows):
        for c in range(g.cols):
            px, py = np.meshgrid((c + u) * tw, (r + u) * th)
            xy = g.to_image(np.stack([px, py], -1))
            inside = np.zeros(px.shape, bool)
            for x0, y0, x1, y1 in boxes_xyxy:
                x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, g.image_size[0]), min(y1, g.image_size[1])
                inside |= (xy[..., 0] >= x0) & (xy[..., 0] < x1) & (xy[..., 1] >= y0) & (xy[..., 1] < y1)
            out[r, c] = inside.mean()
    return out.reshape(-1)


def test_boxes_fraction_vs_supersampled_and_any_consistency():
    rng = np.random.default_rng(1)
    n_checked = 0
    for _ in range(40):
        g = random_grid(rng)
        w0, h0 = g.image_size
        k = int(rng.integers(1, 4))
        x0 = rng.uniform(-5, w0 - 1, k)
        y0 = rng.uniform(-5, h0 - 1, k)
        boxes = np.stack([x0, y0, np.maximum(x0 + rng.uniform(0.5, w0, k), 0.5), np.maximum(y0 + rng.uniform(0.5, h0, k), 0.5)], 1)
        frac = boxes_to_token_mask(boxes, g, box_format="xyxy", mode="fraction", on_empty="empty")
        ref = supersampled_box_fraction(boxes, g)
        np.testing.assert_allclose(frac, ref, atol=3 / 64 + 1e-9)
        anym = boxes_to_token_mask(boxes, g, box_format="xyxy", on_empty="empty")
        # the cover rule == "cell area touched"; only cells touched by < 1e-9 of a cell may differ
        np.testing.assert_array_equal(anym, frac > 1e-7)
        n_checked += int(anym.any())
    assert n_checked > 10


# ---------------------------------------------------------------------- boxes: errors
@pytest.mark.parametrize(
    "boxes, kwargs, msg",
    [
        ([1, 2, 0, 3], {}, "degenerate"),
        ([1, 2, 3, -1], {}, "degenerate"),
        ([5, 5, 5, 9], dict(box_format="xyxy"), "degenerate"),
        ([30, 0, 5, 5], {}, "entirely outside"),
        ([-10, 0, 5, 5], {}, "entirely outside"),
        ([0, 0, 28, 0.0], dict(box_format="xyxy"), "degenerate"),
        ([1, 2, 3], {}, "shape"),
        ([[1, 2, 3, 4, 5]], {}, "shape"),
        (np.zeros((1, 1, 4)), {}, "shape"),
        ([1, float("nan"), 3, 4], {}, "NaN"),
        ("abcd", {}, "numeric"),
        ([1, 2, 3, 4], dict(mode="soft"), "mode"),
        ([1, 2, 3, 4], dict(box_format="cxcywh"), "box_format"),
        ([1, 2, 3, 4], dict(min_cells_per_box=2), "min_cells_per_box"),
        ([1, 2, 3, 4], dict(on_empty="skip"), "on_empty"),
        (np.zeros((0, 4)), {}, "no boxes"),
    ],
)
def test_boxes_errors(boxes, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        boxes_to_token_mask(boxes, unit_grid(), **kwargs)


def test_boxes_errors_misc():
    with pytest.raises(TypeError, match="TokenGrid"):
        boxes_to_token_mask([0, 0, 1, 1], (4, 4))
    assert not boxes_to_token_mask(np.zeros((0, 4)), unit_grid(), on_empty="empty").any()
    # inside the image but fully cropped away by the processor
    g = TokenGrid(4, 4, (20, 10), (2.8, 2.8), (-14.0, 0.0), (28.0, 28.0))
    with pytest.raises(ValueError, match="crops away"):
        boxes_to_token_mask([0, 0, 5, 5], g)
    for mode in ("any", "fraction"):
        out = boxes_to_token_mask([0, 0, 5, 5], g, mode=mode, on_empty="empty")
        assert out.shape == (16,) and not out.any()
    # one visible box is enough
    assert boxes_to_token_mask([[0, 0, 5, 5], [12.5, 0, 2, 2]], g).sum() == 1


# ---------------------------------------------------------------------- masks
def exact_mask_fraction(mask, g):
    """Loop reference: exact overlap of every foreground pixel square (mapped) with every cell."""
    tw, th = g.cell_size
    (sx, sy), (ox, oy), (wc, hc) = g.scale, g.offset, g.canvas_size
    out = np.zeros((g.rows, g.cols))
    for y, x in np.argwhere(mask):
        a0, a1 = max(x * sx + ox, 0), min((x + 1) * sx + ox, wc)
        b0, b1 = max(y * sy + oy, 0), min((y + 1) * sy + oy, hc)
        for r in range(g.rows):
            for c in range(g.cols):
                lx = min(a1, (c + 1) * tw) - max(a0, c * tw)
                ly = min(b1, (r + 1) * th) - max(b0, r * th)
                if lx > 0 and ly > 0:
                    out[r, c] += lx * ly
    return out.reshape(-1) / (tw * th)


def supersampled_mask_fraction(mask, g, n=96):
    tw, th = g.cell_size
    u = (np.arange(n) + 0.5) / n
    out = np.zeros((g.rows, g.cols))
    h0, w0 = mask.shape
    for r in range(g.rows):
        for c in range(g.cols):
            px, py = np.meshgrid((c + u) * tw, (r + u) * th)
            xy = np.floor(g.to_image(np.stack([px, py], -1))).astype(int)
            ok = (xy[..., 0] >= 0) & (xy[..., 0] < w0) & (xy[..., 1] >= 0) & (xy[..., 1] < h0)
            val = np.zeros(px.shape, bool)
            val[ok] = mask[xy[..., 1][ok], xy[..., 0][ok]]
            out[r, c] = val.mean()
    return out.reshape(-1)


def blob_mask(rng, w0, h0):
    yy, xx = np.mgrid[0:h0, 0:w0]
    m = np.zeros((h0, w0), bool)
    for _ in range(2):
        cx, cy, rad = rng.uniform(0, w0), rng.uniform(0, h0), rng.uniform(2, max(w0, h0) / 2)
        m |= (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < rad**2
    if not m.any():
        m[h0 // 2, w0 // 2] = True
    return m


def test_mask_fraction_vs_references():
    rng = np.random.default_rng(2)
    for i in range(25):
        g = random_grid(rng)
        m = blob_mask(rng, *g.image_size)
        frac = mask_to_token_mask(m, g, mode="fraction", on_empty="empty")
        assert frac.dtype == np.float32 and frac.shape == (g.n_tokens,)
        if i < 8:
            np.testing.assert_allclose(frac, exact_mask_fraction(m, g), atol=1e-5)
        # midpoint sampling error <= 0.5/n per fg/bg transition along a sample line: two discs give
        # <= 4 transitions per line and axis, the image border <= 2 more
        np.testing.assert_allclose(frac, supersampled_mask_fraction(m, g), atol=12 * 0.5 / 96)
        anym = mask_to_token_mask(m, g, mode="any", on_empty="empty")
        np.testing.assert_array_equal(anym, frac > 1e-7)


def test_mask_matches_boxes_for_rectangles_and_dtypes():
    rng = np.random.default_rng(3)
    for _ in range(20):
        g = random_grid(rng)
        w0, h0 = g.image_size
        x0, y0 = int(rng.integers(0, w0 - 1)), int(rng.integers(0, h0 - 1))
        x1, y1 = int(rng.integers(x0 + 1, w0 + 1)), int(rng.integers(y0 + 1, h0 + 1))
        m = np.zeros((h0, w0), np.uint8)
        m[y0:y1, x0:x1] = 255
        box = [x0, y0, x1, y1]
        np.testing.assert_array_equal(
            mask_to_token_mask(m, g, on_empty="empty"),
            boxes_to_token_mask(box, g, box_format="xyxy", on_empty="empty"),
        )
        np.testing.assert_allclose(
            mask_to_token_mask(m.astype(bool), g, mode="fraction", on_empty="empty"),
            boxes_to_token_mask(box, g, box_format="xyxy", mode="fraction", on_empty="empty"),
            atol=1e-5,
        )
        np.testing.assert_array_equal(
            mask_to_token_mask(m > 0, g, on_empty="empty"), mask_to_token_mask(m.astype(np.float32) / 255, g, on_empty="empty")
        )


def test_mask_full_image_stretch():
    g = TokenGrid.stretch((97, 61), 4, 4)
    np.testing.assert_allclose(mask_to_token_mask(np.ones((61, 97)), g, mode="fraction"), 1.0, atol=1e-6)
    assert mask_to_token_mask(np.ones((61, 97), bool), g).all()


def test_mask_errors():
    g = TokenGrid(4, 4, (20, 10), (2.8, 2.8), (-14.0, 0.0), (28.0, 28.0))
    with pytest.raises(ValueError, match=r"\(20, 10\).*\(10, 20\)"):
        mask_to_token_mask(np.ones((20, 10)), g)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_token_mask(np.ones((10, 20, 3)), g)
    with pytest.raises(ValueError, match="empty"):
        mask_to_token_mask(np.zeros((10, 20)), g)
    assert not mask_to_token_mask(np.zeros((10, 20)), g, on_empty="empty").any()
    bad = np.ones((10, 20))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mask_to_token_mask(bad, g)
    with pytest.raises(ValueError, match="dtype"):
        mask_to_token_mask(np.full((10, 20), "a"), g)
    with pytest.raises(ValueError, match="mode"):
        mask_to_token_mask(np.ones((10, 20)), g, mode="soft")
    with pytest.raises(ValueError, match="on_empty"):
        mask_to_token_mask(np.ones((10, 20)), g, on_empty="x")
    m = np.zeros((10, 20), bool)
    m[:, :5] = True  # inside the image, cropped away (canvas starts at x = 5)
    with pytest.raises(ValueError, match="crops away"):
        mask_to_token_mask(m, g)
    assert mask_to_token_mask(m, g, mode="fraction", on_empty="empty").sum() == 0


def test_mask_vectorised_is_fast_on_large_images():
    import time

    g = TokenGrid(16, 16, (1600, 1200), (896 / 1600, 896 / 1200), (0.0, 0.0), (896.0, 896.0))
    m = np.zeros((1200, 1600), bool)
    m[100:700, 300:1500] = True
    t = time.perf_counter()
    f = mask_to_token_mask(m, g, mode="fraction")
    assert time.perf_counter() - t < 2.0
    np.testing.assert_allclose(f, boxes_to_token_mask([300, 100, 1500, 700], g, "xyxy", "fraction"), atol=1e-5)


# ---------------------------------------------------------------------- flat helpers
def test_flat_helpers():
    g = TokenGrid.stretch((30, 20), 2, 3)
    flat = np.arange(6)
    grid2d = token_mask_to_grid(flat, g)
    assert grid2d.tolist() == [[0, 1, 2], [3, 4, 5]]
    np.testing.assert_array_equal(grid_to_token_mask(grid2d, g), flat)
    assert rowcol_to_flat(1, 2, g) == 5
    r, c = flat_to_rowcol([0, 4, 5], g)
    assert r.tolist() == [0, 1, 1] and c.tolist() == [0, 1, 2]
    m = indices_to_token_mask([1, 5], g)
    assert m.tolist() == [False, True, False, False, False, True]
    assert token_mask_to_indices(m, g).tolist() == [1, 5]
    with pytest.raises(ValueError, match=r"\[6\]"):
        token_mask_to_grid(np.zeros(5), g)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        grid_to_token_mask(np.zeros((3, 2)), g)
    with pytest.raises(ValueError, match="outside"):
        rowcol_to_flat(2, 0, g)
    with pytest.raises(ValueError, match="outside"):
        flat_to_rowcol(6, g)
    with pytest.raises(ValueError, match="outside"):
        indices_to_token_mask([-1], g)
    assert math.isclose(g.cell_size[0], 10.0)
