"""Sharded runs merge to the single run's bytes; every refusal of the merge fires.

The single run is made in this process; the shards run as parallel subprocesses of
``tl-vlm narrow-gate --shard K/N`` (one of them killed right after its first record and
started again), and the last shard to finish merges. Every step of the study is
covered: predictions (accuracy, progressive), per-chunk float64 totals (contribution),
per-chunk representations (separation, overlap) and pair chunks (patching).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tl_vlm.cli import commands as cli

ROOT = Path(__file__).resolve().parent.parent
STUDY = ["narrow-gate", "--model", "toy-gated", "--n-examples", "12", "--batch-size", "4",
         "--n-pairs", "8", "--patch-layers", "1,3"]   # 3 batches, 2 pair batches
# A shard that dies (like a killed job) right after writing its first record.
DIE_AFTER_FIRST_RECORD = """
import os, sys
from tl_vlm.study.rundir import RunStore
record = RunStore.record
def record_then_die(self, *args, **kwargs):
    record(self, *args, **kwargs)
    os._exit(9)
RunStore.record = record_then_die
from tl_vlm.cli import commands as cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None), env.pop("RANK", None)
    return env


def _start(args: list[str], script: str | None = None) -> subprocess.Popen:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "tl_vlm.cli.commands"]
    return subprocess.Popen(head + args, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, out
    return out


def _files(out: Path) -> dict[str, bytes]:
    """``results.json`` and every file under ``steps/``, by relative path."""
    found = {"results.json": (out / "results.json").read_bytes()}
    for path in sorted((out / "steps").rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            found[str(path.relative_to(out))] = path.read_bytes()
    return found


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(STUDY + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[int, Path]:
    """N=2 (shard 1 killed after its first record, then resumed) and N=3, in parallel."""
    root = tmp_path_factory.mktemp("sharded")
    two, three = root / "two", root / "three"
    procs = [_start(STUDY + ["--out", str(two), "--shard", "0/2"]),
             _start(STUDY + ["--out", str(two), "--shard", "1/2"], DIE_AFTER_FIRST_RECORD)]
    procs += [_start(STUDY + ["--out", str(three), "--shard", f"{k}/3"]) for k in range(3)]
    _finish(procs[1], expect=9)
    lines = (two / "shards" / "1-of-2" / "steps" / "accuracy.jsonl").read_text().splitlines()
    assert len(lines) == 1, "the killed shard should have left exactly one record"
    resumed = _start(STUDY + ["--out", str(two), "--shard", "1/2"])
    for proc in [procs[0], *procs[2:], resumed]:
        _finish(proc)
    return {2: two, 3: three}


def test_shards_merge_to_the_single_runs_bytes(single, sharded):
    expected = _files(single)
    assert {"steps/accuracy.jsonl", "steps/contribution.json", "steps/separation.json",
            "steps/overlap.json", "steps/patching.json", "steps/progressive.json"} <= set(expected)
    assert any(name.endswith(".safetensors") for name in expected)
    for n, out in sharded.items():
        got = _files(out)
        assert sorted(got) == sorted(expected), f"N={n}: other files"
        different = [name for name in expected if got[name] != expected[name]]
        assert not different, f"N={n}: {different} differ from the single run"
        assert (out / "index.html").exists()


def test_one_shard_equals_the_unsharded_run(single, tmp_path):
    out = tmp_path / "one"
    assert cli.main(STUDY + ["--out", str(out), "--shard", "0/1"]) == 0
    assert _files(out) == _files(single)


def test_more_shards_than_batches(tmp_path):
    args = ["narrow-gate", "--model", "toy-gated", "--n-examples", "8", "--batch-size", "4",
            "--steps", "accuracy,contribution"]                     # 2 batches, 3 shards
    assert cli.main(args + ["--out", str(tmp_path / "single")]) == 0
    for k in range(3):
        assert cli.main(args + ["--out", str(tmp_path / "sharded"), "--shard", f"{k}/3"]) == 0
    assert not (tmp_path / "sharded" / "shards" / "2-of-3" / "steps" / "accuracy.jsonl").exists()
    assert _files(tmp_path / "sharded") == _files(tmp_path / "single")


def _unmerged_copy(sharded_out: Path, target: Path) -> Path:
    """The shards of a run without the merge's output."""
    shutil.copytree(sharded_out, target)
    shutil.rmtree(target / "steps")
    (target / "results.json").unlink()
    return target


def test_merge_loads_no_model_and_gives_the_same_bytes(sharded, single, tmp_path, monkeypatch):
    from tl_vlm import HookedVLM

    out = _unmerged_copy(sharded[3], tmp_path / "copy")
    monkeypatch.setattr(HookedVLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the merge must not load a model"))
    assert cli.main(["merge", str(out)]) == 0
    assert _files(out) == _files(single)


def _merge_error(out: Path, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err          # one line
    return err


def test_merge_refuses_a_missing_shard(sharded, tmp_path, capsys):
    out = _unmerged_copy(sharded[2], tmp_path / "copy")
    shutil.rmtree(out / "shards" / "1-of-2")
    err = _merge_error(out, capsys)
    assert "shards [1] of 2 have not finished it (missing: [1])" in err
    assert "--shard 1/2" in err                                     # the command to run


def _edit_shard(out: Path, k: int, n: int, edit) -> None:
    path = out / "shards" / f"{k}-of-{n}" / "shard.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def test_merge_refuses_other_settings(sharded, tmp_path, capsys):
    out = _unmerged_copy(sharded[2], tmp_path / "copy")
    _edit_shard(out, 1, 2, lambda s: s["settings"].update(n_pairs=13))
    assert "shard 1/2 ran with other settings" in _merge_error(out, capsys)


def test_merge_refuses_other_versions(sharded, tmp_path, capsys):
    out = _unmerged_copy(sharded[2], tmp_path / "copy")
    _edit_shard(out, 1, 2, lambda s: s["versions"].update(torch="0.0.1"))
    err = _merge_error(out, capsys)
    assert "ran with other versions" in err and "0.0.1" in err


def test_merge_refuses_conflicting_duplicate_records(sharded, tmp_path, capsys):
    out = _unmerged_copy(sharded[2], tmp_path / "copy")
    theirs = out / "shards" / "1-of-2" / "steps" / "accuracy.jsonl"
    record = json.loads(theirs.read_text().splitlines()[0])
    record["predictions"] = ["something else"] * len(record["predictions"])
    ours = out / "shards" / "0-of-2" / "steps" / "accuracy.jsonl"
    ours.write_text(ours.read_text() + json.dumps(record) + "\n")
    err = _merge_error(out, capsys)
    assert f"two records of chunk {record['chunk']} key {record['key']!r} disagree" in err


def test_torchrun_ranks_are_shards(single, tmp_path):
    """``torchrun --nproc_per_node 2`` (CPU): each rank takes its shard from RANK and
    WORLD_SIZE; the file system is the only coordination, the last rank merges."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    out = tmp_path / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m",
                           "tl_vlm.cli.commands", *STUDY, "--out", str(out), "--shard", "auto"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["0-of-2", "1-of-2"]
    assert _files(out) == _files(single)
