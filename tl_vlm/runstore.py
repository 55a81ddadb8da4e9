"""A run directory that survives interruption: finished steps are never redone.

Layout of ``out/``::

    run.json                 the settings the run was started with
    steps/<step>.json        a finished step's result
    steps/<step>.jsonl       records of an unfinished step, one line per finished chunk

A rerun with the same settings skips finished steps and, inside an unfinished step,
the chunks already recorded. A rerun with different settings refuses to mix results
(pass ``fresh=True`` to start over). Files are written to a temporary name and renamed,
so an interruption never leaves half a JSON file behind.

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
import shutil
from pathlib import Path
from typing import Any, Iterator, Union


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunStore:
    """Finished steps and per-chunk records of a resumable run (see module docstring).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, {"model": "toy-gated", "n": 24})
        >>> store.record("accuracy", {"start": 0, "scores": [1.0, 0.0]})   # a finished chunk
        >>> store.records("accuracy"), store.done("accuracy")
        ([{'start': 0, 'scores': [1.0, 0.0]}], False)
        >>> store.save("accuracy", {"mean": 0.5})
        {'mean': 0.5}
        >>> store.records("accuracy"), store.results(), list(store)
        ([], {'accuracy': {'mean': 0.5}}, ['accuracy'])
        >>> RunStore(tmp.name, {"model": "toy-gated", "n": 48})
        Traceback (most recent call last):
        ...
        ValueError: ... holds a run with other settings (differs in ['n']); use another ...
        >>> list(RunStore(tmp.name, {"model": "toy-gated", "n": 48}, fresh=True))
        []
        >>> tmp.cleanup()
    """

    def __init__(self, out: Union[str, Path], settings: dict[str, Any], fresh: bool = False) -> None:
        self.out = Path(out)
        self.steps = self.out / "steps"
        settings_file = self.out / "run.json"
        if fresh and self.steps.exists():
            shutil.rmtree(self.steps)
        if settings_file.exists() and not fresh:
            saved = json.loads(settings_file.read_text())
            if saved != json.loads(json.dumps(settings)):
                changed = sorted(k for k in set(saved) | set(settings)
                                 if saved.get(k) != settings.get(k))
                raise ValueError(
                    f"{self.out} holds a run with other settings (differs in {changed}); "
                    f"use another output directory, or --fresh to discard it"
                )
        self.steps.mkdir(parents=True, exist_ok=True)
        _write_atomic(settings_file, json.dumps(settings, indent=1))
        self.settings = settings

    def done(self, step: str) -> bool:
        return (self.steps / f"{step}.json").exists()

    def load(self, step: str) -> Any:
        return json.loads((self.steps / f"{step}.json").read_text())

    def save(self, step: str, result: Any) -> Any:
        """Record a finished step (and drop its chunk records)."""
        _write_atomic(self.steps / f"{step}.json", json.dumps(result, indent=1))
        (self.steps / f"{step}.jsonl").unlink(missing_ok=True)
        return result

    def records(self, step: str) -> list[dict[str, Any]]:
        """Chunk records of an unfinished step (a torn last line is ignored)."""
        path = self.steps / f"{step}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # interrupted while writing: that chunk is redone
        return out

    def record(self, step: str, record: dict[str, Any]) -> None:
        path = self.steps / f"{step}.jsonl"
        if path.exists() and not path.read_bytes().endswith(b"\n"):
            # a torn line from an interrupted write: keep only the complete records
            _write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records(step)))
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def results(self) -> dict[str, Any]:
        """Every finished step's result, by step name."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.steps.glob("*.json"))}

    def __iter__(self) -> Iterator[str]:
        return (p.stem for p in sorted(self.steps.glob("*.json")))
