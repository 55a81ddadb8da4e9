"""``tl-vlm rescore``: score a finished run's (or table's) recorded predictions again.

No model is loaded: the accuracy and progressive steps are recomputed from the
predictions recorded per batch, with other scoring options, and the report rewritten.

Example:
    >>> from tl_vlm.cli.commands import main
    >>> main(["rescore", "/no/such/run"])
    2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tl_vlm.cli.options import CLIError, add_run_dir_command, log, scoring_from


def add_parser(sub) -> None:
    """Add ``rescore`` to ``tl-vlm``'s sub-commands.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_parser(p.add_subparsers())
        >>> args = p.parse_args(["rescore", "runs/a", "--cider", "ptb-approx"])
        >>> args.out, args.cider, args.run is rescore
        ('runs/a', 'ptb-approx', True)
    """
    add_run_dir_command(
        sub, "rescore", "score a finished run's recorded predictions again (no model)",
        "Recompute the accuracy and progressive steps of OUT from their recorded predictions "
        "with other scoring options, and rewrite the report (or the table).",
        "a run or table directory", rescore)


def rescore(args: argparse.Namespace) -> int:
    """Run ``tl-vlm rescore`` (the parsed ``args``); returns the exit status.

    Example:
        >>> rescore(argparse.Namespace(out="/no/such/run", vqa_normalise="always", cider="raw",
        ...                            extract="full"))
        Traceback (most recent call last):
        ...
        tl_vlm.study.rundir.RunSettingsError: /no/such/run holds no run.json: expected a tl-vlm run directory
    """
    from tl_vlm.study.rundir import RunStore
    from tl_vlm.study.runner import finalize_step
    from tl_vlm.study.table import TABLE_REQUEST

    out = Path(args.out)
    if (out / TABLE_REQUEST).exists():
        from tl_vlm.cli.table import rescore_table

        rescore_table(out, scoring_from(args), log=log)
        return 0
    store = RunStore.open(out)          # a directory without run.json: a one-line error
    steps = [s for s in ("accuracy", "progressive") if store.done(s)
             and store.load(s).get("skipped") is not True]
    if not steps:
        raise CLIError(f"{out} has no finished accuracy or progressive step to rescore")
    for step in steps:
        finalize_step(store, step, scoring_from(args))
        log(f"[{step}] rescored")
    from tl_vlm.study.job import write_run_report

    write_run_report(store, log=log)
    return 0
