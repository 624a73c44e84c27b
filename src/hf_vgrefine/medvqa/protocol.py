"""Closed-ended multiple-choice protocol of HuatuoGPT-Vision (``docs/medvqa.md``), written from the spec.

* :func:`build_mcq_prompt` — the common MCQ prompt (§ Prompt).
* :func:`extract_choice` — answer extraction: option letter, then option text, then most similar option
  (§ Answer extraction); ``faithful=True`` keeps the released scorer's quirks.
* :func:`prepare_items` — filtering and de-duplication (§ Filtering).
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .schema import CLOSED, OPEN, MedVQAItem, image_key

LETTERS = "ABCDEFGHIJK"  # at most 11 options, as in the released prompt builder
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MCQ_TEMPLATE = "{question}\n{options_block}\n" + MCQ_INSTRUCTION
# Alternates defined (but not called) by the released eval code; for ablations only.
MMMU_TEMPLATE = "Please answer the multiple-choice questions below.\n{question}\n{options_block}"
# Suffix the released VGRefine() appends to any text (docs/medvqa.md § VGRefine and the MCQ prompt).
VGREFINE_INSTRUCTION = "Answer the question using a single word or phrase."


def parse_options(options: Sequence[str] | str | None) -> list[str]:
    """Options as a list of strings; a string is parsed as a Python list literal (``"['a', 'b']"``)."""
    if options is None:
        return []
    if isinstance(options, str):
        s = options.strip()
        if not s:
            return []
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"options string is not a Python list literal: {options[:80]!r}") from e
        if isinstance(value, str):
            return [value]
        return [str(v) for v in value]
    return [str(o) for o in options]


def option_map(options: Sequence[str] | str) -> dict[str, str]:
    """``{"A": text, "B": text, …}`` in stored order (raises if more than 11 options)."""
    opts = parse_options(options)
    if len(opts) > len(LETTERS):
        raise ValueError(f"{len(opts)} options; the protocol supports at most {len(LETTERS)}")
    return dict(zip(LETTERS, opts))


def build_mcq_prompt(question: str, options: Sequence[str] | str, template: str = MCQ_TEMPLATE,
                     instruction: str | None = None) -> str:
    """``"{question}\\n{A. opt}\\n{B. opt}…\\nAnswer with the option's letter from the given choices directly."``

    ``instruction`` (e.g. :data:`VGREFINE_INSTRUCTION`) is appended after one space when given, as the
    released VGRefine does with whatever text it receives (``docs/medvqa.md`` § VGRefine and the MCQ prompt).
    """
    block = "\n".join(f"{k}. {v}" for k, v in option_map(options).items())
    prompt = template.format(question=question, options_block=block)
    if instruction:
        prompt = f"{prompt} {instruction}"
    return prompt


def ground_truth_letter(answer: str, options: Sequence[str] | str) -> str | None:
    """Letter of the first option equal to ``answer`` (exact text); None if the answer is no option."""
    for k, v in option_map(options).items():
        if v == answer:
            return k
    return None


# ---------------------------------------------------------------------------------------------------
# answer extraction (docs/medvqa.md § Answer extraction)

# A letter a–n in either case that is not preceded by a word character (start of string, whitespace,
# punctuation such as ( * ' " # are all non-word), except that the CJK copulas 是/为 may precede it,
# and that is followed by a non-word character or the end of the string.
_LETTER_RE = re.compile(r"(?<![^\W是为])([a-nA-N])(?!\w)")

STEP_LETTER, STEP_TEXT, STEP_SIMILAR, STEP_NONE = "letter", "option_text", "similarity", "none"
STEPS = (STEP_LETTER, STEP_TEXT, STEP_SIMILAR, STEP_NONE)


def _letters(response: str) -> Iterable[tuple[str, int]]:
    for m in _LETTER_RE.finditer(response):
        ch, end = m.group(1), m.end()
        if ch in "aA" and response[end:end + 1] == " ":  # the English article "a"/"A"
            continue
        yield ch, m.start()


def extract_choice(response: str, options: Mapping[str, str], faithful: bool = False) -> tuple[str | None, str]:
    """Chosen option letter and the extraction step that produced it.

    ``options``: ``{letter: option_text}`` (see :func:`option_map`). Returns ``(letter, step)`` with
    ``step`` in ``"letter"`` (standalone letter), ``"option_text"`` (an option's text occurs in the
    response; the one whose last occurrence starts furthest right wins), ``"similarity"``
    (``difflib`` ratio, ties go to the later option) or ``"none"`` (``letter`` is None).

    Default behaviour: the letter is upper-cased and must name an existing option (other standalone
    letters, e.g. the pronoun "I", are skipped); text-match ties at the same position go to the longer
    option; an empty response or one with zero similarity to every option gives ``(None, "none")``.
    ``faithful=True`` reproduces the released scorer: the first standalone letter is returned as
    written (``"b"`` then does not match key ``"B"``; ``"I think…"`` yields ``"I"``), text ties go
    to the earlier option and the similarity step always picks an option (the last one when all
    ratios are 0, e.g. for an empty response).
    """
    response = "" if response is None else str(response)
    valid = {k.upper() for k in options}
    for ch, _ in _letters(response):
        if faithful:
            return ch, STEP_LETTER
        if ch.upper() in valid:
            return ch.upper(), STEP_LETTER
    if not faithful and not response.strip():
        return None, STEP_NONE

    low = response.lower()
    best, best_pos, best_len = None, -1, -1
    for k, v in options.items():
        text = str(v).lower()
        if not text:
            continue
        pos = low.rfind(text)
        if pos < 0:
            continue
        if pos > best_pos or (not faithful and pos == best_pos and len(text) > best_len):
            best, best_pos, best_len = k, pos, len(text)
    if best is not None:
        return best, STEP_TEXT

    best, best_ratio = None, -1.0
    for k, v in options.items():
        ratio = difflib.SequenceMatcher(None, str(v).lower(), low).ratio()
        if ratio >= best_ratio:  # ties -> later option
            best, best_ratio = k, ratio
    if best is None or (not faithful and best_ratio <= 0.0):
        return None, STEP_NONE
    return best, STEP_SIMILAR


# ---------------------------------------------------------------------------------------------------
# filtering (docs/medvqa.md § Filtering)


@dataclass
class PreparedItems:
    """Items after filtering, with what was removed and why.

    ``items``: kept items (stored order). ``removed``: counts per reason (``"open"``, ``"no_options"``,
    ``"duplicate"``, ``"answer_type"``). ``duplicates``: ids of removed duplicates.
    """

    items: list[MedVQAItem]
    removed: dict[str, int] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)


def dedup_key(item: MedVQAItem) -> tuple:
    """(dataset, question, images, options) — the de-duplication key (docs/medvqa.md § Filtering)."""
    return (item.dataset, item.question, tuple(image_key(i) for i in item.images), tuple(item.options))


def prepare_items(items: Iterable[MedVQAItem], answer_types: Sequence[str] = (CLOSED,),
                  dedup: bool = True, limit: int | None = None) -> PreparedItems:
    """Keep items whose ``answer_type`` is in ``answer_types``, drop closed items without options and
    duplicates (also duplicate ids), then keep the first ``limit`` items **per dataset**."""
    kept: list[MedVQAItem] = []
    removed: dict[str, int] = {}
    dups: list[str] = []
    seen_keys: set = set()
    seen_ids: set = set()
    per_ds: dict[str, int] = {}

    def drop(reason):
        removed[reason] = removed.get(reason, 0) + 1

    for it in items:
        if it.answer_type not in answer_types:
            drop("open" if it.answer_type == OPEN else "answer_type")
            continue
        if it.answer_type == CLOSED and not it.options:
            drop("no_options")
            continue
        key = dedup_key(it)
        if dedup and (key in seen_keys or it.id in seen_ids):
            drop("duplicate")
            dups.append(it.id)
            continue
        if it.id in seen_ids:
            raise ValueError(f"duplicate item id {it.id!r} (ids must be unique; use dedup=True)")
        seen_keys.add(key)
        seen_ids.add(it.id)
        if limit is not None and per_ds.get(it.dataset, 0) >= limit:
            continue
        per_ds[it.dataset] = per_ds.get(it.dataset, 0) + 1
        kept.append(it)
    return PreparedItems(kept, removed, dups)
