"""The Narrow Gate study: settings, the run directory, the steps and their runner,
shards, the paper's table, reports and the checkpoint verification.

The main job is one typed :class:`~tl_vlm.study.config.StudyConfig` run by
:func:`~tl_vlm.study.job.run_main_job`. ``tl_vlm.study`` was one module before the
reorganisation; its public names (``run_study``, ``StudySettings``, ``study_results``...)
and the config's are importable from here, lazily, so that ``tl_vlm.study.rundir`` stays
importable without torch.

Example:
    >>> from tl_vlm.study import StudyConfig, run_main_job
    >>> StudyConfig().model
    'toy-gated'
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(f"module 'tl_vlm.study' has no attribute {name!r}")
    for module in ("tl_vlm.study.config", "tl_vlm.study.job", "tl_vlm.study.runner"):
        value = getattr(importlib.import_module(module), name, None)
        if value is not None:
            globals()[name] = value
            return value
    raise AttributeError(f"module 'tl_vlm.study' has no attribute {name!r}")
