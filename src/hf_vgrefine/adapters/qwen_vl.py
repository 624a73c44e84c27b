"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (Lingshu, MedVLM-R1, HuatuoGPT-Vision-Qwen2.5VL): ``image_grid_thw``
gives each image's patch grid; the LLM grid is that grid divided by ``spatial_merge_size``."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ImageSpan


class QwenVLAdapter(FamilyAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    family = "qwen_vl"
    explicit_position_ids = False

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def image_spans(self, inputs):
        runs = self.image_runs(inputs["input_ids"])
        self._require_images(runs)
        thw = self.side_input(inputs, "image_grid_thw", "returned by the processor together with pixel_values")
        m = self.merge_size
        k = 0
        out = []
        for b, sample in enumerate(runs):
            spans = []
            for i, (s, e) in enumerate(sample):
                if k >= len(thw):
                    raise ValueError(f"more image blocks in input_ids than rows in image_grid_thw ({len(thw)})")
                t, h, w = thw[k]
                rows, cols = h // m, w // m
                if t != 1 or rows * cols != e - s:
                    raise ValueError(f"sample {b}, image {i}: {e - s} image tokens but image_grid_thw={thw[k]} "
                                     f"(merge {m}) gives {t}x{rows}x{cols}; videos/multi-frame inputs are not supported")
                spans.append(ImageSpan(s, e, rows, cols, torch.arange(s, e), image_index=k))
                k += 1
            out.append(spans)
        if k != len(thw):
            raise ValueError(f"image_grid_thw has {len(thw)} rows but input_ids hold {k} image blocks")
        return out

    def per_image_rows(self, key, inputs):
        """``pixel_values`` holds every image's patches flattened: ``t*h*w`` rows per image (``image_grid_thw``)."""
        thw = inputs.get("image_grid_thw")
        if key != "pixel_values" or thw is None:
            return None
        return torch.as_tensor(thw).prod(-1).tolist()

    def position_ids(self, inputs):
        """M-RoPE position ids ``[3, B, T]`` (computed without touching the model's cached rope deltas)."""
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = (inputs["input_ids"] == self.image_token_id).int()
        pos, _ = self.model.model.get_rope_index(inputs["input_ids"], mm, image_grid_thw=inputs.get("image_grid_thw"),
                                                 attention_mask=inputs.get("attention_mask"))
        return pos

    def token_grid(self, processor, image_size, span=None, inputs=None):
        from ..processor_geometry import qwen_vl_grid

        ip = getattr(processor, "image_processor", processor)
        thw = None
        if span is not None and inputs is not None and inputs.get("image_grid_thw") is not None:
            thw = torch.as_tensor(inputs["image_grid_thw"])[span.image_index].tolist()
        return qwen_vl_grid(ip, image_size, merge_size=self.merge_size, grid_thw=thw)


class Qwen35Adapter(QwenVLAdapter):
    """Qwen 3.5 (dense and MoE): Qwen3-VL's vision side and processor (``image_grid_thw``, ``spatial_merge_size``,
    M-RoPE from ``get_rope_index``) on a hybrid text decoder: most layers are Gated DeltaNet linear attention, every
    few a full softmax-attention layer (``text_config.layer_types``). Only the full-attention layers
    (:attr:`attention_layers`) can be captured or knocked out; :attr:`hybrid` turns off the paths that assume every
    layer is attention (see :attr:`FamilyAdapter.hybrid`)."""

    model_types = ("qwen3_5", "qwen3_5_moe")
    family = "qwen3_5"
