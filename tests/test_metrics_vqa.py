"""VQA accuracy against golden values computed with the official VQA evaluation logic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tl_vlm.eval.metrics import normalise_vqa_answer, vqa_accuracy

GOLDEN = json.loads((Path(__file__).parent / "data" / "vqa_accuracy.json").read_text())
MODES = {"always": "always_norm_loo", "official": "official"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["pred"])[:24])
def test_golden_cases(case, mode):
    assert vqa_accuracy(case["pred"], case["answers"], normalise=mode) == pytest.approx(
        case[MODES[mode]], abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("matches", range(11))
def test_leave_one_out_by_index(matches, mode):
    """m matching answers of 10 score 0, .3, .6, .9, 1, ...: leaving out a matching
    answer leaves m - 1 (by position, so duplicates are not all removed at once)."""
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    expected = GOLDEN["leave_one_out_by_matches_of_10"][str(matches)]
    assert vqa_accuracy("cat", answers, normalise=mode) == pytest.approx(expected, abs=1e-12)


def test_fewer_than_ten_answers_use_min_m_over_3():
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("Cat.", ["cat"] * 3 + ["dog"] * 5) == 1.0       # 3 of 9, no leave-one-out
    assert vqa_accuracy("cat", ["dog"]) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("The Red one.", "red 1"),
    ("none", "0"),
    ("an apple", "apple"),
    ("Dont", "don't"),
    ("whats that", "what's that"),
    ("Im", "im"),                       # upstream key "Im" never matches after lower-casing
    ("1,000", "1000"),
    ("1,000 (approx)", "1000 approx"),  # digit,digit deletes every mark, even brackets
    ("black-and-white", "black and white"),
    ("black - white", "black white"),   # "- " in the text: "-" is deleted
    ("yes/no", "yes no"),
    ("3.5", "3.5"),                     # a period before a digit stays
    ("3. 5", "3 5"),
    ("yes\n\nQuestion: is it", "yes question: is it"),
    ("  two\tdogs ", "2 dogs"),
])
def test_normalise_vqa_answer(text, expected):
    assert normalise_vqa_answer(text) == expected


def test_at_most_32_periods_are_removed():
    """Upstream passes re.UNICODE (32) as the count of its period substitution."""
    assert normalise_vqa_answer("a." * 40) == "a" * 32 + "a." * 8


def test_official_normalises_only_when_answers_differ():
    same = ["yes"] * 10
    assert vqa_accuracy(" yes\n", same, normalise="official") == 1.0   # whitespace still cleaned
    assert vqa_accuracy("yes.", same, normalise="official") == 0.0
    assert vqa_accuracy("yes.", same) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["no"], normalise="official") == 1.0


@pytest.mark.parametrize("call, error, message", [
    (lambda: vqa_accuracy("a", ["a"], normalise="simple"), ValueError, "normalise must be one of"),
    (lambda: vqa_accuracy("a", "a"), TypeError, "list of the annotators' answer strings"),
    (lambda: vqa_accuracy("a", []), ValueError, "at least one reference"),
    (lambda: vqa_accuracy(["a"], ["a"]), TypeError, "one decoded answer"),
    (lambda: vqa_accuracy("a", [{"answer": "a", "answer_id": 1}]), TypeError,
     r"a\['answer'\] for a in"),
    (lambda: vqa_accuracy("a", ["a", None]), TypeError, r"answers\[1\] must be a str"),
    (lambda: normalise_vqa_answer(3), TypeError, "expects a str"),
])
def test_bad_input_says_what_was_expected(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_metrics_do_not_import_torch():
    code = "import sys, tl_vlm.eval.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
