"""``VGMED``: the `datasets.GeneratorBasedBuilder` of the package (datasets 5.x runs no loading scripts,
so the builder lives here and is instantiated directly).

    from hf_vgrefine.data import VGMED
    b = VGMED(config_name="atlas", dataset_name="vgmed", hash="...")
    b.download_and_prepare(); ds = b.as_dataset(split="test")

Configurations: ``atlas`` (default, offline), ``slake``, ``full``, ``coco``. Local source copies are given
with ``source_dir=`` (kept out of the config so the cache entry keeps the plain config name and
``load_dataset("vgmed", name)`` finds it) or with the usual ``data_dir=``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import datasets

from .. import _version
from . import schema

_HOMEPAGE = "https://huggingface.co/datasets/guimeng-liu/VGMED"
_DESCRIPTION = (
    "VGMED: visual grounding of medical MLLMs. Each row pairs a medical image, a question that names its "
    "target (organ, structure or finding) and the target's region (xywh boxes in original pixels; a 0/255 "
    "mask where available). Evaluation only (single split `test`); question_type is `localization` or "
    "`attribute`; no answers are annotated (localization rows carry the derived answer 'yes')."
)


@dataclass
class VGMEDConfig(datasets.BuilderConfig):
    """BuilderConfig with an optional cap on the number of targets (each target gives two rows)."""

    max_samples: Optional[int] = None


def cache_hash(config_name: str) -> str:
    """Fixed cache hash of a configuration; distinct per configuration so that the bare name resolves."""
    return f"hf_vgrefine-{_version.__version__}-{config_name}".replace(".", "_")


class VGMED(datasets.GeneratorBasedBuilder):
    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = VGMEDConfig
    BUILDER_CONFIGS = [
        VGMEDConfig(name=name, version=datasets.Version("1.0.0"), description=schema.CONFIG_DESCRIPTIONS[name])
        for name in schema.CONFIG_NAMES
    ]
    DEFAULT_CONFIG_NAME = schema.DEFAULT_CONFIG
    DEFAULT_WRITER_BATCH_SIZE = 256

    def __init__(self, *args, source_dir=None, download_sources: bool = True, **kwargs):
        self.source_dir = str(source_dir) if source_dir else None
        self.download_sources = download_sources
        kwargs.setdefault("dataset_name", schema.DATASET_NAME)
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=_DESCRIPTION,
            features=schema.build_features(),
            homepage=_HOMEPAGE,
            citation=schema.CITATION,
            license="other",
        )

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=datasets.Split.TEST, gen_kwargs={})]

    def _samples(self) -> Iterator[dict]:
        name = self.config.name
        data_dir = self.source_dir or self.config.data_dir
        if name == "atlas":
            from .atlas import atlas_samples

            return atlas_samples(data_dir)
        from .release import SAMPLERS

        if name not in SAMPLERS:
            raise ValueError(f"unknown VGMED configuration {name!r}; choose from {', '.join(schema.CONFIG_NAMES)}")
        return SAMPLERS[name](data_dir, download=self.download_sources)

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        limit = self.config.max_samples
        seen: dict[str, int] = {}
        for n, sample in enumerate(self._samples()):
            if limit is not None and n >= limit:
                break
            yield from rows_from_sample(sample, seen)


def rows_from_sample(sample: dict, seen: dict[str, int] | None = None) -> Iterator[tuple[str, dict]]:
    """The two rows (localization, attribute) of one target."""
    seen = {} if seen is None else seen
    base = f"{sample['source']}/{sample['image_key']}/{schema.slugify(sample['label'])}"
    count = seen.get(base, 0) + 1
    seen[base] = count
    if count > 1:  # two targets with the same label on one image (e.g. one sample per lung mask)
        base = f"{base}~{count}"
    image = sample["image"]
    if isinstance(image, bytes):
        image = {"bytes": image, "path": f"{sample['image_key'].replace('/', '_')}.png"}
    mask = sample["mask"]
    if isinstance(mask, bytes):
        mask = {"bytes": mask, "path": f"{sample['image_key'].replace('/', '_')}_{schema.slugify(sample['label'])}_mask.png"}
    for qtype in schema.QUESTION_TYPES:
        question, answer, answer_source = sample["questions"][qtype]
        row_id = f"{base}/{qtype}"
        yield row_id, {
            "id": row_id,
            "image": image,
            "mask": mask,
            "boxes": [[float(v) for v in b] for b in sample["boxes"]],
            "question": question,
            "question_type": qtype,
            "answer": answer,
            "answer_source": answer_source,
            "label": sample["label"],
            "modality": schema.normalise_modality(sample["modality_raw"] or ""),
            "modality_raw": sample["modality_raw"],
            "location": sample["location"],
            "source": sample["source"],
            "license": sample["license"],
            "image_width": int(sample["width"]),
            "image_height": int(sample["height"]),
            "area_ratio": float(sample["area_ratio"]),
            "split_group": schema.split_group(sample["image_key"]),
            "gt_tokens_ref": sample.get("gt_tokens_ref") or [],
            "gt_tokens_ref_grid": sample.get("gt_tokens_ref_grid") or [],
        }
