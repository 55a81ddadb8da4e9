"""CIDEr-D and PTB tokenisation against pycocoevalcap 1.2 golden values."""

import json
import math
import random
from pathlib import Path

import pytest

from tl_vlm.eval.metrics import (PTB_JAR_ENV, cider_d, find_ptb_jar, ptb_tokenize_approx,
                            ptb_tokenize_java)
from tl_vlm.eval.metrics import ptb as ptb_module

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "cider.json").read_text())
PTB_JAVA = json.loads((DATA / "ptb_java.json").read_text())
HYPS, REFS, EXPECTED = GOLDEN["hyps"], GOLDEN["refs"], GOLDEN["expected"]


def _java_missing() -> str | None:
    try:
        return ptb_module.java_ptb_unavailable_reason()
    except FileNotFoundError as error:        # a misconfigured TL_VLM_PTB_JAR
        return str(error)


def _assert_scores(result, expected):
    assert result.corpus == pytest.approx(expected["corpus"], abs=1e-9)
    assert list(result.per_image) == list(HYPS)
    assert list(result.per_image.values()) == pytest.approx(expected["per_image"], abs=1e-9)


def test_raw_matches_pycocoevalcap():
    result = cider_d(HYPS, REFS)
    assert result.tokenize == "raw"
    _assert_scores(result, EXPECTED["raw_whitespace"])


def test_ptb_approx_matches_the_java_pipeline():
    assert {k: ptb_tokenize_approx(v) for k, v in HYPS.items()} == EXPECTED["ptb_tokenized_hyps"]
    result = cider_d(HYPS, REFS, tokenize="ptb-approx")
    assert result.tokenize == "ptb-approx"
    _assert_scores(result, EXPECTED["ptb_java"])


def test_one_image_scores_zero():
    """log(1 image) = 0 makes every idf weight 0."""
    first = next(iter(HYPS))
    result = cider_d({first: HYPS[first]}, {first: REFS[first]})
    assert result.corpus == EXPECTED["single_image_corpus"] == 0.0


def test_scores_depend_on_the_evaluated_set():
    three = {k: HYPS[k] for k in list(HYPS)[:3]}
    subset = cider_d(three, {k: REFS[k] for k in three})
    full = cider_d(HYPS, REFS)
    assert subset.per_image["1"] != pytest.approx(full.per_image["1"])


def test_gaussian_length_penalty_and_clipping():
    """"dog" against "dog" x 7: the unigram vectors are parallel, so the clipped
    similarity is 1 and only the length penalty exp(-6**2 / (2 * 6**2)) remains; no
    bigrams on the hypothesis side. "dog dog" against "dog": clipped to
    min(2w, w) * w / (2w * w) = 1/2, bigrams 0."""
    refs = {1: [" ".join(["dog"] * 7)], 2: ["cat"], 3: ["dog"]}
    result = cider_d({1: "dog", 2: "cat", 3: "dog dog"}, refs)
    assert result.per_image[1] == pytest.approx(10 / 4 * math.exp(-0.5), abs=1e-12)
    assert result.per_image[2] == pytest.approx(10 / 4, abs=1e-12)
    assert result.per_image[3] == pytest.approx(10 / 4 * 0.5 * math.exp(-1 / 72), abs=1e-12)


@pytest.mark.parametrize("predictions, references, error, message", [
    ({1: "a"}, {2: ["a"]}, ValueError, "same image ids.*1 only in predictions"),
    ({}, {}, ValueError, "at least one image"),
    ({1: ["a dog"]}, {1: ["a dog"]}, TypeError, r"predictions\[1\] must be one caption"),
    ({1: "a"}, {1: "a dog"}, TypeError, r"references\[1\] must be a list"),
    ({1: "a"}, {1: []}, ValueError, r"references\[1\] is empty"),
    ({1: "a"}, {1: ["a", 3]}, TypeError, "references must be strings"),
    ([("a", "b")], {1: ["a"]}, TypeError, "predictions must be a mapping"),
])
def test_bad_input_says_what_was_expected(predictions, references, error, message):
    with pytest.raises(error, match=message):
        cider_d(predictions, references)


def test_unknown_tokenize_mode():
    with pytest.raises(ValueError, match="tokenize must be one of"):
        cider_d(HYPS, REFS, tokenize="nltk")


def test_ptb_falls_back_to_the_approximation_with_one_warning(monkeypatch):
    monkeypatch.setattr(ptb_module.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no `java`.*ptb-approx") as caught:
        result = cider_d(HYPS, REFS, tokenize="ptb")
    assert len(caught) == 1
    assert result.tokenize == "ptb-approx"
    _assert_scores(result, EXPECTED["ptb_java"])


def test_ptb_without_a_jar_falls_back(monkeypatch):
    monkeypatch.delenv(PTB_JAR_ENV, raising=False)
    monkeypatch.setattr(ptb_module.importlib.util, "find_spec", lambda name: None)
    assert find_ptb_jar() is None
    with pytest.warns(UserWarning, match="pycocoevalcap"):
        assert cider_d(HYPS, REFS, tokenize="ptb").tokenize == "ptb-approx"
    with pytest.raises(RuntimeError, match="cannot run the Java PTBTokenizer"):
        ptb_tokenize_java(["a dog"])


def test_a_jar_variable_naming_a_missing_file_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(PTB_JAR_ENV, str(tmp_path / "missing.jar"))
    with pytest.raises(FileNotFoundError, match=f"{PTB_JAR_ENV}=.*missing.jar is not a file"):
        cider_d(HYPS, REFS, tokenize="ptb")


@pytest.mark.parametrize("case", PTB_JAVA["cases"], ids=lambda c: c["text"][:30])
def test_ptb_approx_equals_java_output(case):
    assert ptb_tokenize_approx(case["text"]) == case["java"]


@pytest.mark.skipif(_java_missing() is not None, reason=f"Java PTBTokenizer: {_java_missing()}")
def test_java_ptb_matches_golden():
    assert ptb_tokenize_java(list(HYPS.values())) == list(EXPECTED["ptb_tokenized_hyps"].values())
    texts = [case["text"] for case in PTB_JAVA["cases"] + PTB_JAVA["known_differences"]]
    expected = [case["java"] for case in PTB_JAVA["cases"] + PTB_JAVA["known_differences"]]
    assert ptb_tokenize_java(texts + ["", "two\nlines"]) == expected + ["", "two lines"]
    result = cider_d(HYPS, REFS, tokenize="ptb")
    assert result.tokenize == "ptb"
    _assert_scores(result, EXPECTED["ptb_java"])


def _random_corpus(rng: random.Random) -> tuple[dict, dict]:
    vocab = "a the dog dogs cat man red on in of with running grass bus . , A".split()

    def caption() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 14)))

    ids = [f"img{i}" for i in range(rng.randint(1, 25))]
    refs = {k: [caption() for _ in range(rng.randint(1, 6))] for k in ids}
    hyps = {k: caption() if rng.random() < 0.7 else rng.choice(refs[k]) for k in ids}
    return hyps, refs


def test_random_corpora_match_pycocoevalcap():
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = random.Random(0)
    for _ in range(50):
        hyps, refs = _random_corpus(rng)
        corpus, per_image = cider_module.Cider().compute_score(
            {k: list(v) for k, v in refs.items()}, {k: [v] for k, v in hyps.items()})
        result = cider_d(hyps, refs)
        assert result.corpus == pytest.approx(float(corpus), abs=1e-9)
        assert list(result.per_image.values()) == pytest.approx(list(per_image), abs=1e-9)
