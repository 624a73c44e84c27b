"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral Small 3.1 / 3.2 and their fine-tunes): a Pixtral tower at
the image's own resolution (longest edge capped, sides rounded up to whole merged patches), ``spatial_merge_size²``
patches merged into one token, row-major. The prompt lists the grid row by row, each row of ``[IMG]`` tokens
followed by ``[IMG_BREAK]``, the last one by ``[IMG_END]`` instead; ``image_sizes`` (processed ``(H, W)``) gives the
grid. ``ImageSpan.end`` is the ``[IMG_END]`` position (the first after the last image token)."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ImageSpan


class Mistral3Adapter(FamilyAdapter):
    model_types = ("mistral3",)
    family = "mistral3"

    @property
    def token_pixels(self) -> int:
        """Pixels per token side: the tower's patch size x the spatial merge size."""
        return int(self.config.vision_config.patch_size) * int(self.config.spatial_merge_size)

    def _grid_shapes(self, inputs) -> list[tuple[int, int]]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("Mistral 3 inputs need image_sizes (returned by the processor together with pixel_values)")
        f = self.token_pixels
        return [(int(h) // f, int(w) // f) for h, w in torch.as_tensor(sizes).tolist()]

    def image_spans(self, inputs):
        runs = self.image_runs(inputs["input_ids"])
        self._require_images(runs)
        shapes = self._grid_shapes(inputs)
        k, out = 0, []
        for b, sample in enumerate(runs):
            spans, i = [], 0
            while i < len(sample):
                if k >= len(shapes):
                    raise ValueError(f"more images in input_ids than rows in image_sizes ({len(shapes)})")
                rows, cols = shapes[k]
                group = sample[i:i + rows]
                ok = len(group) == rows and all(e - s == cols for s, e in group) and all(
                    group[j + 1][0] == group[j][1] + 1 for j in range(len(group) - 1))
                if not ok:
                    raise ValueError(f"sample {b}, image {k}: image_sizes {shapes[k][0] * self.token_pixels}x"
                                     f"{shapes[k][1] * self.token_pixels} needs {rows} rows of {cols} image tokens, "
                                     "each followed by one [IMG_BREAK] / [IMG_END] token; the prompt does not match "
                                     "(build the inputs with the model's processor)")
                pos = torch.cat([torch.arange(s, e) for s, e in group])
                spans.append(ImageSpan(group[0][0], group[-1][1], rows, cols, pos, image_index=k))
                i += rows
                k += 1
            out.append(spans)
        if k != len(shapes):
            raise ValueError(f"image_sizes has {len(shapes)} rows but input_ids hold {k} images")
        return out

    def image_suffix_text(self, processor) -> str:
        """``[IMG_END]``: the processor ends the image's last row with it (the span ends before it)."""
        return getattr(processor, "image_end_token", None) or "[IMG_END]"

    def image_content(self, inputs: dict, b: int) -> dict:
        """``pixel_values[b]`` cropped to ``image_sizes[b]`` (the processor pads a batch to its largest image; the
        tower reads only the image's own patches), and ``image_sizes[b]``."""
        out = self.select_images(inputs, [b])
        if "pixel_values" in out and "image_sizes" in inputs:
            h, w = (int(v) for v in torch.as_tensor(inputs["image_sizes"])[b].tolist())
            out["pixel_values"] = out["pixel_values"][..., :h, :w]
        return out

    def token_grid(self, processor, image_size, span=None, inputs=None):
        from ..processor_geometry import pixtral_grid

        ip = getattr(processor, "image_processor", processor)
        grid = pixtral_grid(ip, image_size, patch_size=int(self.config.vision_config.patch_size),
                            merge_size=int(self.config.spatial_merge_size))
        if span is not None and (grid.rows, grid.cols) != (span.rows, span.cols):
            raise ValueError(f"the processor gives a {grid.rows}x{grid.cols} grid for a {image_size} image but the span "
                             f"is {span.rows}x{span.cols}: pass the original size of this sample's image")
        return grid
