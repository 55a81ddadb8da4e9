"""``tl-vlm narrow-gate``: the Narrow Gate study on one model and one task, resumably.

Every flag is checked before a model is loaded (layer ranges against the checkpoint's
config, read without its weights); nothing heavy is imported before that.

Example:
    >>> from tl_vlm.cli.commands import build_parser
    >>> args = build_parser().parse_args(["narrow-gate", "--patch-layers", "0:4:2"])
    >>> args.run is narrow_gate, args.patch_layers
    (True, (0, 2))
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

from tl_vlm.cli.options import (CLIError, Formatter, add_model_arguments, add_run_arguments,
                                add_scoring_arguments, add_source_arguments, add_task_arguments,
                                check_chat_template, check_device, check_model_name,
                                check_placement_flags, checkpoint_layers, layer_spec, log,
                                name_list, positive_int, resolve_shard, task_defaults)
from tl_vlm.cli.running import load_model, prepare_run, write_run_report
from tl_vlm.cli.running import scoring as scoring_of
from tl_vlm.core.names import CONDITIONS as CONDITION_CHOICES


def add_parser(sub) -> None:
    """Add ``narrow-gate`` to ``tl-vlm``'s sub-commands.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_parser(p.add_subparsers())
        >>> p.parse_args(["narrow-gate", "--steps", "accuracy"]).steps
        ('accuracy',)
    """
    from tl_vlm.core.names import STEPS

    p = sub.add_parser(
        "narrow-gate", formatter_class=Formatter,
        help="run the Narrow Gate study on one model and task; write an HTML report",
        description="Run the Narrow Gate study on one model and one task, resumably, and\n"
                    "write OUT/index.html and OUT/results.json.",
        epilog="examples:\n"
               "  tl-vlm narrow-gate --out report/\n"
               "  tl-vlm narrow-gate --model facebook/chameleon-7b --task vqav2 --dtype "
               "bfloat16 --device cuda --out runs/c7b-vqa\n"
               "  tl-vlm narrow-gate --model toy-gated --task vqav2 --data path/to/vqav2 "
               "--n-examples 50 --out runs/toy-vqa\n"
               "  tl-vlm narrow-gate --model M --task imagenet --shard auto --out runs/m-in")
    add_source_arguments(p)
    p.add_argument("--out", default="narrow-gate-report", help="output directory (resumable)")
    p.add_argument("--steps", type=name_list(STEPS, "step"), default=None,
                   help=f"comma-separated subset of {','.join(STEPS)} (default: the steps "
                        f"that apply to the task; all of them for the toy task)")
    p.add_argument("--conditions", type=name_list(CONDITION_CHOICES, "condition"),
                   default=CONDITION_CHOICES, help="knockout conditions of the accuracy step")
    add_task_arguments(p)
    p.add_argument("--patch-layers", type=layer_spec, default=None,
                   help="layers of the patching sweep: '0,4,8' or '0:32:4' (default: all)")
    p.add_argument("--patch-streams", type=name_list(("resid_pre", "attn_in"), "stream"),
                   default=("resid_pre", "attn_in"), help="patched activations")
    p.add_argument("--n-pairs", type=positive_int, default=128,
                   help="source/target pairs for patching")
    p.add_argument("--geometry-layers", type=layer_spec, default=None,
                   help="residual layers kept for separation and overlap, as --patch-layers "
                        "(default: all; the last block's output is always kept)")
    p.add_argument("--seed", type=int, default=0,
                   help="patching pairs, the separation step's token draws, the toy task's "
                        "held-out set")
    add_model_arguments(p)
    add_scoring_arguments(p)
    add_run_arguments(p)
    p.set_defaults(run=narrow_gate)


# -- checks before loading ------------------------------------------------------------
def _check_layers(flag: str, layers: Optional[Sequence[int]], n_layers: Optional[int],
                  model: str) -> None:
    if layers is None or n_layers is None:
        return
    outside = [l for l in layers if l >= n_layers]
    if outside:
        raise CLIError(f"{flag} asks for layer(s) {outside[:5]}, but {model} has {n_layers} "
                       f"layers (0-{n_layers - 1}); e.g. {flag} 0:{n_layers}")


def _check_geometry(steps: Sequence[str]) -> None:
    import importlib.util

    if {"separation", "overlap"} & set(steps) and not all(
            importlib.util.find_spec(m) for m in ("dadapy", "sklearn")):
        raise CLIError('the separation and overlap steps need DADApy: pip install '
                       '"tl-vlm[geometry]", or leave them out with --steps')


def _validate_narrow_gate(args: argparse.Namespace) -> None:
    """Every check that needs no model weights (config and processor files only)."""
    check_model_name(args.model)
    task_defaults(args)
    _check_geometry(args.steps)
    check_placement_flags(args)
    check_device(args.device, args.n_devices)
    n_layers = checkpoint_layers(args.model)
    _check_layers("--patch-layers", args.patch_layers, n_layers, args.model)
    _check_layers("--geometry-layers", args.geometry_layers, n_layers, args.model)


# -- running ---------------------------------------------------------------------------
def _add_compute_time(out: Path, seconds: float, shard, placement: Optional[dict] = None) -> None:
    """Append one process's compute time to ``OUT/compute.jsonl`` (one short line per
    run, resume or shard: appends from concurrent shards do not interleave), with where
    the model ran (placement is not a result setting: it may differ between resumes)."""
    import socket

    line = json.dumps({"seconds": round(seconds, 1), "host": socket.gethostname(),
                       "shard": None if shard is None else shard.name,
                       **({"placement": placement} if placement else {})}) + "\n"
    with open(out / "compute.jsonl", "a") as f:
        f.write(line)


def _placement(model) -> dict:
    """Where the model ran: its device, or its device map and device count."""
    placement = {"device": str(model.cfg.device), "n_devices": getattr(model.cfg, "n_devices", 1)}
    if model.device_map:
        placement["device_map"] = {k: str(v) for k, v in model.device_map.items()}
    return placement


def narrow_gate(args: argparse.Namespace) -> int:
    """Run ``tl-vlm narrow-gate`` (the parsed ``args``); returns the exit status.

    Example:
        >>> import tempfile
        >>> from tl_vlm.cli.commands import build_parser
        >>> tmp = tempfile.TemporaryDirectory()
        >>> args = build_parser().parse_args(["narrow-gate", "--n-examples", "8", "--steps",
        ...                                   "accuracy", "--conditions", "none",
        ...                                   "--out", tmp.name])
        >>> narrow_gate(args), (Path(tmp.name) / "index.html").exists()
        (0, True)
        >>> tmp.cleanup()
    """
    _validate_narrow_gate(args)        # before anything heavy is imported or loaded
    from tl_vlm.study.runner import finish_without_model, run_study

    processor = check_chat_template(args)
    shard = resolve_shard(args.shard)
    out = Path(args.out)
    task, settings, store = prepare_run(args, args.model, args.task, args.data, out, args.steps,
                                        shard, log)
    t0 = time.time()
    scoring = scoring_of(args)
    if shard is None and finish_without_model(store, settings, scoring, log):
        write_run_report(store, log=log)     # nothing to compute: no model loaded
        return 0
    log(f"loading {args.model} ...")
    model = load_model(args.model, args, processor)
    try:
        run_study(model, task, store, settings, log=log, scoring=scoring, shard=shard)
    finally:   # a resumed or sharded run adds up
        _add_compute_time(out, time.time() - t0, shard, _placement(model))
    if all(store.done(s) for s in settings.steps):
        write_run_report(store, header={"device": str(model.cfg.device)}, log=log)
    else:
        log(f"shard {shard.index}/{shard.count} done; the last shard to finish (or "
            f"`tl-vlm merge {out}`) writes the report")
    return 0
