"""Every analysis end to end on every family's tiny model (conftest parametrises ``family``
over ``tests/tiny``): the main job from a :class:`StudyConfig` on a JSONL task (accuracy
under every knockout condition, progressive knockout, contribution, patching) and the
geometry analyses. Knockout, contribution, patching, the logit lens and ``find_gates`` are
also checked per family against references in their own test files."""

import json
import math

import pytest

from transformers import AutoProcessor

from tests.test_prompts import chat_template
from tests.tiny import image
from tl_vlm import analyses as A
from tl_vlm.study.config import StudyConfig, TaskSource
from tl_vlm.study.job import run_main_job

N = 6
STEPS = ("accuracy", "progressive", "contribution", "patching")


@pytest.fixture(scope="module")
def colour_jsonl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    rows = []
    for i in range(N):
        image(i).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "what colour",
                     "answers": [["red", "blue", "green"][i % 3]], "kind": "colour"})
    (folder / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "colours.jsonl"


def test_main_job_on_a_jsonl_task(tiny_zoo, family, colour_jsonl, tmp_path):
    config = StudyConfig(model=str(tiny_zoo.path(family)), source=TaskSource(str(colour_jsonl)),
                         steps=STEPS, batch_size=3, random_k=2, random_draws=1, n_pairs=2,
                         out=str(tmp_path / "run"))
    # Emu3's paper prompts go through the chat template, which the tiny processors lack.
    processor = AutoProcessor.from_pretrained(str(tiny_zoo.path(family)))
    if not getattr(processor, "chat_template", None):
        processor.chat_template = chat_template(tiny_zoo.model(family).layout.placeholder)
    report = run_main_job(config, log=lambda message: None, processor=processor)
    assert report is not None and report.exists()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    has_gate = not tiny_zoo.batch(family)[1].positions.gate.is_empty()
    # without a gate (no EOI) there is nothing to knock out progressively or to patch
    expected = STEPS if has_gate else ("accuracy", "contribution")
    assert saved["meta"]["family"] == family and set(saved["results"]) == set(expected)
    conditions = saved["results"]["accuracy"]["conditions"]
    assert conditions["none"]["n"] == N
    assert {"none", "img_to_text", "random"} <= set(conditions)
    for row in saved["results"]["contribution"]["weight"]:
        assert sum(row) == pytest.approx(1.0)


def test_geometry_runs(tiny_zoo, family):
    pytest.importorskip("dadapy")
    spec = tiny_zoo.specs[family]
    model = tiny_zoo.model(family)
    batches = [model.prepare(spec.prompts, images=images)
               for images in (spec.images, spec.other_images, spec.images)]
    separation = A.modality_separation(model, batches, k=3, show_progress=False)
    assert len(separation.layers) == model.cfg.n_layers + 1
    assert all(math.isfinite(q) for q in separation.cos_median)
    labels = [b % 2 for b in range(2 * len(batches))]
    overlap = A.neighbourhood_overlap(model, batches, labels, representation="image_mean", k=2,
                                      show_progress=False)
    assert len(overlap.overlap) == len(overlap.layers)
    with pytest.raises(ValueError, match="ADP clustering needs k >= 3"):   # before any forward
        A.modality_separation(model, iter(()), k=2)
    assert all(0.0 <= x <= 1.0 for x in overlap.overlap if not math.isnan(x))
