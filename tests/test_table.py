"""``tl-vlm table``: the models x tasks x conditions matrix, resumable cell by cell."""

import json

import pytest

from tl_vlm import HookedVLM
from tl_vlm.cli import commands as cli
from tl_vlm.study.table import cell_dir
from tl_vlm.eval.tasks import NextTokenTask

TABLE = ["table", "--models", "toy-gated,toy-distributed", "--tasks", "toy",
         "--n-examples", "24", "--batch-size", "12"]


class Killed(Exception):
    """Stands for the table being killed mid-way."""


@pytest.fixture
def counted(monkeypatch):
    """Counts model loads and predictions; ``kill_at`` makes the n-th prediction die."""
    calls = {"loads": [], "predict": 0, "kill_at": None}
    load, predict = HookedVLM.from_pretrained, NextTokenTask.predict

    def counting_load(name, *a, **k):
        calls["loads"].append(name)
        return load(name, *a, **k)

    def counting_predict(self, *a, **k):
        calls["predict"] += 1
        if calls["predict"] == calls["kill_at"]:
            raise Killed
        return predict(self, *a, **k)

    monkeypatch.setattr(HookedVLM, "from_pretrained", staticmethod(counting_load))
    monkeypatch.setattr(NextTokenTask, "predict", counting_predict)
    return calls


def test_table_on_the_toy_models(tmp_path):
    out = tmp_path / "table"
    assert cli.main(TABLE + ["--out", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    gated = table["cells"]["toy-gated"]["toy"]["conditions"]
    distributed = table["cells"]["toy-distributed"]["toy"]["conditions"]
    assert gated["none"]["mean"] == distributed["none"]["mean"] == 1.0
    assert gated["gate"]["mean"] < 0.6 < distributed["gate"]["mean"]          # the planted gate
    assert distributed["img_to_text"]["mean"] < 0.6 < gated["img_to_text"]["mean"]
    assert gated["random"]["draws"] == 3 and len(gated["random"]["per_draw"]) == 3
    md = (out / "table.md").read_text()
    assert "| toy-gated | 1.000 | " in md and "± " in md
    page = (out / "index.html").read_text()
    assert "<table>" in page and "toy-distributed" in page
    assert (cell_dir(out, "toy-gated", "toy") / "steps" / "accuracy.jsonl").exists()


def test_a_killed_table_reruns_nothing_finished(tmp_path, counted):
    out = tmp_path / "table"
    per_cell = 2 * 6               # 2 batches x (none, gate, img_to_text, 3 random draws)
    counted["kill_at"] = per_cell + 6 + 3     # toy-distributed's second batch, 3rd condition
    with pytest.raises(Killed):
        cli.main(TABLE + ["--out", str(out)])
    assert (cell_dir(out, "toy-gated", "toy") / "steps" / "accuracy.json").exists()
    counted.update(loads=[], predict=0, kill_at=None)
    assert cli.main(TABLE + ["--out", str(out)]) == 0
    assert counted["loads"] == ["toy-distributed"]        # the finished model is not loaded
    assert counted["predict"] == 6 - 2                    # what the killed batch missed
    counted.update(loads=[], predict=0)
    assert cli.main(TABLE + ["--out", str(out)]) == 0     # all finished: nothing loaded
    assert counted["loads"] == [] and counted["predict"] == 0
    assert (out / "table.json").exists()


def test_more_conditions_later_compute_only_those(tmp_path, counted):
    out = tmp_path / "table"
    args = TABLE[:2] + ["toy-gated"] + TABLE[3:] + ["--out", str(out)]
    assert cli.main(args + ["--conditions", "none,gate"]) == 0
    assert counted["predict"] == 2 * 2
    counted["predict"] = 0
    assert cli.main(args + ["--conditions", "none,gate,img_to_text"]) == 0
    assert counted["predict"] == 2                         # img_to_text on 2 batches
    conditions = json.loads((out / "table.json").read_text())["cells"]["toy-gated"]["toy"]
    assert set(conditions["conditions"]) == {"none", "gate", "img_to_text"}


def test_rescoring_a_table_needs_no_model(tmp_path, counted):
    out = tmp_path / "table"
    args = TABLE[:2] + ["toy-gated"] + TABLE[3:] + ["--out", str(out), "--conditions", "none"]
    assert cli.main(args) == 0
    counted.update(loads=[], predict=0)
    assert cli.main(["rescore", str(out), "--vqa-normalise", "official"]) == 0
    assert counted["loads"] == [] and counted["predict"] == 0
    cell = json.loads((out / "table.json").read_text())["cells"]["toy-gated"]["toy"]
    assert cell["scoring"]["vqa_normalise"] == "official"


def test_table_flags_are_checked_first(tmp_path, capsys):
    assert cli.main(["table", "--models", "toy_gated", "--tasks", "toy"]) == 2
    assert "did you mean the shipped toy model 'toy-gated'" in capsys.readouterr().err
    assert cli.main(["table", "--models", "toy-gated", "--tasks", "vqav2,coco",
                     "--data", str(tmp_path)]) == 2
    assert "name each copy's task" in capsys.readouterr().err
    assert cli.main(["table", "--models", "toy-gated", "--tasks", "vqav2",
                     "--data", f"vqav2={tmp_path / 'missing'}"]) == 2
    assert "no such directory" in capsys.readouterr().err
