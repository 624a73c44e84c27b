"""PaliGemma / PaliGemma 2 (``PaliGemmaForConditionalGeneration``): a square SigLIP patch grid, one token per
patch, placed before ``<bos>`` + prompt; prefix-LM mask (the image and the prompt attend to each other
bidirectionally, generated tokens causally); 1-indexed positions."""

from __future__ import annotations

import math

import torch

from .base import FamilyAdapter


class PaliGemmaAdapter(FamilyAdapter):
    model_types = ("paligemma",)
    family = "paligemma"
    prefix_lm = True

    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        n = getattr(self.config.text_config, "num_image_tokens", None)
        if n is not None and int(n) != side * side:
            raise ValueError(f"text_config.num_image_tokens={n} differs from the vision grid {side}x{side}")
        return side

    def image_spans(self, inputs):
        return self.square_grid_spans(inputs, self.grid_side)

    def position_ids(self, inputs):
        """Generate's positions + 1 (PaliGemma positions are 1-indexed: ``prepare_inputs_for_generation`` and the
        forward's default both add one)."""
        return super().position_ids(inputs) + 1

    def id_derived(self, input_ids, like, appended: int = 0):
        """``token_type_ids`` of the prefix-LM mask: 0 (bidirectional prefix) for the prompt, 1 (causal suffix) for
        the last ``appended`` tokens (answer tokens placed after the prompt, as ``generate`` marks its tokens)."""
        if "token_type_ids" not in like:
            return {}
        ref = like["token_type_ids"]
        tt = torch.zeros(input_ids.shape, dtype=ref.dtype if torch.is_tensor(ref) else torch.long,
                         device=input_ids.device)
        if appended:
            tt[:, -appended:] = 1
        return {"token_type_ids": tt}

    def image_placeholder(self, processor) -> str:
        tok = getattr(processor, "image_token", None)
        return tok or "<image>"

    def image_suffix_text(self, processor) -> str:
        """``<bos>``: the processor puts it right after the last image token."""
        tok = getattr(processor, "tokenizer", None)
        return getattr(tok, "bos_token", None) or ""

    def prompt_end_text(self, processor) -> str:
        """The processor ends every prompt with a newline (the prefix ends there)."""
        return "\n"

    def token_grid(self, processor, image_size, span=None, inputs=None):
        from ..processor_geometry import paligemma_grid

        vc = self.config.vision_config
        ip = getattr(processor, "image_processor", processor)
        grid = paligemma_grid(ip, image_size, patch_size=vc.patch_size, vision_image_size=vc.image_size)
        if grid.rows != self.grid_side or math.isqrt(grid.n_tokens) != self.grid_side:
            raise ValueError(f"processor grid {grid.rows}x{grid.cols} differs from the model's {self.grid_side}")
        return grid
