"""LLaVA-1.5 family (``LlavaForConditionalGeneration``: llava-hf, HuatuoGPT-Vision-7B-hf, LLaVA-Med-hf)."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ImageSpan, several_images_check


class LlavaAdapter(FamilyAdapter):
    model_types = ("llava",)
    family = "llava"

    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def image_spans(self, inputs):
        side = self.grid_side
        n = side * side

        def span(b, i, s, e):
            extra = e - s - n  # "full" strategy keeps CLS as the first token
            if extra not in (0, 1):
                several_images_check(b, e - s, n)
                raise ValueError(f"sample {b}: image run of {e - s} tokens, expected {n} (grid {side}x{side})")
            return ImageSpan(s, e, side, side, torch.arange(s + extra, e), image_index=i)
        return self.spans_from_runs(inputs, span)

    def token_grid(self, processor, image_size, span=None, inputs=None):
        from ..processor_geometry import llava_grid

        vc = self.config.vision_config
        ip = getattr(processor, "image_processor", processor)
        return llava_grid(ip, image_size, patch_size=vc.patch_size, vision_image_size=vc.image_size)
