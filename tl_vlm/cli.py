"""``tl-vlm``: the command line.

``tl-vlm narrow-gate`` runs the whole Narrow Gate study on a model and writes an HTML
report with the raw numbers. Without ``--model`` it runs on the shipped toy model with
a planted gate (``toy-gated``), offline, in a few minutes on a laptop CPU.

Examples::

    tl-vlm narrow-gate --out report/                                    # toy-gated
    tl-vlm narrow-gate --model toy-distributed --out report-distributed/
    tl-vlm narrow-gate --model facebook/chameleon-7b --dataset vqa.jsonl \\
        --n-examples 2000 --device cuda --dtype bfloat16 --out report-chameleon/

An interrupted run resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tl_vlm.study import STEPS

TOY_MODELS = ("toy-gated", "toy-distributed")


def _layers(spec: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"0,4,8"`` or ``"0:32:4"`` -> layer indices."""
    if spec is None:
        return None
    try:
        if ":" in spec:
            return tuple(range(*[int(p) for p in spec.split(":")]))
        return tuple(int(p) for p in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--patch-layers takes '0,4,8' or 'start:stop:step', got {spec!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-vlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, summary) in EXTERNAL_COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    p = sub.add_parser("narrow-gate", help="run the Narrow Gate study and write an HTML report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="toy-gated",
                   help=f"{' or '.join(TOY_MODELS)} (shipped), a local checkpoint or a hub id")
    p.add_argument("--dataset", default=None,
                   help="'toy' (the toy task; default for toy models) or a JSONL file of "
                        "{image, question, answers[, label, kind]} lines (required otherwise)")
    p.add_argument("--out", default="narrow-gate-report", help="output directory (resumable)")
    p.add_argument("--n-examples", type=int, default=None,
                   help="examples to evaluate (toy default 240; JSONL default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of steps")
    p.add_argument("--patch-layers", type=_layers, default=None,
                   help="layers for the patching sweep: '0,4,8' or '0:32:4' (default: all)")
    p.add_argument("--n-pairs", type=int, default=128, help="source/target pairs for patching")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--fresh", action="store_true", help="discard a previous run in --out")
    return parser


def _task(args: argparse.Namespace):
    from tl_vlm.tasks import GenerationTask

    dataset = args.dataset or ("toy" if args.model in TOY_MODELS else None)
    if dataset is None:
        raise SystemExit("tl-vlm: --dataset is required for a model other than the toy models "
                         "(a JSONL file of {image, question, answers} lines)")
    if dataset == "toy":
        from tl_vlm.tasks import toy_task

        return dataset, toy_task(n=args.n_examples or 240, seed=args.seed)
    if not Path(dataset).exists():
        raise SystemExit(f"tl-vlm: dataset {dataset!r} is neither 'toy' nor an existing file")
    return dataset, GenerationTask.from_jsonl(dataset, limit=args.n_examples)


def narrow_gate(args: argparse.Namespace) -> Path:
    import torch

    from tl_vlm import HookedVLM
    from tl_vlm.report import write_report
    from tl_vlm.runstore import RunStore
    from tl_vlm.study import StudySettings, run_study

    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise SystemExit(f"tl-vlm: unknown steps {bad}; choose from {', '.join(STEPS)}")
    if {"separation", "overlap"} & set(steps):
        try:
            import dadapy  # noqa: F401
        except ImportError:
            raise SystemExit('tl-vlm: the separation and overlap steps need DADApy: pip install '
                             '"tl-vlm[geometry]", or leave them out with --steps') from None
    dataset, task = _task(args)
    settings = StudySettings(model=args.model, dataset=dataset, n_examples=len(task),
                             batch_size=args.batch_size, seed=args.seed, steps=steps,
                             patch_layers=args.patch_layers, n_pairs=args.n_pairs)
    # Which steps run is not a setting of the results: a rerun may add steps.
    store = RunStore(args.out, {k: v for k, v in settings.to_dict().items() if k != "steps"},
                     fresh=args.fresh)
    t0 = time.time()
    print(f"loading {args.model} ...", file=sys.stderr)
    model = HookedVLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                      device=args.device)
    results = run_study(model, task, store, settings,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    meta = {"model": args.model, "family": model.family.name,
            "gate": model.layout.gate_description, "dataset": dataset,
            "examples": len(task), "layers": model.cfg.n_layers, "heads": model.cfg.n_heads,
            "device": str(model.cfg.device), "dtype": args.dtype,
            "this run (s)": round(time.time() - t0, 1)}
    path = write_report(results, args.out, meta)
    print(f"report: {path}", file=sys.stderr)
    return path


# Subcommands with their own parser, in their own module: name -> "module:function(argv)".
EXTERNAL_COMMANDS = {
    "verify-checkpoint": ("tl_vlm.verify:main",
                          "check a checkpoint against Hugging Face (parity, positions, hooks)"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL_COMMANDS:
        import importlib

        module, _, function = EXTERNAL_COMMANDS[argv[0]][0].partition(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = _parser().parse_args(argv)
    if args.model in TOY_MODELS or Path(args.model).exists():
        # Local files only: never wait on network time-outs.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.command == "narrow-gate":
        narrow_gate(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
