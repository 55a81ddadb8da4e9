"""Figures of a gate search (:func:`tl_vlm.analyses.find_gates`) and its HTML report.

Each function takes a :class:`~tl_vlm.analyses.gates.GateSearch` and returns a plotly
figure; :func:`write_gate_report` puts them on one self-contained page (``tl-vlm
find-gate``) next to ``gates.json`` (``GateSearch.from_dict`` reads it back).

Example:
    >>> import tempfile
    >>> from tl_vlm import HookedVLM, analyses as A
    >>> from tl_vlm.eval.tasks import toy_task
    >>> gates = A.find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(12), rows=False,
    ...                      overlap=False, check_random=0)
    >>> fig = effect_grid_figure(gates)
    >>> [trace.type for trace in fig.data]        # the content grid, then the other positions
    ['heatmap', 'bar']
    >>> tmp = tempfile.TemporaryDirectory()
    >>> sorted(p.name for p in write_gate_report(gates, tmp.name).parent.iterdir())
    ['gates.json', 'index.html']
    >>> tmp.cleanup()
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional, Union

from tl_vlm.analyses.gates import GateSearch


def _share(gates: GateSearch, value: Optional[float]) -> float:
    """``value`` over the image's effect; NaN for a value not there (None: a search saved
    before the value existed, or NaN after a JSON round trip)."""
    if value is None or not gates.total_effect:
        return float("nan")
    return value / gates.total_effect


def _number(value: Optional[float]) -> str:
    """A statistic for a title: two decimals, or "n/a" (None or NaN: too few points)."""
    return "n/a" if value is None or value != value else f"{value:.2f}"


def effect_grid_figure(gates: GateSearch, value: str = "effect", image: int = 0) -> Any:
    """The share of the image effect of each single position: the content tokens on the
    image grid (heatmap), the other image-side positions (BOI, EOI, row breaks,
    specials) as bars. ``value``: ``"effect"`` (exact where checked, else the refined
    value), ``"refined"`` or ``"estimate"``.

    Example:
        >>> from tl_vlm import HookedVLM, analyses as A
        >>> from tl_vlm.eval.tasks import toy_task
        >>> gates = A.find_gates(HookedVLM.from_pretrained("toy-distributed"), toy_task(12),
        ...                      rows=False, overlap=False, check_random=0)
        >>> fig = effect_grid_figure(gates, value="estimate")
        >>> fig.data[0].z.shape, sorted(fig.data[1].x)
        ((6, 6), ['boi', 'eoi'])
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if value not in ("effect", "refined", "estimate"):
        raise ValueError(f"value must be 'effect', 'refined' or 'estimate', got {value!r}")
    grid = gates.effect_grid(value, image) / (gates.total_effect or float("nan"))
    others = [c for c in gates.positions if c.grid is None]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.22,
                        subplot_titles=(f"one content token of image {image} knocked out "
                                        f"({value})", "one other image-side token"))
    fig.add_trace(go.Heatmap(z=grid.numpy(), colorscale="RdBu", zmid=0,
                             colorbar=dict(x=0.6, title="share"),
                             hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=[c.name for c in others], y=[_share(gates, getattr(c, value)) for c in others],
                         marker_color="#444", hovertemplate="%{x}: %{y:.3f}<extra></extra>",
                         showlegend=False), row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text="row", scaleanchor="x", constrain="domain",
                     row=1, col=1)
    fig.update_xaxes(title_text="column", constrain="domain", row=1, col=1)
    fig.update_yaxes(title_text="share of the image effect", row=1, col=2)
    return fig


def layer_figure(gates: GateSearch, top: int = 5) -> Any:
    """Per layer: the estimated share of the image effect of knocking out the best ``top``
    positions and the best classes in that layer only (lines), and the exact layer
    sweep (the gate knocked out from layer L to the end; markers).

    Example:
        >>> from tl_vlm import HookedVLM, analyses as A
        >>> from tl_vlm.eval.tasks import toy_task
        >>> gates = A.find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(12),
        ...                      rows=False, overlap=False, check_random=0)
        >>> fig = layer_figure(gates, top=2)
        >>> [t.name for t in fig.data][:2], fig.data[-1].name
        (['eoi', 'image (0, 0)'], 'exact: eoi knocked out from layer L on')
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = list(range(gates.n_layers))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("estimate: knocked out in one layer only",
                                        "exact: knocked out from layer L to the end"))
    for c in gates.ranking[:top]:
        fig.add_trace(go.Scatter(x=layers, y=[_share(gates, v) for v in c.per_layer],
                                 mode="lines+markers", name=c.name), row=1, col=1)
    for c in [c for c in gates.class_ranking if c.n_positions > 1][:2]:
        fig.add_trace(go.Scatter(x=layers, y=[_share(gates, v) for v in c.per_layer],
                                 mode="lines", line=dict(dash="dot"), name=f"class {c.name}"),
                      row=1, col=1)
    sweep = gates.layers
    if sweep.get("widths"):
        starts = [gates.n_layers - w for w in sweep["widths"]]
        fig.add_trace(go.Scatter(x=starts, y=[_share(gates, e) for e in sweep["effect"]],
                                 mode="lines+markers", marker=dict(size=9, symbol="diamond"),
                                 name=f"exact: {' + '.join(sweep['target'])} knocked out from "
                                      f"layer L on"), row=1, col=2)
    fig.update_xaxes(title_text="layer", tickmode="linear", dtick=max(1, gates.n_layers // 16))
    fig.update_yaxes(title_text="share of the image effect", row=1, col=1)
    return fig


def class_figure(gates: GateSearch) -> Any:
    """Each position class: the exact share of the image effect when it is knocked out,
    and its share of the value-weighted text -> image attention (contribution).

    Example:
        >>> from tl_vlm import HookedVLM, analyses as A
        >>> from tl_vlm.eval.tasks import toy_task
        >>> gates = A.find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(12),
        ...                      rows=False, overlap=False, check_random=0)
        >>> [t.name for t in class_figure(gates).data]
        ['knockout effect (exact)', 'contribution']
    """
    import plotly.graph_objects as go

    classes = gates.class_ranking
    names = [c.name for c in classes]
    fig = go.Figure([
        go.Bar(x=names, y=[c.share for c in classes], name="knockout effect (exact)"),
        go.Bar(x=names, y=[c.contribution for c in classes], name="contribution"),
    ])
    fig.update_layout(barmode="group", title="Position classes: share of the image effect and "
                                             "of the text's attention",
                      yaxis=dict(title="share"))
    return fig


def overlap_figure(gates: GateSearch) -> Optional[Any]:
    """Neighbourhood overlap with the examples' labels per layer, for the classes that
    have it (None when the search computed none).

    Example:
        >>> from tl_vlm import HookedVLM, analyses as A
        >>> from tl_vlm.eval.tasks import toy_task
        >>> gates = A.find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(24),
        ...                      rows=False, overlap=True, check_random=0)
        >>> [t.name for t in overlap_figure(gates).data]
        ['boi', 'first_image', 'last_image', 'image', 'eoi']
        >>> overlap_figure(A.find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(12),
        ...                             rows=False, overlap=False, check_random=0)) is None
        True
    """
    import plotly.graph_objects as go

    have = [c for c in gates.classes if c.overlap]
    if not have:
        return None
    fig = go.Figure([go.Scatter(x=list(range(len(c.overlap))), y=c.overlap, mode="lines+markers",
                                name=c.name) for c in have])
    fig.update_layout(title="Neighbourhood overlap χ with the examples' labels (the mean "
                            "residual over each class's positions)",
                      xaxis=dict(title="layer (input of block; the last: the output)"),
                      yaxis=dict(title="χ", range=[0, 1.05]))
    return fig


def check_figure(gates: GateSearch) -> Any:
    """The attribution estimate (and, with per-example checks, the refined value) against
    the exact knockout on the checked positions.

    Example:
        >>> from tl_vlm import HookedVLM, analyses as A
        >>> from tl_vlm.eval.tasks import toy_task
        >>> gates = A.find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(12),
        ...                      rows=False, overlap=False, check_random=0)
        >>> fig = check_figure(gates)
        >>> len(fig.data), len(fig.data[0].x) == len(gates.check.names)
        (2, True)
    """
    import plotly.graph_objects as go

    check = gates.check
    fig = go.Figure(go.Scatter(x=check.estimate, y=check.exact, mode="markers+text",
                               name="estimate", text=check.names, textposition="top center",
                               hovertemplate="%{text}: estimate %{x:.3g}, exact %{y:.3g}<extra></extra>"))
    title = (f"Estimate vs exact knockout (drop of the {gates.metric}; Spearman "
             f"{_number(check.spearman)}, top-{check.top_k} agree on {check.top_k_agree}")
    if check.per_example:
        fig.add_trace(go.Scatter(x=check.refined, y=check.exact, mode="markers",
                                 name=f"refined ({check.per_example} checks per example)",
                                 text=check.names,
                                 hovertemplate="%{text}: refined %{x:.3g}, exact %{y:.3g}<extra></extra>"))
        title += f"; refined: {_number(check.refined_spearman)}, {check.refined_top_k_agree}"
    fig.update_layout(title=title + ")", xaxis=dict(title="estimated drop"),
                      yaxis=dict(title="exact"))
    return fig


def write_gate_report(gates: GateSearch, out: Union[str, Path]) -> Path:
    """Write ``index.html`` (the summary and every figure; plotly inlined) and
    ``gates.json`` into ``out``; returns the HTML path.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM, analyses as A
        >>> from tl_vlm.eval.tasks import toy_task
        >>> gates = A.find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(12),
        ...                      rows=False, overlap=False, check_random=0)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> page = write_gate_report(gates, tmp.name).read_text()
        >>> page.count('class="plotly-graph-div"'), "narrow: eoi" in page     # no overlap figure
        (4, True)
        >>> tmp.cleanup()
    """
    from plotly.offline import get_plotlyjs

    from tl_vlm.study.compare import EXTRA_CSS
    from tl_vlm.study.report import figure_html, html_page, html_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gates.json").write_text(json.dumps(gates.to_dict(), indent=1))
    def cell(v: Optional[float]) -> Any:
        return "" if v is None else v

    rows = [[c.name, c.kind, c.share, cell(c.exact), cell(c.exact_se), cell(c.estimate),
             cell(c.refined), cell(c.score),
             cell(c.contribution), cell(max(c.overlap) if c.overlap else None),
             ", ".join(c.in_classes)] for c in gates.class_ranking + gates.ranking]
    parts = [f"<style>{EXTRA_CSS}</style>", f"<h1>Gate search: {html.escape(gates.model)}</h1>",
             f"<pre>{html.escape(gates.summary())}</pre>"]
    sections = [
        ("Single positions", effect_grid_figure(gates),
         "The drop of the metric when every position stops attending to one image-side "
         "position in every layer, as a share of the drop with the whole image side cut; "
         "exact where checked, else the attribution estimate refined by the exact "
         "per-example checks."),
        ("Layers", layer_figure(gates),
         "Left: the estimated share if the candidate were knocked out in that layer only. "
         "Right: the gate (or, when distributed, the whole image side) knocked out from "
         "layer L to the last layer, exactly."),
        ("Position classes", class_figure(gates), ""),
        ("Semantic probing", overlap_figure(gates), ""),
        ("Estimate vs exact", check_figure(gates), ""),
    ]
    for title, fig, note in [s for s in sections if s[1] is not None]:
        parts.append(f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>")
        fig.update_layout(template="plotly_white", height=380, margin=dict(l=60, r=20, t=60, b=50))
        parts.append(figure_html(fig))
    parts.append("<details><summary>every candidate</summary>" + html_table(
        ["candidate", "kind", "share", "exact drop", "its standard error",
         "estimate (a class: its positions' unclipped sum)", "refined", "task score",
         "contribution",
         "max overlap", "classes"], rows) + "</details>")
    parts.append("<p class='note'>Raw numbers: <code>gates.json</code> in this folder.</p>")
    path = out / "index.html"
    path.write_text(html_page("Gate search", parts, get_plotlyjs()))
    return path
