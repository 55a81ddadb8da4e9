"""VQA accuracy as the official VQAv2 evaluation computes it.

The official script (``GT-Vision-Lab/VQA``, ``vqaEval.py``) scores a prediction against
the ten annotators' answers. It removes line breaks and tabs and strips both sides, then
normalises the text. The prediction gets the mean, over the ten answers, of
``min(1, matches among the other nine / 3)``. The answer left out is chosen by its
position in the list, not by its value.

The paper's code (Narrow Gate ``eval_vqa.py``) and lmms-eval always normalise. The
official script normalises only when the ten answers are not all identical. Both modes
are provided.

Example:
    >>> answers = ["2", "2", "2"] + ["3"] * 7
    >>> vqa_accuracy("Two.", answers)        # 3 of 10 matches: (3 * 2/3 + 7 * 1) / 10
    0.9
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

NormaliseMode = Literal["always", "official"]
NORMALISE_MODES: tuple[str, ...] = ("always", "official")

# The official script's punctuation list. The period is handled separately, and the
# apostrophe is absent: contractions keep it.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Upstream wrote "(?!<=\d)", a lookahead for the literal text "<=" and a digit, where a
# lookbehind was meant. So the pattern removes every period that is not followed by a
# digit, including the one in "3.". Kept as upstream has it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# Upstream passes re.UNICODE (32) where the count goes, so at most 32 periods are removed.
_UPSTREAM_PERIOD_COUNT = 32

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                 "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                 "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contractions table, entry for entry. Applied after lower-casing, so the
# capitalised keys ("Im", "Ive", ...) never match, and "somebody'd" maps to "somebodyd".
# Both are upstream behaviour and are kept.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# With at least this many answers the official leave-one-out average applies.
_ANNOTATORS = 10


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # Whether a mark is deleted or becomes a space is decided on the *input* text, once
    # per mark. A digit-comma-digit anywhere deletes every mark, as upstream does.
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_UPSTREAM_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalise_vqa_answer(text: str) -> str:
    """Normalise an answer as the official VQA evaluation does.

    The steps are:

    1. line breaks and tabs become spaces, and the ends are stripped;
    2. punctuation: each mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is
       deleted if it touches a space anywhere in the text, or if the text has a
       digit-comma-digit; otherwise it becomes a space. Periods not followed by a digit
       are dropped, at most 32 of them (an upstream quirk);
    3. lower case, number words to digits ("none" is "0"), articles dropped, and the
       official contractions table ("dont" becomes "don't").

    Example:
        >>> normalise_vqa_answer("The Red one.")
        'red 1'
        >>> normalise_vqa_answer("1,000"), normalise_vqa_answer("Dont know"), normalise_vqa_answer("none")
        ('1000', "don't know", '0')
        >>> normalise_vqa_answer("black-and-white"), normalise_vqa_answer("black - white")
        ('black and white', 'black white')
    """
    if not isinstance(text, str):
        raise TypeError(f"normalise_vqa_answer expects a str, got {type(text).__name__}: {text!r}")
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(
            f"answers must be a list of the annotators' answer strings, got "
            f"{type(answers).__name__}: {answers!r}. Wrap a single answer in a list.")
    if not answers:
        raise ValueError("answers is empty: VQA accuracy needs at least one reference answer")
    for i, answer in enumerate(answers):
        if isinstance(answer, dict) and "answer" in answer:
            raise TypeError(
                f"answers[{i}] is a dict ({answer!r}); pass the answer strings, e.g. "
                f"[a['answer'] for a in row['answers']]")
        if not isinstance(answer, str):
            raise TypeError(f"answers[{i}] must be a str, got {type(answer).__name__}: {answer!r}")


def vqa_accuracy(prediction: str, answers: Sequence[str],
                 normalise: NormaliseMode = "always") -> float:
    """The VQA accuracy of one prediction against the annotators' answers, in [0, 1].

    Both the prediction and the answers have line breaks and tabs turned into spaces
    and are stripped. They are then normalised (:func:`normalise_vqa_answer`) as
    ``normalise`` says:

    - ``"always"`` (default): always normalise. This is what the Narrow Gate paper's
      code and lmms-eval do.
    - ``"official"``: normalise only when the answers are not all identical, as the
      official script does. ``"Yes"`` against ten ``"yes"`` then scores 0.

    With 10 or more answers (VQAv2 has 10), the score is the official leave-one-out
    average. For each answer *i*, count the matches *m_i* among the other answers; the
    score is the mean over *i* of ``min(1, m_i / 3)``. For m matches in 10 this gives
    0, .3, .6, .9 and then 1.

    With fewer than 10 answers there is nothing to leave out in the official sense, so
    the score is the simple ``min(1, matches / 3)``. This happens, for instance, with a
    user's JSONL rows. A single reference answer therefore scores at most 1/3.

    Example:
        >>> answers = ["2", "2", "2"] + ["3"] * 7
        >>> vqa_accuracy("2", answers), vqa_accuracy("3", answers), vqa_accuracy("4", answers)
        (0.9, 1.0, 0.0)
        >>> vqa_accuracy("Yes", ["yes"] * 10), vqa_accuracy("Yes", ["yes"] * 10, normalise="official")
        (1.0, 0.0)
        >>> vqa_accuracy("yes", ["yes", "yes", "no"])       # fewer than 10: min(1, 2/3)
        0.6666666666666666
    """
    if normalise not in NORMALISE_MODES:
        raise ValueError(f"normalise must be one of {NORMALISE_MODES}, got {normalise!r}")
    if not isinstance(prediction, str):
        raise TypeError(
            f"prediction must be one decoded answer (str), got {type(prediction).__name__}: "
            f"{prediction!r}")
    _check_answers(answers)

    prediction = _clean_whitespace(prediction)
    answers = [_clean_whitespace(answer) for answer in answers]
    if normalise == "always" or len(set(answers)) > 1:
        prediction = normalise_vqa_answer(prediction)
        answers = [normalise_vqa_answer(answer) for answer in answers]

    hits = [answer == prediction for answer in answers]
    matches = sum(hits)
    if len(answers) < _ANNOTATORS:
        return min(1.0, matches / 3)
    # Leaving out answer i leaves matches - 1 matches if answer i was a match, else matches.
    return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(answers)
