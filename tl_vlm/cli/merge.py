"""``tl-vlm merge``: merge the shards of a run (or of a table) and write the report.

Example:
    >>> from tl_vlm.cli.commands import main
    >>> main(["merge", "/no/such/run"])
    2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tl_vlm.cli.options import add_run_dir_command, log, scoring_from


def add_parser(sub) -> None:
    """Add ``merge`` to ``tl-vlm``'s sub-commands.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_parser(p.add_subparsers())
        >>> args = p.parse_args(["merge", "runs/a"])
        >>> args.out, args.run is merge
        ('runs/a', True)
    """
    add_run_dir_command(
        sub, "merge", "merge the shards of a run (or of a table) and write the report",
        "Merge the shards of OUT: refuses a missing or unfinished shard, other settings or "
        "versions, and records that disagree; loads no model.",
        "the run (or table) directory the shards wrote to", merge)


def merge(args: argparse.Namespace) -> int:
    """Run ``tl-vlm merge`` (the parsed ``args``); returns the exit status.

    Example:
        >>> merge(argparse.Namespace(out="/no/such/run", vqa_normalise="always", cider="raw",
        ...                          extract="full"))
        Traceback (most recent call last):
        ...
        tl_vlm.study.shards.MergeError: /no/such/run holds no run.json: expected a tl-vlm run directory
    """
    from tl_vlm.study.rundir import RunStore
    from tl_vlm.study.shards import merge_run
    from tl_vlm.study.table import TABLE_REQUEST

    out = Path(args.out)
    if (out / TABLE_REQUEST).exists():
        from tl_vlm.cli.table import merge_table

        merge_table(out, scoring_from(args), log=log)
        return 0
    merge_run(out, scoring_from(args), log=log)
    store = RunStore.open(out)
    from tl_vlm.study.job import write_run_report

    write_run_report(store, log=log)
    return 0
