"""Build :class:`~hf_vgrefine.geometry.TokenGrid` objects from real HF image-processor settings.

Every function reads the geometry-relevant settings from the loaded image processor (``size``,
``crop_size``, ``do_pad``, ``do_resize``, ``do_center_crop``, ``patch_size``, ``merge_size``, ...)
and the original image size, and reproduces the processor's size arithmetic (docs/data_formats.md §
Processor geometry per family). Nothing is hard-coded (no 336 / 576 / 24).

* ``image_size`` is always ``(W0, H0)`` (PIL order); a PIL image is accepted too.
* The processor may be the torchvision class (``LlavaImageProcessor``...) or the PIL-backend
  class (``LlavaImageProcessorPil``...), or a multimodal ``ProcessorMixin`` holding one
  (``processor.image_processor`` is used).
* A processor of the wrong family raises ``TypeError``; unsupported or inconsistent settings raise
  ``ValueError`` naming the setting and how to fix it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .geometry import TokenGrid

__all__ = [
    "llava_grid",
    "paligemma_grid",
    "pixtral_grid",
    "internvl_grids",
    "internvl_tile_layout",
    "internvl_tile_positions",
    "qwen_vl_grid",
    "gemma3_grid",
    "llava_next_grids",
    "llava_next_highres_positions",
    "smart_resize",
    "select_best_resolution",
]


# ---------------------------------------------------------------------- generic helpers
def _unwrap(image_processor: Any) -> Any:
    if image_processor is None:
        raise TypeError("image_processor is None; pass the loaded image processor (or the multimodal processor)")
    if not hasattr(image_processor, "size") and hasattr(image_processor, "image_processor"):
        return image_processor.image_processor
    return image_processor


def _check_family(ip: Any, accepted: tuple[str, ...], func: str, pattern: str | None = None) -> None:
    names = [c.__name__ for c in type(ip).__mro__]
    bases = {re.sub(r"(Pil|Fast)$", "", n) for n in names}
    if bases & set(accepted):
        return
    if pattern is not None and any(re.fullmatch(pattern, n) for n in names):
        return
    raise TypeError(
        f"{func}: unsupported image processor class {type(ip).__name__}; expected one of "
        f"{sorted(accepted)} (torchvision or *Pil backend). Use the builder of the matching model family."
    )


def _image_wh(image_size: Any) -> tuple[int, int]:
    if hasattr(image_size, "size") and hasattr(image_size, "mode"):  # PIL image
        image_size = image_size.size
    try:
        w, h = image_size
        fw, fh = float(w), float(h)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (W0, H0) (or a PIL image), got {image_size!r}") from None
    if not (fw > 0 and fh > 0 and fw == int(fw) and fh == int(fh)):
        raise ValueError(f"image_size must be positive integers (W0, H0), got {image_size!r}")
    return int(fw), int(fh)


def _pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    if f <= 0 or f != int(f):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(f)


def _sz(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _backend(ip: Any) -> str:
    b = getattr(ip, "backend", None)
    if isinstance(b, str):
        return b
    return "torchvision" if type(ip).__name__.endswith("Fast") else "pil"


class _Affine:
    """Running affine map original -> current pixels: cur = orig·s + o; current size (w, h)."""

    def __init__(self, w: int, h: int) -> None:
        self.sx = self.sy = 1.0
        self.ox = self.oy = 0.0
        self.w, self.h = w, h

    def shift(self, dx: float, dy: float, new_w: int, new_h: int) -> None:
        self.ox += dx
        self.oy += dy
        self.w, self.h = new_w, new_h

    def resize(self, new_w: int, new_h: int) -> None:
        fx, fy = new_w / self.w, new_h / self.h
        self.sx, self.sy, self.ox, self.oy = self.sx * fx, self.sy * fy, self.ox * fx, self.oy * fy
        self.w, self.h = new_w, new_h

    def center_crop(self, crop_w: int, crop_h: int, backend: str) -> None:
        """Centre crop as the backends do (pads with zeros when the crop is larger than the image)."""

        def axis(cur: int, crop: int) -> float:
            if crop <= cur:
                return -float(int((cur - crop) / 2))
            # image smaller than the crop: padded, PIL/numpy pads ceil((crop-cur)/2) on top/left,
            # torchvision (crop-cur)//2
            return float(math.ceil((crop - cur) / 2) if backend == "pil" else (crop - cur) // 2)

        self.shift(axis(self.w, crop_w), axis(self.h, crop_h), crop_w, crop_h)

    def grid(self, rows: int, cols: int, image_wh: tuple[int, int]) -> TokenGrid:
        return TokenGrid(rows, cols, image_wh, (self.sx, self.sy), (self.ox, self.oy), (float(self.w), float(self.h)))


def _resized_hw(h: int, w: int, size: Any, who: str) -> tuple[int, int]:
    """Output (H, W) of the backends' ``resize`` for a ``size`` dict (shortest/longest edge, h/w, max h/w)."""
    se, le = _sz(size, "shortest_edge"), _sz(size, "longest_edge")
    hh, ww = _sz(size, "height"), _sz(size, "width")
    mh, mw = _sz(size, "max_height"), _sz(size, "max_width")
    if se and le:
        # shortest edge to `se`, longest edge capped at `le`, aspect preserved (int truncation)
        raw = None
        if max(h, w) / min(h, w) * se > le:
            raw = le * min(h, w) / max(h, w)
            se = int(round(raw))
        if (h <= w and h == se) or (w <= h and w == se):
            return h, w
        base = raw if raw is not None else se
        if w < h:
            return int(base * h / w), se
        return se, int(base * w / h)
    if se:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(se * long / short)
        return (new_long, se) if w <= h else (se, new_long)
    if mh and mw:
        s = min(mh / h, mw / w)
        return int(h * s), int(w * s)
    if hh and ww:
        return int(hh), int(ww)
    raise ValueError(
        f"{who}: unsupported image processor size {size!r}; expected 'shortest_edge' (optionally with "
        "'longest_edge'), 'height'+'width' or 'max_height'+'max_width'"
    )


def _crop_wh(crop_size: Any, who: str) -> tuple[int, int]:
    ch, cw = _sz(crop_size, "height"), _sz(crop_size, "width")
    if not ch or not cw:
        raise ValueError(f"{who}: do_center_crop=True needs crop_size with 'height' and 'width', got {crop_size!r}")
    return int(cw), int(ch)


def _vision_side(vision_image_size: Any) -> int:
    if isinstance(vision_image_size, (tuple, list)):
        if len(vision_image_size) != 2 or int(vision_image_size[0]) != int(vision_image_size[1]):
            raise ValueError(f"vision_image_size must be an int (square tower input), got {vision_image_size!r}")
        vision_image_size = vision_image_size[0]
    return _pos_int(vision_image_size, "vision_image_size")


def _cells(vision: int, patch: int, who: str) -> int:
    if vision % patch:
        raise ValueError(
            f"{who}: vision_image_size {vision} is not a multiple of patch_size {patch}; pass the vision tower's "
            "config.vision_config.image_size and patch_size"
        )
    return vision // patch


# ---------------------------------------------------------------------- LLaVA-1.5
def llava_grid(image_processor: Any, image_size: Any, patch_size: int, vision_image_size: int) -> TokenGrid:
    """TokenGrid of a LLaVA-1.5 image (``LlavaImageProcessor`` / ``CLIPImageProcessor`` and *Pil).

    Pipeline (read from the processor): optional pad-to-square (``do_pad``, Llava classes only;
    offset ``((S-W0)//2, (S-H0)//2)``), resize (``size``: shortest edge -> long side
    ``int(S·long/short)``, or height/width stretch), optional centre crop (``crop_size``, top/left
    ``int((H'-ch)/2)``). The result must be the vision tower input ``vision_image_size²``; the grid
    is ``(vision/patch)²`` patch tokens (CLS excluded), cell = ``patch_size`` canvas pixels.

    Args:
        image_processor: the loaded image processor (or a processor holding one).
        image_size: ``(W0, H0)`` original size (or a PIL image).
        patch_size: vision tower patch size (``config.vision_config.patch_size``).
        vision_image_size: vision tower input side (``config.vision_config.image_size``).
    """
    who = "llava_grid"
    ip = _unwrap(image_processor)
    _check_family(ip, ("LlavaImageProcessor", "CLIPImageProcessor", "SiglipImageProcessor"), who)
    return _square_tower_grid(ip, image_size, patch_size, vision_image_size, who)


def _square_tower_grid(ip: Any, image_size: Any, patch_size: int, vision_image_size: int, who: str) -> TokenGrid:
    """Pad-to-square / resize / centre-crop pipeline into a square tower input, one token per patch."""
    w0, h0 = _image_wh(image_size)
    patch = _pos_int(patch_size, "patch_size")
    vision = _vision_side(vision_image_size)
    n = _cells(vision, patch, who)
    aff = _Affine(w0, h0)
    if getattr(ip, "do_pad", False):
        if not hasattr(ip, "pad_to_square"):
            raise ValueError(
                f"{who}: {type(ip).__name__} has do_pad=True, which pads batches at the bottom/right (not "
                "pad-to-square); set do_pad=False or use LlavaImageProcessor(do_pad=True) for pad-to-square"
            )
        s = max(w0, h0)
        aff.shift((s - w0) // 2, (s - h0) // 2, s, s)
    if getattr(ip, "do_resize", True):
        nh, nw = _resized_hw(aff.h, aff.w, getattr(ip, "size", None), who)
        aff.resize(nw, nh)
    if getattr(ip, "do_center_crop", False):
        cw, ch = _crop_wh(getattr(ip, "crop_size", None), who)
        aff.center_crop(cw, ch, _backend(ip))
    if (aff.w, aff.h) != (vision, vision):
        raise ValueError(
            f"{who}: the processor turns a {w0}x{h0} (WxH) image into {aff.w}x{aff.h}, but the vision tower expects "
            f"{vision}x{vision}; check size/crop_size/do_center_crop against config.vision_config.image_size"
        )
    return aff.grid(n, n, (w0, h0))


# ---------------------------------------------------------------------- PaliGemma
def paligemma_grid(image_processor: Any, image_size: Any, patch_size: int, vision_image_size: int) -> TokenGrid:
    """TokenGrid of a PaliGemma / PaliGemma 2 image (``SiglipImageProcessor`` and *Pil).

    The SigLIP processor stretches the image to ``size = {"height", "width"}`` (no crop, no pad), which must be
    the tower input ``vision_image_size²``; every patch is one image token (no pooling), so the grid is
    ``(vision/patch)²`` tokens (``config.text_config.num_image_tokens``), cell = ``patch_size`` canvas pixels.

    Args:
        image_processor: the loaded ``SiglipImageProcessor`` (or a ``PaliGemmaProcessor`` holding one).
        image_size: ``(W0, H0)`` original size (or a PIL image).
        patch_size, vision_image_size: ``config.vision_config.patch_size`` and ``.image_size``.
    """
    who = "paligemma_grid"
    ip = _unwrap(image_processor)
    _check_family(ip, ("SiglipImageProcessor",), who)
    if getattr(ip, "do_center_crop", False):
        raise ValueError(f"{who}: do_center_crop=True is not a PaliGemma setting (the SigLIP processor stretches); "
                         "set do_center_crop=False")
    return _square_tower_grid(ip, image_size, patch_size, vision_image_size, who)


# ---------------------------------------------------------------------- InternVL
def _tile_side(ip: Any, who: str) -> tuple[int, int]:
    size = getattr(ip, "size", None)
    hh, ww = _sz(size, "height"), _sz(size, "width")
    if not hh or not ww:
        raise ValueError(f"{who}: InternVL processors resize tiles to size={{'height', 'width'}}, got {size!r}")
    return int(ww), int(hh)


def internvl_tile_layout(image_processor: Any, image_size: Any) -> tuple[int, int]:
    """``(n_cols, n_rows)`` of the tiles the processor cuts an image of ``(W0, H0)`` pixels into: ``(1, 1)`` without
    ``crop_to_patches``; else the arrangement of ``min_patches..max_patches`` tiles whose aspect ratio is closest to
    the image's (ties: more tiles while the image area exceeds half the tiles' area), as ``GotOcr2ImageProcessor``
    chooses it."""
    who = "internvl_tile_layout"
    ip = _unwrap(image_processor)
    _check_family(ip, ("GotOcr2ImageProcessor",), who)
    w0, h0 = _image_wh(image_size)
    lo, hi = int(getattr(ip, "min_patches", 1) or 1), int(getattr(ip, "max_patches", 1) or 1)
    if not getattr(ip, "crop_to_patches", False) or hi <= 1:
        return 1, 1
    tw, th = _tile_side(ip, who)
    layouts = sorted([(c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi],
                     key=lambda cr: cr[0] * cr[1])     # stable: columns outer, rows inner within a tile count
    aspect, area = w0 / h0, w0 * h0
    best, best_diff = (1, 1), float("inf")
    for c, r in layouts:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * th * tw * c * r:
            best = (c, r)
    return best


def internvl_grids(image_processor: Any, image_size: Any, patch_size: int, vision_image_size: int,
                   downsample_ratio: float) -> dict[str, Any]:
    """TokenGrids of an InternVL image (``GotOcr2ImageProcessor`` and *Pil): ``{"global": ..., "tiles": ...,
    "layout": (n_cols, n_rows), "tile_side": side}``.

    One tile is the tower input ``vision_image_size²`` cut into ``patch_size`` patches; the model's pixel shuffle
    merges ``1/downsample_ratio`` x ``1/downsample_ratio`` patches into one token, row-major, so a tile is a
    ``side x side`` token grid, ``side = vision/patch·downsample_ratio`` (cell ``patch/downsample_ratio`` px).

    * ``global``: the whole image stretched to one tile: the single tile without ``crop_to_patches`` (or when one
      tile is chosen), else the thumbnail the processor appends after the tiles.
    * ``tiles``: with ``n_cols x n_rows > 1`` tiles, the image stretched to ``(n_cols·S, n_rows·S)`` and cut into
      tiles: the mosaic grid ``(n_rows·side) x (n_cols·side)`` (the sequence lists it tile by tile:
      :func:`internvl_tile_positions` gives the row-major order); ``None`` for a single tile.
    """
    who = "internvl_grids"
    ip = _unwrap(image_processor)
    _check_family(ip, ("GotOcr2ImageProcessor",), who)
    w0, h0 = _image_wh(image_size)
    patch = _pos_int(patch_size, "patch_size")
    vision = _vision_side(vision_image_size)
    n = _cells(vision, patch, who)
    inv = 1.0 / float(downsample_ratio)
    if inv != int(inv) or n % int(inv):
        raise ValueError(f"{who}: downsample_ratio {downsample_ratio} must be 1/k with k dividing the {n} patches "
                         "per tile side")
    side = n // int(inv)
    if not getattr(ip, "do_resize", True):
        raise ValueError(f"{who}: do_resize=False keeps the image size, which the InternVL tower (fixed "
                         f"{vision}x{vision} input) does not take; enable do_resize")
    tw, th = _tile_side(ip, who)
    if (tw, th) != (vision, vision):
        raise ValueError(f"{who}: the processor's tile size {tw}x{th} differs from the vision tower input "
                         f"{vision}x{vision}; set size={{'height': {vision}, 'width': {vision}}}")
    glob = _Affine(w0, h0)
    glob.resize(vision, vision)
    cols, rows = internvl_tile_layout(ip, (w0, h0))
    tiles = None
    if cols * rows > 1:
        mosaic = _Affine(w0, h0)
        mosaic.resize(cols * vision, rows * vision)
        tiles = mosaic.grid(rows * side, cols * side, (w0, h0))
    return {"global": glob.grid(side, side, (w0, h0)), "tiles": tiles, "layout": (cols, rows), "tile_side": side}


def internvl_tile_positions(layout: tuple[int, int], side: int) -> np.ndarray:
    """Offsets (int64 ``[n_rows·side · n_cols·side]``), in row-major order of the tile mosaic, of its tokens inside
    the image block, which lists tile after tile (row-major tiles, each ``side x side`` row-major)."""
    cols, rows = (int(v) for v in layout)
    r, c = np.divmod(np.arange(rows * side * cols * side, dtype=np.int64), cols * side)
    tile = (r // side) * cols + (c // side)
    return tile * side * side + (r % side) * side + (c % side)


# ---------------------------------------------------------------------- Pixtral / Mistral 3
def pixtral_grid(image_processor: Any, image_size: Any, patch_size: int, merge_size: int = 1) -> TokenGrid:
    """TokenGrid of a Mistral 3 / Pixtral image (``PixtralImageProcessor`` and *Pil).

    The processor scales the image down (never up) so that it fits ``size["longest_edge"]`` (or ``height`` x
    ``width``): ``r = max(H0/max_h, W0/max_w)``, sides ``floor(side / r)`` when ``r > 1``; then rounds each side up
    to whole tokens of ``f = patch_size·merge_size`` pixels (``ceil(side / f)`` tokens) and stretches the image to
    that size. Grid ``(H'/f) x (W'/f)``, cell = ``f`` canvas pixels; batch padding (bottom/right) is dropped by the
    tower (``image_sizes``).

    Args:
        image_processor: the loaded image processor (or a ``PixtralProcessor`` holding one).
        image_size: ``(W0, H0)`` original size (or a PIL image).
        patch_size: the vision tower's ``patch_size``; merge_size: the model's ``spatial_merge_size`` (Mistral 3: 2,
            Pixtral: 1). The processor is called with ``patch_size·merge_size`` (as ``PixtralProcessor`` does).
    """
    who = "pixtral_grid"
    ip = _unwrap(image_processor)
    _check_family(ip, ("PixtralImageProcessor",), who)
    w0, h0 = _image_wh(image_size)
    f = _pos_int(patch_size, "patch_size") * _pos_int(merge_size, "merge_size")
    h, w = h0, w0
    if getattr(ip, "do_resize", True):
        size = getattr(ip, "size", None)
        le = _sz(size, "longest_edge")
        max_h, max_w = (le, le) if le else (_sz(size, "height"), _sz(size, "width"))
        if not max_h or not max_w:
            raise ValueError(f"{who}: unsupported size {size!r}; expected 'longest_edge' or 'height'+'width'")
        ratio = max(h0 / max_h, w0 / max_w)
        if ratio > 1:
            h, w = int(math.floor(h0 / ratio)), int(math.floor(w0 / ratio))
        h, w = ((h - 1) // f + 1) * f, ((w - 1) // f + 1) * f
    elif h0 % f or w0 % f:
        raise ValueError(f"{who}: do_resize=False needs image sides that are multiples of patch_size*merge_size={f}, "
                         f"got {w0}x{h0} (WxH); enable do_resize")
    aff = _Affine(w0, h0)
    aff.resize(w, h)
    return aff.grid(h // f, w // f, (w0, h0))


# ---------------------------------------------------------------------- Qwen-VL
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL resize target ``(H', W')``: multiples of ``factor``, area within [min, max] pixels.

    Each side is rounded to the nearest multiple of ``factor``; if the area exceeds ``max_pixels``
    both sides are divided by ``sqrt(H·W/max_pixels)`` and floored to multiples of ``factor``
    (at least ``factor``); if it is below ``min_pixels`` they are multiplied by
    ``sqrt(min_pixels/(H·W))`` and ceiled. Aspect ratios above 200 are rejected.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200, which Qwen-VL rejects"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return int(h), int(w)


def _qwen_pixels(ip: Any, who: str) -> tuple[int, int]:
    size = getattr(ip, "size", None)
    lo = getattr(ip, "min_pixels", None)
    hi = getattr(ip, "max_pixels", None)
    lo = lo if lo is not None else (_sz(size, "shortest_edge") or _sz(size, "min_pixels"))
    hi = hi if hi is not None else (_sz(size, "longest_edge") or _sz(size, "max_pixels"))
    if not lo or not hi:
        raise ValueError(
            f"{who}: cannot read min/max pixels from the processor; set "
            "size={'shortest_edge': min_pixels, 'longest_edge': max_pixels}"
        )
    return int(lo), int(hi)


def qwen_vl_grid(
    image_processor: Any, image_size: Any, merge_size: int | None = None, grid_thw: Any = None
) -> TokenGrid:
    """TokenGrid of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL image (``Qwen2VLImageProcessor`` and *Pil).

    ``smart_resize`` with ``factor = patch_size·merge_size`` and min/max pixels from the
    processor (``min_pixels``/``max_pixels`` attributes if set, else
    ``size = {"shortest_edge", "longest_edge"}``); independent axis scales ``W'/W0``, ``H'/H0``;
    LLM grid ``(H'/(patch·merge), W'/(patch·merge))``, cell = ``patch·merge`` canvas pixels.

    Args:
        image_processor: the loaded image processor (patch 14 for Qwen2/2.5-VL, 16 for Qwen3-VL).
        image_size: ``(W0, H0)`` original size (or a PIL image).
        merge_size: the model's ``vision_config.spatial_merge_size`` (default: the processor's);
            must equal the processor's ``merge_size``.
        grid_thw: optional ``image_grid_thw`` returned by the processor (``[t, h, w]`` or
            ``[[t, h, w]]`` in patches); checked against the computed grid.
    """
    who = "qwen_vl_grid"
    ip = _unwrap(image_processor)
    _check_family(ip, ("Qwen2VLImageProcessor",), who, pattern=r"Qwen\d.*VL.*ImageProcessor\w*")
    w0, h0 = _image_wh(image_size)
    patch = _pos_int(getattr(ip, "patch_size", None), "image_processor.patch_size")
    ip_merge = _pos_int(getattr(ip, "merge_size", None), "image_processor.merge_size")
    merge = ip_merge if merge_size is None else _pos_int(merge_size, "merge_size")
    if merge != ip_merge:
        raise ValueError(
            f"{who}: merge_size {merge} (model spatial_merge_size) differs from the processor's merge_size "
            f"{ip_merge}; the processor must be configured for the model"
        )
    factor = patch * merge
    if getattr(ip, "do_resize", True):
        lo, hi = _qwen_pixels(ip, who)
        h, w = smart_resize(h0, w0, factor, lo, hi)
    else:
        if h0 % factor or w0 % factor:
            raise ValueError(
                f"{who}: do_resize=False needs image sides that are multiples of patch_size*merge_size={factor}, "
                f"got {w0}x{h0} (WxH); enable do_resize"
            )
        h, w = h0, w0
    gh, gw = h // patch, w // patch
    if grid_thw is not None:
        g = np.asarray(grid_thw).reshape(-1)
        if g.size != 3:
            raise ValueError(
                f"{who}: grid_thw must describe one image ([t, h, w] or [[t, h, w]]), got shape "
                f"{np.asarray(grid_thw).shape}; multi-image prompts are not supported"
            )
        t, gh_p, gw_p = (int(v) for v in g)
        if t != 1 or (gh_p, gw_p) != (gh, gw):
            raise ValueError(
                f"{who}: image_grid_thw {[t, gh_p, gw_p]} does not match the geometry computed from the "
                f"processor settings for a {w0}x{h0} (WxH) image, [1, {gh}, {gw}]; the image was processed with "
                "other settings (size/min_pixels/max_pixels) or another image size"
            )
    aff = _Affine(w0, h0)
    aff.resize(w, h)
    return aff.grid(gh // merge, gw // merge, (w0, h0))


# ---------------------------------------------------------------------- Gemma 3
def gemma3_grid(image_processor: Any, image_size: Any, tokens_per_image: int) -> TokenGrid:
    """TokenGrid of a Gemma 3 / MedGemma image (``Gemma3ImageProcessor`` and *Pil).

    The image is stretched to ``size = {"height", "width"}``; the projector pools the SigLIP
    patch grid to ``sqrt(tokens_per_image)²`` tokens (``config.mm_tokens_per_image``). With
    pan-and-scan enabled the grid describes the first (full-image) block only.
    """
    who = "gemma3_grid"
    ip = _unwrap(image_processor)
    _check_family(ip, ("Gemma3ImageProcessor",), who)
    w0, h0 = _image_wh(image_size)
    n = _pos_int(tokens_per_image, "tokens_per_image")
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{who}: tokens_per_image={n} is not a perfect square (config.mm_tokens_per_image)")
    aff = _Affine(w0, h0)
    if getattr(ip, "do_resize", True):
        size = getattr(ip, "size", None)
        hh, ww = _sz(size, "height"), _sz(size, "width")
        if not hh or not ww:
            raise ValueError(f"{who}: Gemma 3 processors stretch to size={{'height', 'width'}}, got {size!r}")
        aff.resize(int(ww), int(hh))
    return aff.grid(side, side, (w0, h0))


# ---------------------------------------------------------------------- LLaVA-NeXT
def select_best_resolution(original_hw: tuple[int, int], pinpoints: Any) -> tuple[int, int]:
    """LLaVA-NeXT pinpoint choice ``(h, w)`` for an ``(H0, W0)`` image.

    Maximises the effective resolution ``min(int(W0·s)·int(H0·s), W0·H0)`` with
    ``s = min(w/W0, h/H0)``, ties broken by the least wasted area ``h·w - effective``; the first
    pinpoint wins remaining ties.
    """
    h0, w0 = original_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        s = min(pw / w0, ph / h0)
        eff = min(int(w0 * s) * int(h0 * s), w0 * h0)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    if best is None:
        raise ValueError(f"no usable pinpoint in {pinpoints!r}")
    return best


def _pinpoints(value: Any, who: str) -> list[tuple[int, int]]:
    try:
        pts = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError):
        raise ValueError(f"{who}: image_grid_pinpoints must be a list of [height, width] pairs, got {value!r}") from None
    if not pts or any(a <= 0 or b <= 0 for a, b in pts):
        raise ValueError(f"{who}: image_grid_pinpoints must be non-empty positive [height, width] pairs, got {value!r}")
    return pts


def llava_next_grids(
    image_processor: Any,
    image_size: Any,
    image_grid_pinpoints: Any,
    patch_size: int,
    vision_image_size: int,
    max_num_patches: int | None = None,
) -> dict[str, TokenGrid]:
    """TokenGrids of a LLaVA-NeXT / LLaVA-OneVision (anyres) image: ``{"base": ..., "highres": ...}``.

    * ``base``: the image stretched to the processor's base size (then resized/centre-cropped as
      the processor does), which must be the tower input ``vision_image_size²``; grid
      ``(vision/patch)²``.
    * ``highres``: ``select_best_resolution`` -> aspect-preserving resize into the pinpoint
      (limiting side exact, other ``min(ceil(side·s), target)``) -> centre paste
      (``(target-new)//2``) -> ``vision_image_size`` tiles -> the model's ``unpad_image``
      (``pad = (current - int(round(orig·scale, 7))) // 2`` feature rows/cols removed on both
      sides). ``rows, cols`` are the unpadded feature grid of ``pack_image_features``; offsets
      include the paste minus the unpad offset; cell = ``patch_size`` canvas pixels. In the
      sequence the block has ``rows·(cols+1)`` tokens when the model has ``image_newline``
      (see :func:`llava_next_highres_positions`).

    Args:
        image_processor: ``LlavaNextImageProcessor`` (or *Pil).
        image_size: ``(W0, H0)`` original size (or a PIL image).
        image_grid_pinpoints: the model's ``config.image_grid_pinpoints`` (``[h, w]`` pairs); ``None``
            uses the processor's. Must equal the processor's pinpoints.
        patch_size, vision_image_size: the vision tower's ``patch_size`` and ``image_size``.
        max_num_patches: LLaVA-OneVision's ``anyres_max_N`` cap (``config.vision_aspect_ratio``): a larger unpadded
            grid is interpolated down to ``(int(rows // r), int(cols // r))`` tokens over the same canvas
            (``r = sqrt(rows·cols / (N·side²))``, applied when ``r > 1.1``); ``None`` for LLaVA-NeXT.
    """
    who = "llava_next_grids"
    ip = _unwrap(image_processor)
    _check_family(ip, ("LlavaNextImageProcessor", "LlavaOnevisionImageProcessor"), who)
    w0, h0 = _image_wh(image_size)
    patch = _pos_int(patch_size, "patch_size")
    vision = _vision_side(vision_image_size)
    n = _cells(vision, patch, who)
    ip_pts = getattr(ip, "image_grid_pinpoints", None)
    if image_grid_pinpoints is None:
        if ip_pts is None:
            raise ValueError(f"{who}: no image_grid_pinpoints given and the processor has none")
        image_grid_pinpoints = ip_pts
    pts = _pinpoints(image_grid_pinpoints, who)
    if ip_pts is not None and _pinpoints(ip_pts, who) != pts:
        raise ValueError(
            f"{who}: image_grid_pinpoints {pts} (model config) differ from the processor's {list(ip_pts)}; the "
            "processor would tile the image differently from what the model unpacks"
        )
    size = getattr(ip, "size", None)
    do_resize = getattr(ip, "do_resize", True)
    do_crop = getattr(ip, "do_center_crop", False)
    crop = getattr(ip, "crop_size", None)
    backend = _backend(ip)

    # --- base block: stretch to the base size, then the per-patch resize / centre crop
    if _sz(size, "height") and _sz(size, "width"):
        bh, bw = int(_sz(size, "height")), int(_sz(size, "width"))
    elif _sz(size, "shortest_edge"):
        bh = bw = int(_sz(size, "shortest_edge"))
    else:
        raise ValueError(f"{who}: unsupported size {size!r}; expected 'shortest_edge' or 'height'+'width'")
    base = _Affine(w0, h0)
    base.resize(bw, bh)
    if do_resize:
        rh, rw = _resized_hw(base.h, base.w, size, who)
        base.resize(rw, rh)
    if do_crop:
        base.center_crop(*_crop_wh(crop, who), backend)
    if (base.w, base.h) != (vision, vision):
        raise ValueError(
            f"{who}: the base image becomes {base.w}x{base.h} but the vision tower expects {vision}x{vision}; "
            "check size/crop_size against config.vision_config.image_size"
        )

    # --- tiles: side P as the processor computes it; the per-tile pipeline must be the identity
    if _sz(crop, "height"):
        tile = int(_sz(crop, "height"))
    elif _sz(size, "height"):
        tile = int(_sz(size, "height"))
    else:
        tile = int(_sz(size, "shortest_edge"))
    t = _Affine(tile, tile)
    if do_resize:
        rh, rw = _resized_hw(t.h, t.w, size, who)
        t.resize(rw, rh)
    if do_crop:
        t.center_crop(*_crop_wh(crop, who), backend)
    if tile != vision or (t.w, t.h) != (tile, tile) or (t.sx, t.sy, t.ox, t.oy) != (1.0, 1.0, 0.0, 0.0):
        raise ValueError(
            f"{who}: unsupported processor settings: high-res tiles of {tile}px are resized/cropped to "
            f"{t.w}x{t.h} (vision tower input {vision}); only tile == size == crop_size == vision_image_size "
            "is supported"
        )

    best_h, best_w = select_best_resolution((h0, w0), pts)
    if best_h % vision or best_w % vision:
        raise ValueError(
            f"{who}: selected pinpoint {best_h}x{best_w} (HxW) is not a multiple of the tile size {vision}"
        )
    s_w, s_h = best_w / w0, best_h / h0
    if s_w < s_h:
        new_w, new_h = best_w, min(math.ceil(h0 * s_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(w0 * s_h), best_w)
    paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2

    cur_h, cur_w = (best_h // vision) * n, (best_w // vision) * n  # feature grid before unpadding
    pad_r = pad_c = 0
    if w0 / h0 > cur_w / cur_h:
        kept = int(round(h0 * (cur_w / w0), 7))
        pad_r = (cur_h - kept) // 2
    else:
        kept = int(round(w0 * (cur_h / h0), 7))
        pad_c = (cur_w - kept) // 2
    rows, cols = cur_h - 2 * pad_r, cur_w - 2 * pad_c
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{who}: image {w0}x{h0} unpads to an empty feature grid ({rows}x{cols})")
    hi = _Affine(w0, h0)
    hi.resize(new_w, new_h)
    hi.shift(paste_x - pad_c * patch, paste_y - pad_r * patch, cols * patch, rows * patch)
    from .adapters.llava_next import anyres_downscaled

    rows, cols = anyres_downscaled(rows, cols, n, max_num_patches)   # same canvas, coarser cells
    return {"base": base.grid(n, n, (w0, h0)), "highres": hi.grid(rows, cols, (w0, h0))}


def llava_next_highres_positions(grid: TokenGrid, has_newline: bool = True) -> np.ndarray:
    """Offsets (int64 ``[rows·cols]``) of the high-res grid tokens inside the high-res block.

    Token ``(r, c)`` sits at ``r·(cols+1) + c`` when one ``image_newline`` follows every row
    (``has_newline=True``), else at ``r·cols + c``. Add the start of the high-res block
    (``span start + base tokens``) for absolute positions.
    """
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a TokenGrid, got {type(grid).__name__}")
    r, c = np.divmod(np.arange(grid.n_tokens, dtype=np.int64), grid.cols)
    return r * (grid.cols + (1 if has_newline else 0)) + c
