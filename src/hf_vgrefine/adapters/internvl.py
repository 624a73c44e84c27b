"""InternVL 2.5 / 3 / 3.5 in transformers (``InternVLForConditionalGeneration``; MedRegA's base): each image is
``<img>`` + the tokens of its tiles + ``</img>``; a tile is the tower's ``S x S`` input, pixel-shuffled to a
``side x side`` token grid. Without ``crop_to_patches`` (or when one tile is chosen) the one tile is the stretched
image; with several tiles the processor appends a thumbnail (the stretched image) after them.

The image's default grid (span ``block="grid"``, ``token_grid(block="global")``) is that stretched image: the
single tile or the thumbnail, the last ``side²`` tokens of the block. The tiles (if any) are exposed in ``extra_positions["tiles"]`` (sequence
order) with their count; :meth:`InternVLAdapter.tile_span` gives them as a row-major mosaic span once the image
size is known (the tile layout depends on it)."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ImageSpan


class InternVLAdapter(FamilyAdapter):
    model_types = ("internvl",)
    family = "internvl"

    @property
    def tile_side(self) -> int:
        vc = self.config.vision_config
        size, patch = vc.image_size, vc.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        n = int(size) // int(patch)
        k = round(1 / float(self.config.downsample_ratio))
        if n % k:
            raise ValueError(f"{n} patches per tile side are not divisible by 1/downsample_ratio={k}")
        return n // k

    def image_spans(self, inputs):
        side = self.tile_side
        per_tile = side * side

        def span(b, i, s, e):
            n_blocks, r = divmod(e - s, per_tile)
            if r or n_blocks == 2:   # two blocks never occur: several tiles always add a thumbnail
                raise ValueError(f"sample {b}: image run of {e - s} tokens is not 1 tile or k tiles + a thumbnail "
                                 f"of {per_tile} tokens each ({side}x{side} per tile)")
            n_tiles = 0 if n_blocks == 1 else n_blocks - 1
            extra = {"tiles": torch.arange(s, s + n_tiles * per_tile), "n_tiles": n_tiles}
            return ImageSpan(s, e, side, side, torch.arange(e - per_tile, e), image_index=i, block="grid",
                             extra_positions=extra)
        return self.spans_from_runs(inputs, span)

    def _tiles_per_sample(self, inputs) -> list[int]:
        per_tile = self.tile_side ** 2
        counts = []
        for sample in self.image_runs(inputs["input_ids"]):
            counts.append(sum((e - s) // per_tile for s, e in sample))
        return counts

    def select_images(self, inputs, samples):
        """``pixel_values`` holds every tile of every image in batch order: slice each sample's tiles (their count
        follows from its image tokens)."""
        pv = inputs.get("pixel_values")
        B = inputs["input_ids"].shape[0]
        counts = self._tiles_per_sample(inputs)
        if pv is None or (pv.shape[0] == B and all(c == 1 for c in counts)):
            return super().select_images(inputs, samples)
        if sum(counts) != pv.shape[0]:
            raise ValueError(f"pixel_values holds {pv.shape[0]} tiles but the image tokens of the batch need "
                             f"{sum(counts)} ({counts} per sample)")
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        out = super().select_images({k: v for k, v in inputs.items() if k != "pixel_values"}, samples)
        out["pixel_values"] = torch.cat([pv[starts[b]:starts[b + 1]] for b in samples])
        return out

    def image_suffix_text(self, processor) -> str:
        """``</img>``: the processor closes the expanded block with it (the span ends before it)."""
        return getattr(processor, "end_image_token", None) or ""

    def _grids(self, processor, image_size):
        from ..processor_geometry import internvl_grids

        vc = self.config.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        ip = getattr(processor, "image_processor", processor)
        return internvl_grids(ip, image_size, patch_size=patch, vision_image_size=size,
                              downsample_ratio=self.config.downsample_ratio)

    def token_grid(self, processor, image_size, span=None, inputs=None, block: str = "global"):
        """Grid of the stretched image (``block="global"``) or of the tile mosaic (``block="tiles"``)."""
        if block not in ("global", "tiles"):
            raise ValueError(f"block must be 'global' or 'tiles', got {block!r}")
        grids = self._grids(processor, image_size)
        cols, rows = grids["layout"]
        expected = cols * rows if cols * rows > 1 else 0
        if span is not None and span.extra_positions.get("n_tiles", 0) != expected:
            raise ValueError(f"the processor tiles a {image_size} image into {cols}x{rows} tiles but the span holds "
                             f"{span.extra_positions.get('n_tiles', 0)}: pass the original size of this sample's image")
        if block == "tiles":
            if grids["tiles"] is None:
                raise ValueError("this image is one tile (no crop_to_patches, or one tile chosen): use block='global'")
            return grids["tiles"]
        return grids["global"]

    def tile_span(self, span: ImageSpan, processor, image_size) -> ImageSpan:
        """The span's tiles as a row-major ``(n_rows·side) x (n_cols·side)`` mosaic span (``block="tiles"``)."""
        from ..processor_geometry import internvl_tile_positions

        grid = self.token_grid(processor, image_size, span=span, block="tiles")
        layout = self._grids(processor, image_size)["layout"]
        order = torch.from_numpy(internvl_tile_positions(layout, self.tile_side))
        pos = span.extra_positions["tiles"][order]
        return ImageSpan(span.start, span.end, grid.rows, grid.cols, pos, image_index=span.image_index, block="tiles")
