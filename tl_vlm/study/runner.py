"""The Narrow Gate study as one resumable, shardable run: the main job behind
``tl-vlm narrow-gate``.

Steps (each recorded chunk by chunk, then computed from its records; see
:class:`~tl_vlm.study.rundir.RunStore`):

- ``accuracy``: the task's predictions without knockout, with the gate knocked out,
  with img->text knocked out, and with ``random_k`` random image tokens knocked out
  (``random_draws`` draws: mean and spread); paper semantics (post-softmax zero), all
  layers. Predictions are recorded, scores computed at the end (re-scoring, e.g. another
  CIDEr tokenisation, needs no model: :func:`finalize_step`).
- ``progressive``: gate knockout in the last w layers only.
- ``contribution``: cross-modal attention contribution per layer and key group
  (per-chunk float64 totals, folded in chunk order).
- ``separation``: modality separation (|cos|, cluster homogeneity, intrinsic dimension).
- ``overlap``: neighbourhood overlap of gate / last-image / mean-image representations
  with the class labels.
- ``patching``: steering by patching the gate from an image of another class.

Work is cut into chunks: the batches of ``task.batches(batch_size)`` (patching: batches
of the global pair list). A shard ``K/N`` computes the chunks ``j`` with ``j % N == K``
and keeps its records under ``shards/K-of-N/``; :mod:`tl_vlm.study.shards` merges them. A
step's result is always computed from the sorted records of every chunk, in an
unsharded run as in a merge, so the two are equal to the byte.

Example:
    >>> import tempfile
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.eval.tasks import toy_task
    >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
    >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12,
    ...                          steps=("accuracy", "contribution"))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = RunStore(tmp.name, settings.run_settings())
    >>> results = run_study(model, task, store, settings)
    [accuracy] running
    [contribution] running
    >>> sorted(results), results["accuracy"]["conditions"]["none"]["mean"]
    (['accuracy', 'contribution'], 1.0)
    >>> tmp.cleanup()
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

from tl_vlm.core.names import CONDITIONS, STEPS  # noqa: F401  (re-exported)
from tl_vlm.eval.tasks import Scoring, Task
from tl_vlm.study.rundir import RunStore, dumps, write_atomic
from tl_vlm.study.settings import (TASK_CLASSES, StudySettings, examples_text,  # noqa: F401
                                   load_examples, load_model_info, model_info, scoring_task)
from tl_vlm.study.steps import (STEP_CLASSES, Plan, StepContext, patching_pairs,  # noqa: F401
                                records_by_key)

def finalize_step(store: RunStore, step: str, scoring: Scoring = Scoring(),
                  plan: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Compute and save ``step``'s result from the records in ``store.steps`` (no model).

    ``plan`` (a :meth:`Plan.to_dict`) is what the records must cover; without one the
    complete keys found are used (re-scoring a finished run).

    Example (a finished run re-scored; the model is not needed):
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(12)
        >>> settings = StudySettings("toy-gated", "toy", 12, batch_size=6, steps=("accuracy",),
        ...                          conditions=("none",), task_settings=task.settings())
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.run_settings())
        >>> _ = run_study(model, task, store, settings, log=lambda m: None)
        >>> del model
        >>> finalize_step(store, "accuracy")["conditions"]["none"]["mean"]
        1.0
        >>> tmp.cleanup()
    """
    if plan is not None and plan.get("skipped"):
        return store.save(step, {"skipped": True, "reason": plan["skipped"]})
    records = store.canonical_records(step)
    complete = records_by_key(records)
    if plan is not None:
        missing = [k for k in plan["keys"] if k not in complete]
        if missing:
            raise RuntimeError(f"{step}: the records of {missing} do not cover every chunk; "
                               f"rerun to compute the missing ones")
    if not complete:
        raise RuntimeError(f"{step}: no complete records in {store.steps}; rerun the step")
    return store.save(step, STEP_CLASSES[step].finalize(records, store, store.settings, scoring))


def study_results(store: RunStore, steps: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The finished steps' results (skipped ones left out), in study order; the
    progressive curve gets the clean accuracy as its reference line.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, {})
        >>> _ = store.save("accuracy", {"conditions": {"none": {"mean": 0.9}}})
        >>> _ = store.save("progressive", {"widths": [1], "accuracy": [0.3]})
        >>> _ = store.save("patching", {"skipped": True, "reason": "no gate token"})
        >>> results = study_results(store)
        >>> sorted(results), results["progressive"]["clean"]
        (['accuracy', 'progressive'], 0.9)
        >>> tmp.cleanup()
    """
    saved = store.results()
    out = {s: saved[s] for s in STEPS if s in saved and (steps is None or s in steps)
           and saved[s].get("skipped") is not True}
    if "progressive" in out and "accuracy" in out:
        none = out["accuracy"]["conditions"].get("none")
        out["progressive"] = {**out["progressive"], "clean": none["mean"] if none else None}
    return out


def finish_without_model(store: RunStore, settings: StudySettings, scoring: Scoring = Scoring(),
                         log: Callable[[str], None] = print) -> bool:
    """If every step asked for is saved and holds what is asked, re-score those saved
    with other scoring options and return True: the model need not be loaded.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> settings = StudySettings("toy-gated", "toy", 12, steps=("accuracy",))
        >>> finish_without_model(RunStore(tmp.name, settings.run_settings()), settings)
        False
        >>> tmp.cleanup()
    """
    saved = {s: store.load(s) for s in settings.steps if store.done(s)}
    if len(saved) < len(settings.steps) or not all(
            r.get("skipped") is True or STEP_CLASSES[s].covers(r, settings)
            for s, r in saved.items()):
        return False
    for step, result in saved.items():
        if not STEP_CLASSES[step].satisfied(result, settings, scoring):
            finalize_step(store, step, scoring)
            log(f"[{step}] re-scored from its records")
        else:
            log(f"[{step}] already done: kept")
    return True


@runtime_checkable
class Recorder(Protocol):
    """How a run records its progress and finishes its steps: :class:`WholeRun`, or a
    shard's :class:`tl_vlm.study.shards.ShardState` (shards plug in here; the runner
    never imports them).

    Example:
        >>> isinstance(WholeRun(), Recorder)
        True
    """

    def open(self, store: RunStore, info: dict[str, Any]) -> None: ...
    def step_done(self, step: str, plan: Plan) -> bool: ...
    def begin(self, step: str, plan: Plan) -> None: ...
    def finish(self, step: str) -> None: ...
    def complete(self, store: RunStore, step: str, scoring: Scoring, plan: Plan,
                 log: Callable[[str], None]) -> None: ...


class WholeRun:
    """The :class:`Recorder` of an unsharded run: ``model.json``, and each step's result
    computed from its records as soon as it is produced.

    Example:
        >>> WholeRun().step_done("accuracy", Plan(3, ["none"]))
        False
    """

    def open(self, store: RunStore, info: dict[str, Any]) -> None:
        write_atomic(store.path(RunStore.MODEL), dumps(info))

    def step_done(self, step: str, plan: Plan) -> bool:
        return False   # a finished step is kept by the caller (store.done)

    def begin(self, step: str, plan: Plan) -> None:
        pass

    def finish(self, step: str) -> None:
        pass

    def complete(self, store: RunStore, step: str, scoring: Scoring, plan: Plan,
                 log: Callable[[str], None]) -> None:
        finalize_step(store, step, scoring, plan.to_dict())


def run_study(model, task: Task, store: RunStore, settings: StudySettings,
              log: Callable[[str], None] = print, scoring: Scoring = Scoring(),
              shard: Optional[Any] = None) -> dict[str, Any]:
    """Run every step of ``settings.steps`` not yet saved in ``store``; returns all results.

    Steps that do not apply (no gate token) are saved as skipped and left out of the
    returned results. A rerun on the same ``store`` keeps the finished steps and, inside
    a step, the recorded chunks. With ``shard`` (a :class:`tl_vlm.study.shards.Shard`) only
    that shard's chunks are computed, and its recorder (``shard.recorder(out)``, a
    :class:`Recorder`) finishes a step in whichever shard completes it last
    (:func:`tl_vlm.study.shards.merge_step`); without, :class:`WholeRun` does.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12,
        ...                          steps=("accuracy", "progressive"))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.run_settings())
        >>> results = run_study(model, task, store, settings, log=lambda line: None)
        >>> sorted(results), results["progressive"]["clean"]
        (['accuracy', 'progressive'], 1.0)
        >>> _ = run_study(model, task, store, settings)                # resumed: nothing to do
        [accuracy] already done: kept
        [progressive] already done: kept
        >>> run_study(model, task, store, StudySettings("toy-gated", "toy", 24, steps=("knockout",)))
        Traceback (most recent call last):
        ...
        ValueError: unknown steps ['knockout']; choose from ['accuracy', 'progressive', ...]
        >>> tmp.cleanup()
    """
    unknown = [s for s in settings.steps if s not in STEP_CLASSES]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {list(STEP_CLASSES)}")
    store.write_once(RunStore.EXAMPLES, examples_text(task.examples), "examples")
    info = model_info(model, task)
    recorder = WholeRun() if shard is None else shard.recorder(store.out)
    recorder.open(store, info)
    ctx = StepContext(model, task, store, settings, info,
                  None if shard is None else (shard.index, shard.count))
    for name in settings.steps:
        step = STEP_CLASSES[name]
        if store.done(name):
            saved = store.load(name)
            if saved.get("skipped") is True or step.satisfied(saved, settings, scoring):
                log(f"[{name}] already done: kept")
                continue
        plan = step.plan(ctx)
        if recorder.step_done(name, plan):
            log(f"[{name}] this shard's part is done")
        else:
            recorder.begin(name, plan)
            if plan.skipped is None:
                log(f"[{name}] running")
                step.produce(ctx, plan, log)
            recorder.finish(name)
        if plan.skipped is not None:
            log(f"[{name}] does not apply to this model ({plan.skipped}): skipped")
        recorder.complete(store, name, scoring, plan, log)
    return study_results(store, settings.steps)
