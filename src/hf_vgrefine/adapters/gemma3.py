"""Gemma 3 / MedGemma (``Gemma3ForConditionalGeneration``): pooled square grid, bidirectional image block."""

from __future__ import annotations

import math

from .base import FamilyAdapter


class Gemma3Adapter(FamilyAdapter):
    model_types = ("gemma3",)
    family = "gemma3"

    @property
    def grid_side(self) -> int:
        n = int(self.config.mm_tokens_per_image)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"mm_tokens_per_image={n} is not a square; cannot form a token grid")
        return side

    def image_spans(self, inputs):
        # pan-and-scan crops follow the full image as further blocks; block 0 is the full image
        return self.square_grid_spans(inputs, self.grid_side, later_block="crop")

    def image_suffix_text(self, processor) -> str:
        """Text the processor inserts right after the image tokens (``<eoi>`` + blank line)."""
        full = getattr(processor, "full_image_sequence", None)
        tok = getattr(processor, "image_token", None)
        if full and tok and tok in full:
            return full[full.rindex(tok) + len(tok):]
        return ""

    def image_placeholder(self, processor) -> str:
        return getattr(processor, "boi_token", None) or "<start_of_image>"

    def token_grid(self, processor, image_size, span=None, inputs=None):
        from ..processor_geometry import gemma3_grid

        ip = getattr(processor, "image_processor", processor)
        return gemma3_grid(ip, image_size, tokens_per_image=int(self.config.mm_tokens_per_image))
