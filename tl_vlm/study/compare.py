"""Several Narrow Gate runs side by side: ``tl-vlm compare RUN_DIR... --out DIR``.

Each run directory holds the ``results.json`` that ``tl-vlm narrow-gate`` writes
(``{"meta": ..., "results": {step: result}}``). The comparison overlays the runs in the
paper's figures: the knockout table, progressive knockout, contribution per layer,
modality separation, neighbourhood overlap and the steering curves. Models of different
depths share an x axis of relative depth (layer / number of layers). Every model keeps
one colour in every figure; one legend at the top, grouped into native and non-native
models (from the family's layout), shows and hides a model everywhere at once.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> folder = tempfile.TemporaryDirectory()
    >>> tmp = Path(folder.name)
    >>> for name, gate in (("toy-gated", 0.25), ("toy-distributed", 1.0)):
    ...     acc = {"conditions": {"none": {"mean": 1.0, "n": 24}, "gate": {"mean": gate, "n": 24}},
    ...            "chance": 0.25}
    ...     (tmp / name).mkdir()
    ...     _ = (tmp / name / "results.json").write_text(json.dumps(
    ...         {"meta": {"model": name, "family": "chameleon", "layers": 4},
    ...          "results": {"accuracy": acc}}))
    >>> runs = [load_run(tmp / n) for n in ("toy-gated", "toy-distributed")]
    >>> [(r.name, r.native) for r in runs]
    [('toy-gated', True), ('toy-distributed', True)]
    >>> page = write_comparison([tmp / "toy-gated", tmp / "toy-distributed"], tmp / "cmp")
    >>> page.name, "Attention knockout" in page.read_text()
    ('index.html', True)
    >>> folder.cleanup()
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

# Colours: native models take warm ones, non-native cool ones, so the groups read apart.
_NATIVE_COLOURS = ("#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#b8860b")
_OTHER_COLOURS = ("#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#7f7f7f", "#006400")
GROUPS = {True: "native", False: "non-native", None: "unknown kind"}


@dataclass
class Run:
    """One run's results, as ``tl-vlm compare`` reads them.

    Attributes:
        name: the label in the figures (the model; the directory name added when two
            runs share a model).
        path: the run directory.
        meta: the run's settings (model, family, layers, ...).
        results: step name -> result.
        native: the family's kind (native multimodal or adapted LLM); None if unknown.
        colour: its colour in every figure.

    Example:
        >>> run = Run("toy-gated", Path("runs/toy-gated"), {"layers": 4}, {}, native=True)
        >>> run.n_layers, GROUPS[run.native]
        (4, 'native')
    """

    name: str
    path: Path
    meta: dict[str, Any]
    results: dict[str, Any]
    native: Optional[bool]
    colour: str = "#000000"

    @property
    def n_layers(self) -> Optional[int]:
        return self.meta.get("layers")


def family_is_native(family: Optional[str]) -> Optional[bool]:
    """Whether a tl_vlm family is native multimodal (its layout says so); None if unknown.

    Example:
        >>> family_is_native("chameleon"), family_is_native("pixtral"), family_is_native("x")
        (True, False, None)
    """
    from tl_vlm.core.family import families

    for fam in families():
        if fam.name == family:
            return bool(getattr(fam.layout, "native", False))
    return None


def load_run(path: Union[str, Path]) -> Run:
    """Read ``path/results.json`` (written by ``tl-vlm narrow-gate``).

    Example:
        >>> load_run("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: /nonexistent/results.json not found: give the output directory of a `tl-vlm narrow-gate` run
    """
    from tl_vlm.study.rundir import RunStore

    path = Path(path)
    file = path / RunStore.RESULTS
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: give the output directory of a "
                                f"`tl-vlm narrow-gate` run")
    try:
        data = json.loads(file.read_text())
        meta, results = data["meta"], data["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not a narrow-gate results file (expected a JSON object "
                         f"with 'meta' and 'results'): {err}") from err
    native = meta.get("native")
    if native is None:
        native = family_is_native(meta.get("family"))
    return Run(str(meta.get("model") or path.name), path, meta, results, native)


def _arrange(runs: Sequence[Run]) -> list[Run]:
    """Native models first, then non-native, then unknown; unique names; colours."""
    order = {True: 0, False: 1, None: 2}
    runs = sorted(runs, key=lambda r: order[r.native])
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    palettes = {True: list(_NATIVE_COLOURS), False: list(_OTHER_COLOURS), None: list(_OTHER_COLOURS)}
    used: dict[Optional[bool], int] = {}
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.name} ({r.path.name})"
        palette = palettes[r.native]
        r.colour = palette[used.get(r.native, 0) % len(palette)]
        used[r.native] = used.get(r.native, 0) + 1
    return runs


def _depth(run: Run, layers: Sequence[int]) -> list[float]:
    """Relative depth of layer indices: layer / number of layers."""
    n = run.n_layers or (max(layers) if layers else 1) or 1
    return [l / n for l in layers]


def _line(run: Run, x, y, dash: str = "solid", hover: str = "", **kw) -> Any:
    import plotly.graph_objects as go

    return go.Scatter(x=x, y=y, mode="lines+markers", name=run.name, legendgroup=run.name,
                      showlegend=False, line=dict(color=run.colour, dash=dash),
                      marker=dict(color=run.colour, size=5),
                      hovertemplate=f"{html.escape(run.name)}{hover}: %{{y:.3f}}<extra></extra>",
                      **kw)


def _depth_axis(fig, row: Optional[int] = None, col: Optional[int] = None) -> None:
    kw = {} if row is None else dict(row=row, col=col)
    fig.update_xaxes(title_text="layer / number of layers", range=[-0.02, 1.02], **kw)


# -- figures -------------------------------------------------------------------------------
def _knockout_figure(runs: Sequence[Run]) -> Optional[tuple[Any, list[str], list[list]]]:
    """Accuracy per knockout condition, one bar per model; with its table."""
    import plotly.graph_objects as go

    from tl_vlm.plot import CONDITION_NAMES

    have = [r for r in runs if "accuracy" in r.results]
    if not have:
        return None
    conditions = [c for c in CONDITION_NAMES if any(c in r.results["accuracy"]["conditions"] for r in have)]
    fig = go.Figure()
    rows = []
    metrics = {r.results["accuracy"].get("metric", "accuracy") for r in have}
    top = 1.0
    for r in have:
        res = r.results["accuracy"]
        conds = res["conditions"]
        ys = [conds[c]["mean"] if c in conds else None for c in conditions]
        top = max([top] + [y for y in ys if y is not None])
        fig.add_trace(go.Bar(x=[CONDITION_NAMES[c] for c in conditions], y=ys, name=r.name,
                             legendgroup=r.name, showlegend=False, marker_color=r.colour,
                             hovertemplate=f"{html.escape(r.name)}: %{{y:.3f}}<extra></extra>"))
        rows.append([r.name, GROUPS[r.native], res.get("metric", "accuracy")]
                    + ["" if y is None else y for y in ys] + [res.get("chance") or ""])
    metric = metrics.pop() if len(metrics) == 1 else "score"       # CIDEr is not bounded by 1
    fig.update_layout(barmode="group", title=f"Task {metric} under attention knockout (all layers)",
                      yaxis=dict(title=metric, range=[0, 1.1 * top]))
    header = ["model", "kind", "metric"] + [CONDITION_NAMES[c] for c in conditions] + ["chance"]
    return fig, header, rows


def _progressive_figure(runs: Sequence[Run]):
    """Accuracy with the gate knocked out in the last w layers, w as a fraction of depth."""
    import plotly.graph_objects as go

    have = [r for r in runs if "progressive" in r.results]
    if not have:
        return None
    fig = go.Figure()
    rows = []
    for r in have:
        res = r.results["progressive"]
        n = r.n_layers or max(res["widths"])
        fig.add_trace(_line(r, [w / n for w in res["widths"]], res["accuracy"],
                            customdata=res["widths"], hover=" (last %{customdata} layers)"))
        rows += [[r.name, w, a] for w, a in zip(res["widths"], res["accuracy"])]
    fig.update_layout(title="Gate knocked out in the last w layers only",
                      xaxis=dict(title="w / number of layers"),
                      yaxis=dict(title="accuracy", range=[0, 1.1]))
    return fig, ["model", "w", "accuracy"], rows


def _contribution_figure(runs: Sequence[Run]):
    """Per layer, the value-weighted share of text -> image attention that goes to the
    gate (EOI) and to the image content tokens."""
    from plotly.subplots import make_subplots

    have = [r for r in runs if "contribution" in r.results]
    if not have:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "share of text→image attention to EOI (the gate)", "share to the image tokens"))
    rows = []
    for r in have:
        res = r.results["contribution"]
        groups, x = res["groups"], _depth(r, res["layers"])
        col = {g: [row[groups.index(g)] for row in res["value"]] for g in groups}
        image = [a + b for a, b in zip(col.get("image", [0] * len(x)), col.get("last_image", [0] * len(x)))]
        fig.add_trace(_line(r, x, col.get("eoi", [0.0] * len(x)), customdata=res["layers"],
                            hover=" (layer %{customdata})"), row=1, col=1)
        fig.add_trace(_line(r, x, image, customdata=res["layers"], hover=" (layer %{customdata})"),
                      row=1, col=2)
        rows += [[r.name, l, e, i] for l, e, i in zip(res["layers"], col.get("eoi", [0.0] * len(x)), image)]
    _depth_axis(fig)
    fig.update_yaxes(range=[0, 1.05])
    fig.update_yaxes(title_text="share (value-weighted)", row=1, col=1)
    return fig, ["model", "layer", "EOI share", "image-token share"], rows


def _separation_figure(runs: Sequence[Run]):
    """Median |cos| between text and image residuals per layer (solid) and the
    homogeneity of density-peak clusters with the modality (dotted)."""
    have = [r for r in runs if "separation" in r.results]
    if not have:
        return None
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = []
    for r in have:
        res = r.results["separation"]
        x = _depth(r, res["layers"])
        fig.add_trace(_line(r, x, res["median_abs_cos"], hover=" median |cos|"))
        if res.get("homogeneity") is not None:
            fig.add_trace(_line(r, x, res["homogeneity"], dash="dot", hover=" homogeneity"))
        homog = res.get("homogeneity") or [""] * len(x)
        rows += [[r.name, l, c, h] for l, c, h in zip(res["layers"], res["median_abs_cos"], homog)]
    _depth_axis(fig)
    fig.update_layout(title="Modality separation: median |cos| text vs image (solid), cluster "
                            "homogeneity (dotted)", yaxis=dict(range=[0, 1.05]))
    return fig, ["model", "layer", "median |cos|", "homogeneity"], rows


def _overlap_figure(runs: Sequence[Run]):
    """Neighbourhood overlap with the class labels: the gate (or the last image token
    where a model has no gate; solid) and the mean image token (dashed)."""
    have = [r for r in runs if "overlap" in r.results]
    if not have:
        return None
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = []
    for r in have:
        res = r.results["overlap"]
        reps = res["representations"]
        x = _depth(r, res["layers"])
        first = "gate" if "gate" in reps else "last_image"
        fig.add_trace(_line(r, x, reps[first], hover=f" {first}"))
        if "image_mean" in reps:
            fig.add_trace(_line(r, x, reps["image_mean"], dash="dash", hover=" image mean"))
        rows += [[r.name, l, first, v] for l, v in zip(res["layers"], reps[first])]
    _depth_axis(fig)
    fig.update_layout(title="Neighbourhood overlap χ: gate (solid; last image token if none), "
                            "image mean (dashed)",
                      yaxis=dict(title="χ", range=[0, 1.05]))
    return fig, ["model", "layer", "representation", "χ"], rows


def _steering_figure(runs: Sequence[Run]):
    """Flip rate of patching the gate from another image, per layer: attention input
    from that layer on (solid), residual at that layer (dashed)."""
    have = [r for r in runs if "patching" in r.results]
    if not have:
        return None
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = []
    dashes = {"attn_in": "solid", "resid_pre": "dash"}
    for r in have:
        for stream, res in r.results["patching"]["streams"].items():
            fig.add_trace(_line(r, _depth(r, res["layers"]), res["flip_rate"],
                                dash=dashes.get(stream, "dot"), hover=f" {stream}"))
            rows += [[r.name, stream, l, f] for l, f in zip(res["layers"], res["flip_rate"])]
    _depth_axis(fig)
    fig.update_layout(title="Steering by patching the gate: flip rate (attn_in solid, resid_pre "
                            "dashed)", yaxis=dict(title="flip rate", range=[0, 1.05]))
    return fig, ["model", "stream", "layer", "flip rate"], rows


FIGURES: list[tuple[str, str, Callable]] = [
    ("accuracy", "Attention knockout", _knockout_figure),
    ("progressive", "Progressive knockout", _progressive_figure),
    ("contribution", "Cross-modal attention contribution", _contribution_figure),
    ("separation", "Modality separation", _separation_figure),
    ("overlap", "Semantic probing", _overlap_figure),
    ("patching", "Steering by activation patching", _steering_figure),
]


# -- the page ------------------------------------------------------------------------------
_TOGGLE_JS = """
function tlToggle(item){
  var model = item.getAttribute('data-model'), off = item.classList.toggle('off');
  document.querySelectorAll('.plotly-graph-div').forEach(function(div){
    var idx = [];
    (div.data || []).forEach(function(t, i){ if (t.legendgroup === model) idx.push(i); });
    if (idx.length) Plotly.restyle(div, {visible: off ? 'legendonly' : true}, idx);
  });
}
"""


def shared_legend(runs: Sequence[Run]) -> str:
    """The page's one legend: a swatch per model under its kind; a click hides or shows
    that model in every figure.

    Example:
        >>> run = Run("toy-gated", Path("runs/toy-gated"), {}, {}, native=True, colour="#d62728")
        >>> "native" in shared_legend([run]), "data-model='toy-gated'" in shared_legend([run])
        (True, True)
    """
    parts = ["<div class='legend'>"]
    for native in (True, False, None):
        members = [r for r in runs if r.native is native]
        if not members:
            continue
        parts.append(f"<div class='group'><b>{GROUPS[native]}</b>")
        for r in members:
            name = html.escape(r.name, quote=True)
            parts.append(f"<span class='item' data-model='{name}' onclick='tlToggle(this)'>"
                         f"<span class='swatch' style='background:{r.colour}'></span>{name}</span>")
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


EXTRA_CSS = """
.legend{position:sticky;top:0;background:#fff;z-index:10;padding:.4em 0;border-bottom:1px solid #ddd}
.group{display:inline-block;margin-right:2em}.item{cursor:pointer;margin-left:1em;user-select:none}
pre{white-space:pre-wrap}.item.off{opacity:.35}.swatch{display:inline-block;width:1.6em;height:.8em;margin-right:.3em;vertical-align:middle}
"""


def write_comparison(run_dirs: Sequence[Union[str, Path]], out: Union[str, Path]) -> Path:
    """Write ``out/index.html`` overlaying the runs, and ``out/runs.json`` (what was
    compared); returns the HTML path. Figures no run has are left out.

    Example:
        >>> write_comparison([], "cmp")
        Traceback (most recent call last):
        ...
        ValueError: give at least one run directory (the --out of `tl-vlm narrow-gate`)
    """
    from plotly.offline import get_plotlyjs

    from tl_vlm.study.report import figure_html, html_page, html_table
    from tl_vlm.study.rundir import RunStore

    if not run_dirs:
        raise ValueError("give at least one run directory (the --out of `tl-vlm narrow-gate`)")
    runs = _arrange([load_run(p) for p in run_dirs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(
        [{"name": r.name, "path": str(r.path), "kind": GROUPS[r.native], "colour": r.colour,
          "meta": r.meta} for r in runs], indent=1))
    parts = [f"<style>{EXTRA_CSS}</style>", f"<h1>Narrow Gate: {len(runs)} runs compared</h1>",
             shared_legend(runs)]
    info = [[r.name, GROUPS[r.native], r.meta.get("family", ""), r.n_layers or "",
             r.meta.get("task", r.meta.get("dataset", "")), r.meta.get("examples", ""),
             str(r.path)] for r in runs]
    parts.append(html_table(["model", "kind", "family", "layers", "task", "examples", "run"],
                            info))
    for step, title, make in FIGURES:
        made = make(runs)
        if made is None:
            continue
        fig, header, rows = made
        parts.append(f"<h2 id='{step}'>{html.escape(title)}</h2>")
        fig.update_layout(template="plotly_white", height=380, margin=dict(l=60, r=20, t=60, b=50))
        parts.append(figure_html(fig))
        parts.append(f"<details><summary>numbers</summary>{html_table(header, rows)}</details>")
    path = out / RunStore.REPORT
    path.write_text(html_page("Narrow Gate comparison", parts, get_plotlyjs() + _TOGGLE_JS))
    return path
