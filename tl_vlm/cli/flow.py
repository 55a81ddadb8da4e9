"""``tl-vlm flow``: the information-flow map of one model on one task.

Examples::

    tl-vlm flow --model toy-gated --out flow-report/
    tl-vlm flow --model facebook/chameleon-7b --task vqav2 --n-examples 64 \\
        --device cuda --dtype bfloat16 --window 8 --out flow-chameleon/
"""

from __future__ import annotations

import argparse
import time

from tl_vlm.cli.options import (CLIError, Formatter, add_data_arguments, add_model_arguments,
                                add_source_arguments, check_chat_template, check_device,
                                check_model_name, check_model_reachable, check_out_dir,
                                checkpoint_layers, log, name_list, placement_from, positive_int,
                                resolve_task, task_source_from)


def add_parser(sub) -> None:
    """Add ``flow`` to ``tl-vlm``'s sub-commands.

    Example:
        >>> from tl_vlm.cli.commands import build_parser
        >>> args = build_parser().parse_args(["flow", "--edges", "image->last,gate->last"])
        >>> args.edges, args.window
        (('image->last', 'gate->last'), None)
    """
    p = sub.add_parser("flow", formatter_class=Formatter,
                       help="information-flow map: which edges between token groups carry "
                            "the answer, in which layers",
                       description="Cut each edge (source -> target: the targets stop "
                                   "attending to the sources) in one window of layers at a "
                                   "time and write OUT/flow.json and OUT/index.html.")
    add_source_arguments(p)
    p.add_argument("--out", default="flow-report", help="output directory")
    add_data_arguments(p)
    p.add_argument("--window", type=positive_int, default=None,
                   help="layers per window (default: about a quarter of the depth)")
    p.add_argument("--edges", type=name_list(what="edge"), default=None,
                   help="comma-separated source->target edges of the groups image, gate, boi, "
                        "question, last (default: image->question,image->last,question->last,"
                        "image->gate,gate->question,gate->last)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward")
    p.add_argument("--seed", type=int, default=0, help="the toy task's held-out set")
    add_model_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(run=run_flow)


def run_flow(args: argparse.Namespace) -> int:
    """Run ``tl-vlm flow``; returns the exit status.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from tl_vlm.cli.commands import build_parser
        >>> tmp = tempfile.TemporaryDirectory()
        >>> args = build_parser().parse_args(["flow", "--n-examples", "8", "--out", tmp.name])
        >>> run_flow(args), (Path(tmp.name) / "flow.json").exists()     # doctest: +ELLIPSIS
        Cutting image->gate in layers 0-0 lowers p(answer) most: ...
        (0, True)
        >>> tmp.cleanup()
    """
    from tl_vlm.analyses.flow import DEFAULT_GROUPS, parse_edge
    from tl_vlm.study.config import StudyConfig

    check_model_name(args.model)
    placement = placement_from(args)
    source = resolve_task(StudyConfig(model=args.model, source=task_source_from(args),
                                      placement=placement)).source
    check_model_reachable(args.model)
    check_device(args.device, args.n_devices)
    n_layers = checkpoint_layers(args.model)
    if args.window is not None and n_layers is not None and args.window > n_layers:
        raise CLIError(f"--window {args.window}: {args.model} has {n_layers} layers; give "
                       f"1..{n_layers}")
    for edge in args.edges or ():
        try:
            parse_edge(edge, DEFAULT_GROUPS)
        except ValueError as err:
            raise CLIError(f"--edges: {err}") from None
    out = check_out_dir(args.out)
    processor = check_chat_template(args.model, source.prompt_style)

    from tl_vlm.analyses.flow import flow_map
    from tl_vlm.study.flow_report import headline, write_flow_report

    task, _ = source.load()
    log(f"loading {args.model} ...")
    model = placement.load(args.model, processor)
    t0 = time.time()
    flow = flow_map(model, task, window=args.window, edges=args.edges,
                    batch_size=args.batch_size)
    flow.model = args.model
    print(headline(flow))
    path = write_flow_report(flow, out)
    log(f"report: {path} ({time.time() - t0:.1f}s)")
    return 0

