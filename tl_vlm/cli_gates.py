"""``tl-vlm find-gate`` and ``tl-vlm compare`` (registered by :mod:`tl_vlm.cli`).

Examples::

    tl-vlm find-gate --model toy-last-image --out gate-report/      # which positions carry the image
    tl-vlm find-gate --model facebook/chameleon-7b --dataset vqa.jsonl --n-examples 64 \\
        --device cuda --dtype bfloat16 --out gate-chameleon/
    tl-vlm compare runs/toy-gated runs/toy-distributed runs/toy-last-image --out compare/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_commands(sub) -> None:
    """Add the ``find-gate`` and ``compare`` sub-commands to ``tl-vlm``'s parser.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="tl-vlm")
        >>> add_commands(parser.add_subparsers(dest="command", required=True))
        >>> args = parser.parse_args(["compare", "runs/a", "runs/b", "--out", "cmp"])
        >>> args.runs, args.out, args.run.__name__
        (['runs/a', 'runs/b'], 'cmp', 'compare')
    """
    p = sub.add_parser("find-gate", help="find the image-side positions that carry the image "
                                         "to the text (narrow, distributed or mixed)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="toy-gated",
                   help="a shipped toy model (toy-gated, toy-distributed, toy-last-image), a "
                        "local checkpoint or a hub id")
    p.add_argument("--dataset", default=None,
                   help="'toy' (default for toy models) or a JSONL file of "
                        "{image, question, answers[, label, kind]} lines")
    p.add_argument("--out", default="gate-report", help="output directory")
    p.add_argument("--n-examples", type=int, default=None,
                   help="examples (toy default 240; JSONL default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--queries", default="all", choices=("all", "text"),
                   help="whose attention a knockout cuts: every position (the paper) or text only")
    p.add_argument("--no-rows", action="store_true", help="leave out the per-row classes")
    p.add_argument("--check-top", type=int, default=5,
                   help="best positions (by estimate) checked by exact knockout")
    p.add_argument("--check-random", type=int, default=5,
                   help="random other positions checked by exact knockout")
    p.add_argument("--check-all", action="store_true",
                   help="check every position by exact knockout (one forward each per batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(run=find_gate)

    c = sub.add_parser("compare", help="one HTML report overlaying several narrow-gate runs")
    c.add_argument("runs", nargs="+", help="output directories of `tl-vlm narrow-gate` runs")
    c.add_argument("--out", default="narrow-gate-compare", help="output directory")
    c.set_defaults(run=compare)


def find_gate(args: argparse.Namespace) -> Path:
    """Run :func:`tl_vlm.analyses.find_gates` and write its report; prints the summary.

    Example:
        >>> import argparse, tempfile
        >>> parser = argparse.ArgumentParser(prog="tl-vlm")
        >>> add_commands(parser.add_subparsers(dest="command", required=True))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> args = parser.parse_args(["find-gate", "--model", "toy-gated", "--n-examples", "12",
        ...                           "--no-rows", "--check-random", "0", "--out", tmp.name])
        >>> find_gate(args).name                          # doctest: +ELLIPSIS
        narrow: eoi carries 0.92 of the image effect (from layer 1 on)
        ...
        'index.html'
        >>> tmp.cleanup()
    """
    import torch

    from tl_vlm import HookedVLM
    from tl_vlm.analyses import find_gates
    from tl_vlm.cli import _task
    from tl_vlm.gate_figures import write_gate_report

    _, task = _task(args)
    print(f"loading {args.model} ...", file=sys.stderr)
    model = HookedVLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                      device=args.device)
    t0 = time.time()
    gates = find_gates(model, task, batch_size=args.batch_size, queries=args.queries,
                       rows=not args.no_rows, check_top=args.check_top,
                       check_random=args.check_random, check_all=args.check_all, seed=args.seed,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    gates.model = args.model
    print(gates.summary())
    path = write_gate_report(gates, args.out)
    print(f"report: {path} ({time.time() - t0:.1f}s)", file=sys.stderr)
    return path


def compare(args: argparse.Namespace) -> Path:
    """Write the comparison of ``args.runs`` to ``args.out``.

    Example:
        >>> import argparse
        >>> compare(argparse.Namespace(runs=["no-such-run"], out="cmp"))
        Traceback (most recent call last):
        ...
        SystemExit: tl-vlm compare: no-such-run/results.json not found: give the output directory of a `tl-vlm narrow-gate` run
    """
    from tl_vlm.compare import write_comparison

    try:
        path = write_comparison(args.runs, args.out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"tl-vlm compare: {err}") from None
    print(f"report: {path}", file=sys.stderr)
    return path
