"""The main job from one :class:`~tl_vlm.study.config.StudyConfig`: load the task, open the
run directory, run the steps that are not done yet, write the report.

``tl-vlm narrow-gate`` checks its flags, builds a ``StudyConfig`` and calls
:func:`run_main_job`; a notebook does the same with a config it writes itself, and gets
the same run directory (resumable, shardable, ``results.json`` equal to the byte).

Example:
    >>> import tempfile
    >>> from tl_vlm.study.config import StudyConfig, TaskSource
    >>> tmp = tempfile.TemporaryDirectory()
    >>> config = StudyConfig(source=TaskSource(n_examples=8), steps=("accuracy",),
    ...                      conditions=("none", "gate"), out=tmp.name)
    >>> report = run_main_job(config, log=lambda message: None)
    >>> report.name, (Path(tmp.name) / "results.json").exists()
    ('index.html', True)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tl_vlm.study.config import StudyConfig

Log = Callable[[str], None]


def prepare_run(config: StudyConfig, log: Log = print):
    """``(task, settings, store)``: the task loaded (data, before any model), the
    :class:`~tl_vlm.study.settings.StudySettings` that fix its results and the run
    directory opened (``source.json`` written; a resume checks the settings agree).

    Example:
        >>> import tempfile
        >>> from tl_vlm.study.config import TaskSource
        >>> tmp = tempfile.TemporaryDirectory()
        >>> config = StudyConfig(source=TaskSource(n_examples=8), steps=("accuracy",),
        ...                      conditions=("none", "gate"), out=tmp.name)
        >>> task, settings, store = prepare_run(config.resolved())
        >>> len(task), settings.steps, (Path(tmp.name) / "source.json").exists()
        (8, ('accuracy',), True)
        >>> tmp.cleanup()
    """
    from tl_vlm.eval.data import selection_hash
    from tl_vlm.eval.taskset import RANDOM_DRAWS, prefetch_images, task_kind
    from tl_vlm.study.rundir import RunStore, dumps, write_atomic
    from tl_vlm.study.settings import StudySettings

    config = config.resolved()
    task, source = config.source.load()
    shard = config.shard
    settings = StudySettings(
        model=config.model, task=task.name, n_examples=len(task),
        batch_size=config.batch_size, seed=config.source.seed, random_k=config.random_k,
        random_draws=config.random_draws or RANDOM_DRAWS.get(task_kind(config.source.task), 3),
        steps=tuple(config.steps), conditions=tuple(config.conditions),
        patch_layers=config.patch_layers, patch_streams=tuple(config.patch_streams),
        n_pairs=config.n_pairs, geometry_layers=config.geometry_layers,
        dtype=config.placement.dtype, task_settings=task.settings(),
        selection_hash=selection_hash([ex.id for ex in task.examples]))
    store = RunStore(config.out, settings.run_settings(), fresh=config.fresh,
                     shard=None if shard is None else (shard.index, shard.count))
    write_atomic(store.path(RunStore.SOURCE), dumps(source))
    owned = [ex for j, (_, chunk) in enumerate(task.batches(config.batch_size))
             if shard is None or shard.owns(j) for ex in chunk]
    if prefetch_images(owned):
        log(f"images of {len(owned)} examples found")
    return task, settings, store


def run_main_job(config: StudyConfig, log: Log = print, processor: Any = None) -> Optional[Path]:
    """Run the study ``config`` describes, resuming what its run directory holds; returns
    the report's path, or None when this shard finished and others are still running.

    A run whose steps are all recorded is re-scored and reported without loading the
    model. ``processor`` replaces the checkpoint's (e.g. one checked for a chat template).

    Example (run, then run again: the second finds every step done and loads no model):
        >>> import tempfile
        >>> from tl_vlm.study.config import TaskSource
        >>> tmp = tempfile.TemporaryDirectory()
        >>> config = StudyConfig(source=TaskSource(n_examples=8), steps=("accuracy",),
        ...                      conditions=("none",), out=tmp.name)
        >>> run_main_job(config, log=lambda message: None).name
        'index.html'
        >>> lines = []
        >>> _ = run_main_job(config, log=lines.append)
        >>> any(line.startswith("loading") for line in lines)
        False
        >>> tmp.cleanup()
    """
    from tl_vlm.study.runner import finish_without_model, run_study

    config = config.resolved()
    task, settings, store = prepare_run(config, log)
    shard = config.shard
    t0 = time.time()
    if shard is None and finish_without_model(store, settings, config.scoring, log):
        return write_run_report(store, log=log)          # nothing to compute: no model loaded
    log(f"loading {config.model} ...")
    model = config.placement.load(config.model, processor)
    try:
        run_study(model, task, store, settings, log=log, scoring=config.scoring, shard=shard)
    finally:   # a resumed or sharded run adds up
        add_compute_time(store.out, time.time() - t0, shard, placement_of(model))
    if all(store.done(s) for s in settings.steps):
        return write_run_report(store, header={"device": str(model.cfg.device)}, log=log)
    log(f"shard {shard.index}/{shard.count} done; the last shard to finish (or "
        f"`tl-vlm merge {config.out}`) writes the report")
    return None


def add_compute_time(out: Path, seconds: float, shard, placement: Optional[dict] = None) -> None:
    """Append one process's compute time to ``OUT/compute.jsonl`` (one short line per
    run, resume or shard: appends from concurrent shards do not interleave), with where
    the model ran (placement is not a result setting: it may differ between resumes).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> add_compute_time(Path(tmp.name), 12.34, None, {"device": "cpu"})
        >>> compute_seconds(Path(tmp.name))
        12.3
        >>> tmp.cleanup()
    """
    import socket

    line = json.dumps({"seconds": round(seconds, 1), "host": socket.gethostname(),
                       "shard": None if shard is None else shard.name,
                       **({"placement": placement} if placement else {})}) + "\n"
    with open(Path(out) / "compute.jsonl", "a") as f:
        f.write(line)


def placement_of(model) -> dict:
    """Where a loaded model ran: its device, or its device map and device count.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> placement_of(HookedVLM.from_pretrained("toy-gated"))
        {'device': 'cpu', 'n_devices': 1}
    """
    placement = {"device": str(model.cfg.device), "n_devices": getattr(model.cfg, "n_devices", 1)}
    if model.device_map:
        placement["device_map"] = {k: str(v) for k, v in model.device_map.items()}
    return placement


def compute_seconds(out: Path) -> Optional[float]:
    """The compute time of every run, resume and shard that made ``out`` (None if unknown).

    Example:
        >>> compute_seconds(Path("/no/such/run")) is None
        True
    """
    path = Path(out) / "compute.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return round(sum(line["seconds"] for line in lines), 1)


def run_meta(store) -> dict[str, Any]:
    """What heads the report and ``results.json`` (settings-level: equal for every run
    and merge of the same settings).

    Example:
        >>> import tempfile
        >>> from tl_vlm.study.rundir import RunStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> settings = {"model": "m", "task": "toy", "n_examples": 2, "dtype": "float32",
        ...             "task_settings": {}}
        >>> store = RunStore(tmp.name, settings)
        >>> _ = store.path(RunStore.MODEL).write_text(json.dumps(
        ...     {"family": "chameleon", "gate": "EOI", "layers": 4, "heads": 4}))
        >>> run_meta(store)["family"], run_meta(store)["prompts"]
        ('chameleon', None)
        >>> tmp.cleanup()
    """
    from tl_vlm.study.settings import load_model_info
    from tl_vlm.study.shards import versions

    settings, info = store.settings, load_model_info(store)
    return {"model": settings["model"], "family": info["family"], "gate": info["gate"],
            "task": settings["task"], "examples": settings["n_examples"],
            "layers": info["layers"], "heads": info["heads"], "dtype": settings["dtype"],
            "prompts": settings["task_settings"].get("prompt_style"),
            "tl_vlm": versions()["tl_vlm"]}


def write_run_report(store, header: Optional[dict] = None, log: Log = print) -> Optional[Path]:
    """``index.html`` + ``results.json`` of a run whose planned steps are all finished.
    The page also shows ``header`` and the total compute time (not ``results.json``:
    it must not depend on how the run was split or resumed).

    Example (the report of a finished run, written again):
        >>> import tempfile
        >>> from tl_vlm.study.config import TaskSource
        >>> from tl_vlm.study.rundir import RunStore
        >>> tmp = tempfile.TemporaryDirectory()
        >>> config = StudyConfig(source=TaskSource(n_examples=8), steps=("accuracy",),
        ...                      conditions=("none",), out=tmp.name)
        >>> _ = run_main_job(config, log=lambda message: None)
        >>> write_run_report(RunStore.open(tmp.name), log=lambda message: None).name
        'index.html'
        >>> tmp.cleanup()
    """
    from tl_vlm.study.report import write_report
    from tl_vlm.study.runner import study_results

    header = dict(header or {})
    skipped = {s: r.get("reason", "") for s, r in store.results().items()
               if r.get("skipped") is True}
    if skipped:       # on the page, not in results.json
        header["skipped steps"] = "; ".join(f"{s}: {why}" for s, why in skipped.items())
    total = compute_seconds(store.out)
    if total is not None:
        header["compute_seconds"] = total
    path = write_report(study_results(store), store.out, run_meta(store), header=header)
    log(f"report: {path}")
    return path
