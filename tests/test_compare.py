"""``tl-vlm compare``: several narrow-gate runs in one page, one legend, native first."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tl_vlm.cli import commands as cli
from tl_vlm.study.compare import load_run, write_comparison
from tl_vlm.study.report import write_report
from tl_vlm.study.rundir import RunStore
from tl_vlm.study.runner import STEPS, StudySettings, run_study
from tl_vlm.eval.tasks import toy_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_models):
    """Two toy runs of every step (small), and the gated one relabelled as a non-native
    family with twice the layers (how a Pixtral run's results.json looks)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("toy-gated", "toy-last-image"):
        settings = StudySettings(name, "toy", n_examples=24, batch_size=12, n_pairs=12,
                                 patch_streams=("attn_in",))
        store = RunStore(root / name / "store", settings.to_dict())
        results = run_study(toy_models[name], toy_task(24), store, settings, log=lambda m: None)
        write_report(results, root / name, {"model": name, "family": "chameleon", "layers": 4,
                                            "dataset": "toy", "examples": 24})
        out[name] = root / name
    fake = root / "pixtral-like"
    fake.mkdir()
    saved = json.loads((out["toy-gated"] / "results.json").read_text())
    saved["meta"].update(model="pixtral-like", family="pixtral", layers=8)
    (fake / "results.json").write_text(json.dumps(saved))
    out["pixtral-like"] = fake
    return out


def test_every_figure_of_every_run(runs, tmp_path):
    page = write_comparison(list(runs.values()), tmp_path / "cmp").read_text()
    assert page.count('class="plotly-graph-div"') == len(STEPS)
    for step in STEPS:
        assert f"<h2 id='{step}'>" in page
    # one legend, native models first, every model once in it
    legend = page[page.index("<div class='legend'>"):page.index("<table>")]
    assert legend.index("native") < legend.index("toy-gated") < legend.index("non-native") \
        < legend.index("pixtral-like")
    assert all(legend.count(f"data-model='{m}'") == 1 for m in runs)
    saved = json.loads((tmp_path / "cmp" / "runs.json").read_text())
    assert [r["kind"] for r in saved] == ["native", "native", "non-native"]
    assert len({r["colour"] for r in saved}) == 3


def test_each_figure_has_one_trace_set_per_model_in_its_colour(runs):
    import plotly.graph_objects as go

    from tl_vlm.study.compare import FIGURES, _arrange

    loaded = _arrange([load_run(p) for p in runs.values()])
    colour = {r.name: r.colour for r in loaded}
    for step, _, make in FIGURES:
        fig, header, rows = make(loaded)
        groups = {t.legendgroup for t in fig.data}
        assert groups == set(runs), (step, groups)
        for trace in fig.data:
            drawn = trace.marker.color if isinstance(trace, go.Bar) else trace.line.color
            assert drawn == colour[trace.legendgroup], step
        assert rows and all(len(r) == len(header) for r in rows)
    # depth is relative: the 8-layer run's layers end where the 4-layer run's do
    fig = dict((s, m) for s, _, m in FIGURES)["contribution"](loaded)[0]
    ends = {t.legendgroup: max(t.x) for t in fig.data}
    assert ends["pixtral-like"] < ends["toy-gated"]          # 3/8 vs 3/4: its copy of 4 layers


def test_the_same_model_twice_and_partial_runs(runs, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    saved = json.loads((runs["toy-gated"] / "results.json").read_text())
    saved["results"] = {"accuracy": saved["results"]["accuracy"]}
    (partial / "results.json").write_text(json.dumps(saved))
    page = write_comparison([runs["toy-gated"], partial], tmp_path / "cmp").read_text()
    assert "toy-gated (toy-gated)" in page and "toy-gated (partial)" in page
    assert page.count('class="plotly-graph-div"') == len(STEPS)   # figures of what any run has
    only = write_comparison([partial], tmp_path / "one").read_text()
    assert only.count('class="plotly-graph-div"') == 1


def test_bad_run_directories(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="results.json not found"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="not a narrow-gate results file"):
        load_run(tmp_path)
    # the command line says it in one line and exits with 2
    assert cli.main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "cmp")]) == 2
    assert cli.main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("tl-vlm compare: error: ") and "results.json not found" in err[0]
    assert "not a narrow-gate results file" in err[1]


def test_cli_compare(runs, tmp_path, capsys):
    assert cli.main(["compare", *map(str, runs.values()), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "index.html").is_file()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_every_figure_renders_in_headless_chromium(runs, tmp_path):
    write_comparison(list(runs.values()), tmp_path / "cmp")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "check-report"), str(tmp_path / "cmp")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{len(STEPS)} of {len(STEPS)} figures drawn")
