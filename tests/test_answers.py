"""One answer-token policy (tl_vlm.core.answers) for tasks, patching and the CLI, checked on a
Llama-style SentencePiece tokenizer, where `" cat"` tokenizes as `["▁", "▁cat"]`."""

import warnings

import pytest
import torch

from tests.tiny import make_sentencepiece_tokenizer
from tl_vlm import analyses as A
from tl_vlm.core.answers import AnswerTokenError, answer_token_id, answer_token_ids
from tl_vlm.eval.tasks import Example, NextTokenTask


@pytest.fixture(scope="module")
def sp_tokenizer():
    return make_sentencepiece_tokenizer(["<image>"], extra_pieces=["hedral"])


def _id(tok, piece):
    return tok.convert_tokens_to_ids(piece)


def test_the_bare_space_piece_is_never_the_answer(sp_tokenizer):
    tok = sp_tokenizer
    assert tok.convert_ids_to_tokens(tok(" cat", add_special_tokens=False)["input_ids"]) == ["▁", "▁cat"]
    assert answer_token_id(tok, "cat") == answer_token_id(tok, " cat ") == _id(tok, "▁cat")
    assert answer_token_id(tok, "dog") != answer_token_id(tok, "cat")


def test_unknown_words_and_collisions_are_errors(sp_tokenizer):
    tok = sp_tokenizer
    with pytest.raises(AnswerTokenError, match="'ñu' is not in the vocabulary"):
        answer_token_id(tok, "ñu")
    with pytest.raises(AnswerTokenError, match=r"\['cat', 'cathedral'\] share their first token"):
        answer_token_ids(tok, ["dog", "cat", "cathedral"], closed_set=True)
    merged = answer_token_ids(tok, ["cat", "cathedral"], closed_set=True, on_collision="merge")
    assert merged.tolist() == [_id(tok, "▁cat")] * 2
    with pytest.raises(AnswerTokenError, match="non-empty word"):
        answer_token_id(tok, "  ")


def test_a_multi_token_answer_warns_once(sp_tokenizer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = answer_token_id(sp_tokenizer, "zebra")
        answer_token_id(sp_tokenizer, "zebra")
    assert first == _id(sp_tokenizer, "z")
    assert [str(w.message) for w in caught if "zebra" in str(w.message)] == [
        "answer 'zebra' takes 5 tokens ['z', 'e', 'b', 'r', 'a']; it is scored by its first "
        "token ['z']"]


@torch.no_grad()
def test_closed_set_accuracy_reads_the_word_tokens(sp_llava, tiny_zoo):
    model = sp_llava
    tok = model.layout.tokenizer
    images = tiny_zoo.specs["llava"].images[:1] * 4
    examples = [Example("what is this", images=(im,), answers=(a,), kind="animal")
                for im, a in zip(images, ["cat", "dog", "cat", "dog"])]
    task = NextTokenTask("animals", examples)
    batch = task.prepare(model, examples)
    scores = task.score(model, batch, examples)
    last = model(batch)[batch.positions.last.mask]
    cat, dog = _id(tok, "▁cat"), _id(tok, "▁dog")
    says_cat = last[:, cat] > last[:, dog]
    expected = torch.tensor([bool(says_cat[i]) == (ex.answers[0] == "cat")
                             for i, ex in enumerate(examples)], dtype=torch.float)
    assert torch.equal(scores, expected)
    assert 0 < scores.mean() < 1, "both answers must be candidates (not one collapsed token)"
    clash = NextTokenTask("clash", [Example("what is this", (images[0],), ("cathedral",), kind="k"),
                                    *examples[:1]])
    clash.examples[1] = Example("what is this", (images[0],), ("cat",), kind="k")
    with pytest.raises(AnswerTokenError, match="share their first token"):
        clash.score(model, clash.prepare(model, clash.examples), clash.examples)


@torch.no_grad()
def test_patching_uses_the_same_policy(sp_llava, tiny_zoo):
    model = sp_llava
    spec = tiny_zoo.specs["llava"]
    target = model.prepare(["what is this"], images=spec.images[:1])
    source = model.prepare(["what is this"], images=spec.other_images[:1])
    res = A.patch_positions(model, source, target, positions="last_image", layers=[0],
                            answers=[("cat", "dog")])
    tok = model.layout.tokenizer
    assert res.source_answer.tolist() == [_id(tok, "▁cat")]
    assert res.target_answer.tolist() == [_id(tok, "▁dog")]
    with pytest.raises(AnswerTokenError, match="not in the vocabulary"):
        A.patch_positions(model, source, target, positions="last_image", layers=[0],
                          answers=[("ñu", "dog")])
