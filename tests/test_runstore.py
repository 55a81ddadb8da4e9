"""The run directory: finished steps kept, chunks resumed, records sorted, settings never mixed."""

import json

import pytest
import torch

from tl_vlm.study.rundir import (RecordConflictError, RunSettingsError, RunStore, read_records,
                             sorted_unique, tensor_file_name)


def test_finished_steps_survive_a_restart(tmp_path):
    store = RunStore(tmp_path, {"model": "m", "n": 3})
    store.save("accuracy", {"none": 0.5})
    again = RunStore(tmp_path, {"model": "m", "n": 3})
    assert again.done("accuracy") and again.load("accuracy") == {"none": 0.5}
    assert list(again) == ["accuracy"]
    assert again.results() == {"accuracy": {"none": 0.5}}


def test_other_settings_are_refused_unless_fresh(tmp_path):
    RunStore(tmp_path, {"model": "m", "n": 3}).save("accuracy", {"x": 1})
    with pytest.raises(RunSettingsError, match=r"differs in \['n'\].*--fresh"):
        RunStore(tmp_path, {"model": "m", "n": 4})
    fresh = RunStore(tmp_path, {"model": "m", "n": 4}, fresh=True)
    assert not fresh.done("accuracy")


def test_chunk_records_resume_and_a_torn_line_is_redone(tmp_path):
    store = RunStore(tmp_path, {})
    store.record("knockout", {"chunk": 0, "scores": [1, 0]})
    store.record("knockout", {"chunk": 1, "scores": [1, 1]})
    path = tmp_path / "steps" / "knockout.jsonl"
    path.write_text(path.read_text() + '{"chunk": 2, "sco')       # killed mid-write
    assert [r["chunk"] for r in store.records("knockout")] == [0, 1]
    store.record("knockout", {"chunk": 2, "scores": [0, 0]})
    assert [r["chunk"] for r in store.records("knockout")] == [0, 1, 2]
    store.save("knockout", {"done": True})
    assert len(store.records("knockout")) == 3, "records stay after the step is saved"
    assert json.loads((tmp_path / "steps" / "knockout.json").read_text()) == {"done": True}


def test_canonical_records_are_sorted_deduplicated_and_checked(tmp_path):
    store = RunStore(tmp_path, {})
    for chunk, key in [(1, "gate"), (0, "none"), (1, "none"), (0, "gate"), (1, "gate")]:
        store.record("accuracy", {"chunk": chunk, "key": key, "said": [chunk, key]})
    records = store.canonical_records("accuracy")
    assert [(r["chunk"], r["key"]) for r in records] == [(0, "gate"), (0, "none"), (1, "gate"),
                                                         (1, "none")]
    assert read_records(tmp_path / "steps" / "accuracy.jsonl") == records   # rewritten sorted
    with pytest.raises(RecordConflictError, match="chunk 0 key 'gate' disagree.*'said'"):
        sorted_unique(records + [{"chunk": 0, "key": "gate", "said": "other"}], "test")


def test_tensor_records_round_trip(tmp_path):
    store = RunStore(tmp_path, {})
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    store.record("contribution", {"chunk": 12, "key": "random/1"}, {"total": t})
    [record] = store.records("contribution")
    assert record["tensors"] == tensor_file_name(12, "random/1") == \
        "chunk-000012.random-1.safetensors"
    loaded = store.tensors("contribution", record)
    assert torch.equal(loaded["total"], t) and loaded["total"].dtype == torch.float64


def test_a_shard_records_apart_and_shares_the_settings(tmp_path):
    shard = RunStore(tmp_path, {"n": 1}, shard=(1, 3))
    shard.record("accuracy", {"chunk": 1, "key": "none"})
    assert (tmp_path / "shards" / "1-of-3" / "steps" / "accuracy.jsonl").exists()
    assert not (tmp_path / "steps" / "accuracy.jsonl").exists()
    with pytest.raises(RunSettingsError):
        RunStore(tmp_path, {"n": 2}, shard=(0, 3))
    other = RunStore(tmp_path, {"n": 1}, shard=(0, 3), fresh=True)   # drops only its own records
    assert other.records("accuracy") == [] and shard.records("accuracy") != []


def test_write_once_refuses_other_content(tmp_path):
    store = RunStore(tmp_path, {})
    store.write_once("examples.jsonl", "a\n", "examples")
    store.write_once("examples.jsonl", "a\n", "examples")
    with pytest.raises(RunSettingsError, match="other examples"):
        store.write_once("examples.jsonl", "b\n", "examples")
