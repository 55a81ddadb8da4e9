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
from pathlib import Path
from typing import Optional, Sequence

from tl_vlm.cli.options import (CLIError, Formatter, add_model_arguments, add_run_arguments,
                                add_scoring_arguments, add_source_arguments, add_task_arguments,
                                check_chat_template, check_device, check_model_name,
                                check_model_reachable, check_out_dir, checkpoint_layers,
                                layer_spec, log, name_list, positive_int, resolve_task,
                                study_config_from)
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
        shown = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
        raise CLIError(f"{flag} asks for layer(s) [{shown}], but {model} has {n_layers} "
                       f"layers (0-{n_layers - 1}); e.g. {flag} 0:{n_layers}")


def _check_geometry(steps: Sequence[str]) -> None:
    import importlib.util

    if {"separation", "overlap"} & set(steps) and not all(
            importlib.util.find_spec(m) for m in ("dadapy", "sklearn")):
        raise CLIError('the separation and overlap steps need DADApy: pip install '
                       '"tl-vlm[geometry]", or leave them out with --steps')


def validated_config(args: argparse.Namespace):
    """The :class:`~tl_vlm.study.config.StudyConfig` of the parsed flags, after every check
    that needs no model weights (config and processor files only).

    Example:
        >>> from tl_vlm.cli.commands import build_parser
        >>> config = validated_config(build_parser().parse_args(["narrow-gate"]))
        >>> config.source.task, config.placement.device
        ('toy', None)
    """
    check_model_name(args.model)
    config = resolve_task(study_config_from(args))
    check_out_dir(config.out)
    check_model_reachable(args.model)
    _check_geometry(config.steps)
    check_device(args.device, args.n_devices)
    n_layers = checkpoint_layers(args.model)
    _check_layers("--patch-layers", config.patch_layers, n_layers, args.model)
    _check_layers("--geometry-layers", config.geometry_layers, n_layers, args.model)
    return config


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
    config = validated_config(args)     # before anything heavy is imported or loaded
    processor = check_chat_template(config.model, config.source.prompt_style)
    from tl_vlm.study.job import run_main_job

    run_main_job(config, log=log, processor=processor)
    return 0
