"""One normalised record type for every Med-VQA source (``docs/medvqa.md`` § Benchmarks and loaders)."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from typing import Any

ImageRef = bytes | str  # encoded image bytes (PNG/JPEG/…) or a filesystem path

CLOSED, OPEN = "closed", "open"


@dataclass
class MedVQAItem:
    """A single question.

    ``images``: list of encoded bytes or file paths (PIL-loadable), in prompt order.
    ``options``: option texts in stored order (letters A, B, … are assigned by position); empty for
    open-ended items. ``answer``: the *text* of the correct answer (for MCQ: one of ``options``;
    ``"?"`` or any non-option text is scored wrong). ``answer_type``: ``"closed"`` / ``"open"``.
    ``bundle_identical``: True only for items read from the HuatuoGPT-Vision evaluation bundle;
    raw-loader items (e.g. yes/no converted to a 2-option MCQ) are not bundle-identical.
    """

    id: str
    dataset: str
    images: list[ImageRef]
    question: str
    options: list[str]
    answer: str
    answer_type: str = CLOSED
    modality: str | None = None
    subset: str | None = None
    bundle_identical: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_images: bool = False) -> dict[str, Any]:
        """JSON-able dict; images are replaced by path strings / ``"<bytes:sha1>"`` unless asked."""
        d = asdict(self)
        if not with_images:
            d["images"] = [image_key(im) for im in self.images]
        return d


def image_key(image: ImageRef) -> str:
    """Stable text key of one image reference (path as given, or ``bytes:<sha1>``)."""
    if isinstance(image, (bytes, bytearray)):
        return "bytes:" + hashlib.sha1(bytes(image)).hexdigest()
    return str(image)


def open_image(image: ImageRef):
    """PIL RGB image from bytes or a path; raises ``OSError``/``ValueError`` if unreadable."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        im = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, os.PathLike)):
        im = Image.open(os.fspath(image))
    elif hasattr(image, "convert"):  # already a PIL image
        im = image
    else:
        raise TypeError(f"unsupported image reference {type(image).__name__}")
    im.load()
    return im.convert("RGB")
