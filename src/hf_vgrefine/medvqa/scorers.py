"""Scorers (``docs/medvqa.md`` § Answer extraction and § Scorers), written from the spec's rule descriptions.

A closed-ended scorer maps ``(response, item) -> Score``; open-ended items are always scored by
:func:`score_open` (exact match + token recall), reported separately.

| name | rule |
|---|---|
| ``mcq_letter`` (default) | :func:`~.protocol.extract_choice` (letter → option text → similarity) == ground-truth letter |
| ``mcq_letter_faithful`` | same with ``faithful=True`` (released scorer's quirks) |
| ``substring_bidirectional`` | strip ``<|endoftext|>``, ``str.capitalize`` both; prediction ⊂ answer or answer ⊂ prediction |
| ``yesno_exact`` | first normalised token of the response == normalised answer |
| ``yesno_xor_substring`` | exactly one of "yes"/"no" occurs in the response and the answer occurs in it |
| ``multimedeval`` | closed: ≥ 40 % of the answer's token set ({yes} / {no, not}) recalled; open: recall ≥ 0.75 |
| ``llava_med`` | closed: answer (lower-cased) ⊂ response (lower-cased); open: token recall |
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

from .protocol import STEP_NONE, extract_choice, ground_truth_letter, option_map
from .schema import MedVQAItem

SCORER_VERSION = "1"


@dataclass
class Score:
    """Verdict on one response.

    ``correct``: bool. ``extracted``: what the scorer read from the response (a letter for MCQ
    scorers, normalised text otherwise). ``step``: extraction step (MCQ scorers) or the rule name.
    ``target``: what it was compared with (ground-truth letter or answer text).
    """

    correct: bool
    extracted: str | None
    step: str
    target: str | None = None


_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def normalize_text(s: str) -> str:
    """Lower-case, punctuation → space, whitespace collapsed."""
    return " ".join(str(s).lower().translate(_PUNCT_TABLE).split())


def tokens(s: str) -> list[str]:
    """Tokens of :func:`normalize_text` (whitespace split)."""
    return normalize_text(s).split()


def token_recall(prediction: str, answer: str) -> float:
    """Fraction of the answer's distinct tokens present in the prediction (0 if the answer has none)."""
    gt = set(tokens(answer))
    if not gt:
        return 0.0
    return len(gt & set(tokens(prediction))) / len(gt)


def exact_match(prediction: str, answer: str) -> bool:
    """Equality after :func:`normalize_text`."""
    return normalize_text(prediction) == normalize_text(answer)


# ---------------------------------------------------------------------------------------------------
# closed-ended scorers


def _mcq(response: str, item: MedVQAItem, faithful: bool) -> Score:
    opts = option_map(item.options)
    gt = ground_truth_letter(item.answer, item.options)
    letter, step = extract_choice(response, opts, faithful=faithful)
    return Score(correct=gt is not None and letter == gt, extracted=letter, step=step, target=gt)


def mcq_letter(response: str, item: MedVQAItem) -> Score:
    return _mcq(response, item, faithful=False)


def mcq_letter_faithful(response: str, item: MedVQAItem) -> Score:
    return _mcq(response, item, faithful=True)


def substring_bidirectional(response: str, item: MedVQAItem) -> Score:
    """Note: an empty prediction is a substring of every answer and therefore counts as correct."""
    pred = str(response).replace("<|endoftext|>", "").strip().capitalize()
    ans = str(item.answer).strip().capitalize()
    return Score(correct=pred in ans or ans in pred, extracted=pred, step="substring_bidirectional", target=ans)


def yesno_exact(response: str, item: MedVQAItem) -> Score:
    toks = tokens(response)
    first = toks[0] if toks else ""
    ans = normalize_text(item.answer)
    return Score(correct=bool(first) and first == ans, extracted=first or None, step="yesno_exact", target=ans)


def yesno_xor_substring(response: str, item: MedVQAItem) -> Score:
    """Note: ``"no"`` also matches inside "not", "nodule", "know" (as in the harness it mirrors)."""
    pred = str(response).lower().replace("\n", "").replace(".", "")
    ans = str(item.answer).lower()
    has_yes, has_no = "yes" in pred, "no" in pred
    return Score(correct=(has_yes != has_no) and ans in pred, extracted=pred, step="yesno_xor_substring", target=ans)


def multimedeval(response: str, item: MedVQAItem) -> Score:
    ans = normalize_text(item.answer)
    pred = set(tokens(response))
    if ans in ("yes", "no"):
        target = {"yes"} if ans == "yes" else {"no", "not"}
        ok = len(target & pred) / len(target) >= 0.4
    else:
        ok = token_recall(response, item.answer) >= 0.75
    return Score(correct=ok, extracted=" ".join(sorted(pred)) or None, step="multimedeval", target=ans)


def llava_med(response: str, item: MedVQAItem) -> Score:
    ans = str(item.answer).lower()
    return Score(correct=bool(ans) and ans in str(response).lower(), extracted=str(response).lower(),
                 step="llava_med", target=ans)


SCORERS: dict[str, Callable[[str, MedVQAItem], Score]] = {
    "mcq_letter": mcq_letter,
    "mcq_letter_faithful": mcq_letter_faithful,
    "substring_bidirectional": substring_bidirectional,
    "yesno_exact": yesno_exact,
    "yesno_xor_substring": yesno_xor_substring,
    "multimedeval": multimedeval,
    "llava_med": llava_med,
}


def get_scorer(name: str) -> Callable[[str, MedVQAItem], Score]:
    """Closed-ended scorer by name (see :data:`SCORERS`)."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; choose one of {sorted(SCORERS)}") from None


@dataclass
class OpenScore:
    """Open-ended verdict: normalised exact match and token recall in [0, 1]."""

    exact: bool
    recall: float


def score_open(response: str, item: MedVQAItem) -> OpenScore:
    """Exact match (normalised) and token recall of the answer in the response."""
    return OpenScore(exact=exact_match(response, item.answer), recall=token_recall(response, item.answer))


__all__ = [
    "SCORERS", "SCORER_VERSION", "Score", "OpenScore", "get_scorer", "score_open", "token_recall", "exact_match",
    "normalize_text", "tokens", "mcq_letter", "mcq_letter_faithful", "substring_bidirectional", "yesno_exact",
    "yesno_xor_substring", "multimedeval", "llava_med", "STEP_NONE",
]
