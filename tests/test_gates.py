"""find_gates (tl_vlm.analyses.gates) finds the gate planted in each shipped toy model,
its estimates agree with exact knockouts, its cost is what it says, and it runs on every
family's tiny random model; ``tl-vlm find-gate`` writes its report."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from tl_vlm import analyses as A
from tl_vlm.cli import commands as cli
from tl_vlm.analyses.gates import GateSearch, candidate_classes, position_roles, role_label
from tl_vlm.analyses.gates.stats import spearman as _spearman
from tl_vlm.eval.tasks import Example, GenerationTask, NextTokenTask, toy_task

N = 24


@pytest.fixture(scope="module")
def searches(toy_models):
    """Each toy model searched once with every single position checked exactly."""
    return {name: A.find_gates(model, toy_task(N), batch_size=12, check_all=True, overlap=False)
            for name, model in toy_models.items()}


def test_gated_model_is_narrow_through_eoi(searches):
    gates = searches["toy-gated"]
    assert gates.verdict == "narrow" and gates.gate == ["eoi"], gates.summary()
    assert gates.gate_share > 0.9 and gates.candidate("eoi").share > 0.9
    assert gates.best_class == "eoi"
    assert gates.summary().startswith("narrow: eoi carries 0.9")
    # the text reads EOI in the later layers: cutting the first layer only changes little
    assert gates.layers["from_layer"] >= 1


def test_distributed_model_is_distributed(searches):
    gates = searches["toy-distributed"]
    assert gates.verdict == "distributed", gates.summary()
    assert gates.top_shares[1] < 0.25
    assert abs(gates.candidate("eoi").share) < 0.05           # EOI carries nothing
    assert gates.class_ranking[0].name == "image"            # the content tokens do


def test_last_image_model_is_narrow_through_its_last_code(searches):
    gates = searches["toy-last-image"]
    assert gates.verdict == "narrow" and gates.gate == ["image (5, 5)"], gates.summary()
    assert "last_image" in gates.candidate("image (5, 5)").in_classes
    assert gates.best_class == "last_image" and gates.candidate("last_image").share > 0.9
    assert abs(gates.candidate("eoi").share) < 0.05
    assert "image (5, 5) (last_image) carries" in gates.headline()


@pytest.mark.parametrize("name", ["toy-gated", "toy-distributed", "toy-last-image"])
def test_estimates_agree_with_exact_knockouts(searches, name):
    check = searches[name].check
    assert len(check["names"]) == 38                          # BOI, 36 codes, EOI: all checked
    assert check["spearman"] > 0.75, check                   # measured 0.82-0.93 (n=24)
    assert check["top_k"] == 5 and check["top_k_agree"] >= 4, check
    # the positions this sample clearly ranks in the exact top 5 (ahead of the 6th by more
    # than 2 standard errors of the paired difference)
    exact = dict(zip(check["names"], check["exact"]))
    sixth = sorted(exact.values(), reverse=True)[5]
    assert len(check["settled"]) == check["top_k_settled"]
    assert all(exact[n] > sixth for n in check["settled"])
    refined_top = {n for _, n in sorted(zip(check["refined"], check["names"]), reverse=True)[:5]}
    assert set(check["settled"]) <= refined_top
    # refined by the per-example checks, the top 5 is the exhaustive one (measured 5, 5, 5;
    # over three more seeds 5, 5, 5 / 5, 5, 5 / 5, 5, 4, the 4 within the exact ties)
    assert check["per_example"] == 5 and check["refined_top_k_agree"] == 5, check
    assert check["refined_spearman"] > 0.85, check                # measured 0.91-0.95
    if name != "toy-distributed":                             # a planted gate: the same best
        assert check["names"][0] == max(zip(check["exact"], check["names"]))[1]
        assert check["top_k_settled"] >= 1 and check["settled"][0] == check["names"][0]


def test_a_position_estimate_is_the_mean_of_each_examples_clipped_at_zero(toy_models):
    """estimate = mean over examples of max(0, sum over layers of the attribution);
    per_layer keeps the plain (unclipped) means."""
    from tl_vlm.analyses.gates import GateMetric
    from tl_vlm.analyses.gates.search import BatchSearch as _Search

    model = toy_models["toy-distributed"]
    task = toy_task(6)
    batch = task.prepare(model, task.examples)
    search = _Search(model, task, GateMetric("log_odds"), "all", rows=False, alpha=1.0)
    per_example = search.attribution(batch, task.examples)["estimate"].sum(0)   # [batch, pos]
    gates = A.find_gates(model, task, batch_size=6, rows=False, overlap=False,
                         layer_sweep=False, contribution=False, check_top=1, check_random=0)
    name = "image (5, 4)"
    at = [dict((role_label(k), p) for k, p in position_roles(batch.positions, b))[name]
          for b in range(len(task.examples))]
    values = per_example[torch.arange(len(at)), at]                   # each example's own position
    candidate = next(c for c in gates.positions if c.name == name)
    assert candidate.estimate == pytest.approx(values.clamp(min=0).mean().item(), abs=1e-6)
    assert sum(candidate.per_layer) == pytest.approx(values.mean().item(), abs=1e-6)
    assert (per_example[batch.positions.image_side.mask] < 0).any()     # clipping did something


def test_per_example_checks_are_exact_knockouts_of_each_examples_best(toy_models):
    """check_per_example=1: in each example, the image-side position with the largest
    clipped estimate (BOI, EOI, the first and last code aside: their classes measure them)
    is knocked out by hand; a position's refined value is the mean of those exact drops
    where it was that example's pick, of its clipped estimate elsewhere."""
    from tl_vlm.analyses.gates import GateMetric
    from tl_vlm.analyses.gates.search import BatchSearch as _Search
    from tl_vlm.core.positions import PositionSet

    model = toy_models["toy-last-image"]
    task = toy_task(6)
    batch = task.prepare(model, task.examples)
    pos = batch.positions
    search = _Search(model, task, GateMetric("log_odds"), "all", rows=False, alpha=1.0)
    grad = search.attribution(batch, task.examples)
    clipped = grad["estimate"].sum(0).clamp(min=0)                      # [batch, pos]
    measured = pos.boi.mask | pos.eoi.mask | pos.first_image.mask | pos.last_image.mask
    pick = clipped.masked_fill(~pos.image_side.mask | measured, -1.0).argmax(1)
    expected = clipped.clone()
    for klass in (pos.boi, pos.eoi, pos.first_image, pos.last_image):  # one position each
        cut = search.metric_under(batch, A.knockout_hooks(model, batch, keys=klass),
                                  grad["targets"], grad["allowed"])
        expected = torch.where(klass.mask, (grad["metric"] - cut)[:, None], expected)
    for b, p in enumerate(pick.tolist()):
        keys = PositionSet.from_lists([[p] if i == b else [] for i in range(6)], pos.seq_len)
        cut = search.metric_under(batch, A.knockout_hooks(model, batch, keys=keys),
                                  grad["targets"], grad["allowed"])
        expected[b, p] = grad["metric"][b] - cut[b]
    gates = A.find_gates(model, task, batch_size=6, rows=False, overlap=False, layer_sweep=False,
                         contribution=False, check_per_example=1, check_top=1, check_random=0)
    assert gates.cost["passes"]["example_check_forward"] == 1
    for candidate in gates.positions:
        at = [dict((role_label(k), p) for k, p in position_roles(pos, b))[candidate.name]
              for b in range(6)]
        want = expected[torch.arange(6), at]
        assert candidate.refined == pytest.approx(want.mean().item(), abs=1e-4), candidate.name
        picked = sum(int(pick[b]) == p for b, p in enumerate(at))
        in_class = sum(bool(measured[b, p]) for b, p in enumerate(at))
        assert candidate.checked_in == picked + in_class, candidate.name
    assert sum(c.checked_in for c in gates.positions) == 6 * (1 + 4)   # its pick + 4 classes


def test_the_estimate_is_the_gradient_times_the_pattern_by_hand(toy_models):
    """The gradient pass (key scales on the values, SDPA) equals sum over heads and
    queries of dM/dA * A computed on the eager pattern, layer by layer."""
    from tl_vlm.analyses.gates import GateMetric
    from tl_vlm.analyses.gates.search import BatchSearch as _Search

    model = toy_models["toy-gated"]
    task = toy_task(6)
    batch = task.prepare(model, task.examples)
    search = _Search(model, task, GateMetric("log_odds"), "all", rows=False, alpha=1.0)
    got = search.attribution(batch, task.examples)
    patterns = {}

    def keep(pattern, hook):
        patterns[hook.layer()] = pattern
        return pattern

    layers = range(model.cfg.n_layers)
    hooks = [(f"blocks.{l}.attn.hook_pattern", keep) for l in layers]
    with torch.enable_grad():
        last = search.transform(model.last_logits(batch, fwd_hooks=hooks))
        metric = search.metric(last, got["targets"], got["allowed"]).sum()
        grads = torch.autograd.grad(metric, [patterns[l] for l in layers])
    by_hand = torch.stack([(g * patterns[l]).sum((1, 2)).detach() for l, g in zip(layers, grads)])
    side = batch.positions.image_side.mask
    torch.testing.assert_close(got["estimate"][:, side], by_hand[:, side], atol=1e-5, rtol=1e-4)
    assert float(by_hand[:, side].abs().max()) > 1e-3


@pytest.mark.parametrize("name, agree", [("toy-gated", 5), ("toy-distributed", 4), ("toy-last-image", 4)])
def test_the_default_ranking_finds_the_exact_top_five(toy_models, searches, name, agree):
    """With the default checks (5 best by estimate, 5 random, the positions classes stand
    for), the ranking's top 5 against the top 5 of every position knocked out exactly
    (measured: 5, 4 and 4 of 5 at n=24; 5, 4 and 2 at n=240)."""
    full = searches[name].check
    truth = {n for _, n in sorted(zip(full["exact"], full["names"]), reverse=True)[:5]}
    gates = A.find_gates(toy_models[name], toy_task(N), batch_size=12, overlap=False,
                         layer_sweep=False, contribution=False)
    assert len({c.name for c in gates.ranking[:5]} & truth) >= agree


def test_positions_a_class_stands_for_are_exact_at_no_cost(toy_models):
    """BOI, EOI and the first and last code are one position per example: their classes'
    exact knockouts are theirs, checked without another forward."""
    gates = A.find_gates(toy_models["toy-gated"], toy_task(N), batch_size=12, rows=False,
                         overlap=False, layer_sweep=False, check_top=1, check_random=0)
    by_name = {c.name: c for c in gates.positions}
    for position, klass in [("boi", "boi"), ("eoi", "eoi"), ("image (0, 0)", "first_image"),
                            ("image (5, 5)", "last_image")]:
        assert by_name[position].exact == gates.candidate(klass).exact, position
        assert position in gates.check["names"]
    boi = by_name["boi"]
    assert sum(boi.per_layer) < 0 < boi.exact               # first order misses BOI: its slope
    assert 0 <= boi.estimate < boi.exact / 5                 # clipped, it is still far below
    # one forward per batch for the best-by-estimate (eoi: known) is not run; the union is
    assert gates.cost["passes"]["check_forward"] == 2 * 1


def test_classes_are_exact_knockouts(toy_models, searches):
    """A class's effect is the drop of the metric under knockout_hooks, by hand."""
    model, gates = toy_models["toy-gated"], searches["toy-gated"]
    task = toy_task(N)
    drops, scores = [], []
    for _, examples in task.batches(12):
        batch = task.prepare(model, examples)
        pos = batch.positions
        hooks = A.knockout_hooks(model, batch, keys=pos.eoi, queries=pos.all)
        with torch.no_grad():
            clean = model(batch)[pos.last.mask]
            cut = model.run_with_hooks(batch, fwd_hooks=hooks)[pos.last.mask]
        answers = task.answer_ids(model, examples)
        cands = torch.tensor([[model.tokenizer.convert_tokens_to_ids(a) for a in
                               {"colour": ["red", "green", "blue", "yellow"],
                                "shape": ["square", "plus", "x", "triangle"],
                                "position": ["top-left", "top-right", "bottom-left",
                                             "bottom-right"]}[ex.kind]] for ex in examples])

        def log_odds(logits):
            own = logits.gather(1, answers[:, None])[:, 0]
            others = logits.gather(1, cands).masked_fill(cands == answers[:, None], -torch.inf)
            return own - others.logsumexp(-1)

        drops.append(log_odds(clean) - log_odds(cut))
        scores.append(task.score(model, batch, examples, fwd_hooks=hooks))
    eoi = gates.candidate("eoi")
    assert eoi.exact == pytest.approx(torch.cat(drops).mean().item(), rel=1e-4)
    assert eoi.exact_se == pytest.approx(torch.cat(drops).std().item() / N ** 0.5, rel=1e-3)
    assert gates.candidate("eoi").exact_se == eoi.exact_se
    position = next(c for c in gates.positions if c.name == "eoi")   # from the class pass
    assert position.exact_se == eoi.exact_se
    assert eoi.score == pytest.approx(torch.cat(scores).mean().item())
    assert gates.candidate("image_side").share == pytest.approx(1.0)


def test_cost_is_a_gradient_pass_plus_one_forward_per_class(toy_models):
    """Pass 1 runs 1 forward with gradients (the clean run too) + its backward + one
    forward per distinct class, every one on the SDPA kernel (no pattern built): within
    3 + n_classes forward-equivalents. The forwards the model ran match the accounting."""
    from tl_vlm.core.attention import record_paths

    model = toy_models["toy-gated"]
    fired = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_in", lambda x, hook: fired.append(x.shape[1]))]), \
            record_paths() as paths:
        gates = A.find_gates(model, toy_task(N), batch_size=12, rows=False, overlap=False,
                             check_top=2, check_random=1)     # the contribution rides along
    cost = gates.cost
    classes = [c.name for c in gates.classes]
    assert classes == ["image_side", "boi", "first_image", "last_image", "image", "eoi"]
    assert "gate: the same positions as eoi" in gates.notes[0]        # knocked out once
    assert cost["n_classes"] == 6 and cost["passes_per_batch"] == 8 and cost["budget_forwards"] == 9
    passes = cost["passes"]
    assert passes["forward"] == 2 * 6 and passes["grad_forward"] == 2 == passes["backward"]
    assert passes["example_check_forward"] == 2 * 5                  # 5 per example, per batch
    assert len(fired) == 4 + passes["forward"] + passes["grad_forward"] + passes["check_forward"] \
        + passes["example_check_forward"] + passes["sweep_forward"]
    assert cost["check_forwards_per_batch"] == (passes["check_forward"]
                                                + passes["example_check_forward"]) / 2
    assert cost["time_ratio"] > 0 and cost["baseline_forward_s"] > 0
    assert set(paths) <= {"sdpa", "fused"} and "fused" in paths     # never eager


def test_json_round_trip(searches, tmp_path):
    gates = searches["toy-last-image"]
    again = GateSearch.from_dict(json.loads(json.dumps(gates.to_dict())))
    assert again.summary() == gates.summary()
    assert torch.equal(again.effect_grid().nan_to_num(), gates.effect_grid().nan_to_num())
    # a search saved before refined values, standard errors and settled positions existed
    from tl_vlm.study import gate_figures

    old = gates.to_dict()
    for c in old["classes"] + old["positions"]:
        for key in ("refined", "checked_in", "exact_se"):
            c.pop(key)
    for key in ("settled", "top_k_settled", "per_example", "refined", "refined_spearman",
                "refined_top_k_agree", "exact_se"):
        old["check"].pop(key)
    old["check"]["spearman"] = None                    # NaN (too few points) after JSON
    old["cost"].pop("check_forwards_per_batch")
    loaded = GateSearch.from_dict(json.loads(json.dumps(old)))
    assert loaded.summary().startswith("narrow: image (5, 5)")
    assert gate_figures.effect_grid_figure(loaded, "refined").data
    assert gate_figures.write_gate_report(loaded, tmp_path).exists()


def test_a_generation_task_uses_the_models_own_answer(toy_models):
    examples = [replace(ex, references=ex.answers * 3) for ex in toy_task(12).examples]
    task = GenerationTask("toy", examples, max_new_tokens=2, prompt_kind=None)
    gates = A.find_gates(toy_models["toy-gated"], task, batch_size=12, rows=False,
                         overlap=False, check_random=0)
    assert gates.clean_score == 1.0 and gates.gate == ["eoi"], gates.summary()
    assert gates.candidate("eoi").score < 0.6                      # generation is blinded too
    # a task that generates is scored by a clean pass of its own: one more forward a batch
    assert gates.cost["passes_per_batch"] == 3 + gates.cost["n_classes"]
    assert gates.cost["passes"]["forward"] == 1 + gates.cost["n_classes"]


def test_roles_and_classes_on_a_left_padded_batch(toy_models):
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    data = make_examples(3, seed=0)
    pos = model.prepare(data.prompts, padding_side="left").positions
    roles = [dict(position_roles(pos, b)) for b in range(3)]
    assert roles[0].keys() == roles[2].keys()                      # the same roles ...
    eoi = [r[("eoi", 0)] for r in roles]
    assert eoi == [p[0] for p in pos.eoi.tolist()] and len(set(eoi)) == 2    # ... elsewhere
    classes = candidate_classes(pos)
    assert classes["first_image"].tolist() == [[r[("image", 0, 0, 0)]] for r in roles]
    assert all(len(p) == 6 for p in classes["row 2"].tolist())


def test_bad_arguments(toy_models):
    model = toy_models["toy-gated"]
    with pytest.raises(ValueError, match="metric must be 'log_odds' or 'logprob'"):
        A.find_gates(model, toy_task(12), metric="accuracy")
    with pytest.raises(ValueError, match="the task has no examples"):
        A.find_gates(model, toy_task(12), limit=0)
    with pytest.raises(ValueError, match="check_top must be at least 1"):
        A.find_gates(model, toy_task(12), check_top=0)
    with pytest.raises(TypeError, match="find_gates needs a tl_vlm.eval.tasks.Task"):
        A.find_gates(model, [model.prepare(["what is this"])])


def test_settled_positions_use_the_paired_difference():
    """Both drops come from the same examples: a constant lead is settled however much
    the examples differ; the same means with the lead changing sign are not; a position
    the runner-up's examples lack is compared where both were measured."""
    from tl_vlm.analyses.gates.stats import standard_error as _standard_error
    from tl_vlm.analyses.gates.verdict import settled as _settled

    noisy = torch.tensor([0.0, 5.0, 1.0, 9.0, 3.0])
    assert _settled(["a", "b"], {"a": noisy + 0.1, "b": noisy}, 1) == ["a"]
    flipping = noisy + torch.tensor([2.0, -1.8, 2.0, -1.8, 0.1])
    assert _settled(["a", "b"], {"a": flipping, "b": noisy}, 1) == []
    gaps = torch.tensor([float("nan"), 6.0, 2.0, 10.0, 4.0])
    assert _settled(["a", "b"], {"a": gaps, "b": noisy}, 1) == ["a"]
    assert _settled(["a"], {"a": noisy}, 1) == []                        # no runner-up
    assert _standard_error(torch.tensor([1.0, float("nan")])) is None
    assert _standard_error(torch.tensor([1.0, 3.0])) == pytest.approx(1.0)


def test_spearman():
    assert _spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert _spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.866, abs=1e-3)   # ties


def test_every_family_runs_end_to_end(tiny_zoo, family):
    spec = tiny_zoo.specs[family]
    model = tiny_zoo.model(family)
    examples = [Example(p, images=tuple(im if isinstance(im, (list, tuple)) else [im]),
                        answers=("cat",)) for p, im in zip(spec.prompts, spec.images)]
    task = GenerationTask(family, examples, max_new_tokens=1, prompt_kind=None)
    gates = A.find_gates(model, task, batch_size=2, check_random=2, overlap=False)
    assert gates.verdict in ("narrow", "mixed", "distributed", "no image effect")
    assert gates.classes[0].name == "image_side" and gates.positions
    n_side = max(len(position_roles(task.prepare(model, examples).positions, b))
                 for b in range(len(examples)))
    assert len(gates.positions) >= n_side
    assert all(len(c.per_layer) == model.cfg.n_layers for c in gates.positions)
    assert gates.cost["passes_per_batch"] == 3 + gates.cost["n_classes"]
    json.dumps(gates.to_dict())
    # a next-token task: the gradient pass (SDPA forward and backward) is the clean run
    quick = A.find_gates(model, NextTokenTask(family, examples), batch_size=2, check_top=1,
                         check_random=0, rows=False, overlap=False, layer_sweep=False)
    assert quick.cost["passes_per_batch"] == 2 + quick.cost["n_classes"]
    assert all(math.isfinite(c.estimate) for c in quick.positions)
    # recomputed activations (each family's decoder blocks and their kwargs): same estimates
    again = A.find_gates(model, NextTokenTask(family, examples), batch_size=2, check_top=1,
                         check_random=0, rows=False, overlap=False, layer_sweep=False,
                         check_per_example=0, recompute_activations=True)
    before = {c.name: c.estimate for c in quick.positions}
    assert {c.name: c.estimate for c in again.positions} == pytest.approx(before, abs=1e-5)


def test_cli_find_gate_writes_the_report(tmp_path, capsys):
    out = tmp_path / "gate"
    assert cli.main(["find-gate", "--model", "toy-last-image", "--n-examples", "12",
                     "--no-rows", "--check-random", "0", "--check-per-example", "2",
                     "--recompute-activations", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("narrow: image (5, 5) (last_image) carries")
    saved = GateSearch.from_dict(json.loads((out / "gates.json").read_text()))
    assert saved.model == "toy-last-image" and saved.gate == ["image (5, 5)"]
    assert saved.check["per_example"] == 2 and saved.cost["passes"]["recompute_forward"] == 1
    page = (out / "index.html").read_text()
    import importlib.util

    with_overlap = importlib.util.find_spec("dadapy") is not None    # the optional extra
    assert page.count("class=\"plotly-graph-div\"") == 4 + with_overlap
    assert (saved.candidate("eoi").overlap is not None) == with_overlap


def test_contribution_and_overlap_per_class(toy_models):
    pytest.importorskip("dadapy")
    gates = A.find_gates(toy_models["toy-gated"], toy_task(N), batch_size=12, rows=True,
                         overlap=True, check_random=0)
    eoi, image = gates.candidate("eoi"), gates.candidate("image")
    assert eoi.contribution > 0.99 and image.contribution < 0.01        # the text reads EOI
    assert gates.candidate("image_side").contribution == pytest.approx(1.0)
    assert len(eoi.contribution_per_layer) == 4
    assert sum(gates.candidate(f"row {r}").contribution for r in range(6)) \
        == pytest.approx(image.contribution, abs=1e-6)
    assert len(eoi.overlap) == 5 and gates.candidate("row 0").overlap is None   # not a probe
    assert gates.cost["passes"]["overlap_forward"] == 2


def test_the_gradient_pass_leaves_no_graph_in_the_contribution(toy_models):
    """The contribution's readers ride along the gradient pass: what they keep is detached
    (no autograd graph kept alive across batches, no requires_grad warning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gates = A.find_gates(toy_models["toy-gated"], toy_task(12), batch_size=12, rows=False,
                             overlap=False, check_random=0, layer_sweep=False)
    assert gates.candidate("eoi").contribution > 0.5


def test_recomputed_activations_give_the_same_search(toy_models):
    """recompute_activations: the gradient pass keeps block inputs only and recomputes in
    the backward: the same estimates and contribution (readers count their first call),
    one more forward per batch, and every block's hooks fire twice in that pass."""
    model = toy_models["toy-gated"]
    kwargs = dict(batch_size=12, rows=False, overlap=False, layer_sweep=False, check_top=1,
                  check_random=0, check_per_example=0)
    plain = A.find_gates(model, toy_task(N), **kwargs)
    fired = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_in", lambda x, hook: fired.append(1))]):
        again = A.find_gates(model, toy_task(N), recompute_activations=True, **kwargs)
    for a, b in zip(plain.positions, again.positions):
        assert a.name == b.name and a.estimate == pytest.approx(b.estimate, abs=1e-5)
        assert a.per_layer == pytest.approx(b.per_layer, abs=1e-5)
    for a, b in zip(plain.classes, again.classes):
        assert a.contribution == pytest.approx(b.contribution, abs=1e-6), a.name
    passes = again.cost["passes"]
    assert passes["recompute_forward"] == 2 and again.cost["passes_per_batch"] == \
        plain.cost["passes_per_batch"] + 1
    assert len(fired) == 4 + passes["forward"] + 2 * passes["grad_forward"] + passes["check_forward"]


def test_an_example_with_two_images(toy_models):
    """Roles carry the image index; the per-example checks knock out each example's own
    picks among all its images' positions, and the refined values stay finite."""
    base = toy_task(6).examples
    image = base[2].prompt.split(" <eoss> ")[0]
    examples = list(base)
    examples[3] = replace(examples[3], prompt=image + " <eoss> " + examples[3].prompt)
    gates = A.find_gates(toy_models["toy-last-image"], NextTokenTask("two", examples),
                         batch_size=6, rows=False, overlap=False, layer_sweep=False,
                         check_top=2, check_random=0)
    second = [c for c in gates.positions if c.name.startswith("image 1 ")]   # "image i (r, c)"
    assert len(second) == 36 and all(c.n_examples == 1 for c in second)
    assert all(math.isfinite(c.refined) for c in gates.positions)
    # 5 rounds in every example, plus BOI, EOI, the first and last code from their classes
    # (one position each in the single-image examples; two in the two-image one: not used)
    assert sum(c.checked_in for c in gates.positions) == 6 * 5 + 5 * 4
    assert gates.ranking[0].name == "image 0 (5, 5)"         # the last code of the first image
