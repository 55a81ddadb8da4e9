"""The main job on a tiny checkpoint and a JSONL dataset: every step, the report, resuming,
re-scoring without the model."""

import json

import pytest

from tests.tiny import image
from tl_vlm.cli import commands as cli
from tl_vlm.study.runner import STEPS
from tl_vlm.eval.tasks import GenerationTask

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
    return cli.main(["narrow-gate", "--model", str(model_dir), "--task", str(data),
                     "--out", str(out), "--batch-size", "8", *extra])


def test_main_job_runs_every_step_and_writes_the_report(tiny_zoo, vqa_jsonl, tmp_path):
    out = tmp_path / "report"
    assert _run(tiny_zoo.path("chameleon"), vqa_jsonl, out) == 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == set(STEPS)
    assert saved["meta"]["family"] == "chameleon" and saved["meta"]["task"] == "vqa"
    acc = saved["results"]["accuracy"]
    assert acc["metric"] == "vqa_accuracy" and acc["scoring"]["vqa_normalise"] == "always"
    conditions = acc["conditions"]
    assert set(conditions) == {"none", "gate", "img_to_text", "random"}
    assert conditions["none"]["n"] == N and conditions["random"]["draws"] == 5
    assert len(conditions["random"]["per_draw"]) == 5
    contribution = saved["results"]["contribution"]
    for row in contribution["weight"] + contribution["value"]:
        assert sum(row) == pytest.approx(1.0)
    records = (out / "steps" / "accuracy.jsonl").read_text().splitlines()
    assert len(records) == 3 * 8                     # 3 batches x 8 conditions, all kept
    first = json.loads(records[0])
    assert set(first) == {"chunk", "of", "key", "start", "ids", "predictions", "extra"}
    examples = (out / "examples.jsonl").read_text().splitlines()
    assert [json.loads(line)["answers"] for line in examples[:2]] == [["red"], ["blue"]]
    page = (out / "index.html").read_text()
    for title in ("Attention knockout", "Cross-modal attention contribution",
                  "Modality separation", "Semantic probing", "Steering by activation patching"):
        assert title in page
    assert page.count("Plotly.newPlot") >= 6 and "<script src" not in page   # offline


def test_an_interrupted_run_resumes_where_it_stopped(tiny_zoo, vqa_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "report"
    calls, kill_at = [], [9]   # the 9th prediction: the first one of the second batch
    real_predict = GenerationTask.predict

    def dying_predict(self, *a, **kw):
        calls.append(1)
        if len(calls) == kill_at[0]:
            kill_at[0] = None
            raise Killed
        return real_predict(self, *a, **kw)

    monkeypatch.setattr(GenerationTask, "predict", dying_predict)
    with pytest.raises(Killed):
        _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--steps", "accuracy")
    recorded = (out / "steps" / "accuracy.jsonl").read_text().splitlines()
    assert len(recorded) == 8                      # 8 conditions x draws of the first batch
    assert not (out / "steps" / "accuracy.json").exists()

    calls.clear()
    _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--steps", "accuracy")
    assert len(calls) == 16                        # only the two batches not yet scored
    acc = json.loads((out / "steps" / "accuracy.json").read_text())
    assert acc["conditions"]["none"]["n"] == N
    runs = (out / "compute.jsonl").read_text().splitlines()
    assert len(runs) == 2                          # the killed run's time counts too
    assert "compute time (all runs of this report, resumes included)" in \
        (out / "index.html").read_text()

    calls.clear()                                  # a finished step is kept; new steps run
    _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--steps", "accuracy,contribution")
    assert calls == [] and (out / "steps" / "contribution.json").exists()

    assert _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--n-pairs", "3") == 2  # refused


def test_rescoring_needs_no_model(tiny_zoo, vqa_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "report"
    _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--steps", "accuracy",
         "--conditions", "none,gate")
    before = json.loads((out / "steps" / "accuracy.json").read_text())
    from tl_vlm import HookedVLM

    monkeypatch.setattr(HookedVLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("rescoring must not load a model"))
    assert cli.main(["rescore", str(out), "--vqa-normalise", "official",
                     "--extract", "first_line"]) == 0
    after = json.loads((out / "steps" / "accuracy.json").read_text())
    assert after["scoring"] == {"vqa_normalise": "official", "cider": "raw",
                                "extract": "first_line"}
    assert set(after["conditions"]) == set(before["conditions"]) == {"none", "gate"}
    saved = json.loads((out / "results.json").read_text())["results"]["accuracy"]
    assert saved == after
    # the same command again with the new scoring: re-scored from the records, nothing run
    assert _run(tiny_zoo.path("chameleon"), vqa_jsonl, out, "--steps", "accuracy",
                "--conditions", "none,gate") == 0
    again = json.loads((out / "steps" / "accuracy.json").read_text())
    assert again == before


def test_recorded_geometry_equals_the_library_functions(toy_models, tmp_path):
    """Separation and overlap computed from per-batch records at the end equal
    ``modality_separation`` and ``neighbourhood_overlaps`` over the same batches."""
    from tl_vlm import analyses as A
    from tl_vlm.study.rundir import RunStore
    from tl_vlm.study.runner import StudySettings, run_study
    from tl_vlm.eval.tasks import overlap_k, toy_task

    model, task = toy_models["toy-gated"], toy_task(48)
    settings = StudySettings("toy-gated", "toy", 48, batch_size=16, seed=3,
                             steps=("separation", "overlap"), task_settings=task.settings())
    results = run_study(model, task, RunStore(tmp_path, settings.run_settings()), settings,
                        log=lambda m: None)
    batches = [task.prepare(model, chunk) for _, chunk in task.batches(16)]
    sep = A.modality_separation(model, batches, seed=3).to_dict()
    assert results["separation"]["median_abs_cos"] == sep["cos_median"]
    assert results["separation"]["homogeneity"] == sep["homogeneity"]
    labels = [ex.klass for ex in task.examples]
    chis = A.neighbourhood_overlaps(model, batches, labels, k=overlap_k(48))
    for name, chi in chis.items():
        assert results["overlap"]["representations"][name] == chi.overlap.tolist()
