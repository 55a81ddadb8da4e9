"""The tutorials in ``docs/`` run top to bottom, offline (their cells assert what they show),
their figures draw outside JupyterLab, and the docs site builds from them without warnings.

Each notebook is executed by ``docs/build.py`` (what ``scripts/docs`` runs) in a fresh
``python3`` kernel, with ``docs/`` as the working directory. The kernel is pinned to
*this* interpreter: the ``python3`` kernelspec is resolved to ipykernel's native spec
built from ``sys.executable``, so a ``python3`` kernelspec installed elsewhere (user or
system Jupyter paths, possibly pointing at another Python) is never picked up; a last
cell checks the kernel's ``sys.prefix``. Nothing is installed at run time. The kernel
runs offline and, unless the caller set ``OMP_NUM_THREADS``, with one torch thread.

Every plotly figure must carry ``text/html`` drawn by plotly.js embedded in the notebook
(not only ``application/vnd.plotly.v1+json``, which only JupyterLab draws). The site is
built from the notebooks executed here (Sphinx, MyST-NB, furo: the ``docs`` extra; the
test skips without it). With Debian's ``chromium`` the built page of one tutorial and
the same notebook exported by nbconvert are opened headless and every figure must be
drawn (``scripts/check-figures``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nbformat
from nbclient.exceptions import CellExecutionError, CellTimeoutError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_spec = importlib.util.spec_from_file_location("tl_vlm_docs_build", DOCS / "build.py")
docs_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_build)

NOTEBOOKS = docs_build.notebooks()
_PREFIX_MARK = "tl_vlm-docs-kernel-prefix:"
PLOTLY_JSON = "application/vnd.plotly.v1+json"
#: a tutorial with several figures, checked in a browser (site page and nbconvert export)
BROWSER_CHECKED = "05_anyres_tiles_llava_onevision.ipynb"


@pytest.fixture(scope="module")
def executed() -> dict:
    """Notebook name -> the notebook as executed by test_notebook_runs (for the site)."""
    return {}


def test_docs_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_narrow_gate_on_toy_models.ipynb",
            "08_run_on_your_checkpoint.ipynb"} <= names, names


def figure_outputs(nb) -> list[dict]:
    """The outputs of ``nb`` that hold a plotly figure (any representation)."""
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if PLOTLY_JSON in out.get("data", {})
            or 'class="plotly-graph-div"' in str(out.get("data", {}).get("text/html", ""))]


def check_figures_render_outside_jupyterlab(nb, name: str) -> None:
    figures = figure_outputs(nb)
    assert figures, f"{name}: no plotly figure output"
    no_html = [i for i, out in enumerate(figures)
               if "Plotly.newPlot" not in str(out["data"].get("text/html", ""))
               and "image/png" not in out["data"]]
    assert not no_html, (f"{name}: figures {no_html} have no text/html or PNG representation: set "
                         f"pio.renderers.default = 'plotly_mimetype+notebook' in the first cell")
    htmls = [str(out["data"]["text/html"]) for cell in nb.cells if cell.cell_type == "code"
             for out in cell.outputs if "text/html" in out.get("data", {})]
    bundles = sum("plotly.js v" in h and len(h) > 1_000_000 for h in htmls)
    assert bundles == 1, f"{name}: plotly.js should be embedded once in the outputs, found {bundles}"
    cdn = [m for h in htmls for m in re.findall(r'<script[^>]+src="(https?://[^"]+)"', h)]
    assert not cdn, f"{name}: figures load scripts from the network: {sorted(set(cdn))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, executed: dict):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == docs_build.KERNEL, \
        f"{path.name}: set the notebook's kernel to {docs_build.KERNEL!r}"
    committed_outputs = [i for i, c in enumerate(nb.cells)
                         if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not committed_outputs, f"{path.name}: clear the outputs of cells {committed_outputs}"

    # Which interpreter runs the kernel: checked from inside it, after the notebook.
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import sys; print({_PREFIX_MARK!r} + sys.prefix)"))
    started: list[int] = []
    start = time.perf_counter()
    try:
        docs_build.execute_notebook(nb, on_cell_start=lambda cell, cell_index: started.append(cell_index))
    except (CellExecutionError, CellTimeoutError) as err:
        i = started[-1] if started else -1
        where = f"cell {i}:\n{nb.cells[i].source}" if started else "an unknown cell"
        pytest.fail(f"{path.name} failed in {where}\n\n{err}", pytrace=False)
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")

    printed = "".join(out.get("text", "") for out in nb.cells[-1].outputs
                      if out.get("output_type") == "stream")
    assert printed.strip() == _PREFIX_MARK + sys.prefix, \
        f"the kernel ran another interpreter: {printed!r} (expected prefix {sys.prefix})"
    nb.cells.pop()   # the check cell is not part of the tutorial
    warned = [f"cell {i}: {out['text'].strip()[:200]}" for i, c in enumerate(nb.cells)
              if c.cell_type == "code" for out in c.get("outputs", [])
              if out.get("name") == "stderr" and "Warning" in out.get("text", "")]
    assert not warned, f"{path.name} prints warnings a reader would see:\n" + "\n".join(warned)
    check_figures_render_outside_jupyterlab(nb, path.name)
    executed[path.name] = nb


def public_names() -> list[str]:
    """Every public name the reference must document, as it documents it: names exported
    by a package (``tl_vlm``, ``tl_vlm.analyses``, ``tl_vlm.eval.metrics``, ``tl_vlm.toy``)
    under the package, the other public functions and classes under their module."""
    import tl_vlm

    packages = {p: importlib.import_module(p) for p in
                ("tl_vlm", "tl_vlm.analyses", "tl_vlm.eval.metrics", "tl_vlm.toy")}
    exported = {n: p for p, mod in packages.items() for n in mod.__all__}
    names = {f"{p}.{n}" for n, p in exported.items() if n != "DEFAULT_GROUPS"}
    names.add("tl_vlm.analyses.contribution.DEFAULT_GROUPS")   # documented where its comment is
    modules = ["tl_vlm.core.model", "tl_vlm.core.loading", "tl_vlm.study.verify", "tl_vlm.core.attention",
               "tl_vlm.core.attention_edits", "tl_vlm.core.batch", "tl_vlm.core.positions", "tl_vlm.core.layout",
               "tl_vlm.adapters", "tl_vlm.core.answers", "tl_vlm.core.prefix", "tl_vlm.plot",
               "tl_vlm.eval.tasks", "tl_vlm.eval.taskset", "tl_vlm.study.runner", "tl_vlm.study.rundir",
               "tl_vlm.study.shards", "tl_vlm.study.table", "tl_vlm.study.report",
               "tl_vlm.toy.task", "tl_vlm.toy.evaluate"]
    modules += [f"tl_vlm.analyses.{m}" for m in ("knockout", "contribution", "patching",
                                                 "geometry", "logit_lens", "tl_patching")]
    modules += [f"tl_vlm.eval.metrics.{m}" for m in ("vqa", "cider", "ptb")]
    for module in modules:
        mod = importlib.import_module(module)
        for n, obj in vars(mod).items():
            if n.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)) \
                    or obj.__module__ != module:
                continue
            names.add(f"{exported[n]}.{n}" if n in exported else f"{module}.{n}")
    assert len(names) > 100 and "tl_vlm.HookedVLM" in names and tl_vlm.__all__
    return sorted(names)


def test_docs_site_builds_without_warnings(executed: dict, tmp_path: Path):
    for module in ("sphinx", "myst_nb", "furo"):
        pytest.importorskip(module, reason='the docs extra is not installed: pip install -e ".[docs]"')
    for path in NOTEBOOKS:   # the ones test_notebook_runs did not run (e.g. with -k)
        if path.name not in executed:
            executed[path.name] = nbformat.read(path, as_version=4)
            docs_build.execute_notebook(executed[path.name])
    out = tmp_path / "site"
    start = time.perf_counter()
    warnings = docs_build.build_site(out, executed)
    print(f"site built in {time.perf_counter() - start:.1f} s")
    assert not warnings, "Sphinx warnings:\n" + "\n".join(warnings)

    pages = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.html")}
    for path in NOTEBOOKS:
        page = pages[path.with_suffix(".html").name]
        assert page.count("Plotly.newPlot") == len(figure_outputs(executed[path.name])), path.name
    everything = "\n".join(pages.values())
    undocumented = [n for n in public_names() if f'id="{n}"' not in everything]
    assert not undocumented, f"public names missing from the API reference: {undocumented}"
    external = sorted(set(re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"',
                                     everything)))
    assert not external, f"the site loads from the network: {external}"

    if shutil.which("chromium") is None:
        pytest.skip("no chromium (apt-get install chromium): figures not checked in a browser")
    from nbconvert import HTMLExporter

    exported = tmp_path / BROWSER_CHECKED.replace(".ipynb", ".export.html")
    exported.write_text(HTMLExporter().from_notebook_node(executed[BROWSER_CHECKED])[0])
    site_page = out / BROWSER_CHECKED.replace(".ipynb", ".html")
    check = subprocess.run(["bash", str(ROOT / "scripts" / "check-figures"), str(site_page),
                            str(exported)], capture_output=True, text=True, timeout=300)
    print(check.stdout)
    assert check.returncode == 0, check.stdout + check.stderr
