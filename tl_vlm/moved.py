"""Module paths of the previous layout, kept for one release.

The library was reorganised into layers (``tl_vlm.core``, ``tl_vlm.adapters``,
``tl_vlm.analyses``, ``tl_vlm.eval``, ``tl_vlm.study``, ``tl_vlm.cli``). An old path such
as ``tl_vlm.batch`` is a one-line module that makes itself the new module
(``tl_vlm.core.batch``): the same object, so its functions, classes and monkeypatching
behave exactly as before. Importing one warns (``DeprecationWarning``) with the new path,
except the paths the README teaches (``tl_vlm.tasks``, ``tl_vlm.metrics``), which stay.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     import tl_vlm.batch, tl_vlm.core.batch
    >>> tl_vlm.batch is tl_vlm.core.batch
    True
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

#: old module path -> new module path
MOVED = {
    "tl_vlm.model": "tl_vlm.core.model",
    "tl_vlm.loading": "tl_vlm.core.loading",
    "tl_vlm.attention": "tl_vlm.core.attention",
    "tl_vlm.attention_edits": "tl_vlm.core.attention_edits",
    "tl_vlm.batch": "tl_vlm.core.batch",
    "tl_vlm.positions": "tl_vlm.core.positions",
    "tl_vlm.layout": "tl_vlm.core.layout",
    "tl_vlm.prefix": "tl_vlm.core.prefix",
    "tl_vlm.recompute": "tl_vlm.core.recompute",
    "tl_vlm.answers": "tl_vlm.core.answers",
    "tl_vlm.evaldata": "tl_vlm.eval.data",
    "tl_vlm.tasks": "tl_vlm.eval.tasks",
    "tl_vlm.taskset": "tl_vlm.eval.taskset",
    "tl_vlm.prompts": "tl_vlm.eval.prompts",
    "tl_vlm.metrics.vqa": "tl_vlm.eval.metrics.vqa",
    "tl_vlm.metrics.cider": "tl_vlm.eval.metrics.cider",
    "tl_vlm.metrics.ptb": "tl_vlm.eval.metrics.ptb",
    "tl_vlm.runstore": "tl_vlm.study.rundir",
    "tl_vlm.shards": "tl_vlm.study.shards",
    "tl_vlm.table": "tl_vlm.study.table",
    "tl_vlm.report": "tl_vlm.study.report",
    "tl_vlm.compare": "tl_vlm.study.compare",
    "tl_vlm.gate_figures": "tl_vlm.study.gate_figures",
    "tl_vlm.verify": "tl_vlm.study.verify",
    "tl_vlm.cli_gates": "tl_vlm.cli.find_gate",
}


#: old paths the README and tutorials teach: they stay, without a warning
KEPT = {"tl_vlm.tasks", "tl_vlm.metrics.vqa", "tl_vlm.metrics.cider", "tl_vlm.metrics.ptb"}


def become(old: str) -> ModuleType:
    """Make module path ``old`` the module it moved to (called from the old file).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     module = become("tl_vlm.answers")
        >>> module.__name__, str(caught[0].message).split(";")[0]
        ('tl_vlm.core.answers', 'tl_vlm.answers has moved to tl_vlm.core.answers')
    """
    new = MOVED[old]
    module = importlib.import_module(new)
    sys.modules[old] = module
    if old not in KEPT:
        warnings.warn(f"{old} has moved to {new}; the old path works until the next release",
                      DeprecationWarning, stacklevel=3)
    return module
