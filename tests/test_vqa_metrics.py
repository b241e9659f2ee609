"""VQA metrics on hand-made cases: every EvalAI normalisation rule of MLLM.md §6.3 (quirks included), the
leave-one-out accuracy against an explicit enumeration of the 10 subsets, GQA exact match, LLaVA and lmms-eval POPE."""

from __future__ import annotations

import itertools

import pytest

from visionfx.evaluation.vqa import score_predictions
from visionfx.evaluation.vqa_metrics import (CONTRACTIONS, PUNCTUATION, exact_match, normalize_answer,
                                             pope_metrics, pope_metrics_lmms, pope_parse, process_punctuation,
                                             vqa_accuracy)

# --- step 1-2: lowercase, "," "?" deleted, "'s" split, whitespace ---------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("RED Car", "red car"),
    ("yes, it is?", "yes it is"),
    ("1,000", "1000"),                 # the comma goes in step 1, before any punctuation rule
    ("man's hat", "man 's hat"),
    ("red\tcar\nhere", "red car here"),
    ("  two   big  cats  ", "2 big cats"),
])
def test_tokenise_and_whitespace(text, expected):
    assert normalize_answer(text) == expected


# --- step 3: punctuation -------------------------------------------------------------------------------------------

OTHER_MARKS = [p for p in PUNCTUATION if p not in (",", "?")]


def test_punctuation_list_is_the_reference_one():
    assert sorted(PUNCTUATION) == sorted(list(';/[]"{}()=+\\_-><@`,?!'))


@pytest.mark.parametrize("p", OTHER_MARKS)
def test_mark_without_adjacent_space_becomes_a_space(p):
    assert process_punctuation(f"x{p}y") == "x y"
    assert normalize_answer(f"x{p}y") == "x y"


@pytest.mark.parametrize("p", OTHER_MARKS)
def test_mark_next_to_a_space_is_deleted_everywhere(p):
    # one occurrence next to a space deletes every occurrence, including the one inside "x?y"
    assert process_punctuation(f"x{p}y z{p} w") == "xy z w"
    assert process_punctuation(f"x{p}y {p}z") == "xy z"
    assert normalize_answer(f"x{p}y z{p} w") == "xy z w"


@pytest.mark.parametrize("p", [",", "?"])
def test_comma_and_question_mark_rules_alone(p):
    # reachable only through process_punctuation: normalize_answer removes them in step 1
    assert process_punctuation(f"x{p}y") == "x y"
    assert process_punctuation(f"x{p} y") == "x y"
    assert normalize_answer(f"x{p}y") == "xy"


def test_digit_comma_deletes_every_mark():
    assert process_punctuation("1,000 x-y (z)") == "1000 xy z"
    assert process_punctuation("1, 000 x-y") == "1 000 x y"  # no digit,digit: the comma has a space, '-' not
    assert process_punctuation("x,y x-y") == "x y x y"


# --- step 4: periods -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("end.", "end"),
    ("3.14", "3.14"),        # followed by a digit: kept
    ("x.5", "x.5"),
    ("5.x", "5x"),           # after a digit but not before one: deleted (the intended look-behind is not there)
    ("a.b", "ab"),           # deleted, not replaced by a space
    ("u.s.a.", "usa"),
])
def test_period_rule(text, expected):
    assert process_punctuation(text) == expected


def test_period_removal_stops_at_32():
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8
    assert normalize_answer("." * 33 + " dog") == ". dog"
    assert process_punctuation("x" + "." * 32) == "x"


# --- steps 5-7: numbers, articles, contractions, joining ------------------------------------------------------------


def test_number_words():
    words = "none zero one two three four five six seven eight nine ten eleven"
    assert normalize_answer(words) == "0 0 1 2 3 4 5 6 7 8 9 10 eleven"
    assert normalize_answer("Two Dogs") == "2 dogs"


def test_articles():
    assert normalize_answer("a cat an owl the dog") == "cat owl dog"
    assert normalize_answer("theater another") == "theater another"
    assert normalize_answer("the") == ""


def test_contractions():
    assert len(CONTRACTIONS) == 120
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("it isnt") == "it isn't"
    assert normalize_answer("yall'll") == "y'all'll"
    assert normalize_answer("somebody'd") == "somebodyd"      # the table maps this one backwards
    assert normalize_answer("Im") == "im" and normalize_answer("Ive") == "ive"  # capitalised keys never match
    assert normalize_answer("hes") == "he's"
    assert normalize_answer("let's") == "let 's"              # split in step 1 before the table is consulted
    assert normalize_answer("twas") == "'twas"


def test_rule_order():
    assert normalize_answer("The (Two) dogs, aren't they?") == "2 dogs aren't they"
    assert normalize_answer("A-frame.") == "frame"  # '-' becomes a space, then the article goes


# --- accuracy ------------------------------------------------------------------------------------------------------


def reference_accuracy(pred: str, answers: list[str]) -> float:
    """Explicit enumeration of the 10 leave-one-out subsets of 9 answers."""
    pred = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    subsets = list(itertools.combinations(range(len(gts)), len(gts) - 1))
    return sum(min(1.0, sum(gts[j] == pred for j in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(matches, expected):
    answers = ["2"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("Two.", answers) == pytest.approx(expected)
    assert vqa_accuracy("Two.", answers) == pytest.approx(reference_accuracy("Two.", answers))


def test_accuracy_normalises_both_sides():
    answers = ["Yes", "yes.", "YES", "no", "no", "nope", "yes", "Yes!", "no", "no"]
    assert vqa_accuracy("yes", answers) == pytest.approx(reference_accuracy("yes", answers)) == pytest.approx(1.0)
    assert vqa_accuracy("No", answers) == pytest.approx(reference_accuracy("No", answers)) == pytest.approx(1.0)
    assert vqa_accuracy("nope", answers) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        vqa_accuracy("yes", ["yes"])


# --- exact match and POPE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred, gt, hit", [
    ("Yes.", "yes", 1.0), ("Red..", "red", 1.0), ("red", "blue", 0.0), (".red", "red", 0.0), ("red ", "red", 0.0),
])
def test_exact_match(pred, gt, hit):
    assert exact_match(pred, gt) == hit


@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a dog.", "yes"),
    ("No, there is not.", "no"),
    ("There is not a dog in the image", "no"),
    ("no", "no"), ("No.", "no"), ("no,", "no"),
    ("NO", "yes"),              # only "No", "no" and "not" count
    ("No!", "yes"),
    ("", "yes"),
    ("Yes. No", "yes"),        # only the text before the first period
])
def test_pope_parse(text, parsed):
    assert pope_parse(text) == parsed


def test_pope_metrics():
    answers = ["Yes", "Yes.", "No", "no, it is not", "yes", "No"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    m = pope_metrics(answers, labels)
    assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (2, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)  # predicted yes
    empty = pope_metrics(["no", "no"], ["no", "no"])
    assert empty["precision"] == 0.0 and empty["f1"] == 0.0 and empty["accuracy"] == 1.0


def test_pope_metrics_lmms_eval():
    answers = ["yes", "Yes.", "no", "maybe", "yes", " No "]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    m = pope_metrics_lmms(answers, labels)
    assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (1, 1, 1, 1)  # "Yes." and "maybe" count in neither
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["yes_ratio"] == pytest.approx(3 / 6)  # ground-truth yes


def test_score_predictions_categories_and_mean_f1():
    questions = [{"question_id": i, "image": "x.png", "text": "q", "category": c}
                 for i, c in enumerate(["random", "random", "adversarial", "adversarial"])]
    answers = {f"{i}": {"answers": None, "answer": a, "category": None}
               for i, a in enumerate(["yes", "no", "yes", "no"])}
    preds = [{"question_id": i, "text": t} for i, t in enumerate(["Yes.", "No.", "Yes", "Yes"])]
    s = score_predictions(preds, answers, questions, metric="pope")
    assert s["pope"]["by_category"]["random"]["f1"] == 1.0
    assert s["pope"]["by_category"]["adversarial"]["f1"] == pytest.approx(2 / 3)
    assert s["pope"]["score"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert s["pope"]["pooled"]["TP"] == 2 and s["pope"]["lmms_eval_pooled"]["TP"] == 1

    vqa_answers = {"0": {"answers": ["2"] * 3 + ["3"] * 7, "answer": None, "category": None},
                   "1": {"answers": ["red"] * 10, "answer": None, "category": None}}
    s = score_predictions([{"question_id": 0, "text": "two"}, {"question_id": 1, "text": "Red"},
                           {"question_id": 7, "text": "x"}], vqa_answers)
    assert set(s) >= {"vqav2"} and "exact" not in s
    assert s["vqav2"]["score"] == pytest.approx(100 * (0.9 + 1.0) / 2)
    assert s["count"] == 2 and s["unscored"] == 1 and s["missing"] == 0
