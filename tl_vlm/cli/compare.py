"""``tl-vlm compare``: one HTML report overlaying several ``tl-vlm narrow-gate`` runs.

Example::

    tl-vlm compare runs/toy-gated runs/toy-distributed runs/toy-last-image --out compare/
"""

from __future__ import annotations

import argparse
import sys

from tl_vlm.cli.options import CLIError, Formatter, check_out_dir


def add_parser(sub) -> None:
    """Add ``compare`` to ``tl-vlm``'s sub-commands.

    Example:
        >>> from tl_vlm.cli.commands import build_parser
        >>> args = build_parser().parse_args(["compare", "runs/a", "runs/b", "--out", "cmp"])
        >>> args.runs, args.out, args.run.__name__
        (['runs/a', 'runs/b'], 'cmp', 'compare')
    """
    c = sub.add_parser("compare", formatter_class=Formatter,
                       help="one HTML report overlaying several narrow-gate runs",
                       description="Overlay the results.json of several `tl-vlm narrow-gate` "
                                   "runs in one page\n(OUT/index.html), native models first.")
    c.add_argument("runs", nargs="+", help="output directories of `tl-vlm narrow-gate` runs")
    c.add_argument("--out", default="narrow-gate-compare", help="output directory")
    c.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    c.set_defaults(run=compare)


def compare(args: argparse.Namespace) -> int:
    """Write the comparison of ``args.runs`` to ``args.out``.

    Example:
        >>> import argparse
        >>> compare(argparse.Namespace(runs=["no-such-run"], out="cmp"))
        Traceback (most recent call last):
        ...
        FileNotFoundError: no-such-run/results.json not found: give the output directory of a `tl-vlm narrow-gate` run
    """
    from tl_vlm.study.compare import write_comparison

    check_out_dir(args.out)
    try:
        path = write_comparison(args.runs, args.out)
    except ValueError as err:          # a results.json that is not one: the user's input
        raise CLIError(str(err)) from None
    print(f"report: {path}", file=sys.stderr)
    return 0
