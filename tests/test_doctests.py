"""The docstring examples run: every public function and class of these modules has one.

Examples run on the shipped toy models (``HookedVLM.from_pretrained("toy-gated")``, CPU,
offline). An example that needs a real checkpoint or a GPU is marked
``# doctest: +SKIP``, and only at the end of its docstring, so that no live example
depends on a skipped one.

Each docstring loads its own model, as a reader would. Here, for speed, the loads of a
toy model by name share one instance per module, and the test checks that no example
leaves a hook or an overridden ``forward`` on it.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io

import pytest

MODULES = [
    "tl_vlm",
    "tl_vlm.core.model",
    "tl_vlm.core.loading",
    "tl_vlm.analyses",
    "tl_vlm.toy",
    "tl_vlm.analyses.knockout",
    "tl_vlm.analyses.contribution",
    "tl_vlm.analyses.patching",
    "tl_vlm.analyses.geometry",
    "tl_vlm.analyses.logit_lens",
    "tl_vlm.analyses.image_lens",
    "tl_vlm.analyses.sinks",
    "tl_vlm.analyses.tl_patching",
    "tl_vlm.analyses.gates",
    "tl_vlm.analyses.gates.candidates",
    "tl_vlm.analyses.gates.config",
    "tl_vlm.analyses.gates.find",
    "tl_vlm.analyses.gates.metric",
    "tl_vlm.analyses.gates.records",
    "tl_vlm.analyses.gates.result",
    "tl_vlm.analyses.gates.search",
    "tl_vlm.analyses.gates.stats",
    "tl_vlm.analyses.gates.verdict",
    "tl_vlm.study.gate_figures",
    "tl_vlm.study.compare",
    "tl_vlm.cli.find_gate",
    "tl_vlm.cli.families",
    "tl_vlm.cli.flow",
    "tl_vlm.study.flow_report",
    "tl_vlm.analyses.flow",
    "tl_vlm.analyses.generation_attention",
    "tl_vlm.cli.compare",
    "tl_vlm.core.prefix",
    "tl_vlm.core.recompute",
    "tl_vlm.core.attention",
    "tl_vlm.core.attention_edits",
    "tl_vlm.core.attention_bridge",
    "tl_vlm.core.positions",
    "tl_vlm.core.batch",
    "tl_vlm.eval.tasks",
    "tl_vlm.eval.examples",
    "tl_vlm.core.answers",
    "tl_vlm.study.verify",
    "tl_vlm.eval.data",
    "tl_vlm.eval.sources",
    "tl_vlm.eval.paper_sets",
    "tl_vlm.eval.selection",
    "tl_vlm.eval.images",
    "tl_vlm.eval.rows",
    "tl_vlm.eval.prompts",
    "tl_vlm.study.rundir",
    "tl_vlm.study.runner",
    "tl_vlm.study.settings",
    "tl_vlm.study.steps",
    "tl_vlm.eval.taskset",
    "tl_vlm.study.shards",
    "tl_vlm.study.table",
    "tl_vlm.cli.commands",
    "tl_vlm.cli.options",
    "tl_vlm.study.config",
    "tl_vlm.study.job",
    "tl_vlm.eval.scoring",
    "tl_vlm.cli.narrow_gate",
    "tl_vlm.cli.table",
    "tl_vlm.cli.merge",
    "tl_vlm.cli.rescore",
    "tl_vlm.study.report",
    "tl_vlm.plot",
    "tl_vlm.toy.task",
    "tl_vlm.toy.evaluate",
    "tl_vlm.eval.metrics",
    "tl_vlm.core.compat",
    "tl_vlm.core.names",
    "tl_vlm.core.jsonable",
    "tl_vlm.core.reprs",
    "tl_vlm.core.merged_patches",
    "tl_vlm.core.family",
    "tl_vlm.core.registration",
    "tl_vlm.core.autoload",
    "tl_vlm.moved",
    "tl_vlm.eval.metrics.vqa",
    "tl_vlm.eval.metrics.cider",
    "tl_vlm.eval.metrics.ptb",
]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests(module) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


def _hook_state(model) -> dict[str, tuple]:
    """Hooks on every hook point, and the modules whose ``forward`` is overridden."""
    state = {name: (len(hp.fwd_hooks), len(hp.bwd_hooks)) for name, hp in model.hook_dict.items()}
    state["forward overridden"] = tuple(name for name, mod in model.named_modules()
                                        if "forward" in mod.__dict__)
    return state


@pytest.fixture
def shared_toy_models(monkeypatch):
    """``HookedVLM.from_pretrained(<toy name>)`` returns one shared instance per test."""
    from tl_vlm import HookedVLM
    from tl_vlm.toy import is_toy_model

    load = HookedVLM.from_pretrained
    loaded: dict[str, tuple] = {}   # name -> (model, its hook state when loaded)

    def from_pretrained(name_or_path, *args, **kwargs):
        if args or kwargs or not is_toy_model(name_or_path):
            return load(name_or_path, *args, **kwargs)
        if name_or_path not in loaded:
            model = load(name_or_path)
            loaded[name_or_path] = (model, _hook_state(model))
        return loaded[name_or_path][0]

    monkeypatch.setattr(HookedVLM, "from_pretrained", staticmethod(from_pretrained))
    yield loaded
    for name, (model, state) in loaded.items():
        now = _hook_state(model)
        changed = sorted(k for k in now.keys() | state.keys() if now.get(k) != state.get(k))
        assert not changed, f"the examples left hooks or a patched forward on {name}: {changed}"


def _public(module) -> dict[str, object]:
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module.__name__}


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name, shared_toy_models):
    module = importlib.import_module(name)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _tests(module):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} failing example(s) in {name}:\n{out.getvalue()}"
    live = sum(not ex.options.get(doctest.SKIP, False) for t in _tests(module) for ex in t.examples)
    assert result.attempted > 0 and live > 0, f"{name} has no live (unskipped) examples"


@pytest.mark.parametrize("name", MODULES)
def test_public_api_has_examples(name):
    module = importlib.import_module(name)
    missing = [n for n, obj in _public(module).items() if ">>>" not in (obj.__doc__ or "")]
    assert not missing, f"{name}: public functions/classes without an example: {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_skipped_examples_only_at_the_end(name):
    """A skipped example followed by a live one usually means the live one depends on
    state the skipped one would have made (the old first-line-only ``+SKIP``)."""
    module = importlib.import_module(name)
    bad = []
    for test in _tests(module):
        skipped = [bool(ex.options.get(doctest.SKIP, False)) for ex in test.examples]
        if any(s and not later for i, s in enumerate(skipped) for later in skipped[i + 1:]):
            bad.append(test.name)
    assert not bad, f"live examples after skipped ones in {bad}: mark every line +SKIP"
