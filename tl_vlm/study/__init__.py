"""The Narrow Gate study: settings, the run directory, the steps and their runner,
shards, the paper's table, reports and the checkpoint verification.

``tl_vlm.study`` was one module before the reorganisation; its public names (``run_study``,
``StudySettings``, ``study_results``...) are still importable from here, lazily, so that
``tl_vlm.study.rundir`` stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(f"module 'tl_vlm.study' has no attribute {name!r}")
    runner = importlib.import_module("tl_vlm.study.runner")
    try:
        value = getattr(runner, name)
    except AttributeError:
        raise AttributeError(f"module 'tl_vlm.study' has no attribute {name!r}") from None
    globals()[name] = value
    return value
