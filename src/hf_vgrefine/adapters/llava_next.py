"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): base image block + unpadded anyres block with one
newline token per row. The base block (first ``side**2`` tokens) is the default grid; the high-res
block is exposed as a second span with ``block="highres"`` (newline positions excluded)."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ImageSpan


def llava_next_highres_shape(image_hw, pinpoints, tile: int, patch: int) -> tuple[int, int]:
    """(rows, cols) of the unpadded high-res feature grid for an original image of ``(H, W)`` pixels,
    exactly as ``LlavaNextModel.pack_image_features`` builds it."""
    from transformers.models.llava_next.modeling_llava_next import select_best_resolution

    H, W = (int(v) for v in image_hw)
    bh, bw = select_best_resolution((H, W), [list(p) for p in pinpoints])
    side = tile // patch
    ch, cw = (bh // tile) * side, (bw // tile) * side
    if W / H > cw / ch:
        new_h = int(round(H * (cw / W), 7))
        pad = (ch - new_h) // 2
        return ch - 2 * pad, cw
    new_w = int(round(W * (ch / H), 7))
    pad = (cw - new_w) // 2
    return ch, cw - 2 * pad


class LlavaNextAdapter(FamilyAdapter):
    model_types = ("llava_next",)
    family = "llava_next"

    def image_spans(self, inputs, block: str = "base"):
        runs = self.image_runs(inputs["input_ids"])
        self._require_images(runs)
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT inputs need image_sizes (returned by the processor)")
        sizes = torch.as_tensor(sizes).tolist()
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        has_newline = getattr(getattr(self.model, "model", self.model), "image_newline", None) is not None
        k, out = 0, []
        for b, sample in enumerate(runs):
            spans = []
            for s, e in sample:
                rows, cols = llava_next_highres_shape(sizes[k], self.config.image_grid_pinpoints, vc.image_size, vc.patch_size)
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
                                 vision_image_size=vc.image_size)
        return grids[block]
