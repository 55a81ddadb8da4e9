"""The tutorials in ``docs/`` run top to bottom, offline (their cells assert what they show).

Each notebook is executed with nbclient in a fresh ``python3`` kernel, with ``docs/`` as
the working directory. The kernel is pinned to *this* interpreter: the ``python3``
kernelspec is resolved to ipykernel's native spec built from ``sys.executable``, so a
``python3`` kernelspec installed elsewhere (user or system Jupyter paths, possibly
pointing at another Python) is never picked up; a last cell checks the kernel's
``sys.prefix``. Nothing is installed at run time.

The kernel runs offline (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``) and, unless the
caller set ``OMP_NUM_THREADS``, with one torch thread: on a loaded machine the toy models
run several times slower with more (thread contention), as in ``conftest.py``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

import nbformat
from ipykernel.kernelspec import RESOURCES, get_kernel_dict
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

DOCS = Path(__file__).resolve().parents[1] / "docs"
NOTEBOOKS = sorted(DOCS.glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT = 120  # seconds per cell
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_PREFIX_MARK = "tl_vlm-docs-kernel-prefix:"


class ThisInterpreterSpecs(KernelSpecManager):
    """Kernelspecs as Jupyter finds them, except ``python3``: always this interpreter."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name == KERNEL:
            return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())
        return super().get_kernel_spec(kernel_name)


def test_docs_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_narrow_gate_on_toy_models.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL, \
        f"{path.name}: set the notebook's kernel to {KERNEL!r}"
    committed_outputs = [i for i, c in enumerate(nb.cells)
                         if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not committed_outputs, f"{path.name}: clear the outputs of cells {committed_outputs}"

    # Which interpreter runs the kernel: checked from inside it, after the notebook.
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import sys; print({_PREFIX_MARK!r} + sys.prefix)"))
    km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=ThisInterpreterSpecs())
    started: list[int] = []
    client = NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(DOCS)}},
                            on_cell_start=lambda cell, cell_index: started.append(cell_index))
    env = {"OMP_NUM_THREADS": "1", **os.environ, **OFFLINE}
    start = time.perf_counter()
    try:
        client.execute(env=env, cleanup_kc=True)  # we made km, so shut the kernel down too
    except (CellExecutionError, CellTimeoutError) as err:
        i = started[-1] if started else -1
        where = f"cell {i}:\n{nb.cells[i].source}" if started else "an unknown cell"
        pytest.fail(f"{path.name} failed in {where}\n\n{err}", pytrace=False)
    elapsed = time.perf_counter() - start
    print(f"{path.name}: executed in {elapsed:.1f} s")

    printed = "".join(out.get("text", "") for out in nb.cells[-1].outputs
                      if out.get("output_type") == "stream")
    assert printed.strip() == _PREFIX_MARK + sys.prefix, \
        f"the kernel ran another interpreter: {printed!r} (expected prefix {sys.prefix})"
