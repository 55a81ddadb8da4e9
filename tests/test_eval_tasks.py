"""The main job on the paper's tasks, end to end, from schema-faithful local copies.

``tl-vlm narrow-gate --task NAME --data DIR`` goes through the same ``load_rows`` call as a
hub id (tests/tinydata); the models are the tiny checkpoints (tests/tiny) and the shipped
toy model.
"""

import json

import pytest

from tl_vlm.cli import commands as cli
from tl_vlm.eval.data import select_indices


def _main(model, task, data, out, *extra):
    return cli.main(["narrow-gate", "--model", str(model), "--task", task, "--data", str(data),
                     "--out", str(out), "--batch-size", "4", *extra])


def _results(out):
    return json.loads((out / "results.json").read_text())["results"]


def test_vqav2_end_to_end(tiny_zoo, tiny_data, tmp_path):
    out = tmp_path / "vqa"
    assert _main(tiny_zoo.path("chameleon"), "vqav2", tiny_data.path("vqav2"), out,
                 "--n-examples", "6", "--batch-size", "3") == 0
    results = _results(out)
    assert sorted(results) == ["accuracy", "contribution"]          # the task's default steps
    acc = results["accuracy"]
    assert acc["metric"] == "vqa_accuracy"
    assert acc["conditions"]["random"]["draws"] == 5                # the paper's VQA draws
    assert {c["n"] for c in acc["conditions"].values()} == {6}      # one set for every condition
    source = json.loads((out / "source.json").read_text())
    assert source["indices"] == select_indices("vqav2", 50, n=6)    # the authors' seeded draw
    assert source["loaded_from"] == str(tiny_data.path("vqav2"))
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [e["id"] for e in examples] == source["ids"]
    assert all(len(e["references"]) == 10 for e in examples)
    run = json.loads((out / "run.json").read_text())
    assert run["task_settings"]["prompt_style"] == "paper" and run["task_settings"]["max_new_tokens"] == 20
    record = json.loads((out / "steps" / "accuracy.jsonl").read_text().splitlines()[0])
    assert record["ids"] == source["ids"][:3] and len(record["predictions"]) == 3


def test_the_toy_model_reads_a_local_copy_through_the_same_path(tiny_data, tmp_path):
    out = tmp_path / "toy-vqa"
    assert _main("toy-gated", "vqav2", tiny_data.path("vqav2"), out, "--n-examples", "4",
                 "--steps", "accuracy", "--conditions", "none,gate") == 0
    assert set(_results(out)["accuracy"]["conditions"]) == {"none", "gate"}


@pytest.mark.parametrize("task, n", [("flickr30k", 12), ("coco", 6)])
def test_captioning_end_to_end(tiny_zoo, tiny_data, tmp_path, task, n):
    out = tmp_path / task
    extra = ["--coco-root", str(tiny_data.coco_root())] if task == "coco" else []
    assert _main(tiny_zoo.path("chameleon"), task, tiny_data.path(task), out,
                 "--n-examples", str(n), "--batch-size", "6", "--cider", "ptb-approx",
                 *extra) == 0
    acc = _results(out)["accuracy"]
    assert acc["metric"] == "cider" and acc["scoring"]["cider"] == "ptb-approx"
    assert acc["conditions"]["random"]["draws"] == 3                # the paper's caption draws
    none = acc["conditions"]["none"]
    assert none["mean"] == none["metrics"]["cider_ptb-approx"]
    assert "cider_raw" in none["metrics"]
    run = json.loads((out / "run.json").read_text())
    assert run["task_settings"]["max_new_tokens"] == 60


def test_imagenet_end_to_end(sp_chameleon_path, tiny_data, tmp_path):
    out = tmp_path / "imagenet"
    assert _main(sp_chameleon_path, "imagenet", tiny_data.path("imagenet"), out) == 0
    results = _results(out)
    acc = results["accuracy"]
    assert acc["metric"] == "accuracy" and acc["classes"] == 4
    assert acc["collision_rate"] == pytest.approx(0.5)   # tench/tabby "t", great/golden "g"
    assert acc["chance"] == pytest.approx(1 / 2)
    for condition in acc["conditions"].values():
        assert 0 <= condition["metrics"]["chi_out"] <= 1             # chi_out per condition
    assert (out / "steps" / "accuracy").is_dir()                      # final residuals, per batch
    assert sorted(results["overlap"]["representations"]) == ["gate", "image_mean", "last_image"]


def test_steering_set_patches_between_the_authors_class_pairs(sp_chameleon_path, tiny_data,
                                                              tmp_path):
    out = tmp_path / "steering"
    assert _main(sp_chameleon_path, "steering", tiny_data.path("steering"), out,
                 "--patch-streams", "attn_in") == 0
    source = json.loads((out / "source.json").read_text())
    assert source["class_pairs"] == [["bird.n.01", "cat.n.01"], ["dog.n.01", "fox.n.01"]]
    patching = _results(out)["patching"]
    assert patching["n_pairs"] == 4                                   # 2 images per class pair
    assert len(patching["streams"]["attn_in"]["flip_rate"]) == 2      # every layer


def test_a_local_source_never_contacts_the_hub(tiny_zoo, tiny_data, tmp_path, no_network):
    out = tmp_path / "offline"
    assert _main(tiny_zoo.path("chameleon"), "vqav2", tiny_data.path("vqav2"), out,
                 "--n-examples", "4", "--steps", "accuracy", "--conditions", "none") == 0
    assert no_network == [], f"sockets were opened: {no_network}"
    assert json.loads((out / "source.json").read_text())["sha"] is None


def test_imagenet_open_vocabulary_end_to_end(sp_chameleon_path, tiny_data, tmp_path):
    """The same rows scored open-vocabulary: greedy 5 tokens, correct when they start
    with one of the label's lemmas (every lemma is a reference)."""
    from tl_vlm.eval.taskset import load_task

    task, source = load_task("imagenet_open", data=tiny_data.path("imagenet"))
    assert type(task).__name__ == "OpenClassTask" and task.max_new_tokens == 5
    assert source["task"] == "imagenet_open" and len(task) == 12
    lemmas = {ex.answers[0]: ex.references for ex in task.examples}
    assert all(refs[0] == first and len(refs) >= 1 for first, refs in lemmas.items())
    out = tmp_path / "imagenet_open"
    assert _main(sp_chameleon_path, "imagenet_open", tiny_data.path("imagenet"), out) == 0
    acc = _results(out)["accuracy"]
    assert acc["metric"] == "name_prefix_accuracy"
    assert acc["conditions"]["random"]["draws"] == 5
    assert all(0 <= c["mean"] <= 1 for c in acc["conditions"].values())
