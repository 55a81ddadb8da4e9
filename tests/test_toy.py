"""The shipped toy models (tl_vlm.toy): task, files, and the known mechanism.

Bounds (closed-set accuracy over 300 held-out examples; chance 0.25 per question type):
every model >= 0.95 clean; toy-gated: EOI knockout within 0.1 of chance, img->text
knockout keeps >= 0.9 of clean; toy-distributed: the reverse; toy-last-image: knocking out
the last image code (or img->text, which cuts it too) within 0.1 of chance, EOI knockout
keeps >= 0.9 of clean. Reproduction of the
weights from the seed is checked by ``python -m tl_vlm.toy.train --check`` (minutes).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tl_vlm.toy import (QUESTION_TYPES, TOY_MODELS, chance_level, make_examples, make_pairs,
                        toy_model_path)
from tl_vlm.toy import task
from tl_vlm.toy.evaluate import evaluate

N_EVAL = 300


@pytest.fixture(scope="module")
def data():
    return make_examples(N_EVAL, seed=task.DEFAULT_EVAL_SEED)


@pytest.fixture(scope="module")
def models(toy_models):
    return toy_models


@pytest.fixture(scope="module")
def scores(models, data):
    """(model, condition) -> ToyScore, computed once."""
    out = {}
    for name, model in models.items():
        for condition in ("clean", "eoi", "img2text", "last_image"):
            out[name, condition] = evaluate(model, data, condition)
    return out


# -- the task -----------------------------------------------------------------------


def test_task_is_deterministic_balanced_and_not_guessable(data):
    again = make_examples(N_EVAL, seed=task.DEFAULT_EVAL_SEED)
    assert again.prompts == data.prompts and again.answer_ids == data.answer_ids
    assert make_examples(N_EVAL, seed=1).prompts != data.prompts
    for q in QUESTION_TYPES:
        counts = Counter(data.of_question(q).labels)
        assert sorted(counts) == [0, 1, 2, 3] and len(set(counts.values())) == 1, (q, counts)
    assert chance_level(data) == 0.25
    # the wording of a question does not give its answer away
    for q in QUESTION_TYPES:
        for t in range(len(task.TEMPLATES[q])):
            labels = [e.label for e in data if e.question == q and e.template == t]
            assert max(Counter(labels).values()) / len(labels) < 0.45
    # attributes are independent of each other across the set
    pairs = Counter((e.image.colour, e.image.shape) for e in data)
    assert len(pairs) == 16


def test_images_draw_the_attributes():
    img = task.draw_image(colour=2, shape=task.SHAPES.index("plus"), position=3,
                          background=[0] * 36)
    grid = [list(img.codes[r * 6:(r + 1) * 6]) for r in range(6)]
    piece = task.object_code(2, task.SHAPES.index("plus"))
    assert [grid[r][3:] for r in range(3, 6)] == [[0, piece, 0], [piece] * 3, [0, piece, 0]]
    assert all(c == 0 for r in range(3) for c in grid[r])
    ex = task.ToyExample(img, "colour", 1)
    assert ex.answer == "blue" and ex.prompt.endswith("<eoss> which colour ?")
    assert ex.prompt.split()[1:37] == [task.code_token(c) for c in img.codes]


def test_pairs_differ_only_in_the_asked_attribute():
    pairs = make_pairs(36, seed=0)
    assert [p.source.question for p in pairs[:3]] == list(QUESTION_TYPES)
    seen = Counter()
    for p in pairs:
        q = p.source.question
        assert p.target.question == q and p.source.template == p.target.template
        assert p.source.label != p.target.label
        for other in set(QUESTION_TYPES) - {q}:
            assert p.source.image.label(other) == p.target.image.label(other)
        seen[q, p.source.label, p.target.label] += 1
        if q == "colour":   # same cells, another colour: only object cells differ
            diff = [i for i, (a, b) in enumerate(zip(p.source.image.codes, p.target.image.codes))
                    if a != b]
            assert len(diff) == len(task.SHAPE_CELLS[task.SHAPES[p.source.image.shape]])
    assert len(seen) == 36   # every ordered pair of different values, per question type


# -- the shipped files --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_shipped_checkpoint_files(name):
    path = toy_model_path(name)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "README.md", "metrics.json"} <= files
    assert sum(p.stat().st_size for p in path.iterdir()) < 2_500_000
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["ChameleonForConditionalGeneration"]
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["conditions"]["clean"]["accuracy"] >= 0.95
    assert "python -m tl_vlm.toy.train" in (path / "README.md").read_text()
    assert toy_model_path(TOY_MODELS[name]) == path
    with pytest.raises(ValueError, match="unknown toy model"):
        toy_model_path("toy-nothing")


def test_tokenizer_and_processor_match_the_task(models, data):
    from tl_vlm.toy.train import encode

    model = models["toy-gated"]
    assert model.layout.tokenizer.get_vocab() == {w: i for i, w in enumerate(task.vocabulary())}
    batch = model.prepare(data.prompts[:6], padding_side="right")
    ids, mask, _ = encode(list(data[:6]), with_answer=False)
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)


def test_positions_of_a_pretokenised_toy_image(models, data):
    model = models["toy-distributed"]
    batch = model.prepare(data.prompts[:3])
    pos = batch.positions
    # <s> 0, BOI 1, codes 2-37, EOI 38, question, <reserved08706> last
    n = task.GRID * task.GRID
    assert pos.boi.tolist() == [[1]] * 3
    assert pos.image.tolist() == [list(range(2, 2 + n))] * 3
    assert pos.gate.tolist() == [[2 + n]] * 3 and pos.eoi.tolist() == [[2 + n]] * 3
    assert pos.grid[0].tolist() == [[0, r, c] for r in range(6) for c in range(6)]
    for b, e in enumerate(data[:3]):
        assert pos.after_image[b].tolist() == list(range(3 + n, 3 + n + len(e.question_text.split()) + 1))
    assert "pixel_values" not in batch.inputs


# -- the mechanism ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_clean_accuracy(scores, name):
    s = scores[name, "clean"]
    assert s.accuracy >= 0.95, s
    assert min(s.per_question.values()) >= 0.9, s


def test_gated_needs_the_gate(scores):
    clean, eoi, img = (scores["toy-gated", c] for c in ("clean", "eoi", "img2text"))
    assert abs(eoi.accuracy - eoi.chance) <= 0.1, eoi
    assert img.accuracy >= 0.9 * clean.accuracy, img


def test_distributed_ignores_the_gate(scores):
    clean, eoi, img = (scores["toy-distributed", c] for c in ("clean", "eoi", "img2text"))
    assert eoi.accuracy >= 0.9 * clean.accuracy, eoi
    assert abs(img.accuracy - img.chance) <= 0.1, img


def test_last_image_model_needs_its_last_code(scores):
    clean, eoi, img, last = (scores["toy-last-image", c]
                             for c in ("clean", "eoi", "img2text", "last_image"))
    assert abs(last.accuracy - last.chance) <= 0.1, last
    assert abs(img.accuracy - img.chance) <= 0.1, img
    assert eoi.accuracy >= 0.9 * clean.accuracy, eoi
    # the other models do not need the last code
    for name in ("toy-gated", "toy-distributed"):
        assert scores[name, "last_image"].accuracy >= 0.9 * scores[name, "clean"].accuracy


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_generate_answers_one_word(models, data, name):
    model = models[name]
    sub = data[:6]
    out = model.generate(model.prepare(sub.prompts, padding_side="left"), max_new_tokens=3)
    assert [t.strip() for t in out.text] == sub.answers


# -- the training code --------------------------------------------------------------


def test_training_attention_equals_eager_without_masks():
    from transformers import ChameleonForConditionalGeneration

    from tl_vlm.toy import train

    train._register_attention()
    tok = train.build_tokenizer()
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(
        train.build_config(train.Recipe("gated", layers=2), tok)).eval()
    ids, mask, _ = train.encode(list(make_examples(4, seed=3)))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(train.ATTN_IMPLEMENTATION)
        ours = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], eager[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gated", "distributed", "last_image"])
def test_training_masks_and_a_few_steps(name):
    from tl_vlm.toy import train

    recipe = train.Recipe(name, layers=2, steps=2, batch=8, warmup=1, probe=1.0, robust=True,
                          penalty_delay=1, penalty_ramp=1)
    ids, _, _ = train.encode(list(make_examples(2, seed=0)))
    forbid = recipe.forbidden(ids)
    boi, eoi, n = 1, 2 + task.GRID * task.GRID, task.GRID * task.GRID
    last = int((ids[0] != task.token_id("<pad>")).sum()) - 1
    if name == "gated":
        assert forbid[0, last, boi:eoi].all() and not forbid[0, last, eoi]
        assert not forbid[0, eoi].any()
        assert recipe.knockout(ids)[0, :, eoi].all()
    elif name == "distributed":
        assert forbid[0, last, eoi] and not forbid[0, last, boi:eoi].any()
        assert forbid[0, eoi, boi:eoi].all() and forbid[0, eoi].sum() == n + 1
    else:   # text reads the last code only; EOI is blind
        assert forbid[0, last, boi:eoi - 1].all() and not forbid[0, last, eoi - 1]
        assert forbid[0, last, eoi] and forbid[0, eoi, boi:eoi].all()
        assert recipe.gate(ids)[0].nonzero().flatten().tolist() == [eoi - 1]
        assert recipe.knockout(ids)[0, :, eoi - 1].all() and recipe.knockout(ids)[0].sum() == len(ids[0])
    assert [recipe.penalty_at(s) for s in (0, 1, 2, 5)] == [0.0, 5.0, 10.0, 10.0]
    assert not forbid[0, :eoi].any()   # nothing before EOI is constrained
    logs = []
    model, _, _ = train.train(recipe, seed=0, log=logs.append)
    assert len(logs) == 2 and all("leak" in line for line in logs)
    assert all(torch.isfinite(p).all() for p in model.parameters())
