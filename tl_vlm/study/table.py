"""The paper's Table 1 (models x tasks x knockout conditions), as ``tl-vlm table`` runs it.

Each (model, task) cell is an ordinary run directory, ``OUT/cells/<model>/<task>/``,
holding the accuracy step only (its predictions per condition, recorded per batch).
The command (:mod:`tl_vlm.cli.table`) skips a cell that is finished and loads a model
only when one of its cells has work left, so a rerun after a kill redoes nothing
finished. This module names the cells and writes the table from them: it is written
as ``table.json``, ``table.md`` and ``index.html`` (the report's style), each cell next
to the paper's published number where there is one (:data:`PAPER`).

Example:
    >>> cell_dir("out", "facebook/chameleon-7b", "vqav2").as_posix()
    'out/cells/facebook--chameleon-7b/vqav2'
    >>> PAPER["facebook/chameleon-7b"]["vqav2"]["gate"]
    0.25
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tl_vlm.study.rundir import dumps, write_atomic

TABLE_TASKS = ("vqav2", "flickr30k", "coco", "imagenet")
#: the file a table run keeps its request in (models, tasks, conditions); it also marks
#: a directory as a table, for `tl-vlm merge` and `tl-vlm rescore`
TABLE_REQUEST = "table-run.json"
TASK_TITLES = {"vqav2": "VQAv2", "flickr30k": "Flickr30k", "coco": "COCO", "imagenet": "ImageNet",
               "imagenet_open": "ImageNet (open vocabulary)", "steering": "steering set",
               "toy": "toy task"}
CONDITION_TITLES = {"none": "none", "gate": "gate (EOI)", "img_to_text": "img→text",
                    "random": "10 random"}


def _paper(rows: dict[str, str]) -> dict[str, dict[str, float]]:
    """``{condition: "vqa/flickr/coco/imagenet"}`` -> ``{task: {condition: value}}``."""
    out: dict[str, dict[str, float]] = {t: {} for t in TABLE_TASKS}
    for condition, values in rows.items():
        for task, value in zip(TABLE_TASKS, values.split("/")):
            out[task][condition] = float(value)
    return out


# The Narrow Gate paper's v1 Table 1 (narrow-gate-methods.md, "Headline numbers"):
# VQAv2 accuracy / Flickr30k CIDEr / COCO CIDEr / ImageNet accuracy. Chameleon-34B is
# released on the hub as facebook/chameleon-30b.
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "facebook/chameleon-7b": _paper({"none": ".51/.23/.35/.46", "gate": ".25/.04/.03/.01",
                                     "img_to_text": ".40/.13/.21/.47",
                                     "random": ".51/.21/.31/.46"}),
    "facebook/chameleon-30b": _paper({"none": ".59/.38/.42/.43", "gate": ".39/.02/.02/.04",
                                      "img_to_text": ".50/.25/.28/.42",
                                      "random": ".58/.34/.38/.42"}),
    "mistral-community/pixtral-12b": _paper({"none": ".79/.51/.60/.63",
                                             "gate": ".77/.53/.58/.61",
                                             "img_to_text": ".37/.00/.01/.06",
                                             "random": ".77/.46/.55/.61"}),
}


def model_slug(model: str) -> str:
    """A folder name for a model: ``org--name`` for a hub id, ``name-<hash>`` for a path.

    Example:
        >>> model_slug("toy-gated"), model_slug("/ckpt/my model")[:9]
        ('toy-gated', 'my-model-')
    """
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) and not Path(model).exists():
        return model.replace("/", "--")
    path = str(Path(model).expanduser().resolve())
    name = re.sub(r"[^\w.-]+", "-", Path(path).name) or "model"
    return f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def cell_dir(out, model: str, task: str) -> Path:
    """The run directory of one cell of the table.

    Example:
        >>> cell_dir("runs/table", "toy-gated", "toy").as_posix()
        'runs/table/cells/toy-gated/toy'
    """
    return Path(out) / "cells" / model_slug(model) / task


def parse_data(text: Optional[str], tasks: Sequence[str]) -> dict[str, str]:
    """``--data vqav2=DIR,coco=DIR`` -> ``{task: path}`` (a bare path with one task).

    Example:
        >>> parse_data("vqav2=/d/vqa,coco=/d/coco", ["vqav2", "coco"])
        {'vqav2': '/d/vqa', 'coco': '/d/coco'}
        >>> parse_data("/d/vqa", ["vqav2"])
        {'vqav2': '/d/vqa'}
    """
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        task, sep, path = part.partition("=")
        if not sep:
            if len(tasks) != 1:
                raise ValueError(f"--data {text!r}: with several tasks, name each copy's task "
                                 f"(e.g. vqav2=DIR,coco=DIR)")
            task, path = tasks[0], part
        if task not in tasks:
            raise ValueError(f"--data names task {task!r}, which is not among --tasks "
                             f"{','.join(tasks)}")
        out[task] = path
    return out


def _collect(out, models: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    """The finished cells' accuracy results, by model and task (missing ones left out)."""
    cells: dict[str, dict[str, Any]] = {}
    for model in models:
        for task in tasks:
            path = cell_dir(out, model, task) / "steps" / "accuracy.json"
            if path.exists():
                cells.setdefault(model, {})[task] = json.loads(path.read_text())
    return cells


def _cell_text(result: Optional[dict], condition: str, paper: Optional[float]) -> str:
    ours = "–"
    if result is not None:
        if condition in result["conditions"]:
            c = result["conditions"][condition]
            ours = f"{c['mean']:.3f}" + (f" ± {c['std']:.3f}" if c["draws"] > 1 else "")
            chi = c.get("metrics", {}).get("chi_out")
            if chi is not None:
                ours += f" (χ_out {chi:.2f})"
        elif condition in result.get("skipped", {}):
            ours = "n/a"
    return ours if paper is None else f"{ours} [paper {paper:.2f}]"


def _table_rows(cells: dict, models: Sequence[str], task: str,
               conditions: Sequence[str]) -> list[list[str]]:
    return [[model] + [_cell_text(cells.get(model, {}).get(task), c,
                                  PAPER.get(model, {}).get(task, {}).get(c))
                       for c in conditions] for model in models]


def _task_heading(task: str, cells: dict, models: Sequence[str]) -> tuple[str, str]:
    """The task's title, and how it was scored (empty before any cell finished)."""
    title = TASK_TITLES.get(task, task)
    result = next((cells[m][task] for m in models if task in cells.get(m, {})), None)
    if result is None:
        return title, ""
    scoring = result.get("scoring", {})
    how = {"vqa_accuracy": f"VQA accuracy, normalisation {scoring.get('vqa_normalise')}",
           "cider": f"CIDEr-D, {scoring.get('cider')} tokens",
           "accuracy": "closed-set first-token accuracy",
           "name_prefix_accuracy": "greedy 5 tokens starting with a lemma of the class"
           }.get(result["metric"], result["metric"])
    if result.get("classes"):
        how += (f" over {result['classes']} classes, first-token collision rate "
                f"{result['collision_rate']:.2f}")
    n = next(iter(result["conditions"].values()))["n"] if result["conditions"] else 0
    return title, f"{how}; {n} examples"


def write_table(out, models: Sequence[str], tasks: Sequence[str], conditions: Sequence[str],
                log: Callable[[str], None] = print) -> Path:
    """``table.json``, ``table.md`` and ``index.html`` from the finished cells.

    Example (no cell finished yet: the paper's numbers and dashes):
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = write_table(tmp.name, ["facebook/chameleon-7b"], ["vqav2"], ["none", "gate"],
        ...                    log=lambda m: None)
        >>> print((path.parent / "table.md").read_text().splitlines()[-1])
        | facebook/chameleon-7b | – [paper 0.51] | – [paper 0.25] |
        >>> tmp.cleanup()
    """
    from tl_vlm.study.report import html_page, html_table

    out = Path(out)
    cells = _collect(out, models, tasks)
    header = ["model"] + [CONDITION_TITLES.get(c, c) for c in conditions]
    md = ["# The Narrow Gate table", "",
          "Mean over examples (random: mean ± std over draws); [paper] is the published "
          "v1 value. n/a: the model has no gate token. –: not computed yet.", ""]
    parts = ["<h1>The Narrow Gate table</h1>",
             "<p class='note'>Mean over examples (random: mean ± std over draws); [paper] is "
             "the published v1 value. n/a: the model has no gate token. –: not computed "
             "yet. Numbers: <code>table.json</code>.</p>"]
    for task in tasks:
        rows = _table_rows(cells, models, task, conditions)
        title, how = _task_heading(task, cells, models)
        md += [f"## {title}", "", how, "", "| " + " | ".join(header) + " |",
               "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
        parts += [f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(how)}</p>",
                  html_table(header, rows)]
    payload = {"models": list(models), "tasks": list(tasks), "conditions": list(conditions),
               "cells": cells,
               "paper": {m: PAPER[m] for m in models if m in PAPER}}
    write_atomic(out / "table.json", dumps(payload) + "\n")
    write_atomic(out / "table.md", "\n".join(md))
    write_atomic(out / "index.html", html_page("The Narrow Gate table", parts))
    missing = [(m, t) for m in models for t in tasks if t not in cells.get(m, {})]
    log(f"table: {out / 'index.html'}" + (f" ({len(missing)} cell(s) not finished yet)"
                                          if missing else ""))
    return out / "index.html"
