"""Information-flow maps: equal to a hand-written loop of single knockouts, and they find
the planted routes of the toy models."""

import math

import pytest
import torch

from tl_vlm import analyses as A
from tl_vlm.analyses.flow import DEFAULT_EDGES, question, windows
from tl_vlm.eval.tasks import Example, NextTokenTask, toy_task


def _hand_loop(model, task, edge_sets, span):
    """Per example: the full forward with the edge cut in ``span``, one example at a time."""
    changes, correct = [], []
    for ex in task.examples:
        batch = task.prepare(model, [ex])
        pos = batch.positions
        target = task.answer_ids(model, [ex])
        clean = model(batch)[0, pos.last[0]].softmax(-1)[0, target[0]]
        keys, queries = edge_sets(pos)
        cut_logits = model.run_with_hooks(batch, fwd_hooks=[
            (f"blocks.{layer}.attn.hook_pattern", _zero(queries, keys)) for layer in span])
        last = cut_logits[0, pos.last[0]][0]
        changes.append(float(100 * (last.softmax(-1)[target[0]] - clean) / clean))
        correct.append(float(task.score_from_logits(model, [ex], last[None])[0]))
    return sum(changes) / len(changes), sum(correct) / len(correct)


def _zero(queries, keys):
    """The paper's knockout written out: zero the pattern at (query, key), no renormalising."""
    def hook(pattern, hook):
        cut = queries.mask[:, None, :, None] & keys.mask[:, None, None, :]
        return pattern.masked_fill(cut, 0.0)
    return hook


@pytest.mark.parametrize("name", ["toy-gated", "toy-distributed"])
def test_every_number_equals_a_hand_loop_of_single_knockouts(toy_models, name):
    model, task = toy_models[name], toy_task(6)
    flow = A.flow_map(model, task, window=2, batch_size=4, show_progress=False)
    groups = {"image": lambda p: p.image, "gate": lambda p: p.gate, "question": question,
              "last": lambda p: p.last}
    for edge in DEFAULT_EDGES:
        source, target = edge.split("->")
        for i, span in enumerate(windows(model.cfg.n_layers, 2)):
            change, accuracy = _hand_loop(
                model, task, lambda p: (groups[source](p), groups[target](p)), span)
            assert flow.edges[edge][i] == pytest.approx(change, abs=1e-3), (edge, span)
            assert flow.accuracy[edge][i] == pytest.approx(accuracy)
    assert flow.layers == [0, 1, 2] and flow.window == 2 and flow.n_examples == 6


def test_the_planted_routes(toy_models):
    task = toy_task(24)
    gated = A.flow_map(toy_models["toy-gated"], task, window=1, show_progress=False)
    spread = A.flow_map(toy_models["toy-distributed"], task, window=1, show_progress=False)
    planted = A.flow_map(toy_models["toy-last-image"], task, window=1, show_progress=False,
                         groups={"last_image": "last_image", "other_image":
                                 lambda p: p.image - p.last_image},
                         edges=["last_image->last", "other_image->last", "gate->last"])
    # toy-gated: through the gate (image -> gate, gate -> last), never image -> last
    assert min(gated.edges["gate->last"]) < -40 and min(gated.edges["image->gate"]) < -40
    assert max(abs(x) for x in gated.edges["image->last"]) < 1
    # toy-distributed: the reverse
    assert min(spread.edges["image->last"]) < -40
    assert max(abs(x) for x in spread.edges["gate->last"] + spread.edges["image->gate"]) < 1
    # toy-last-image: through its planted position only
    assert min(planted.edges["last_image->last"]) < -40
    assert max(abs(x) for x in planted.edges["other_image->last"] + planted.edges["gate->last"]) < 1


def test_a_family_without_a_gate_skips_its_edges(tiny_zoo):
    model = tiny_zoo.model("llava")
    spec = tiny_zoo.specs["llava"]
    examples = [Example(p, images=tuple(im if isinstance(im, (list, tuple)) else [im]),
                        answers=("cat",)) for p, im in zip(spec.prompts, spec.images)]
    flow = A.flow_map(model, NextTokenTask("llava", examples), show_progress=False)
    assert set(flow.skipped) == {"image->gate", "gate->question", "gate->last"}
    assert "gate group is empty in every example" in flow.skipped["gate->last"]
    assert set(flow.edges) == {"image->question", "image->last", "question->last"}
    assert all(math.isfinite(x) for x in flow.edges["image->last"])


def test_bad_options_fail_before_any_forward(toy_models):
    model, task = toy_models["toy-gated"], toy_task(2)
    for kwargs, message in [({"window": 0}, "window must be a whole number of layers in 1..4"),
                            ({"window": 5}, "in 1..4, got 5"),
                            ({"metric": "logit"}, "metric must be one of"),
                            ({"edges": ["image->answer"]}, "no group 'answer'"),
                            ({"edges": ["image-last"]}, "an edge is 'source->target'"),
                            ({"edges": ["image->image"]}, "the same group"),
                            ({"edges": []}, "no edges to cut")]:
        with pytest.raises(ValueError, match=message):
            A.flow_map(model, task, show_progress=False, **kwargs)


def test_to_dict_round_trip(toy_models):
    flow = A.flow_map(toy_models["toy-gated"], toy_task(4), window=2, show_progress=False)
    again = A.FlowMap.from_dict(flow.to_dict())
    assert again.edges == flow.edges and again.layers == flow.layers
    assert torch.tensor(again.se["gate->last"]).isfinite().all()


def test_cli_flow_writes_the_report(tmp_path, capsys):
    import json

    from tl_vlm.cli import commands as cli

    out = tmp_path / "flow"
    assert cli.main(["flow", "--model", "toy-gated", "--n-examples", "8", "--window", "1",
                     "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("Cutting ")
    saved = json.loads((out / "flow.json").read_text())
    assert saved["model"] == "toy-gated" and saved["layers"] == [0, 1, 2, 3]
    assert set(saved["edges"]) == set(DEFAULT_EDGES) == set(saved["se"]) == set(saved["accuracy"])
    assert (out / "index.html").read_text().count('class="plotly-graph-div"') == 1


@pytest.mark.parametrize("argv, message", [
    (["--window", "9"], "--window 9: toy-gated has 4 layers"),
    (["--edges", "image->answer"], "--edges: edge 'image->answer': no group 'answer'"),
])
def test_cli_flow_refuses_bad_flags_in_one_line(tmp_path, capsys, argv, message):
    from tl_vlm.cli import commands as cli

    assert cli.main(["flow", "--out", str(tmp_path / "f"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "f").exists()
