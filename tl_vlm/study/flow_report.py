"""The page of an information-flow map (``tl-vlm flow``): a headline, a table, the figure.

Example:
    >>> import tempfile
    >>> from tl_vlm import HookedVLM, analyses as A
    >>> from tl_vlm.eval.tasks import toy_task
    >>> flow = A.flow_map(HookedVLM.from_pretrained("toy-gated"), toy_task(8), window=2,
    ...                   show_progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> page = write_flow_report(flow, tmp.name).read_text()
    >>> page.count('class="plotly-graph-div"'), (Path(tmp.name) / "flow.json").exists()
    (1, True)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Union

from tl_vlm.analyses.flow import FlowMap


def headline(flow: FlowMap) -> str:
    """One sentence: which edge carries the answer, where.

    Example:
        >>> flow = FlowMap("m", "toy", "prob", 1, [0, 1], 0.9, 1.0, {"gate->last": [-60.0, -2.0]},
        ...                {"gate->last": [4.0, 1.0]}, {"gate->last": [0.4, 1.0]}, {}, 24)
        >>> headline(flow)
        'Cutting gate->last in layers 0-0 lowers p(answer) most: -60% (SE 4.0), accuracy 1.00 -> 0.40.'
    """
    drop = flow.largest_drop()
    if drop is None:
        return "No edge was cut (every edge's groups were empty)."
    edge, layer, value = drop
    i = flow.layers.index(layer)
    accuracy = flow.accuracy[edge][i]
    told = ("" if accuracy is None or flow.clean_accuracy is None
            else f", accuracy {flow.clean_accuracy:.2f} -> {accuracy:.2f}")
    return (f"Cutting {edge} in layers {layer}-{layer + flow.window - 1} lowers p(answer) "
            f"most: {value:+.0f}% (SE {flow.se[edge][i]:.1f}){told}.")


def write_flow_report(flow: FlowMap, out: Union[str, Path]) -> Path:
    """Write ``flow.json`` and ``index.html`` into ``out``; returns the page's path.

    Example (a saved map, written again):
        >>> import tempfile
        >>> flow = FlowMap("m", "toy", "prob", 1, [0, 1], 0.9, None, {"image->last": [-5.0, 0.0]},
        ...                {"image->last": [1.0, 0.0]}, {"image->last": [None, None]}, {}, 4)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> write_flow_report(flow, tmp.name).name
        'index.html'
        >>> tmp.cleanup()
    """
    from plotly.offline import get_plotlyjs

    from tl_vlm import plot
    from tl_vlm.study.report import figure_html, html_page, html_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flow.json").write_text(json.dumps(flow.to_dict(), indent=1))
    rows = []
    for edge, values in flow.edges.items():
        i = min(range(len(values)), key=lambda j: values[j])
        rows.append([edge, values[i], flow.se[edge][i],
                     f"{flow.layers[i]}-{flow.layers[i] + flow.window - 1}",
                     "" if flow.accuracy[edge][i] is None else flow.accuracy[edge][i]])
    parts = [f"<h1>Information flow: {html.escape(flow.model)} on {html.escape(flow.task)}</h1>",
             f"<p><b>{html.escape(headline(flow))}</b></p>",
             html_table(["edge (source -> target)", "largest drop of p(answer), %", "SE",
                         "in layers", "accuracy there"], rows),
             f"<p class='note'>{flow.n_examples} examples; clean p(answer) {flow.clean:.3f}"
             + ("" if flow.clean_accuracy is None else f", clean accuracy "
                f"{flow.clean_accuracy:.3f}") + ". Each edge is cut (the targets stop attending "
             "to the sources, post-softmax zero) in one window of layers at a time.</p>",
             figure_html(plot.flow_map(flow))]
    if flow.skipped:
        parts.append("<p class='note'>Not cut: " + "; ".join(
            f"{html.escape(e)} ({html.escape(why)})" for e, why in flow.skipped.items()) + "</p>")
    parts.append("<p class='note'>Raw numbers: <code>flow.json</code> in this folder.</p>")
    path = out / "index.html"
    path.write_text(html_page("Information flow", parts, get_plotlyjs()))
    return path
