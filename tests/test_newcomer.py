"""A newcomer's first day (issue 22), item by item: each mistake is one line saying what
was expected, what was found and what to do, fast, and nothing is created or lost."""

import json
import re
import time

import pytest

from tl_vlm.cli import commands as cli


def _run(argv, capsys):
    start = time.perf_counter()
    status = cli.main(argv)
    wall = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    return status, err, wall


# -- 1. a mistyped model name, a hub id without network ---------------------------------
@pytest.mark.parametrize("argv, message", [
    (["narrow-gate", "--model", "toy-gatd", "--task", "toy"],
     "no model 'toy-gatd': did you mean the shipped toy model 'toy-gated'?"),
    (["narrow-gate", "--model", "toy-gatd"],               # the typo first, not "--task is required"
     "did you mean the shipped toy model 'toy-gated'?"),
    (["narrow-gate", "--model", "facebook/chameleon-7b", "--task", "vqav2"],
     "facebook/chameleon-7b: the Hugging Face hub cannot be reached"),
    (["find-gate", "--model", "facebook/chameleon-7b", "--task", "vqav2"],
     "pass a local directory (save_pretrained output) or a shipped toy model"),
])
def test_model_names_fail_in_one_line_within_seconds(argv, message, tmp_path, capsys):
    status, err, wall = _run(argv + ["--out", str(tmp_path / "run")], capsys)
    assert status == 2 and len(err) == 1 and message in err[0]
    assert wall < 10 and not (tmp_path / "run").exists()


# -- 2. checks that came after the work -------------------------------------------------
@pytest.mark.parametrize("command", ["find-gate", "narrow-gate", "flow"])
def test_an_output_path_that_is_a_file_is_refused_first(command, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    status, err, wall = _run([command, "--n-examples", "8", "--out", str(afile)], capsys)
    assert status == 2 and "a file is in the way; give a directory" in err[-1]
    assert wall < 10 and afile.read_text() == "keep me"


# -- 3. data mistakes ------------------------------------------------------------------
def _write(folder, name, text):
    (folder / name).write_text(text)
    return folder / name


@pytest.mark.parametrize("content, message", [
    ("", "holds no examples: expected one JSON object per line"),
    ('{"image": "a.png", "question": \n', ":1: not a JSON line"),
    ('{"image": "a.png"}\n', ":1: expected a JSON object with 'image', 'question' and "
                             "'answers', found ['image']"),
    ('{"image": "bad.png", "question": "q", "answers": ["a"]}\n',
     "bad.png is not a readable image (cannot identify image file"),
    ('{"image": "gone.png", "question": "q", "answers": ["a"]}\n',
     "gone.png does not exist"),
])
def test_data_mistakes_are_one_line_before_the_model(content, message, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not a png")
    task = _write(tmp_path, "task.jsonl", content)
    status, err, _ = _run(["narrow-gate", "--model", "toy-gated", "--task", str(task),
                           "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and len(err) == 1 and message in err[0]
    assert "loading" not in " ".join(err) and not (tmp_path / "run").exists()


# -- 4. a small task runs every step ----------------------------------------------------
def _small_task(folder, n):
    from tests.tiny import image

    rows = []
    for i in range(n):
        image(i, (32, 32)).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "what colour",
                     "answers": [["red", "blue"][i % 2]], "label": i % 2})
    return _write(folder, "small.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def test_a_six_example_task_runs_every_step(tmp_path, capsys):
    pytest.importorskip("dadapy")
    task = _small_task(tmp_path, 6)
    out = tmp_path / "run"
    status, err, _ = _run(["narrow-gate", "--model", "toy-gated", "--task", str(task),
                           "--steps", "accuracy,separation,overlap", "--out", str(out)], capsys)
    assert status == 0, err
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["separation"]["params"]["k"] == 11          # 12 points: k adapted from 16
    assert results["overlap"]["k"] < 6


def test_a_one_example_task_skips_separation_and_says_why(tmp_path, capsys):
    pytest.importorskip("dadapy")
    task = _small_task(tmp_path, 1)
    out = tmp_path / "run"
    status, err, _ = _run(["narrow-gate", "--model", "toy-gated", "--task", str(task),
                           "--steps", "accuracy,separation", "--out", str(out)], capsys)
    assert status == 0, err
    assert any("[separation] does not apply" in line for line in err)
    assert "separation" not in json.loads((out / "results.json").read_text())["results"]
    assert "separation: 2 points" in (out / "index.html").read_text()


# -- 6. notebook manners ----------------------------------------------------------------
def test_short_reprs_and_clear_type_errors(toy_models):
    from tl_vlm import analyses as A
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    batch = model.prepare(make_examples(3).prompts, padding_side="left")
    out = model.generate(batch, max_new_tokens=2)
    for shown in (repr(out), repr(batch),
                  repr(A.cross_modal_contribution(model, [batch], show_progress=False))):
        assert len(shown.splitlines()) == 1 and len(shown) < 400 and "tensor([" not in shown
    assert "text=['red', 'square', 'top-left']" in repr(out)
    for call, method in [(lambda: model.last_logits(["which colour ?"]), "last_logits()"),
                         (lambda: model.generate("which colour ?"), "generate()"),
                         (lambda: model(["which colour ?"]), "model(...)")]:
        with pytest.raises(TypeError, match=rf"{re.escape(method)} takes a batch, not prompts: "
                                            r"batch = model.prepare\(prompts"):
            call()
    with pytest.raises(TypeError, match="did you swap model and batch"):
        A.gate_knockout(batch, model)


# -- 5. the README's plotting line; figures without a setup call -------------------------
def test_image_scores_takes_the_row_pos_last_gives(toy_models):
    from tl_vlm import plot
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    batch = model.prepare(make_examples(1).prompts)
    _, cache = model.run_with_cache(batch, names_filter="blocks.3.attn.hook_pattern")
    pattern = cache["blocks.3.attn.hook_pattern"][0].mean(0)
    row = pattern[batch.positions.last[0]]                 # shape [1, seq]: what users write
    fig = plot.image_scores(model, batch, row, score_name="attention")
    assert fig.layout.title.text == "attention of each image token"


def test_figures_draw_in_a_notebook_without_a_setup_call():
    """In a kernel, importing tl_vlm.plot sets the renderer (the tutorials, executed by
    tests/test_docs.py without a setup call, check every figure carries HTML)."""
    import subprocess
    import sys

    code = ("import IPython, plotly.io as pio\n"
            "class ZMQInteractiveShell: pass\n"
            "IPython.get_ipython = lambda: ZMQInteractiveShell()\n"
            "import tl_vlm.plot\n"
            "print(pio.renderers.default)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "plotly_mimetype+tl_vlm_notebook", out.stderr[-2000:]


# -- 7. silence and small lies ----------------------------------------------------------
def test_a_shard_of_another_split_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["narrow-gate", "--n-examples", "8", "--steps", "accuracy", "--conditions", "none",
            "--out", out]
    status, err, _ = _run(base + ["--shard", "0/2"], capsys)
    assert status == 0 and any("shard(s) 1 of 2 still to finish it" in line for line in err)
    status, err, _ = _run(base + ["--shard", "1/3"], capsys)
    assert status == 2 and "holds shards of a 2-way split; shard 1/3 would mix two splits" in err[-1]
    assert sorted(p.name for p in (tmp_path / "run" / "shards").iterdir()) == ["0-of-2"]


def test_the_settings_table_leaves_out_what_does_not_apply(tmp_path, capsys):
    out = tmp_path / "run"
    status, _, _ = _run(["narrow-gate", "--n-examples", "8", "--steps", "accuracy",
                         "--conditions", "none", "--out", str(out)], capsys)
    assert status == 0 and "<td>prompts</td>" not in (out / "index.html").read_text()
