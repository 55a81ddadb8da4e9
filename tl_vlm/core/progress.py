"""Progress for long loops that reads well wherever it lands.

- a terminal: a tqdm bar on stderr;
- a notebook: tqdm's widget bar when ipywidgets is installed, else a text bar (never
  tqdm's "IProgress not found" warning);
- a log file or pipe (stderr is not a terminal): a plain line every ~10%, every 10
  minutes and at the end, e.g.
  ``[contribution] 12/40 batches (30%), 1m05s elapsed, about 2m32s left``.

Example:
    >>> total = sum(progress(range(3), desc="demo", enabled=False))   # off: the iterable itself
    >>> total
    3
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import warnings
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (JupyterLab, VS Code, classic, nbconvert).

    Example:
        >>> in_notebook()
        False
    """
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"




def _widgets_missing() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return True
    return False


def quiet_tqdm_widget_warning() -> None:
    """Without ipywidgets, drop tqdm's "IProgress not found" warning, which the first
    import of ``tqdm.auto`` (by transformers, the hub) prints in every fresh notebook
    kernel: tl_vlm's bars are text bars there. Run when ``tl_vlm`` is imported, which
    its start-up hook does before any notebook exists, hence no notebook check (tqdm
    issues the warning only in notebooks); with ipywidgets installed nothing changes."""
    try:
        missing = importlib.util.find_spec("ipywidgets") is None
    except ValueError:          # a module object without a spec (set to None)
        missing = True
    if missing:
        warnings.filterwarnings("ignore", message="IProgress not found")


@contextlib.contextmanager
def quiet_hub_bars_in_bare_notebooks() -> Iterator[None]:
    """Within the block, transformers' own progress bars ("Loading weights") are off in a
    notebook without ipywidgets, where tqdm would print "IProgress not found" instead."""
    if not (in_notebook() and _widgets_missing()):
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _lines(iterable: Iterable[T], total: Optional[int], desc: str, unit: str,
           interval: float = 600.0) -> Iterator[T]:
    """Plain progress lines for logs: at ~10% steps, at the end, and at least every
    ``interval`` seconds (a step of a long job still says it is alive)."""
    start, next_report, done = time.monotonic(), 0.1, 0
    last = start
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if total and (done / total >= next_report or done == total or now - last >= interval):
            last = now
            elapsed = now - start
            left = elapsed / done * (total - done)
            print(f"[{desc}] {done}/{total} {unit} ({done / total:.0%}), {_clock(elapsed)} "
                  f"elapsed" + (f", about {_clock(left)} left" if done < total else ""),
                  file=sys.stderr, flush=True)
            while next_report <= done / total:
                next_report += 0.1


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: str = "",
             unit: str = "batches", enabled: Optional[bool] = True) -> Iterable[T]:
    """``iterable``, reporting progress as suits the output (see the module docstring).

    ``enabled=False`` returns the iterable untouched; a loop of one step shows nothing.
    """
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    if not enabled or total == 1:
        return iterable
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm
        except ImportError:
            from tqdm.std import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
    if sys.stderr.isatty():
        from tqdm.std import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)
    return _lines(iterable, total, desc, unit)
