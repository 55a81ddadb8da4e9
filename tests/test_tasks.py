"""Tasks: VQA normalisation and accuracy, JSONL loading, scoring through the model."""

import json

import pytest
import torch

from tests.tiny import image
from tl_vlm.tasks import Example, GenerationTask, NextTokenTask, normalise_answer, vqa_accuracy


@pytest.mark.parametrize("text, expected", [
    ("Two dogs.", "2 dogs"), ("  The RED one ", "red 1"), ("1,000", "1000"), ("yes\nno", "yes"),
])
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


def test_vqa_accuracy_counts_annotators():
    answers = ["2", "two", "2", "3", "2", "4", "2", "2", "3", "3"]
    assert vqa_accuracy("Two.", answers) == 1.0               # six annotators said 2
    assert vqa_accuracy("3", answers) == 1.0                  # three said 3
    assert vqa_accuracy("4", answers) == pytest.approx(1 / 3)
    assert vqa_accuracy("cat", answers) == 0.0
    assert vqa_accuracy("the cat", ["cat"]) == 1.0            # a single reference: exact match


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


@torch.no_grad()
def test_generation_task_scores_what_the_model_generates(tiny_zoo, tmp_path):
    model = tiny_zoo.model("llava")
    for i in range(2):
        image(i).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": "what is this", "answers": ["red"]} for i in range(2)]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = GenerationTask.from_jsonl(tmp_path / "vqa.jsonl", max_new_tokens=3)
    [(start, examples)] = list(task.batches(8))
    batch = task.prepare(model, examples)
    assert batch.prompts[0].endswith(task.instruction)
    out = model.generate(batch, max_new_tokens=3)
    expected = [vqa_accuracy(t, ["red"]) for t in out.text]
    assert task.score(model, batch, examples).tolist() == expected
    # the scorer agrees with itself when the answer is what the model says
    said = [Example(e.prompt, e.images, (t,)) for e, t in zip(examples, out.text)]
    assert task.score(model, batch, said).tolist() == [1.0, 1.0]
