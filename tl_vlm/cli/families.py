"""``tl-vlm families``: what loads, how, and what was verified (the table of
:func:`tl_vlm.families`).

Example::

    tl-vlm families               # a text table
    tl-vlm families --markdown    # the README's table
"""

from __future__ import annotations

import argparse

from tl_vlm.cli.options import Formatter


def add_parser(sub) -> None:
    """Add ``families`` to ``tl-vlm``'s sub-commands.

    Example:
        >>> from tl_vlm.cli.commands import build_parser
        >>> build_parser().parse_args(["families", "--markdown"]).markdown
        True
    """
    p = sub.add_parser("families", formatter_class=Formatter,
                       help="the supported model families: what loads and what was verified",
                       description="List the model families tl_vlm loads (named family "
                                   "files), their HF classes, image tokens, gate candidate, "
                                   "and what the tests verify for each.")
    p.add_argument("--markdown", action="store_true", help="print the Markdown table")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(run=list_families)


def list_families(args: argparse.Namespace) -> int:
    """Print the families table.

    Example:
        >>> list_families(argparse.Namespace(markdown=True))   # doctest: +ELLIPSIS
        | family | HF class | ...
        0
    """
    from tl_vlm.core.family import families
    from tl_vlm.core.registration import ensure_registered

    ensure_registered()
    table = families()
    print(table.to_markdown() if args.markdown else repr(table), end="" if args.markdown else "\n")
    return 0
