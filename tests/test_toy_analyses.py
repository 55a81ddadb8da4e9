"""The analyses find the mechanism planted in the shipped toy models (issue 4's bounds).

toy-gated routes every visual fact through EOI; toy-distributed never uses EOI. The
cross-modal contribution and gate patching must say so; the main job must run on them.
"""

from __future__ import annotations

import json

import pytest
import torch

from tl_vlm import analyses as A
from tl_vlm.eval.tasks import toy_task
from tl_vlm.toy import make_examples, make_pairs

N = 120


@pytest.fixture(scope="module")
def batches(toy_models):
    data = make_examples(N, seed=7)
    model = toy_models["toy-gated"]     # both share tokenizer and processor
    return [model.prepare(data.prompts[i:i + 60]) for i in range(0, N, 60)]


@torch.no_grad()
def test_eoi_takes_the_largest_share_of_text_to_image_attention_only_in_the_gated_model(
        toy_models, batches):
    shares = {name: A.cross_modal_contribution(model, batches).per_layer(value_weighted=False)
              for name, model in toy_models.items()}
    groups = list(A.DEFAULT_GROUPS)
    eoi = groups.index("eoi")
    gated = shares["toy-gated"]
    largest = gated.argmax(-1) == eoi
    assert largest.float().mean() > 0.5, gated            # most layers
    assert (shares["toy-distributed"][:, eoi] < 0.05).all(), shares["toy-distributed"]


@pytest.fixture(scope="module")
def pairs(toy_models):
    model = toy_models["toy-gated"]
    ps = make_pairs(96, seed=5)
    source = model.prepare([p.source.prompt for p in ps])
    target = model.prepare([p.target.prompt for p in ps])
    answers = [(p.source.answer, p.target.answer) for p in ps]
    return source, target, answers


@torch.no_grad()
@pytest.mark.parametrize("name, best_at_least, best_at_most", [
    ("toy-gated", 0.9, 1.0), ("toy-distributed", 0.0, 0.2)])
def test_patching_the_gate_steers_only_the_gated_model(toy_models, pairs, name,
                                                       best_at_least, best_at_most):
    source, target, answers = pairs
    res = A.patch_gate(toy_models[name], source, target, stream="attn_in", answers=answers)
    best = res.flip_rate.max().item()
    assert best_at_least <= best <= best_at_most, res.table()
    resid = A.patch_gate(toy_models[name], source, target, stream="resid_pre", answers=answers)
    assert resid.flip_rate.max().item() <= best + 1e-6   # one layer moves less than l..end


def test_toy_task_scores_closed_set(toy_models):
    task = toy_task(48)
    model = toy_models["toy-gated"]
    [(_, examples)] = list(task.batches(48))
    batch = task.prepare(model, examples)
    assert task.chance() == 0.25
    assert task.score(model, batch, examples).mean() == 1.0
    blind = task.score(model, batch, examples, A.gate_knockout(model, batch)).mean().item()
    assert abs(blind - 0.25) <= 0.15


def test_main_job_on_the_toy_default(tmp_path):
    from tl_vlm.cli import commands as cli

    out = tmp_path / "report"
    assert cli.main(["narrow-gate", "--out", str(out), "--n-examples", "96", "--n-pairs", "48",
                     "--batch-size", "48", "--steps", "accuracy,contribution,patching"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["model"] == "toy-gated"
    acc = results["results"]["accuracy"]["conditions"]
    assert acc["none"]["mean"] >= 0.95 and abs(acc["gate"]["mean"] - 0.25) <= 0.1
    assert acc["img_to_text"]["mean"] >= 0.9 * acc["none"]["mean"]
    flips = results["results"]["patching"]["streams"]["attn_in"]["flip_rate"]
    assert max(flips) >= 0.9
    assert (out / "index.html").stat().st_size > 1_000_000   # plotly.js inlined
