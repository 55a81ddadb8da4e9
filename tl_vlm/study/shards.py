"""Sharded runs merged exactly: SLURM arrays, torchrun, or shards started by hand.

A run is cut into chunks (the batches of the global batch list; patching: batches of
the global pair list). Shard ``K/N`` computes the chunks ``j`` with ``j % N == K`` and
keeps its records in ``OUT/shards/K-of-N/`` with a ``shard.json`` (settings, versions,
model, the plan and status of each step). Batches are never re-cut: a batch's
composition fixes its padding and its random draws, so every shard's records are the
single run's records for those chunks.

:func:`merge_step` (run by whichever shard finishes a step last, or by ``tl-vlm merge
OUT``) refuses a missing or unfinished shard, shards whose settings, versions or model
differ, and two records of one chunk that disagree; then it writes the union of the
records, sorted, to ``OUT/steps/`` and computes the step's result from them, as an
unsharded run does: the files are equal to the byte. No model is loaded.

Example:
    >>> Shard.parse("1/3"), Shard.parse("1/3").owns(4), Shard.parse("1/3").owns(5)
    (Shard(index=1, count=3), True, False)
    >>> Shard.parse("auto", environ={"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4",
    ...                              "SLURM_ARRAY_TASK_COUNT": "4"})
    Shard(index=3, count=4)
    >>> Shard.parse("3/3")
    Traceback (most recent call last):
    ...
    ValueError: --shard 3/3: K must be in 0..2 (shards are numbered from 0)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from tl_vlm.study.rundir import (RecordConflictError, RunStore, dumps, read_records, sorted_unique,
                             write_atomic)


class MergeError(RuntimeError):
    """The shards cannot be merged (missing, unfinished, or inconsistent).

    Example:
        >>> shard_count("/no/such/run")
        Traceback (most recent call last):
        ...
        tl_vlm.study.shards.MergeError: /no/such/run holds no shards (no /no/such/run/shards/K-of-N): nothing to merge. Was it run with --shard?
    """


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard K/N``).

    Example:
        >>> Shard(0, 2).name, [j for j in range(5) if Shard(0, 2).owns(j)]
        ('0-of-2', [0, 2, 4])
    """

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    def recorder(self, out) -> "ShardState":
        """This shard's :class:`~tl_vlm.study.runner.Recorder` in run directory ``out``."""
        return ShardState(out, self)

    @classmethod
    def parse(cls, spec: str, environ: Optional[Mapping[str, str]] = None) -> "Shard":
        """``"K/N"``, or ``"auto"``: a SLURM array task
        (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``),
        else a torchrun / accelerate rank (``RANK`` of ``WORLD_SIZE``)."""
        environ = os.environ if environ is None else environ
        if spec == "auto":
            found = from_environment(environ)
            if found is None:
                raise ValueError("--shard auto found neither SLURM_ARRAY_TASK_ID/"
                                 "SLURM_ARRAY_TASK_COUNT (a SLURM job array) nor RANK/"
                                 "WORLD_SIZE (torchrun, accelerate launch); give --shard K/N")
            return found
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if match is None:
            raise ValueError(f"--shard takes K/N (e.g. 0/4) or 'auto', got {spec!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise ValueError(f"--shard {spec}: N must be at least 1")
        if index >= count:
            raise ValueError(f"--shard {spec}: K must be in 0..{count - 1} (shards are "
                             f"numbered from 0)")
        return cls(index, count)


def from_environment(environ: Mapping[str, str]) -> Optional[Shard]:
    """The shard a SLURM array task or a torchrun rank is (None outside both).

    Example:
        >>> from_environment({"RANK": "1", "WORLD_SIZE": "2"}), from_environment({})
        (Shard(index=1, count=2), None)
    """
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Shard(int(environ["SLURM_ARRAY_TASK_ID"]) - first,
                     int(environ["SLURM_ARRAY_TASK_COUNT"]))
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return Shard(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
    return None


def versions() -> dict[str, Optional[str]]:
    """The versions that could change a shard's numbers (compared at merge time).

    Example:
        >>> sorted(versions())
        ['tl_vlm', 'tl_vlm_git', 'torch', 'transformer_lens', 'transformers']
    """
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {}
    for name, dist in (("tl_vlm", "tl-vlm"), ("torch", "torch"),
                       ("transformers", "transformers"),
                       ("transformer_lens", "transformer-lens")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    out["tl_vlm_git"] = _git_commit()
    return out


def _git_commit() -> Optional[str]:
    """The commit of a source checkout of tl_vlm (None when installed from a wheel)."""
    root = Path(__file__).resolve().parent.parent
    head = root / ".git"
    if head.is_file():                       # a worktree: "gitdir: <path>"
        head = Path(head.read_text().split(":", 1)[1].strip())
    try:
        ref = (head / "HEAD").read_text().strip()
        if ref.startswith("ref: "):
            name = ref[5:]
            for base in (head, Path(str(head).split("/worktrees/")[0])):
                if (base / name).is_file():
                    return (base / name).read_text().strip()
                packed = base / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + name):
                            return line.split()[0]
            return None
        return ref
    except OSError:
        return None


class ShardState:
    """A shard's ``shard.json``: its settings, versions, model and per-step status.

    Example:
        >>> import tempfile
        >>> from tl_vlm.study.runner import Plan
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = ShardState(tmp.name, Shard(1, 2))
        >>> state.start({"n": 4}, {"layers": 4})
        >>> state.begin("accuracy", Plan(3, ["none"]))
        >>> state.step_done("accuracy", Plan(3, ["none"]))
        False
        >>> state.finish("accuracy")
        >>> state.step_done("accuracy", Plan(3, ["none"])), state.path.parent.name
        (True, '1-of-2')
        >>> tmp.cleanup()
    """

    def __init__(self, out, shard: Shard) -> None:
        self.shard = shard
        self.path = RunStore.shard_path(out, shard.index, shard.count) / RunStore.SHARD_STATE
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def _save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_atomic(self.path, dumps(self.data))

    def start(self, settings: dict[str, Any], model: dict[str, Any]) -> None:
        if self.data.get("settings") != settings:
            self.data["steps"] = {}          # records of other settings were discarded
        self.data.update(shard=self.shard.index, of=self.shard.count, settings=settings,
                         versions=versions(), model=model, host=socket.gethostname(),
                         argv=sys.argv)
        self.data.setdefault("steps", {})
        self._save()

    def begin(self, step: str, plan) -> None:
        self.data["steps"][step] = {"plan": plan.to_dict(), "done": False}
        self._save()

    def finish(self, step: str) -> None:
        self.data["steps"][step]["done"] = True
        self._save()

    def step_done(self, step: str, plan) -> bool:
        entry = self.data.get("steps", {}).get(step)
        return bool(entry and entry["done"] and entry["plan"] == plan.to_dict())

    # -- the runner's Recorder interface (tl_vlm.study.runner.Recorder) -----------------
    def open(self, store: RunStore, info: dict[str, Any]) -> None:
        self.start(store.settings, info)

    def complete(self, store: RunStore, step: str, scoring, plan,
                 log: Callable[[str], None]) -> None:
        merge_step(store, step, scoring, log=log)


def shard_count(out) -> int:
    """N of the shards in ``out/shards`` (an error when there are none, or several N).

    Example:
        >>> import pathlib, tempfile
        >>> tmp = pathlib.Path(tempfile.mkdtemp())
        >>> (tmp / "shards" / "1-of-3").mkdir(parents=True)
        >>> shard_count(tmp)
        3
    """
    found = {int(m.group(2)) for p in (Path(out) / RunStore.SHARDS).glob("*-of-*")
             if (m := re.fullmatch(r"(\d+)-of-(\d+)", p.name))}
    if not found:
        raise MergeError(f"{out} holds no shards (no {Path(out) / 'shards'}/K-of-N): nothing "
                         f"to merge. Was it run with --shard?")
    if len(found) > 1:
        raise MergeError(f"{out} holds shards of runs split {sorted(found)} ways; keep one "
                         f"set (delete the others' shards/K-of-N folders) and merge again")
    return found.pop()


def _command_for(states: dict[int, dict], k: int, n: int) -> str:
    argv = next((s["argv"] for s in states.values() if s and s.get("argv")), None)
    if not argv:
        return f"the same command with --shard {k}/{n}"
    args = list(argv)
    if "--shard" in args:
        args[args.index("--shard") + 1] = f"{k}/{n}"
    return "`tl-vlm " + " ".join(args[1:]) + "`"


def _load_states(out, n: int) -> dict[int, Optional[dict]]:
    """Each shard's ``shard.json`` (None for a shard that never started)."""
    paths = {k: RunStore.shard_path(out, k, n) / RunStore.SHARD_STATE for k in range(n)}
    return {k: json.loads(p.read_text()) if p.exists() else None for k, p in paths.items()}


def _check_shards(out, step: str, states: dict[int, Optional[dict]],
                 settings: dict[str, Any]) -> dict[str, Any]:
    """The plan and model the shards agree on for ``step`` (all must have finished it);
    :class:`MergeError` when their settings, versions, model or plan differ."""
    n = len(states)
    first = states[0]
    for k, s in states.items():
        if s["settings"] != settings:
            diff = sorted(key for key in set(s["settings"]) | set(settings)
                          if s["settings"].get(key) != settings.get(key))
            raise MergeError(f"shard {k}/{n} ran with other settings than {out}/run.json "
                             f"(differs in {diff}); rerun it with the run's settings")
        if s["versions"] != first["versions"]:
            diff = {key: (first["versions"].get(key), s["versions"].get(key))
                    for key in set(first["versions"]) | set(s["versions"])
                    if first["versions"].get(key) != s["versions"].get(key)}
            raise MergeError(f"shards 0/{n} and {k}/{n} ran with other versions {diff}; their "
                             f"numbers may differ. Rerun one with the other's versions")
        if s["model"] != first["model"]:
            raise MergeError(f"shards 0/{n} and {k}/{n} loaded different models "
                             f"({first['model']} vs {s['model']})")
        if s["steps"][step]["plan"] != first["steps"][step]["plan"]:
            raise MergeError(f"shards 0/{n} and {k}/{n} planned {step} differently "
                             f"({first['steps'][step]['plan']} vs {s['steps'][step]['plan']})")
    return {"plan": first["steps"][step]["plan"], "model": first["model"]}


def _copy_tensors(out: Path, src_dir: Path, step: str, record: dict) -> None:
    name = record.get("tensors")
    if not name:
        return
    src, dst = src_dir / step / name, out / RunStore.STEPS / step / name
    if not src.exists():
        raise MergeError(f"{src} is missing though a record names it; rerun that shard")
    if dst.exists():
        if dst.read_bytes() != src.read_bytes():
            raise RecordConflictError(f"{src} and {dst} hold different tensors for chunk "
                                      f"{record['chunk']} key {record.get('key', '')!r}; "
                                      f"remove the wrong shard's records and rerun it")
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    try:
        os.link(src, tmp)                      # no copy of large representations
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def merge_step(store: RunStore, step: str, scoring=None, log: Callable[[str], None] = print,
               require: bool = False, count: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Merge ``step`` of the shards of ``store.out`` and save its result, if every shard
    has finished it (else None; with ``require`` a :class:`MergeError` instead).
    ``count``: the number of shards (default: this store's, or the one on disk).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, {"n": 1}, shard=(0, 2))
        >>> merge_step(store, "accuracy", log=lambda m: None) is None   # shard 1 not there
        True
        >>> merge_step(store, "accuracy", require=True)
        Traceback (most recent call last):
        ...
        tl_vlm.study.shards.MergeError: accuracy: shards [0, 1] of 2 have not finished it (missing: [0, 1]); ...
        >>> tmp.cleanup()
    """
    from tl_vlm.study.runner import finalize_step
    from tl_vlm.eval.tasks import Scoring

    out = store.out
    n = count or (store.shard[1] if store.shard else shard_count(out))
    states = _load_states(out, n)
    missing = [k for k, st in states.items() if st is None]
    pending = [k for k, st in states.items()
               if st is not None and not st.get("steps", {}).get(step, {}).get("done")]
    if missing or pending:
        if require:
            hints = "; ".join(f"shard {k}: {_command_for(states, k, n)}"
                              for k in sorted(missing + pending))
            raise MergeError(f"{step}: shards {sorted(missing + pending)} of {n} have not "
                             f"finished it (missing: {missing}); run them first ({hints})")
        still = ", ".join(str(k) for k in sorted(missing + pending))
        log(f"[{step}] this shard's part is done; shard(s) {still} of {n} still to finish it "
            f"(the last to finish merges, or run `tl-vlm merge {out}`)")
        return None
    checked = _check_shards(out, step, states, store.settings)
    lock = out / RunStore.STEPS / f".merge-{step}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
    except FileExistsError:
        if not require:
            log(f"[{step}] another process is merging it")
            return None
    try:
        plan = checked["plan"]
        merged = RunStore(out, store.settings)
        write_atomic(out / RunStore.MODEL, dumps(checked["model"]))
        if plan.get("skipped"):
            return finalize_step(merged, step, plan=plan)
        records = read_records(out / RunStore.STEPS / f"{step}.jsonl")
        for k in range(n):
            shard_dir = RunStore.shard_path(out, k, n) / RunStore.STEPS
            own = read_records(shard_dir / f"{step}.jsonl")
            for r in own:
                _copy_tensors(out, shard_dir, step, r)
            records += own
        records = sorted_unique(records, f"{out}/shards/*/steps/{step}.jsonl")
        have = {(r["chunk"], r.get("key", "")) for r in records}
        lost = [(j, key) for key in plan["keys"] for j in range(plan["chunks"])
                if (j, key) not in have]
        if lost:
            owners = sorted({j % n for j, _ in lost})
            raise MergeError(f"{step}: chunks {sorted({j for j, _ in lost})[:10]} are missing "
                             f"though shards {owners} of {n} say they finished; rerun them")
        write_atomic(out / RunStore.STEPS / f"{step}.jsonl",
                     "".join(json.dumps(r) + "\n" for r in records))
        result = finalize_step(merged, step, scoring or Scoring(), plan)
        log(f"[{step}] merged {len(records)} records from {n} shard(s)")
        return result
    finally:
        lock.unlink(missing_ok=True)


def _merged_steps(out) -> list[str]:
    """The steps any shard of ``out`` has planned, in study order."""
    from tl_vlm.study.runner import STEPS

    n = shard_count(out)
    planned: set[str] = set()
    for k in range(n):
        path = RunStore.shard_path(out, k, n) / RunStore.SHARD_STATE
        if path.exists():
            planned |= set(json.loads(path.read_text()).get("steps", {}))
    return [s for s in STEPS if s in planned]


def merge_run(out, scoring=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Merge every step of a sharded run directory; returns the study's results.

    Example (see tests/test_shards.py for a full run):
        >>> import tempfile
        >>> merge_run(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        tl_vlm.study.shards.MergeError: ... holds no run.json: expected a tl-vlm run directory
    """
    from tl_vlm.study.runner import study_results

    out = Path(out)
    if not (out / RunStore.RUN).exists():
        raise MergeError(f"{out} holds no {RunStore.RUN}: expected a tl-vlm run directory")
    n = shard_count(out)
    store = RunStore.open(out)
    steps = _merged_steps(out)
    if not steps:
        raise MergeError(f"no shard of {out} has started a step yet; nothing to merge")
    for step in steps:
        merge_step(store, step, scoring, log=log, require=True, count=n)
    return study_results(store, steps)
