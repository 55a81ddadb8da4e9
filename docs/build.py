"""Build the docs site offline: execute the tutorials, then Sphinx on a staged copy.

    python docs/build.py [OUT]          (what ``scripts/docs`` runs; OUT: docs/_build/html)

The tutorials in ``docs/`` are committed without outputs. Each is executed here in a
fresh kernel running *this* interpreter (never a ``python3`` kernelspec found elsewhere),
offline, with ``docs/`` as its working directory; the executed copies, the pages and the
API reference are staged in a temporary directory and built with Sphinx (MyST-NB renders
the notebooks without executing anything). Warnings fail the build.

The tests (``tests/test_docs.py``) use :func:`execute_notebook` for every tutorial and
:func:`build_site` on the notebooks they executed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
KERNEL = "python3"
CELL_TIMEOUT = 120  # seconds per cell
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PLOTLY_JSON = "application/vnd.plotly.v1+json"
#: what the site is built from, besides the notebooks, the README and CONTRIBUTING.md
PAGES = ("conf.py", "index.md", "install-and-versions.md", "families.md", "real-hardware.md",
         "how-it-works.md", "performance.md", "analyses.md", "toy-models.md", "gate-finder.md",
         "gate-finder-measurements.md", "main-job.md", "paper-table.md", "sharding.md",
         "testing.md", "verified-models.md", "reference.md", "api", "images", "_templates")
#: the page that shows CONTRIBUTING.md (staged next to the README); its links to
#: ``docs/*.md`` are made relative to the site, as index.md does for the README's
CONTRIBUTING_PAGE = "```{include} ../CONTRIBUTING.md\n:relative-docs: docs/\n```\n"


def notebooks() -> list[Path]:
    """The tutorials, in order."""
    return sorted(DOCS.glob("*.ipynb"))


def _kernel_manager():
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class ThisInterpreterSpecs(KernelSpecManager):
        """Kernelspecs as Jupyter finds them, except ``python3``: always this interpreter."""

        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            if kernel_name == KERNEL:
                return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())
            return super().get_kernel_spec(kernel_name)

    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=ThisInterpreterSpecs())


def execute_notebook(nb, on_cell_start: Optional[Callable] = None) -> None:
    """Execute ``nb`` (an nbformat notebook) in place, in ``docs/``, offline.

    Unless the caller set ``OMP_NUM_THREADS``, the kernel uses one torch thread: on a
    loaded machine the tiny models run several times slower with more. Raises nbclient's
    ``CellExecutionError`` / ``CellTimeoutError``.
    """
    from nbclient import NotebookClient

    client = NotebookClient(nb, km=_kernel_manager(), kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(DOCS)}},
                            on_cell_start=on_cell_start)
    env = {"OMP_NUM_THREADS": "1", **os.environ, **OFFLINE}
    client.execute(env=env, cleanup_kc=True)  # we made km, so shut the kernel down too


def is_plotlyjs(output) -> bool:
    """Whether a notebook output is plotly.js itself (what the notebook renderer embeds once)."""
    html = str(output.get("data", {}).get("text/html", ""))
    return len(html) > 1_000_000 and "plotly.js v" in html[:2000]


def stage(target: Path, executed: Mapping[str, object]) -> Path:
    """Copy the pages and write the executed notebooks (name -> notebook) into ``target``.

    The site loads plotly.js once, from ``_static/plotly.min.js`` on every page, so the
    copy each notebook embeds in its outputs is left out of the pages; figures are drawn
    from their HTML, so their plotly JSON (for JupyterLab) is left out too.
    """
    import copy

    import nbformat
    from plotly.offline import get_plotlyjs

    target.mkdir(parents=True, exist_ok=True)
    for name in PAGES:
        src = DOCS / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, target / name)
    shutil.copy(ROOT / "README.md", target.parent / "README.md")   # index.md includes ../README.md
    shutil.copy(ROOT / "CONTRIBUTING.md", target.parent / "CONTRIBUTING.md")
    (target / "CONTRIBUTING.md").write_text(CONTRIBUTING_PAGE)     # README links CONTRIBUTING.md
    (target / "_static").mkdir(exist_ok=True)
    (target / "_static" / "plotly.min.js").write_text(get_plotlyjs())
    for name, nb in executed.items():
        nb = copy.deepcopy(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = [out for out in cell.outputs if not is_plotlyjs(out)]
                for out in cell.outputs:
                    if "text/html" in out.get("data", {}):
                        out["data"].pop(PLOTLY_JSON, None)
        nbformat.write(nb, target / name)
    return target


def build_site(out: Path, executed: Optional[Mapping[str, object]] = None) -> list[str]:
    """Build the HTML site into ``out``; returns Sphinx's warnings (empty on success).

    ``executed``: notebook name -> executed notebook; tutorials missing from it are
    executed first.
    """
    import nbformat
    from sphinx.cmd.build import build_main

    executed = dict(executed or {})
    for path in notebooks():
        if path.name not in executed:
            nb = nbformat.read(path, as_version=4)
            execute_notebook(nb)
            executed[path.name] = nb
    with tempfile.TemporaryDirectory() as tmp:
        src = stage(Path(tmp) / "docs", executed)
        warnings = Path(tmp) / "warnings.txt"
        status = build_main(["-b", "html", "-q", "-E", "-W", "--keep-going", "-w", str(warnings),
                             "-d", str(Path(tmp) / "doctrees"), str(src), str(out)])
        found = [line for line in warnings.read_text().splitlines() if line.strip()]
    if status and not found:
        found = [f"sphinx-build exited with status {status}"]
    return found


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DOCS / "_build" / "html"
    print(f"executing {len(notebooks())} tutorials, then building {out} ...", file=sys.stderr)
    warnings = build_site(out)
    for line in warnings:
        print(line, file=sys.stderr)
    if warnings:
        return 1
    print(f"site: {out / 'index.html'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
