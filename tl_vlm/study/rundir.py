"""A run directory that survives interruption and can be split into shards.

Layout of ``out/``::

    run.json                        the settings the run was started with (checked)
    examples.jsonl                  the examples' ids, answers and references (no images)
    steps/<step>.json               a finished step's result
    steps/<step>.jsonl              the step's records, one line per finished chunk
    steps/<step>/<chunk>.safetensors  tensor records (contribution totals, representations)
    shards/K-of-N/shard.json        a shard's status, versions and model (sharded runs)
    shards/K-of-N/steps/...         the shard's own records, same layout

A record is a JSON object with the index of its ``chunk`` (a batch of the global batch
list) and a ``key`` (the condition, stream, ...; ``""`` when a step has one record per
chunk). Records are appended and fsynced one by one; a rerun with the same settings
skips the chunks already recorded, and a torn last line (a kill mid-write) is dropped.
Records are kept when a step finishes: the step's result is always computed from them
(:meth:`RunStore.canonical_records`, sorted by chunk and key), which is what makes a
merge of shards equal a single run. A rerun with different settings refuses to mix
results (``fresh=True`` starts over). Files are written to a temporary name and
renamed, so an interruption never leaves half a file.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = RunStore(tmp.name, {"model": "toy-gated"})
    >>> if not store.done("accuracy"):
    ...     _ = store.save("accuracy", {"none": 0.98})
    >>> RunStore(tmp.name, {"model": "toy-gated"}).load("accuracy")      # a rerun keeps it
    {'none': 0.98}
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Union

if TYPE_CHECKING:  # torch only when tensors are saved: the CLI checks flags without it
    from torch import Tensor


class RunSettingsError(ValueError):
    """The output directory holds a run with other settings (see :class:`RunStore`).

    Example:
        >>> issubclass(RunSettingsError, ValueError)
        True
    """


class RecordConflictError(ValueError):
    """Two records of the same chunk and key disagree (see :func:`sorted_unique`).

    Example:
        >>> issubclass(RecordConflictError, ValueError)
        True
    """


def write_atomic(path: Path, data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` through a uniquely named temporary file and a rename:
    readers (and concurrent shards writing the same file) see a whole file or none.

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> write_atomic(d / "a.json", "{}")
        >>> (d / "a.json").read_text(), sorted(p.name for p in d.iterdir())
        ('{}', ['a.json'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps(value: Any) -> str:
    """The one JSON form of results and settings files (stable bytes for equal values).

    Example:
        >>> print(dumps({"a": [1, 2]}))
        {
         "a": [
          1,
          2
         ]
        }
    """
    return json.dumps(value, indent=1)


def record_id(record: dict[str, Any]) -> tuple[int, str]:
    """``(chunk, key)``: what a record is about (two records with one id must agree).

    Example:
        >>> record_id({"chunk": 3, "key": "gate", "predictions": ["a"]})
        (3, 'gate')
    """
    return int(record["chunk"]), str(record.get("key", ""))


def tensor_file_name(chunk: int, key: str = "") -> str:
    """The file of a record's tensors: ``chunk-000012[.key].safetensors``.

    Example:
        >>> tensor_file_name(12, "random/2")
        'chunk-000012.random-2.safetensors'
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", key)
    return f"chunk-{chunk:06d}{'.' + slug if slug else ''}.safetensors"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` file; a torn last line (killed mid-write) is dropped.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.jsonl"
        >>> _ = p.write_text('{"chunk": 0}\\n{"chu')
        >>> read_records(p)
        [{'chunk': 0}]
    """
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # interrupted while writing: that chunk is redone
    return out


def sorted_unique(records: Iterable[dict[str, Any]], where: str = "") -> list[dict[str, Any]]:
    """Records sorted by :func:`record_id`, equal duplicates dropped; duplicates that
    differ raise :class:`RecordConflictError` (a shard that computed something else).

    Example:
        >>> sorted_unique([{"chunk": 1, "key": ""}, {"chunk": 0, "key": ""}, {"chunk": 1, "key": ""}])
        [{'chunk': 0, 'key': ''}, {'chunk': 1, 'key': ''}]
        >>> sorted_unique([{"chunk": 1, "x": 1}, {"chunk": 1, "x": 2}], "steps/accuracy.jsonl")
        Traceback (most recent call last):
        ...
        tl_vlm.study.rundir.RecordConflictError: two records of chunk 1 key '' disagree (steps/accuracy.jsonl): ...
    """
    by_id: dict[tuple[int, str], dict[str, Any]] = {}
    for record in records:
        rid = record_id(record)
        if rid in by_id and by_id[rid] != record:
            diff = sorted(k for k in set(record) | set(by_id[rid])
                          if record.get(k) != by_id[rid].get(k))
            raise RecordConflictError(
                f"two records of chunk {rid[0]} key {rid[1]!r} disagree ({where}): they differ "
                f"in {diff}. The same batch gave different results: were the runs made "
                f"with other code, settings or hardware? Remove the wrong shard's records "
                f"and rerun it")
        by_id[rid] = record
    return [by_id[rid] for rid in sorted(by_id)]


class RunStore:
    """Finished steps and per-chunk records of a resumable run (see module docstring).

    Args:
        out: the run directory.
        settings: what fixes the results (a rerun must give the same).
        fresh: discard what ``out`` holds (a shard discards only its own records).
        shard: ``(K, N)``: this process computes shard K of N and records under
            ``shards/K-of-N/``; None for an unsharded run.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, {"model": "toy-gated", "n": 24})
        >>> store.record("accuracy", {"chunk": 0, "key": "none", "scores": [1.0, 0.0]})
        >>> store.records("accuracy"), store.done("accuracy")
        ([{'chunk': 0, 'key': 'none', 'scores': [1.0, 0.0]}], False)
        >>> store.save("accuracy", {"mean": 0.5})
        {'mean': 0.5}
        >>> store.results(), list(store), len(store.records("accuracy"))   # records are kept
        ({'accuracy': {'mean': 0.5}}, ['accuracy'], 1)
        >>> RunStore(tmp.name, {"model": "toy-gated", "n": 48})
        Traceback (most recent call last):
        ...
        tl_vlm.study.rundir.RunSettingsError: ... holds a run with other settings (differs in ['n'])...
        >>> list(RunStore(tmp.name, {"model": "toy-gated", "n": 48}, fresh=True))
        []
        >>> tmp.cleanup()
    """

    #: the file names of a run directory: spelled here only
    RUN = "run.json"
    EXAMPLES = "examples.jsonl"
    MODEL = "model.json"
    SOURCE = "source.json"
    RESULTS = "results.json"
    COMPUTE = "compute.jsonl"
    REPORT = "index.html"
    STEPS = "steps"
    SHARDS = "shards"
    SHARD_STATE = "shard.json"
    #: what a fresh (unsharded) start discards besides the steps and shards
    RUN_FILES = (EXAMPLES, MODEL, SOURCE, RESULTS, COMPUTE)

    def __init__(self, out: Union[str, Path], settings: dict[str, Any], fresh: bool = False,
                 shard: Optional[tuple[int, int]] = None) -> None:
        self.out = Path(out)
        self.steps = self.out / self.STEPS
        self.shard = shard
        self.shard_dir = None if shard is None else self.shard_path(self.out, *shard)
        self.records_dir = self.steps if shard is None else self.shard_dir / self.STEPS
        settings = json.loads(json.dumps(settings))   # tuples -> lists, as saved
        settings_file = self.out / self.RUN
        if fresh:
            shutil.rmtree(self.shard_dir if shard else self.steps, ignore_errors=True)
            if shard is None:
                shutil.rmtree(self.out / self.SHARDS, ignore_errors=True)
                for name in self.RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
        if shard is not None:
            self._check_split(shard)
        if settings_file.exists() and not fresh:
            saved = json.loads(settings_file.read_text())
            if saved != settings:
                changed = sorted(k for k in set(saved) | set(settings)
                                 if saved.get(k) != settings.get(k))
                raise RunSettingsError(
                    f"{self.out} holds a run with other settings (differs in {changed}); "
                    f"use another output directory, or --fresh to discard it")
        else:
            write_atomic(settings_file, dumps(settings))
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.steps.mkdir(parents=True, exist_ok=True)
        self.settings = settings

    def _check_split(self, shard: tuple[int, int]) -> None:
        """A shard of an N-way split may not join a directory split another way."""
        folder = self.out / self.SHARDS
        if not folder.is_dir():
            return
        counts = sorted({int(p.name.split("-of-")[1]) for p in folder.iterdir()
                         if p.is_dir() and "-of-" in p.name
                         and p.name.split("-of-")[1].isdigit()})
        others = [n for n in counts if n != shard[1]]
        if others:
            raise RunSettingsError(
                f"{self.out} holds shards of a {others[0]}-way split; shard {shard[0]}/{shard[1]} "
                f"would mix two splits: use --shard K/{others[0]}, another output directory, "
                f"or --fresh without --shard to start over")

    # -- opening and naming ----------------------------------------------------------
    @classmethod
    def open(cls, out: Union[str, Path], shard: Optional[tuple[int, int]] = None) -> "RunStore":
        """Reopen the run in ``out`` with its own settings (rescore, merge, table cells).

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> _ = RunStore(tmp.name, {"model": "toy-gated"})
            >>> RunStore.open(tmp.name).settings
            {'model': 'toy-gated'}
            >>> RunStore.open(tmp.name + "/nothing")
            Traceback (most recent call last):
            ...
            tl_vlm.study.rundir.RunSettingsError: .../nothing holds no run.json: expected a tl-vlm run directory
            >>> tmp.cleanup()
        """
        out = Path(out)
        if not (out / cls.RUN).is_file():
            raise RunSettingsError(f"{out} holds no {cls.RUN}: expected a tl-vlm run directory")
        return cls(out, json.loads((out / cls.RUN).read_text()), shard=shard)

    @classmethod
    def shard_path(cls, out: Union[str, Path], index: int, count: int) -> Path:
        """Where shard ``index`` of ``count`` keeps its records and state.

        Example:
            >>> RunStore.shard_path("runs/a", 1, 4).as_posix()
            'runs/a/shards/1-of-4'
        """
        return Path(out) / cls.SHARDS / f"{index}-of-{count}"

    def path(self, name: str) -> Path:
        """``out/name`` for one of the run's file names (``RunStore.MODEL``...).

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> RunStore(tmp.name, {}).path(RunStore.MODEL).name
            'model.json'
            >>> tmp.cleanup()
        """
        return self.out / name

    # -- finished steps --------------------------------------------------------------
    def done(self, step: str) -> bool:
        return (self.steps / f"{step}.json").exists()

    def load(self, step: str) -> Any:
        return json.loads((self.steps / f"{step}.json").read_text())

    def save(self, step: str, result: Any) -> Any:
        """Record a finished step's result (its records stay: they are the evidence)."""
        write_atomic(self.steps / f"{step}.json", dumps(result))
        return result

    def results(self) -> dict[str, Any]:
        """Every finished step's result, by step name."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.steps.glob("*.json"))}

    def __iter__(self) -> Iterator[str]:
        return (p.stem for p in sorted(self.steps.glob("*.json")))

    # -- records ---------------------------------------------------------------------
    def records(self, step: str) -> list[dict[str, Any]]:
        """This process's records of ``step`` (a shard's own; all of an unsharded run)."""
        return read_records(self.records_dir / f"{step}.jsonl")

    def record(self, step: str, record: dict[str, Any],
               tensors: Optional[dict[str, "Tensor"]] = None) -> None:
        """Append one record (and save its tensors first: the line is the commit)."""
        if "chunk" not in record:
            raise ValueError(f"a record needs the index of its chunk, got keys {sorted(record)}")
        if tensors:
            from safetensors.torch import save

            name = tensor_file_name(*record_id(record))
            data = save({k: v.contiguous() for k, v in tensors.items()})
            write_atomic(self.records_dir / step / name, data)
            record = {**record, "tensors": name}
        path = self.records_dir / f"{step}.jsonl"
        if path.exists() and not path.read_bytes().endswith(b"\n") and path.stat().st_size:
            # a torn line from an interrupted write: keep only the complete records
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records(step)))
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def canonical_records(self, step: str) -> list[dict[str, Any]]:
        """The step's records in ``steps/`` (an unsharded run's, or a merge's union),
        sorted by chunk and key, rewritten in that order so equal runs give equal files."""
        path = self.steps / f"{step}.jsonl"
        records = sorted_unique(read_records(path), str(path))
        text = "".join(json.dumps(r) + "\n" for r in records)
        if not path.exists() or path.read_text() != text:
            write_atomic(path, text)
        return records

    def tensors(self, step: str, record: dict[str, Any]) -> dict[str, "Tensor"]:
        """The tensors saved with a record of ``steps/`` (empty when it has none)."""
        if "tensors" not in record:
            return {}
        from safetensors.torch import load_file

        return load_file(str(self.steps / step / record["tensors"]))

    def write_once(self, name: str, text: str, what: str) -> None:
        """Write ``out/name`` unless it exists; if it exists it must hold ``text``."""
        path = self.out / name
        if path.exists():
            if path.read_text() != text:
                raise RunSettingsError(
                    f"{path} describes other {what} than this run's; use another output "
                    f"directory, or --fresh to discard it")
            return
        write_atomic(path, text)


#: the name the restructuring gave the run directory (``RunStore`` stays)
RunDir = RunStore
