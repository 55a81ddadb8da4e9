"""``tl-vlm``: the command line's parser and dispatcher.

Each command lives in a module of its own (:mod:`tl_vlm.cli.narrow_gate`,
:mod:`~tl_vlm.cli.table`, :mod:`~tl_vlm.cli.merge`, :mod:`~tl_vlm.cli.rescore`,
:mod:`~tl_vlm.cli.find_gate`, :mod:`~tl_vlm.cli.compare`) that adds its parser with
``add_parser(sub)``; what they share is :mod:`tl_vlm.cli.options` (option groups,
argument types, checks, and the builders of the typed
:class:`~tl_vlm.study.config.StudyConfig` the study runs from). Commands are registered in :data:`COMMANDS`, so another module can add one
with a single line (``COMMANDS.append(add_parser)``).

Every flag is checked before a model is loaded; a mistake is one line saying what to
do, and Ctrl-C says how to resume.

Example:
    >>> main(["narrow-gate", "--batch-size", "0"])
    Traceback (most recent call last):
    ...
    SystemExit: 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

DESCRIPTION = """\
tl-vlm: TransformerLens for vision-language models. Runs the Narrow Gate study
(Serra et al., arXiv 2412.06646) on a model and writes an HTML report: task scores
under attention knockout, progressive knockout, cross-modal attention contribution,
modality separation, neighbourhood overlap, steering by patching the gate."""

EXAMPLES = """\
examples:
  tl-vlm narrow-gate --out report/                      # the toy model with a planted gate
  tl-vlm narrow-gate --model facebook/chameleon-7b --task vqav2 --dtype bfloat16 \\
      --device cuda --out runs/c7b-vqa
  tl-vlm narrow-gate --model toy-gated --task vqav2 --data path/to/vqav2 --n-examples 50
  tl-vlm table --models facebook/chameleon-7b,mistral-community/pixtral-12b \\
      --tasks vqav2,flickr30k,coco,imagenet --conditions none,gate,img_to_text,random \\
      --dtype bfloat16 --device cuda --out runs/table
  tl-vlm narrow-gate ... --shard auto                    # one task of a SLURM array
  tl-vlm merge runs/c7b-vqa                               # after every shard finished
  tl-vlm rescore runs/c7b-vqa --cider ptb-approx          # no model needed

An interrupted command resumes when it is run again with the same settings."""

from tl_vlm.cli import compare, families, find_gate, flow, merge, narrow_gate, rescore, table
from tl_vlm.cli.options import CLIError, log
from tl_vlm.core.names import TOY_MODELS


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that points at ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The commands parsed here: each entry adds one subcommand (``sub.add_parser(...)``)
# and sets ``run=`` to the function that runs it.
COMMANDS: list[Callable[[Any], None]] = [narrow_gate.add_parser, table.add_parser,
                                         merge.add_parser, rescore.add_parser,
                                         find_gate.add_parser, flow.add_parser,
                                         compare.add_parser, families.add_parser]
# Subcommands with their own parser, in their own module: name -> "module:function(argv)".
# Registering another tool is one line here.
EXTERNAL_COMMANDS = {
    "verify-checkpoint": ("tl_vlm.study.verify:main",
                          "check a checkpoint against Hugging Face (parity, positions, hooks)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``tl-vlm`` parser with every registered command.

    Example:
        >>> args = build_parser().parse_args(["narrow-gate", "--patch-layers", "0:4:2"])
        >>> args.model, args.patch_layers, args.batch_size
        ('toy-gated', (0, 2), 32)
    """
    parser = _Parser(prog="tl-vlm", description=DESCRIPTION, epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for register in COMMANDS:
        register(sub)
    for name, (_, summary) in EXTERNAL_COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


# Exceptions that mean the input was wrong, not the code: one line, no traceback. Looked
# up only in modules already imported (an error raised before torch loads stays fast).
_USER_ERRORS = {
    "tl_vlm.study.rundir": ("RunSettingsError", "RecordConflictError"),
    "tl_vlm.study.shards": ("MergeError",),
    "tl_vlm.eval.data": ("ImageFetchError", "ScriptDatasetError"),
    "tl_vlm.eval.prompts": ("PromptError",),
    "tl_vlm.core.answers": ("AnswerTokenError",),
    "tl_vlm.core.layout": ("LayoutError",),
    "tl_vlm.core.family": ("UnsupportedModelError",),
    "tl_vlm.study.config": ("StudyConfigError",),
    "tl_vlm.eval.examples": ("TaskDataError",),
}


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, (CLIError, FileNotFoundError, ConnectionError)):
        return True
    return any(isinstance(err, getattr(sys.modules[module], name))
               for module, names in _USER_ERRORS.items() if module in sys.modules
               for name in names)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``tl-vlm``; returns the exit status (user errors exit with 2, Ctrl-C 130).

    Example:
        >>> main(["rescore", "/no/such/run"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL_COMMANDS:
        import importlib

        module, _, function = EXTERNAL_COMMANDS[argv[0]][0].partition(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = build_parser().parse_args(argv)
    model = getattr(args, "model", None)
    if model in TOY_MODELS or (model and Path(model).exists()):
        # Local files only: never wait on network time-outs.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        log(f"\ntl-vlm: interrupted. Finished batches are saved{f' in {out}' if out else ''}; "
            f"run the same command again to resume.")
        return 130
    except Exception as err:
        if getattr(args, "debug", False) or not _is_user_error(err):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        hint = "" if isinstance(err, CLIError) else " (--debug shows the traceback)"
        log(f"tl-vlm {args.command}: error: {message}{hint}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
