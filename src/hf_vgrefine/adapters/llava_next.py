"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) and LLaVA-OneVision: base image block + unpadded anyres
block with one newline token per row. Each image is one span whose grid is the base block (first ``side**2``
tokens); the high-res block's positions (newlines excluded), its ``(rows, cols)`` and the newline positions are in
the span's ``extra_positions`` (``"highres"``, ``"highres_grid"``, ``"newlines"``), and its pixel geometry is
``token_grid(..., block="highres")``."""

from __future__ import annotations

import math
import re

import torch

from .base import FamilyAdapter, ImageSpan


def anyres_max_patches(vision_aspect_ratio) -> int | None:
    """``N`` of LLaVA-OneVision's ``vision_aspect_ratio="anyres_max_N"`` (``None`` for LLaVA-NeXT: no cap)."""
    if vision_aspect_ratio is None:
        return None
    m = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if m is None:
        raise ValueError(f"unsupported vision_aspect_ratio {vision_aspect_ratio!r}; expected 'anyres_max_N'")
    return int(m.group(1))


def anyres_downscaled(rows: int, cols: int, side: int, max_num_patches: int | None) -> tuple[int, int]:
    """LLaVA-OneVision's cap on the unpadded high-res grid: above ``max_num_patches`` tiles' worth of tokens (by more
    than 10 % in side), the grid is interpolated down to ``(int(rows // r), int(cols // r))``,
    ``r = sqrt(rows·cols / (max_num_patches·side²))``. ``None``: unchanged (LLaVA-NeXT)."""
    if max_num_patches is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_num_patches * side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def llava_next_highres_shape(image_hw, pinpoints, tile: int, patch: int,
                             max_num_patches: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the unpadded high-res feature grid for an original image of ``(H, W)`` pixels,
    exactly as ``LlavaNextModel.pack_image_features`` builds it (LLaVA-OneVision: then capped at
    ``max_num_patches`` tiles, :func:`anyres_downscaled`)."""
    from transformers.models.llava_next.modeling_llava_next import select_best_resolution

    H, W = (int(v) for v in image_hw)
    bh, bw = select_best_resolution((H, W), [list(p) for p in pinpoints])
    side = tile // patch
    ch, cw = (bh // tile) * side, (bw // tile) * side
    if W / H > cw / ch:
        new_h = int(round(H * (cw / W), 7))
        pad = (ch - new_h) // 2
        rows, cols = ch - 2 * pad, cw
    else:
        new_w = int(round(W * (ch / H), 7))
        pad = (cw - new_w) // 2
        rows, cols = ch, cw - 2 * pad
    return anyres_downscaled(rows, cols, side, max_num_patches)


class LlavaNextAdapter(FamilyAdapter):
    model_types = ("llava_next",)
    family = "llava_next"

    @property
    def max_num_patches(self) -> int | None:
        """Cap on the high-res grid (LLaVA-OneVision's ``anyres_max_N``); ``None``: uncapped (LLaVA-NeXT)."""
        return None

    def image_spans(self, inputs):
        runs = self.image_runs(inputs["input_ids"])
        self._require_images(runs)
        sizes = self.side_input(inputs, "image_sizes", "returned by the processor")
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        has_newline = getattr(getattr(self.model, "model", self.model), "image_newline", None) is not None
        k, out = 0, []
        for b, sample in enumerate(runs):
            spans = []
            for s, e in sample:
                rows, cols = llava_next_highres_shape(sizes[k], self.config.image_grid_pinpoints, vc.image_size,
                                                      vc.patch_size, self.max_num_patches)
                width = cols + (1 if has_newline else 0)
                expected = side * side + rows * width
                if e - s != expected:
                    raise ValueError(f"sample {b}: image run of {e - s} tokens, expected {expected} for image size "
                                     f"{sizes[k]} (base {side}x{side} + high-res {rows}x{cols} with newlines)")
                base = torch.arange(s, s + side * side)
                hr0 = s + side * side
                grid = torch.arange(rows)[:, None] * width + torch.arange(cols)[None, :]
                hr = (hr0 + grid).flatten()
                newlines = hr0 + torch.arange(rows) * width + cols if has_newline else torch.empty(0, dtype=torch.long)
                extra = {"highres": hr, "highres_grid": (rows, cols), "newlines": newlines}
                spans.append(ImageSpan(s, e, side, side, base, image_index=k, block="base", extra_positions=extra))
                k += 1
            out.append(spans)
        return out

    def image_content(self, inputs: dict, b: int) -> dict:
        """``pixel_values[b]`` without the zero patches the processor pads a batch with (the valid count
        follows from ``image_sizes[b]``), and ``image_sizes[b]``."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        out = self.select_images(inputs, [b])
        if "pixel_values" in out and out["pixel_values"].dim() == 5 and "image_sizes" in inputs:
            n = image_size_to_num_patches(torch.as_tensor(inputs["image_sizes"])[b].tolist(),
                                          self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            out["pixel_values"] = out["pixel_values"][:, :n]
        return out

    def token_grid(self, processor, image_size, span=None, inputs=None, block: str = "base"):
        from ..processor_geometry import llava_next_grids

        vc = self.config.vision_config
        ip = getattr(processor, "image_processor", processor)
        grids = llava_next_grids(ip, image_size, self.config.image_grid_pinpoints, patch_size=vc.patch_size,
                                 vision_image_size=vc.image_size, max_num_patches=self.max_num_patches)
        return grids[block]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout (base block, then the
    unpadded high-res block with one newline per row) with the high-res grid capped at ``anyres_max_N`` tiles
    (``config.vision_aspect_ratio``) and a SigLIP tower (``vision_feature_select_strategy="full"``: no CLS)."""

    model_types = ("llava_onevision",)
    family = "llava_onevision"

    @property
    def max_num_patches(self) -> int | None:
        return anyres_max_patches(getattr(self.config, "vision_aspect_ratio", None))
