"""``tl-vlm find-gate``: which image-side positions carry the image to the text.

Examples::

    tl-vlm find-gate --model toy-last-image --out gate-report/      # which positions carry the image
    tl-vlm find-gate --model facebook/chameleon-7b --task vqav2 --n-examples 64 \\
        --device cuda --dtype bfloat16 --out gate-chameleon/

Nothing here imports torch before the arguments are checked (as the rest of the CLI).
"""

from __future__ import annotations

import argparse
import time

from tl_vlm.cli.options import (Formatter, add_data_arguments, add_model_arguments,
                                add_source_arguments, check_chat_template, check_device,
                                check_model_name, check_model_reachable, check_out_dir, log,
                                non_negative_int, placement_from, positive_int, resolve_task,
                                task_source_from)


def add_parser(sub) -> None:
    """Add ``find-gate`` to ``tl-vlm``'s sub-commands.

    Example:
        >>> from tl_vlm.cli.commands import build_parser
        >>> args = build_parser().parse_args(["find-gate"])
        >>> args.model, args.batch_size, args.run.__name__
        ('toy-gated', 16, 'find_gate')
    """
    p = sub.add_parser(
        "find-gate", formatter_class=Formatter,
        help="find the image-side positions that carry the image to the text",
        description="Knock out every position class and estimate every single image-side\n"
                    "position's effect on the task (checked by exact knockouts); say whether\n"
                    "the image reaches the text narrowly, distributed or mixed, and from\n"
                    "which layer on. Writes OUT/index.html and OUT/gates.json.")
    add_source_arguments(p)
    p.add_argument("--out", default="gate-report", help="output directory")
    add_data_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="examples per forward pass (the search holds one backward's activations)")
    p.add_argument("--queries", default="all", choices=("all", "text"),
                   help="whose attention a knockout cuts: every position (the paper) or text")
    p.add_argument("--no-rows", action="store_true", help="leave out the per-row classes")
    p.add_argument("--check-per-example", type=non_negative_int, default=5,
                   help="positions knocked out exactly in each example, its best by estimate "
                        "(one forward per batch each; refines every position's value; 0: none)")
    p.add_argument("--check-top", type=positive_int, default=5,
                   help="best positions (by refined value) knocked out exactly in every "
                        "example (one forward per batch each; default 5)")
    p.add_argument("--check-random", type=non_negative_int, default=5,
                   help="random other positions checked by exact knockout")
    p.add_argument("--recompute-activations", action="store_true",
                   help="the gradient pass keeps one residual per layer and recomputes each "
                        "block in the backward: far less memory, one more forward per batch")
    p.add_argument("--check-all", action="store_true",
                   help="check every position by exact knockout (one forward each per batch)")
    p.add_argument("--seed", type=int, default=0, help="the random checks; the toy held-out set")
    add_model_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(run=find_gate)


def find_gate(args: argparse.Namespace) -> int:
    """Run :func:`tl_vlm.analyses.find_gates` and write its report; prints the summary.

    Example:
        >>> import tempfile
        >>> from tl_vlm.cli.commands import build_parser
        >>> tmp = tempfile.TemporaryDirectory()
        >>> args = build_parser().parse_args(["find-gate", "--model", "toy-gated", "--n-examples",
        ...                                   "12", "--no-rows", "--check-random", "0",
        ...                                   "--out", tmp.name])
        >>> find_gate(args)                               # doctest: +ELLIPSIS
        narrow: eoi carries 0.92 of the image effect (from layer 1 on)
        ...
        0
        >>> tmp.cleanup()
    """
    from tl_vlm.study.config import StudyConfig

    check_model_name(args.model)
    placement = placement_from(args)
    # --task, --data and --coco-root checked, the toy task by default (no study steps run)
    source = resolve_task(StudyConfig(model=args.model, source=task_source_from(args),
                                      placement=placement)).source
    check_model_reachable(args.model)
    check_out_dir(args.out)
    check_device(args.device, args.n_devices)
    processor = check_chat_template(args.model, source.prompt_style)

    from tl_vlm.analyses import find_gates
    from tl_vlm.study.gate_figures import write_gate_report

    task, _ = source.load()
    log(f"loading {args.model} ...")
    model = placement.load(args.model, processor)
    t0 = time.time()
    gates = find_gates(model, task, batch_size=args.batch_size, queries=args.queries,
                       rows=not args.no_rows, check_per_example=args.check_per_example,
                       check_top=args.check_top, recompute_activations=args.recompute_activations,
                       check_random=args.check_random, check_all=args.check_all, seed=args.seed,
                       log=log)
    gates.model = args.model
    print(gates.summary())
    path = write_gate_report(gates, args.out)
    log(f"report: {path} ({time.time() - t0:.1f}s)")
    return 0
