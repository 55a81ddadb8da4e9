"""Tasks: predictions from the model, scores from the predictions (no model needed)."""

import json
from dataclasses import replace

import pytest
import torch

from tests.tiny import image
from tl_vlm.eval.metrics import cider_d, vqa_accuracy
from tl_vlm.eval.prompts import PromptBuilder
from tl_vlm.eval.tasks import (CaptionTask, Example, GenerationTask, NextTokenTask, Predictions,
                          Scoring, extract_answer, toy_task)


def test_jsonl_errors_say_which_line(tmp_path):
    image(0).save(tmp_path / "a.png")
    f = tmp_path / "vqa.jsonl"
    f.write_text(json.dumps({"image": "a.png", "question": "q", "answers": ["x"]}) + "\n"
                 + json.dumps({"image": "a.png", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"vqa.jsonl:2: .*'answers'"):
        GenerationTask.from_jsonl(f)
    f.write_text(json.dumps({"image": "missing.png", "question": "q", "answers": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        GenerationTask.from_jsonl(f)


def test_chance_is_a_uniform_guess_per_question_kind():
    ex = [Example("q", answers=(a,), kind=k) for k, a in
          [("colour", "red"), ("colour", "blue"), ("shape", "cat"), ("shape", "dog"), ("shape", "one")]]
    assert NextTokenTask("t", ex).chance() == pytest.approx((2 * 1 / 2 + 3 * 1 / 3) / 5)
    assert NextTokenTask("t", [Example("q", answers=("a",))]).chance() is None


@pytest.mark.parametrize("text, full, first", [
    (" yes\n\nQuestion: is it", "yes  Question: is it", "yes"),
    ("\ta dog\truns ", "a dog runs", "a dog\truns"),
    ("", "", ""),
])
def test_answer_extraction(text, full, first):
    assert extract_answer(text) == full
    assert extract_answer(text, "first_line") == first


@torch.no_grad()
def test_vqa_predictions_are_the_generated_text_scored_officially(tiny_zoo, tmp_path):
    model = tiny_zoo.model("chameleon")
    for i in range(2):
        image(i).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": "what is this", "answers": ["red"] * 10}
            for i in range(2)]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = GenerationTask.from_jsonl(tmp_path / "vqa.jsonl", max_new_tokens=3)
    batch = task.prepare(model, task.examples)
    # the family's template ("\n" + instruction + " Answer:"), not " " + instruction
    assert batch.prompts[0] == PromptBuilder.for_model(model).vqa("what is this").text
    said = task.predict(model, batch, task.examples)
    assert said.outputs == model.generate(batch, max_new_tokens=3).text
    result = task.evaluate(task.examples, said)
    assert result.scores == [vqa_accuracy(t, ["red"] * 10) for t in said.outputs]
    # the scorer agrees with itself when the answers are what the model said
    agreed = [replace(ex, answers=(t or "x",) * 10) for ex, t in zip(task.examples, said.outputs)]
    assert task.evaluate(agreed, Predictions([t or "x" for t in said.outputs])).value == 1.0


def test_vqa_scoring_modes_and_references():
    ex = Example("q", answers=("yes",) * 10)
    task = GenerationTask("vqa", [ex])
    said = Predictions(["Yes"])
    assert task.evaluate([ex], said).value == 1.0
    assert task.evaluate([ex], said, Scoring(vqa_normalise="official")).value == 0.0
    assert task.evaluate([ex], said).metrics == {"vqa_always": 1.0, "vqa_official": 0.0}
    two_lines = Predictions(["yes\nno"])
    assert task.evaluate([ex], two_lines).value == 0.0                     # the paper: whole text
    assert task.evaluate([ex], two_lines, Scoring(extract="first_line")).value == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        task.evaluate([ex], Predictions(["a", "b"]))


def test_caption_scores_are_cider_of_the_whole_set():
    refs = [("a dog runs on grass", "a brown dog"), ("a red bus", "a bus on a road"),
            ("two cats sleep", "cats on a sofa")]
    examples = [Example("caption", references=r) for r in refs]
    said = Predictions(["A dog on grass.", "a bus", ""])                   # "" scores 0
    task = CaptionTask("captions", examples)
    result = task.evaluate(examples, said)
    direct = cider_d({i: s for i, s in enumerate(said.outputs)},
                     {i: list(r) for i, r in enumerate(refs)})
    assert result.value == direct.corpus and result.scores == list(direct.per_image.values())
    approx = task.evaluate(examples, said, Scoring(cider="ptb-approx"))
    assert approx.value == result.metrics["cider_ptb-approx"] != result.value
    with pytest.raises(ValueError, match="no reference captions"):
        task.evaluate([Example("caption")], Predictions(["a dog"]))


@torch.no_grad()
def test_closed_set_merges_colliding_class_names(tiny_zoo, sp_chameleon_path):
    from tl_vlm import HookedVLM

    model = HookedVLM.from_pretrained(str(sp_chameleon_path))
    names = ["tench", "tabby", "golden retriever", "kit fox"]   # t, t, g, k: one collision
    examples = [Example("This animal is a", (image(i),), (n,), label=n, kind="imagenet")
                for i, n in enumerate(names)]
    strict = NextTokenTask("in", examples, prompt_kind="imagenet")
    with pytest.raises(Exception, match="share their first token"):
        strict.predict(model, strict.prepare(model, examples), examples)
    task = NextTokenTask("in", examples, prompt_kind="imagenet", on_collision="merge",
                         final_representation=True)
    said = task.predict(model, task.prepare(model, examples), examples)
    assert said.tensors["final"].shape == (4, model.cfg.d_model)
    result = task.evaluate(examples, said)
    assert result.details["collision_rate"] == pytest.approx(1 / 4)
    assert result.details["chance"] == pytest.approx(1 / 3)          # 3 distinct first tokens
    assert set(said.extra["token"]) <= set(said.extra["answer_token"])
    assert 0 <= result.metrics["chi_out"] <= 1


def test_predictions_of_batches_concatenate_in_order():
    a = Predictions(["x"], {"token": [1]}, {"final": torch.zeros(1, 2)})
    b = Predictions(["y", "z"], {"token": [2, 3]}, {"final": torch.ones(2, 2)})
    both = Predictions.concat([a, b])
    assert both.outputs == ["x", "y", "z"] and both.extra == {"token": [1, 2, 3]}
    assert both.tensors["final"].tolist() == [[0, 0], [1, 1], [1, 1]]
    with pytest.raises(ValueError, match="different columns"):
        Predictions.concat([a, Predictions(["y"])])


def _predictions_by_batch_size(model, task, sizes=(1, 8)):
    out = {}
    for size in sizes:
        parts = [task.predict(model, task.prepare(model, chunk), chunk)
                 for _, chunk in task.batches(size)]
        out[size] = Predictions.concat(parts).outputs
    return out


@pytest.mark.parametrize("name", ["chameleon", "qwen2_vl", "llava"])
@torch.no_grad()
def test_greedy_predictions_do_not_depend_on_the_batch_size(tiny_zoo, name):
    """Left padding: batch 1 and batch 8 give the same greedy continuations."""
    model = tiny_zoo.model(name)
    prompts = ["what is this", "describe the image", "what colour is the cat", "where",
               "is this a dog", "what shape", "a cat", "left or right", "top"]
    examples = [Example(p, (image(i, (16 + 2 * i, 20)),)) for i, p in enumerate(prompts)]
    task = GenerationTask(name, examples, max_new_tokens=6, prompt_kind=None)
    by_size = _predictions_by_batch_size(model, task)
    assert by_size[1] == by_size[8]
    assert len(set(by_size[1])) > 1, "the continuations should depend on the input"


def test_toy_predictions_do_not_depend_on_the_batch_size(toy_models):
    task = toy_task(17)
    by_size = _predictions_by_batch_size(toy_models["toy-gated"], task)
    assert by_size[1] == by_size[8]


def test_open_class_task_scores_name_prefixes():
    from tl_vlm.eval.tasks import Example, OpenClassTask, Predictions, starts_with_name

    names = ("great white shark", "white shark", "man-eater")
    examples = [Example("This animal is a", references=names)] * 6
    said = [" great white shark in the", "n white shark.", " man eater", " shark", "",
            " great white"]
    result = OpenClassTask("in", examples).evaluate(examples, Predictions(said))
    assert result.scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]        # "n white" is not "white"
    assert starts_with_name("The white shark", names) and not starts_with_name("catfish", ["cat"])
    assert OpenClassTask("in", examples).chance() is None
