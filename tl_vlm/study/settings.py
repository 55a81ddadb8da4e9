"""A study's settings and what a run directory holds besides the steps' records:
the examples, the model's description, and a task that can score recorded predictions
without the model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from tl_vlm.core.names import CONDITIONS, STEPS  # noqa: F401  (re-exported)
from tl_vlm.eval.tasks import (CaptionTask, Example, GenerationTask, NextTokenTask, OpenClassTask,
                               Task)
from tl_vlm.study.rundir import RunStore

TASK_CLASSES = {cls.__name__: cls for cls in (NextTokenTask, GenerationTask, CaptionTask,
                                              OpenClassTask)}


@dataclass
class StudySettings:
    """What the study runs; saved with the run so a resume uses the same settings.

    Attributes:
        model, task: the model and task names (``task``: ``"toy"``, ``"vqav2"``, ...).
        n_examples: examples in the task.
        batch_size: examples per chunk (fixes padding, and so the numerics).
        seed: patching pairs and the separation step's token draws.
        random_k, random_draws: the random knockout: image tokens per draw, draws.
        steps: the steps to run (not a setting of the results: a rerun may add steps).
        conditions: the accuracy step's knockout conditions (a rerun may add some).
        patch_layers: layers of the patching sweep (None: every layer).
        patch_streams: ``"resid_pre"`` and/or ``"attn_in"``.
        n_pairs: patching pairs.
        geometry_layers: residual layers kept for separation and overlap (None: all).
        dtype: the model's dtype.
        task_settings: what else fixes the task's predictions (prompts, decoding).
        selection_hash: sha1 of the examples' ids, in order.

    Example:
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, patch_layers=(0, 2))
        >>> d = settings.run_settings()                 # JSON-ready: tuples become lists
        >>> d["patch_layers"], d["batch_size"], "steps" in d, "conditions" in d
        ([0, 2], 16, False, False)
    """

    model: str
    task: str
    n_examples: int
    batch_size: int = 16
    seed: int = 0
    random_k: int = 10
    random_draws: int = 3
    steps: tuple[str, ...] = STEPS
    conditions: tuple[str, ...] = CONDITIONS
    patch_layers: Optional[tuple[int, ...]] = None   # None: every layer
    patch_streams: tuple[str, ...] = ("resid_pre", "attn_in")
    n_pairs: int = 128
    geometry_layers: Optional[tuple[int, ...]] = None
    dtype: str = "float32"
    task_settings: dict[str, Any] = field(default_factory=dict)
    selection_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def run_settings(self) -> dict[str, Any]:
        """The settings that fix the results (``run.json``): all but the steps and
        conditions asked for this time."""
        return {k: v for k, v in self.to_dict().items() if k not in ("steps", "conditions")}

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_examples / self.batch_size)


def model_info(model, task: Task) -> dict[str, Any]:
    """What the results and the report need to know about the model (no weights).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model_info(HookedVLM.from_pretrained("toy-gated"), toy_task(4))["has_gate"]
        True
    """
    probe = task.prepare(model, task.examples[:1])
    return {"family": model.family.name, "gate": model.layout.gate_description,
            "has_gate": not probe.positions.gate.is_empty(), "layers": model.cfg.n_layers,
            "heads": model.cfg.n_heads}


def examples_text(examples: Sequence[Example]) -> str:
    """``examples.jsonl``: what scoring needs of each example, one line each.

    Example:
        >>> print(examples_text([Example("Why?", answers=("because",), id=3)]), end="")
        {"prompt": "Why?", "answers": ["because"], "label": null, "kind": null, "id": 3, "references": []}
    """
    import json

    return "".join(json.dumps(ex.to_record()) + "\n" for ex in examples)


def load_examples(store: RunStore) -> list[Example]:
    """The examples of a run directory (without images), for scoring without a model.

    Example:
        >>> import tempfile
        >>> from tl_vlm.eval.tasks import toy_task
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, {})
        >>> store.write_once("examples.jsonl", examples_text(toy_task(3).examples), "examples")
        >>> [(ex.id, ex.answers) for ex in load_examples(store)]
        [(0, ('red',)), (1, ('square',)), (2, ('top-left',))]
        >>> tmp.cleanup()
    """
    import json

    path = store.path(RunStore.EXAMPLES)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {store.out} a tl-vlm run directory?")
    return [Example.from_record(json.loads(line)) for line in path.read_text().splitlines()]


def scoring_task(settings: dict[str, Any], examples: list[Example]) -> Task:
    """A task that can score the run's predictions (its kind, its examples; no data).

    Example:
        >>> task = scoring_task({"task": "toy", "task_settings": {"kind": "NextTokenTask"}},
        ...                     [Example("Why?", answers=("because",))])
        >>> type(task).__name__, len(task.examples)
        ('NextTokenTask', 1)
    """
    kind = settings["task_settings"].get("kind", "NextTokenTask")
    return TASK_CLASSES[kind](settings["task"], examples)


def load_model_info(store: RunStore) -> dict[str, Any]:
    """The run's ``model.json`` (what :func:`model_info` wrote when the model ran).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = (Path(tmp.name) / "model.json").write_text('{"n_layers": 4}')
        >>> load_model_info(RunStore(tmp.name, {"n": 1}))
        {'n_layers': 4}
        >>> tmp.cleanup()
    """
    return json.loads(store.path(RunStore.MODEL).read_text())
