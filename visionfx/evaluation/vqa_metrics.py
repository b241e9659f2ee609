"""VQA metrics as LLaVA's evaluation scripts compute them (MLLM.md §6.3, §6.4, §6.6).

- :func:`normalize_answer`: the EvalAI / MMF answer normaliser (``EvalAIAnswerProcessor``), every quirk included:
  ``","`` and ``"?"`` are deleted before the punctuation rules run (so the digit-comma rule can only fire when
  :func:`process_punctuation` is called on its own), the period rule only looks at the next character, and at most 32
  periods are removed (the reference passes ``re.UNICODE``, whose value is 32, in the ``count`` position of
  ``re.sub``). The contraction table is the MMF one, including keys that can never match (capitalised keys such as
  ``"Im"`` after lowercasing, keys with ``"'s"`` after the ``" 's"`` split) and the odd ``"somebody'd" ->
  "somebodyd"`` entry.
- :func:`vqa_accuracy`: leave-one-out soft accuracy, ``mean_i min(1, #{j != i : g_j = a} / 3)``.
- :func:`gqa_normalize` / :func:`exact_match`: LLaVA's GQA conversion, ``text.rstrip('.').lower()``.
- :func:`pope_parse` / :func:`pope_metrics`: LLaVA's ``eval_pope.py`` parsing and metrics; :func:`pope_metrics_lmms`
  the lmms-eval variant (labelled as such wherever it is reported; the two are not comparable).

Choices the references leave open: ratios with an empty denominator (no predicted positives, no items) are 0.0 where
LLaVA's script would raise; :func:`exact_match` normalises the ground truth the same way as the prediction (a no-op
for GQA's lower-case answers); :func:`vqa_accuracy` accepts any number (>= 2) of human answers, VQAv2 and TextVQA
have 10.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

__all__ = [
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "ARTICLES",
    "PUNCTUATION",
    "process_punctuation",
    "process_digit_article",
    "normalize_answer",
    "vqa_accuracy",
    "gqa_normalize",
    "exact_match",
    "pope_parse",
    "pope_metrics",
    "pope_metrics_lmms",
    "mean",
]

# MMF's table, entry for entry (keys the pipeline can never produce are kept: they are part of the reference).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = ("a", "an", "the")

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")

# The reference pattern opens with a lookahead meant as a lookbehind ("not after a digit"); at the position of a "."
# it always passes, so only the next character is checked.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_CAP = 32  # re.UNICODE == 32 lands in re.sub's count argument in the reference
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def process_punctuation(text: str) -> str:
    """Punctuation and period rules (§6.3 steps 3-4) on an already tokenised answer.

    Each mark in :data:`PUNCTUATION` is deleted if it is followed or preceded by a space in the *input*, or if the
    input holds a comma between digits; otherwise it becomes a space. Then every ``"."`` not followed by a digit is
    deleted, at most 32 of them.
    """
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_CAP)


def process_digit_article(text: str) -> str:
    """Number words to digits, articles dropped, contractions restored, words joined by single spaces (steps 5-7)."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The EvalAI answer normaliser (``EvalAIAnswerProcessor.__call__``), applied to predictions and human answers."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize: bool = True) -> float:
    """VQAv2 / TextVQA soft accuracy of one prediction against its human answers (usually 10).

    ``mean over i of min(1, #{j != i : g_j == a} / 3)``, after :func:`normalize_answer` on the prediction and each
    answer (unless ``normalize=False``, for already normalised strings).
    """
    if len(answers) < 2:
        raise ValueError(f"VQA accuracy needs at least 2 human answers (VQAv2 has 10), got {len(answers)}")
    a = normalize_answer(prediction) if normalize else prediction
    gts = [normalize_answer(g) for g in answers] if normalize else list(answers)
    hits = sum(g == a for g in gts)
    # Leaving out answer i removes one match exactly when g_i itself matches.
    return sum(min(1.0, (hits - (g == a)) / 3.0) for g in gts) / len(gts)


def gqa_normalize(text: str) -> str:
    """LLaVA's GQA prediction normalisation: ``text.rstrip('.').lower()``."""
    return text.rstrip(".").lower()


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if the GQA-normalised prediction equals the GQA-normalised answer, else 0.0."""
    return float(gqa_normalize(prediction) == gqa_normalize(answer))


def pope_parse(text: str) -> str:
    """LLaVA's POPE answer parsing: the text before the first ``"."``, commas deleted, split on spaces; ``"no"`` if a
    word is ``"No"``, ``"not"`` or ``"no"``, else ``"yes"`` (an empty answer is ``"yes"``)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _scores(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall)}


def pope_metrics(answers: Iterable[str], labels: Iterable[str], parse: bool = True) -> dict[str, float]:
    """LLaVA-style POPE metrics (``eval_pope.py``): TP/FP/TN/FN, accuracy, precision, recall, F1 and the
    **predicted** yes ratio. ``answers`` are raw model texts (parsed with :func:`pope_parse` unless ``parse=False``),
    ``labels`` the ground truth; a label is positive unless it is ``"no"``."""
    preds = [pope_parse(a) if parse else a for a in answers]
    labels = list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} answers but {len(labels)} labels")
    p = [x != "no" for x in preds]
    y = [x != "no" for x in labels]
    tp = sum(a and b for a, b in zip(p, y))
    fp = sum(a and not b for a, b in zip(p, y))
    tn = sum(not a and not b for a, b in zip(p, y))
    fn = sum(not a and b for a, b in zip(p, y))
    return {**_scores(tp, fp, tn, fn), "accuracy": _ratio(tp + tn, len(p)), "yes_ratio": _ratio(sum(p), len(p)),
            "count": len(p)}


def pope_metrics_lmms(answers: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """lmms-eval's POPE metrics: exact ``pred.lower().strip()`` against ``"yes"``/``"no"`` (so ``"Yes."`` is wrong; an
    answer that is neither only counts in accuracy) and the **ground-truth** yes ratio. Not comparable with
    :func:`pope_metrics`."""
    preds = [a.lower().strip() for a in answers]
    gts = [g.lower().strip() for g in labels]
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} answers but {len(gts)} labels")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gts))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gts))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, gts))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gts))
    return {**_scores(tp, fp, tn, fn), "accuracy": _ratio(sum(p == g for p, g in zip(preds, gts)), len(gts)),
            "yes_ratio": _ratio(sum(g == "yes" for g in gts), len(gts)), "count": len(gts)}


def mean(values: Iterable[float] | Mapping) -> float:
    values = list(values.values() if isinstance(values, Mapping) else values)
    return sum(values) / len(values) if values else 0.0
