"""Prompt helpers shared by measurement, calibration and VGRefine (docs/method.md § Prompts).

The study runs two prompts on the same image: the *question prompt*
``f"{question} {INSTRUCTION}"`` and the *generic prompt* ``f"{GENERIC_QUESTION} {INSTRUCTION}"``
(one space between the parts; ``instruction=None`` drops the suffix). Both are rendered with the
model's own processor chat template as one user turn, **image first, then text**, with the generation
prompt appended, and batched with **left padding** (the last position ``T-1`` is the last prompt token
of every row, which the attention capture reads).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence

from .vgrefine.config import GENERIC_QUESTION, INSTRUCTION

__all__ = ["INSTRUCTION", "GENERIC_QUESTION", "format_question", "build_messages", "render_prompts", "build_inputs",
           "chat_inputs", "generic_inputs", "to_model_inputs"]


def format_question(question: str, instruction: str | None = INSTRUCTION) -> str:
    """``"{question} {instruction}"`` (single space), or ``question`` unchanged when ``instruction`` is None/empty."""
    question = str(question).strip()
    if not instruction:
        return question
    return f"{question} {instruction.strip()}"


def build_messages(text: str, n_images: int = 1) -> list[dict]:
    """One user turn in the transformers chat format: ``n_images`` image placeholders, then ``text``."""
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": text}]}]


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


@contextmanager
def _padding_side(processor, side: str):
    tok = _tokenizer(processor)
    old = getattr(tok, "padding_side", None)
    try:
        if old is not None:
            tok.padding_side = side
        yield
    finally:
        if old is not None:
            tok.padding_side = old


def render_prompts(processor, texts: Sequence[str], chat_template: str | None = None,
                   n_images: int | Sequence[int] = 1) -> list[str]:
    """Chat-template strings (generation prompt appended) for user texts that follow ``n_images`` images
    each (one count for all texts, or one per text)."""
    if getattr(processor, "chat_template", None) is None and chat_template is None:
        raise ValueError(f"{type(processor).__name__} has no chat template; pass chat_template= (a Jinja string)")
    counts = [n_images] * len(texts) if isinstance(n_images, int) else list(n_images)
    kw = {"chat_template": chat_template} if chat_template is not None else {}
    return [processor.apply_chat_template(build_messages(t, n), tokenize=False, add_generation_prompt=True, **kw)
            for t, n in zip(texts, counts)]


def _as_images(images) -> list:
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for im in images:
        if im is None:
            raise ValueError("every prompt needs exactly one image, got None")
        if hasattr(im, "mode") and im.mode != "RGB":
            im = im.convert("RGB")   # size unchanged: token geometry stays valid
        out.append(im)
    return out


def build_inputs(processor, images, questions, instruction: str | None = INSTRUCTION, padding_side: str = "left",
                 chat_template: str | None = None, return_tensors: str = "pt", **processor_kwargs):
    """Model inputs for ``B`` (image, question) pairs: one image per prompt, image first then text.

    Args:
        processor: the model's multimodal processor (``AutoProcessor``).
        images: ``B`` PIL images (or one); non-RGB images are converted to RGB (same size).
        questions: ``B`` strings (or one); ``instruction`` is appended with a single space.
        padding_side: ``"left"`` (required by attention capture / triage) or ``"right"``.
        chat_template: optional template string overriding the processor's (model presets).
    Returns:
        the processor's ``BatchFeature`` (``input_ids [B, T]``, ``attention_mask [B, T]``, pixel inputs, ...).
    """
    images = _as_images(images)
    if isinstance(questions, str):
        questions = [questions]
    questions = list(questions)
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: give one image per question")
    return chat_inputs(processor, [format_question(q, instruction) for q in questions], [[im] for im in images],
                       padding_side=padding_side, chat_template=chat_template, return_tensors=return_tensors,
                       **processor_kwargs)


def chat_inputs(processor, texts: Sequence[str], images: Sequence[Sequence[Any]], padding_side: str = "left",
                chat_template: str | None = None, return_tensors: str = "pt", **processor_kwargs):
    """Model inputs for ``B`` prompts, each its own list of images (possibly empty) followed by its text.

    ``texts``: ``B`` user texts, used as given; ``images``: ``B`` lists of PIL images. One user turn per
    prompt through the chat template, generation prompt appended, batched with ``padding_side`` padding.
    Returns the processor's ``BatchFeature`` (``input_ids [B, T]``, ``attention_mask [B, T]``, pixel inputs)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rendered = render_prompts(processor, texts, chat_template, n_images=[len(ims) for ims in images])
    flat = [im for ims in images for im in ims]
    kw = {"images": flat} if flat else {}
    with _padding_side(processor, padding_side):
        return processor(**kw, text=rendered, padding=True, return_tensors=return_tensors, **processor_kwargs)


def generic_inputs(processor, images, instruction: str | None = INSTRUCTION, generic_question: str = GENERIC_QUESTION,
                   padding_side: str = "left", chat_template: str | None = None, **processor_kwargs):
    """Model inputs of the generic prompt (``GENERIC_QUESTION`` + instruction) for each image."""
    images = _as_images(images)
    return build_inputs(processor, images, [generic_question] * len(images), instruction=instruction,
                        padding_side=padding_side, chat_template=chat_template, **processor_kwargs)


def to_model_inputs(inputs: Any, model) -> dict:
    """Move a processor output to ``model``'s device; floating tensors are cast to the model's dtype."""
    import torch

    device = getattr(model, "device", torch.device("cpu"))
    dtype = getattr(model, "dtype", None)
    out = {}
    for k, v in dict(inputs).items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out
