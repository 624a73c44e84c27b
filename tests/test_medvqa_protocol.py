"""MCQ prompt, answer extraction (tricky responses), other scorers, statistics, filtering."""

from __future__ import annotations

import math

import pytest

from hf_vgrefine.medvqa import (
    MedVQAItem,
    build_mcq_prompt,
    extract_choice,
    get_scorer,
    ground_truth_letter,
    mcnemar_exact,
    option_map,
    parse_options,
    prepare_items,
    score_open,
    token_recall,
    wilson_interval,
)

ORGANS = {"A": "Liver", "B": "Lung", "C": "Kidney", "D": "Spleen"}  # ground truth: B (Lung)
YES_NO = {"A": "yes", "B": "no"}

# response, default (letter, step), faithful letter, correct under the default scorer (GT = B)
TABLE = [
    ("B", ("B", "letter"), "B", True),
    ("The answer is B.", ("B", "letter"), "B", True),
    ("b) Liver", ("B", "letter"), "b", True),                      # faithful: lower-case letter never matches
    ("(C)", ("C", "letter"), "C", False),
    ("Option D: Spleen", ("D", "letter"), "D", False),
    ("**B**", ("B", "letter"), "B", True),
    ("#C", ("C", "letter"), "C", False),
    ("'D'", ("D", "letter"), "D", False),
    ("B.", ("B", "letter"), "B", True),
    ("Answer: B", ("B", "letter"), "B", True),
    ("answer: b", ("B", "letter"), "b", True),
    ("B\n", ("B", "letter"), "B", True),
    ("\nC", ("C", "letter"), "C", False),
    ("答案是B", ("B", "letter"), "B", True),                        # CJK copula before the letter
    ("答案为C", ("C", "letter"), "C", False),
    ("B or C", ("B", "letter"), "B", True),                        # two letters: the first wins
    ("C D", ("C", "letter"), "C", False),
    ("A and B", ("B", "letter"), "B", True),                       # "A " is read as the article
    ("Spleen (D)", ("D", "letter"), "D", False),                   # a letter beats option text
    ("I think it is C", ("C", "letter"), "I", False),              # faithful: pronoun "I" = option I
    ("I", ("A", "similarity"), "I", False),
    ("E", ("A", "similarity"), "E", False),                        # no option E: default falls through
    ("N/A", ("A", "letter"), "N", False),                          # default skips N, takes the A after "/"
    ("It is a. lung", ("A", "letter"), "a", False),                # "a." is a letter, not the article
    ("e.g. kidney", ("C", "option_text"), "e", False),
    ("Lung", ("B", "option_text"), "B", True),                     # answer text without a letter
    ("The organ shown is the lung.", ("B", "option_text"), "B", True),
    ("The lungs", ("B", "option_text"), "B", True),
    ("a liver", ("A", "option_text"), "A", False),                 # article skipped, then option text
    ("Liverpool", ("A", "option_text"), "A", False),               # substring match
    ("Kidney and liver", ("A", "option_text"), "A", False),        # rightmost occurrence wins
    ("liver, not lung", ("B", "option_text"), "B", True),
    ("x-ray of the kidney", ("C", "option_text"), "C", False),
    ("A cyst", ("D", "similarity"), "D", False),                   # article; similarity tie -> later option
    ("spleeen", ("D", "similarity"), "D", False),
    ("kidny", ("C", "similarity"), "C", False),
    ("none of the above", ("A", "similarity"), "A", False),
    ("<|endoftext|>", ("D", "similarity"), "D", False),
    ("AB", (None, "none"), "D", False),                            # no similarity at all
    ("", (None, "none"), "D", False),                              # empty: faithful picks the last option
    ("   ", (None, "none"), "D", False),
]

YES_NO_TABLE = [  # response, default letter, faithful letter (GT "no" = B)
    ("yes", "A", "A"),
    ("Yes.", "A", "A"),
    ("YES", "A", "A"),
    ("No, it is not.", "B", "B"),
    ("nope", "B", "B"),
    ("Not sure", "B", "B"),
    ("I do not know", "B", "I"),
    ("", None, "B"),
]


def test_table_is_large_enough():
    assert len(TABLE) + len(YES_NO_TABLE) >= 30


@pytest.mark.parametrize("response,expected,faithful_letter,correct", TABLE)
def test_extract_choice_table(response, expected, faithful_letter, correct):
    assert extract_choice(response, ORGANS) == expected
    assert extract_choice(response, ORGANS, faithful=True)[0] == faithful_letter
    item = MedVQAItem("x", "T", [], "Which organ?", list(ORGANS.values()), "Lung")
    s = get_scorer("mcq_letter")(response, item)
    assert s.correct is correct and s.target == "B" and s.extracted == expected[0] and s.step == expected[1]
    sf = get_scorer("mcq_letter_faithful")(response, item)
    assert sf.correct is (faithful_letter == "B")


@pytest.mark.parametrize("response,default,faithful", YES_NO_TABLE)
def test_extract_choice_yes_no(response, default, faithful):
    assert extract_choice(response, YES_NO)[0] == default
    assert extract_choice(response, YES_NO, faithful=True)[0] == faithful


def test_text_tie_prefers_longer_option_by_default():
    opts = {"A": "liver", "B": "liver cyst"}
    assert extract_choice("liver cyst", opts) == ("B", "option_text")
    assert extract_choice("liver cyst", opts, faithful=True) == ("A", "option_text")


@pytest.mark.parametrize("scorer,response,answer,correct", [
    ("substring_bidirectional", "Yes", "yes", True),
    ("substring_bidirectional", "no<|endoftext|>", "no", True),
    ("substring_bidirectional", "Right lung", "right lung", True),
    ("substring_bidirectional", "lung", "Right lung", False),      # "Lung" is not in "Right lung"
    ("substring_bidirectional", "", "yes", True),                  # empty prediction ⊂ every answer
    ("yesno_exact", "Yes.", "yes", True),
    ("yesno_exact", "yes, it is", "yes", True),
    ("yesno_exact", "No", "yes", False),
    ("yesno_exact", "", "no", False),
    ("yesno_exact", "Nope", "no", False),
    ("yesno_xor_substring", "Yes", "yes", True),
    ("yesno_xor_substring", "yes and no", "yes", False),
    ("yesno_xor_substring", "I do not know", "no", True),          # "no" inside "not"/"know"
    ("yesno_xor_substring", "nodule present", "yes", False),
    ("multimedeval", "not present", "no", True),
    ("multimedeval", "yes", "no", False),
    ("multimedeval", "the left lung", "left lung", True),
    ("multimedeval", "the left", "left lung", False),
    ("llava_med", "Yes, there is", "yes", True),
    ("llava_med", "yesterday", "yes", True),
    ("llava_med", "no", "yes", False),
])
def test_other_scorers(scorer, response, answer, correct):
    item = MedVQAItem("x", "T", [], "q?", ["yes", "no"] if answer in ("yes", "no") else [], answer)
    assert get_scorer(scorer)(response, item).correct is correct


def test_unknown_scorer():
    with pytest.raises(ValueError, match="unknown scorer"):
        get_scorer("nope")


def test_open_scoring():
    item = MedVQAItem("x", "T", [], "q?", [], "Right upper lobe", answer_type="open")
    s = score_open("right upper lobe.", item)
    assert s.exact and s.recall == 1.0
    s = score_open("the upper lobe", item)
    assert not s.exact and s.recall == pytest.approx(2 / 3)
    assert token_recall("anything", "") == 0.0


def test_prompt_and_options():
    p = build_mcq_prompt("Is it normal?", "['yes', 'no']")
    assert p == "Is it normal?\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly."
    assert build_mcq_prompt("Q", ["x"], instruction="Answer.") == (
        "Q\nA. x\nAnswer with the option's letter from the given choices directly. Answer.")
    assert parse_options("['a', 'b']") == ["a", "b"] and parse_options(None) == [] and parse_options([1, 2]) == ["1", "2"]
    assert option_map(["p", "q", "r"]) == {"A": "p", "B": "q", "C": "r"}
    assert ground_truth_letter("r", ["p", "q", "r"]) == "C" and ground_truth_letter("?", ["p"]) is None
    with pytest.raises(ValueError):
        option_map([str(i) for i in range(12)])
    with pytest.raises(ValueError):
        parse_options("not a list [")
    # an answer that is no option ("?") is always wrong
    item = MedVQAItem("x", "T", [], "q", ["heart", "brain"], "?")
    assert get_scorer("mcq_letter")("A", item).correct is False


def test_wilson_and_mcnemar():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and 0 < hi < 1
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 * 0.5 ** 5)
    assert mcnemar_exact(3, 7) == pytest.approx(mcnemar_exact(7, 3))
    assert math.isclose(mcnemar_exact(1, 1), 1.0)


def test_prepare_items_filters_and_dedups():
    mk = lambda i, **kw: MedVQAItem(**{"id": f"i{i}", "dataset": "D", "images": [b"x"], "question": f"q{i}",
                                       "options": ["yes", "no"], "answer": "yes", **kw})
    items = [mk(0), mk(1), mk(2, answer_type="open", options=[]), mk(3, options=[]),
             mk(4, question="q0"),  # same (dataset, question, image, options) as i0
             mk(5, dataset="E"), mk(6), mk(7)]
    p = prepare_items(items)
    assert [i.id for i in p.items] == ["i0", "i1", "i5", "i6", "i7"]
    assert p.removed == {"open": 1, "no_options": 1, "duplicate": 1} and p.duplicates == ["i4"]
    p = prepare_items(items, limit=2)
    assert [i.id for i in p.items] == ["i0", "i1", "i5"]  # first 2 per dataset
    p = prepare_items(items, answer_types=("closed", "open"))
    assert "i2" in [i.id for i in p.items]
