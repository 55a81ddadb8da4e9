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
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Union

from tl_vlm import plot
from tl_vlm.core.version import __version__
from tl_vlm.study.rundir import RunStore


def figure_html(fig: Any) -> str:
    """A plotly figure as an HTML fragment for a report page (plotly.js loaded once by
    the page).

    Example:
        >>> import plotly.graph_objects as go
        >>> html = figure_html(go.Figure()); html.startswith("<div") and "<html" not in html
        True
    """
    return fig.to_html(full_html=False, include_plotlyjs=False,
                       config={"displaylogo": False, "responsive": True})


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figures(step: str, res: dict) -> str:
    """The step's figures (:data:`tl_vlm.plot.STUDY_FIGURES`), as HTML."""
    figures = (draw(res) for draw in plot.STUDY_FIGURES[step])
    return "".join(figure_html(fig) for fig in figures if fig is not None)


def _accuracy(res: dict) -> str:
    conds = res["conditions"]
    metric = res.get("metric", "accuracy")
    rows = [[plot.CONDITION_NAMES.get(n, n), c["mean"], c.get("std", 0.0), c.get("draws", 1),
             c["n"]] for n, c in conds.items()]
    rows += [[f"{n}: skipped", why, "", "", ""] for n, why in res.get("skipped", {}).items()]
    return _table(["condition", metric, "std over draws", "draws", "examples"], rows)


def _progressive(res: dict) -> str:
    return _table(["w", "accuracy"], list(zip(res["widths"], res["accuracy"])))


def _contribution(res: dict) -> str:
    rows = [[layer] + list(w) for layer, w in zip(res["layers"], res["weight"])]
    return _table(["layer"] + list(res["groups"]), rows)


def _separation(res: dict) -> str:
    header = ["layer", "median |cos|", "q25", "q75"]
    cols = [res["layers"], res["median_abs_cos"], res["q25"], res["q75"]]
    for key, name in (("homogeneity", "homogeneity"), ("intrinsic_dim", "intrinsic dim")):
        if res.get(key) is not None:
            header.append(name)
            cols.append(res[key])
    return _table(header, [list(r) for r in zip(*cols)])


def _overlap(res: dict) -> str:
    reps = list(res["representations"])
    rows = [[layer] + [res["representations"][r][i] for r in reps]
            for i, layer in enumerate(res["layers"])]
    return _table(["layer"] + reps, rows)


def _patching(res: dict) -> str:
    rows = [[stream, l, f, o] for stream, r in res["streams"].items()
            for l, f, o in zip(r["layers"], r["flip_rate"], r["overlap"])]
    return _table(["stream", "layer", "flip rate", "overlap"], rows)


def _duration(seconds: float) -> str:
    """``95.3`` -> ``'1 min 35 s'``; ``3725`` -> ``'1 h 2 min'``."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _settings_rows(meta: dict[str, Any]) -> list[list[Any]]:
    """The header table: scalar settings, compute time spelled out."""
    rows = []
    for k, v in meta.items():
        if isinstance(v, (dict, list)) or v is None:      # None: the setting does not apply
            continue
        if k == "compute_seconds":
            rows.append(["compute time (all runs of this report, resumes included)",
                         _duration(v)])
        else:
            rows.append([k, v])
    return rows


SECTIONS: list[tuple[str, str, Callable[[dict], str], str]] = [
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
    settings, say) heads the page and ``results.json``, under the tl_vlm version and the
    date. A ``compute_seconds`` entry (the compute time of every run that made the
    results, resumes included) is shown as a duration. ``header`` (the device, the
    compute time: what differs between runs of the same settings) heads the page only,
    so that ``results.json`` is the same for every run and merge of the same settings.

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
    written = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    (out / RunStore.RESULTS).write_text(json.dumps(
        {"meta": meta, "results": results, "tl_vlm": __version__}, indent=1) + "\n")
    parts = [f"<h1>Narrow Gate study: {html.escape(str(meta.get('model', '')))}</h1>",
             f"<p class='note'>tl_vlm {html.escape(__version__)} · written "
             f"{html.escape(written)}</p>"]
    parts.append(_table(["setting", "value"], _settings_rows({**meta, **(header or {})})))
    for step, title, numbers, note in SECTIONS:
        if step not in results:
            continue
        parts.append(f"<h2 id='{step}'>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>")
        parts.append(_figures(step, results[step]))
        parts.append(f"<details><summary>numbers</summary>{numbers(results[step])}</details>")
    parts.append("<p class='note'>Raw numbers: <code>results.json</code> in this folder.</p>")
    path = out / RunStore.REPORT
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
