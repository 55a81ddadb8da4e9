"""The main job on a tiny checkpoint and a JSONL dataset: every step, the report, resuming."""

import json

import pytest

from tests.tiny import image
from tl_vlm import cli
from tl_vlm.study import STEPS
from tl_vlm.tasks import GenerationTask

N = 24  # > DADApy's k=16 distinct vectors per layer


class Killed(Exception):
    """Stands for the run being killed mid-step."""


@pytest.fixture(scope="module")
def vqa_jsonl(tmp_path_factory):
    d = tmp_path_factory.mktemp("vqa")
    rows = []
    for i in range(N):
        image(i).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "what colour",
                     "answers": [["red", "blue", "green"][i % 3]], "kind": "colour"})
    (d / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "vqa.jsonl"


def _run(model_dir, data, out, *extra):
    return cli.main(["narrow-gate", "--model", str(model_dir), "--dataset", str(data),
                     "--out", str(out), "--batch-size", "8", *extra])


def test_main_job_runs_every_step_and_writes_the_report(tiny_zoo, vqa_jsonl, tmp_path):
    out = tmp_path / "report"
    assert _run(tiny_zoo.path("chameleon"), vqa_jsonl, out) == 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == set(STEPS)
    assert saved["meta"]["family"] == "chameleon"
    acc = saved["results"]["accuracy"]["conditions"]
    assert set(acc) == {"none", "gate", "img_to_text", "random"} and acc["none"]["n"] == N
    contribution = saved["results"]["contribution"]
    for row in contribution["weight"] + contribution["value"]:
        assert sum(row) == pytest.approx(1.0)
    page = (out / "index.html").read_text()
    for title in ("Attention knockout", "Cross-modal attention contribution",
                  "Modality separation", "Semantic probing", "Steering by activation patching"):
        assert title in page
    assert page.count("Plotly.newPlot") >= 6 and "<script src" not in page   # offline


def test_an_interrupted_run_resumes_where_it_stopped(tiny_zoo, vqa_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "report"
    calls, kill_at = [], [7]   # the 7th score: the first one of the second batch
    real_score = GenerationTask.score

    def dying_score(self, *a, **kw):
        calls.append(1)
        if len(calls) == kill_at[0]:
            kill_at[0] = None
            raise Killed
        return real_score(self, *a, **kw)

    monkeypatch.setattr(GenerationTask, "score", dying_score)
    with pytest.raises(Killed):
        _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--steps", "accuracy")
    recorded = (out / "steps" / "accuracy.jsonl").read_text().splitlines()
    assert len(recorded) == 6                      # 6 conditions x draws of the first batch
    assert not (out / "steps" / "accuracy.json").exists()

    calls.clear()
    _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--steps", "accuracy")
    assert len(calls) == 12                        # only the two batches not yet scored
    acc = json.loads((out / "steps" / "accuracy.json").read_text())
    assert acc["conditions"]["none"]["n"] == N

    calls.clear()                                  # a finished step is kept; new steps run
    _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--steps", "accuracy,contribution")
    assert calls == [] and (out / "steps" / "contribution.json").exists()

    with pytest.raises(ValueError, match="other settings"):
        _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--n-pairs", "3")


def test_bad_arguments_say_what_to_do(tiny_zoo, vqa_jsonl, tmp_path):
    with pytest.raises(SystemExit, match="--dataset is required"):
        cli.main(["narrow-gate", "--model", str(tiny_zoo.path("llava")), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown steps"):
        _run(tiny_zoo.path("llava"), vqa_jsonl, tmp_path, "--steps", "acuracy")
    with pytest.raises(SystemExit, match="neither 'toy' nor an existing file"):
        _run(tiny_zoo.path("llava"), tmp_path / "nope.jsonl", tmp_path)
