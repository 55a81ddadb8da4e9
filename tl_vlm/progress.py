"""Progress reporting that suits where the output goes.

- a terminal: a tqdm bar on stderr;
- a Jupyter notebook: tqdm's widget when ipywidgets is installed, else plain lines (no
  "IProgress not found" warning);
- a log file or pipe (a SLURM job, ``nohup``): plain lines, one every 10% or every
  ``interval`` seconds, whichever comes first, with the elapsed and remaining time.

``TL_VLM_PROGRESS=bar|lines|none`` overrides the choice.

Example:
    >>> import io
    >>> log = io.StringIO()
    >>> for _ in progress(range(3), total=3, desc="demo", mode="lines", file=log):
    ...     pass
    >>> print(log.getvalue().splitlines()[-1].split(",")[0])
    [demo] 3/3 (100%)
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
MODES = ("bar", "lines", "none")


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:  # IPython half-imported: not a notebook we can draw in
        return False


def progress_mode(file: Optional[IO] = None) -> str:
    """``"bar"``, ``"notebook"``, ``"lines"`` or ``"none"`` for output to ``file``.

    Example:
        >>> import io
        >>> progress_mode(io.StringIO())            # not a terminal: plain lines
        'lines'
    """
    forced = os.environ.get("TL_VLM_PROGRESS")
    if forced:
        if forced not in MODES:
            raise ValueError(f"TL_VLM_PROGRESS must be one of {MODES}, got {forced!r}")
        return forced
    file = sys.stderr if file is None else file
    if _in_notebook():
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            return "lines"
        return "notebook"
    return "bar" if getattr(file, "isatty", lambda: False)() else "lines"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _lines(iterable: Iterable[T], total: int, desc: str, unit: str, file: IO,
           interval: float) -> Iterator[T]:
    start = last = time.monotonic()
    last_tenth = 0
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        tenth = done * 10 // max(total, 1)
        if done == total or tenth > last_tenth or now - last >= interval:
            elapsed = now - start
            left = elapsed / done * (total - done)
            print(f"[{desc}] {done}/{total}{' ' + unit if unit else ''} "
                  f"({100 * done // max(total, 1)}%), {_duration(elapsed)} elapsed, "
                  f"about {_duration(left)} left", file=file, flush=True)
            last, last_tenth = now, tenth


def progress(iterable: Iterable[T], total: int, desc: str, unit: str = "",
             mode: Optional[str] = None, file: Optional[IO] = None,
             interval: float = 60.0) -> Iterable[T]:
    """``iterable``, reporting progress as :func:`progress_mode` says (or ``mode``).

    Example:
        >>> list(progress([1, 2], total=2, desc="quiet", mode="none"))
        [1, 2]
    """
    file = sys.stderr if file is None else file
    mode = mode or progress_mode(file)
    if mode == "none" or total == 0:
        return iterable
    if mode == "lines":
        return _lines(iterable, total, desc, unit, file, interval)
    if mode == "notebook":
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit or "it", leave=False, file=file)
