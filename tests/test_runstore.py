"""The run directory: finished steps kept, chunks resumed, settings never mixed."""

import json

import pytest

from tl_vlm.runstore import RunStore


def test_finished_steps_survive_a_restart(tmp_path):
    store = RunStore(tmp_path, {"model": "m", "n": 3})
    store.save("accuracy", {"none": 0.5})
    again = RunStore(tmp_path, {"model": "m", "n": 3})
    assert again.done("accuracy") and again.load("accuracy") == {"none": 0.5}
    assert list(again) == ["accuracy"]
    assert again.results() == {"accuracy": {"none": 0.5}}


def test_other_settings_are_refused_unless_fresh(tmp_path):
    RunStore(tmp_path, {"model": "m", "n": 3}).save("accuracy", {"x": 1})
    with pytest.raises(ValueError, match=r"differs in \['n'\].*--fresh"):
        RunStore(tmp_path, {"model": "m", "n": 4})
    fresh = RunStore(tmp_path, {"model": "m", "n": 4}, fresh=True)
    assert not fresh.done("accuracy")


def test_chunk_records_resume_and_a_torn_line_is_redone(tmp_path):
    store = RunStore(tmp_path, {})
    store.record("knockout", {"start": 0, "scores": [1, 0]})
    store.record("knockout", {"start": 2, "scores": [1, 1]})
    path = tmp_path / "steps" / "knockout.jsonl"
    path.write_text(path.read_text() + '{"start": 4, "sco')       # killed mid-write
    assert [r["start"] for r in store.records("knockout")] == [0, 2]
    store.record("knockout", {"start": 4, "scores": [0, 0]})
    assert [r["start"] for r in store.records("knockout")] == [0, 2, 4]
    store.save("knockout", {"done": True})
    assert store.records("knockout") == [] and not path.exists()
    assert json.loads((tmp_path / "steps" / "knockout.json").read_text()) == {"done": True}
