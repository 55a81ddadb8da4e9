"""A self-contained HTML report of a Narrow Gate study (plotly figures, raw numbers).

:func:`write_report` takes the results of :func:`tl_vlm.study.run_study` (one entry per
step) and writes ``index.html`` (plotly.js inlined: it opens offline, from a file) and
``results.json`` next to it. Figures for steps that did not run are left out; every
figure comes with the table of its numbers in a collapsible block.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> results = {"progressive": {"widths": [1, 2, 4], "accuracy": [0.9, 0.6, 0.25],
    ...                            "clean": 1.0, "chance": 0.25}}
    >>> path = write_report(results, tmp.name, meta={"model": "toy-gated"})
    >>> path.name, sorted(p.name for p in path.parent.iterdir())
    ('index.html', ['index.html', 'results.json'])
    >>> "Progressive knockout" in path.read_text(), "Attention knockout" in path.read_text()
    (True, False)
    >>> tmp.cleanup()

    After a run: ``write_report(run_study(model, task, store, settings), "report/")``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

CONDITION_NAMES = {
    "none": "no knockout",
    "gate": "gate (EOI) knocked out",
    "img_to_text": "img→text knocked out",
    "random": "random image tokens knocked out",
}


def _figure_html(fig: Any) -> str:
    fig.update_layout(template="plotly_white", height=380, margin=dict(l=60, r=20, t=50, b=50))
    return fig.to_html(full_html=False, include_plotlyjs=False,
                       config={"displaylogo": False, "responsive": True})


def _ticks(n: int) -> dict:
    """Whole-number ticks for an axis of ``n`` layers or grid cells (at most ~16 labels)."""
    return dict(tickmode="linear", tick0=0, dtick=max(1, -(-n // 16)))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _accuracy(res: dict) -> tuple[str, str]:
    import plotly.graph_objects as go

    conds = res["conditions"]
    names = list(conds)
    metric = res.get("metric", "accuracy")
    top = max([1.0] + [conds[n]["mean"] + conds[n].get("std", 0.0) for n in names])
    fig = go.Figure(go.Bar(x=[CONDITION_NAMES.get(n, n) for n in names],
                           y=[conds[n]["mean"] for n in names],
                           error_y=dict(type="data", array=[conds[n].get("std", 0.0) for n in names]),
                           text=[f"{conds[n]['mean']:.2f}" for n in names], textposition="outside"))
    if res.get("chance") is not None:
        fig.add_hline(y=res["chance"], line_dash="dash", annotation_text="chance")
    fig.update_layout(title=f"Task {metric} under attention knockout (all layers)",
                      yaxis=dict(title=metric, range=[0, 1.1 * top]))
    rows = [[CONDITION_NAMES.get(n, n), conds[n]["mean"], conds[n].get("std", 0.0),
             conds[n].get("draws", 1), conds[n]["n"]] for n in names]
    rows += [[f"{n}: skipped", why, "", "", ""] for n, why in res.get("skipped", {}).items()]
    return _figure_html(fig), _table(["condition", metric, "std over draws", "draws",
                                      "examples"], rows)


def _progressive(res: dict) -> tuple[str, str]:
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=res["widths"], y=res["accuracy"], mode="lines+markers"))
    if res.get("clean") is not None:
        fig.add_hline(y=res["clean"], line_dash="dot", annotation_text="no knockout")
    if res.get("chance") is not None:
        fig.add_hline(y=res["chance"], line_dash="dash", annotation_text="chance")
    fig.update_layout(title="Gate knockout in the last w layers only",
                      xaxis=dict(title="w (layers knocked out, counted from the end)",
                                 tickvals=res["widths"]),
                      yaxis=dict(title="accuracy", range=[0, 1.1]))
    return _figure_html(fig), _table(["w", "accuracy"], list(zip(res["widths"], res["accuracy"])))


def _contribution(res: dict) -> tuple[str, str]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups, layers = res["groups"], res["layers"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("attention weight", "value-weighted ‖A·W_O v‖"))
    for col, key in ((1, "weight"), (2, "value")):
        fig.add_trace(go.Heatmap(z=res[key], x=groups, y=layers, coloraxis="coloraxis",
                                 hovertemplate="layer %{y}<br>%{x}: %{z:.3f}<extra></extra>"),
                      row=1, col=col)
    fig.update_layout(title="Share of text→image attention per image-side key group",
                      coloraxis=dict(colorscale="Viridis", cmin=0, cmax=1))
    fig.update_yaxes(**_ticks(len(layers)))
    fig.update_yaxes(title_text="layer", row=1, col=1)
    figs = _figure_html(fig)
    if res.get("grid_map"):
        heat = go.Figure(go.Heatmap(z=res["grid_map"], colorscale="Viridis",
                                    hovertemplate="row %{y}, col %{x}: %{z:.4f}<extra></extra>"))
        heat.update_layout(title=f"Text→image-token attention over the image grid "
                                 f"(layers {res.get('map_layers')})",
                           yaxis=dict(autorange="reversed", title="row", scaleanchor="x",
                                      **_ticks(len(res["grid_map"]))),
                           xaxis=dict(title="column", **_ticks(len(res["grid_map"][0]))))
        figs += _figure_html(heat)
    rows = [[layer] + list(w) for layer, w in zip(layers, res["weight"])]
    return figs, _table(["layer"] + groups, rows)


def _separation(res: dict) -> tuple[str, str]:
    import plotly.graph_objects as go

    x = res["layers"]
    fig = go.Figure([
        go.Scatter(x=x + x[::-1], y=res["q75"] + res["q25"][::-1], fill="toself", opacity=0.25,
                   line=dict(width=0), name="interquartile range", hoverinfo="skip"),
        go.Scatter(x=x, y=res["median_abs_cos"], mode="lines+markers", name="median |cos|"),
    ])
    if res.get("homogeneity") is not None:
        fig.add_trace(go.Scatter(x=x, y=res["homogeneity"], mode="lines+markers",
                                 name="cluster homogeneity (modality)"))
    fig.update_layout(title="Modality separation in the residual stream (layer L: the "
                            "last block's output)",
                      xaxis=dict(title="layer", **_ticks(len(x))), yaxis=dict(range=[0, 1.05]))
    header = ["layer", "median |cos|", "q25", "q75"]
    cols = [x, res["median_abs_cos"], res["q25"], res["q75"]]
    if res.get("homogeneity") is not None:
        header.append("homogeneity")
        cols.append(res["homogeneity"])
    if res.get("intrinsic_dim") is not None:
        header.append("intrinsic dim")
        cols.append(res["intrinsic_dim"])
    return _figure_html(fig), _table(header, [list(r) for r in zip(*cols)])


def _overlap(res: dict) -> tuple[str, str]:
    import plotly.graph_objects as go

    x = res["layers"]
    fig = go.Figure([go.Scatter(x=x, y=v, mode="lines+markers", name=k)
                     for k, v in res["representations"].items()])
    fig.update_layout(title=f"Neighbourhood overlap with the class label (k={res.get('k')})",
                      xaxis=dict(title="layer", **_ticks(len(x))),
                      yaxis=dict(title="χ", range=[0, 1.05]))
    reps = list(res["representations"])
    rows = [[layer] + [res["representations"][r][i] for r in reps] for i, layer in enumerate(x)]
    return _figure_html(fig), _table(["layer"] + reps, rows)


def _patching(res: dict) -> tuple[str, str]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("flip rate", "overlap with the source"))
    rows = []
    for stream, r in res["streams"].items():
        fig.add_trace(go.Scatter(x=r["layers"], y=r["flip_rate"], mode="lines+markers",
                                 name=f"{stream}: flip rate"), row=1, col=1)
        fig.add_trace(go.Scatter(x=r["layers"], y=r["overlap"], mode="lines+markers",
                                 name=f"{stream}: overlap"), row=1, col=2)
        rows += [[stream, l, f, o] for l, f, o in zip(r["layers"], r["flip_rate"], r["overlap"])]
    fig.update_layout(title=f"Steering by patching the gate from another image "
                            f"({res.get('n_pairs')} pairs)")
    n = max(len(r["layers"]) for r in res["streams"].values())
    fig.update_xaxes(title_text="layer", **_ticks(n))
    fig.update_yaxes(range=[0, 1.05])
    return _figure_html(fig), _table(["stream", "layer", "flip rate", "overlap"], rows)


SECTIONS: list[tuple[str, str, Callable[[dict], tuple[str, str]], str]] = [
    ("accuracy", "Attention knockout", _accuracy,
     "Post-softmax attention to the key set is set to zero without renormalisation (the "
     "paper's semantics) in every layer and head, on the prompt and on every generated token."),
    ("progressive", "Progressive knockout", _progressive,
     "The gate is knocked out only in the last w layers."),
    ("contribution", "Cross-modal attention contribution", _contribution,
     "Per layer, the share of attention from text queries after the image to each group of "
     "image-side keys (mean over heads, averaged over the dataset, normalised over the groups)."),
    ("separation", "Modality separation", _separation,
     "Residual of a random text token and a random image token per example: |cosine| between "
     "the two modalities, and homogeneity of density-peak clusters (DADApy) with respect to modality."),
    ("overlap", "Semantic probing", _overlap,
     "Neighbourhood overlap χ: the fraction of each example's nearest neighbours sharing its class."),
    ("patching", "Steering by activation patching", _patching,
     "The gate's activation of a source image replaces the target's: residual at one layer "
     "(resid_pre) or attention input from that layer to the end (attn_in). Flip rate: sign of "
     "logit(target class) − logit(source class) flips."),
]

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:right}th{background:#f4f4f4}
.note{color:#555}details{margin:.5em 0}code{background:#f4f4f4;padding:0 .2em}
"""


def write_report(results: dict[str, Any], out: Union[str, Path],
                 meta: Optional[dict[str, Any]] = None,
                 header: Optional[dict[str, Any]] = None) -> Path:
    """Write ``index.html`` and ``results.json`` into ``out``; returns the HTML path.

    ``results`` maps step names (see :data:`SECTIONS`) to their results; ``meta`` (the
    settings, say) heads the page and ``results.json``; ``header`` (the device, the time
    taken: what differs between runs of the same settings) heads the page only, so that
    ``results.json`` is the same for every run and merge of the same settings.

    Example:
        >>> import json, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> acc = {"conditions": {"none": {"mean": 1.0, "n": 24}, "gate": {"mean": 0.25, "n": 24}},
        ...        "chance": 0.25}
        >>> path = write_report({"accuracy": acc}, tmp.name, meta={"model": "toy-gated"})
        >>> json.loads((path.parent / "results.json").read_text())["meta"]
        {'model': 'toy-gated'}
        >>> "gate (EOI) knocked out" in path.read_text()
        True
        >>> tmp.cleanup()
    """
    from plotly.offline import get_plotlyjs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1)
                                      + "\n")
    parts = [f"<h1>Narrow Gate study: {html.escape(str(meta.get('model', '')))}</h1>"]
    info = [[k, v] for k, v in {**meta, **(header or {})}.items()
            if not isinstance(v, (dict, list))]
    parts.append(_table(["setting", "value"], info))
    for step, title, render, note in SECTIONS:
        if step not in results:
            continue
        figs, table = render(results[step])
        parts.append(f"<h2 id='{step}'>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>")
        parts.append(figs)
        parts.append(f"<details><summary>numbers</summary>{table}</details>")
    parts.append("<p class='note'>Raw numbers: <code>results.json</code> in this folder.</p>")
    path = out / "index.html"
    path.write_text(html_page("Narrow Gate study", parts, scripts=get_plotlyjs()))
    return path


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    """A table in the report's style (floats to 3 significant digits, text escaped).

    Example:
        >>> html_table(["model", "VQAv2"], [["chameleon-7b", 0.51234]])
        '<table><thead><tr><th>model</th><th>VQAv2</th></tr></thead><tbody><tr><td>chameleon-7b</td><td>0.512</td></tr></tbody></table>'
    """
    return _table(header, rows)


def html_page(title: str, parts: list[str], scripts: str = "") -> str:
    """A self-contained page in the report's style around ``parts`` (HTML snippets).

    Example:
        >>> html_page("Table", ["<p>hi</p>"]).startswith("<!DOCTYPE html>")
        True
    """
    script = f"<script>{scripts}</script>" if scripts else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style>{script}</head><body>{''.join(parts)}</body></html>")
