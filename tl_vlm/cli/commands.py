"""``tl-vlm``: the command line.

Every flag is checked before a model is loaded (layer ranges against the checkpoint's
config, read without its weights); a mistake is one line saying what to do, and Ctrl-C
says how to resume. Commands are registered in :data:`COMMANDS`, so another module can
add one with a single line (``COMMANDS.append(register)``).

Example:
    >>> main(["narrow-gate", "--batch-size", "0"])
    Traceback (most recent call last):
    ...
    SystemExit: 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
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

from tl_vlm.core.names import CONDITIONS as CONDITION_CHOICES
from tl_vlm.core.names import TASK_NAMES, TOY_MODELS, is_toy_model, toy_model_path


class CLIError(Exception):
    """A user error: printed as one line, no traceback.

    Example:
        >>> main(["narrow-gate", "--model", "toy_gated"])
        2
    """


# -- argument types ------------------------------------------------------------------
def _device_map(text: str):
    """``auto``/``balanced``/``balanced_low_0``/``sequential``, or a JSON file of a map."""
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"expected auto, balanced, balanced_low_0, sequential or a JSON file holding "
            f"{{module path: device}}, got {text!r} (no such file)")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text}: not JSON ({err})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise argparse.ArgumentTypeError(f"{text}: expected a JSON object {{module path: device}}")
    return mapping


def _max_memory(text: str) -> dict:
    """``'0=70GiB,1=70GiB,cpu=100GiB'`` -> ``{0: '70GiB', 1: '70GiB', 'cpu': '100GiB'}``."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, budget = part.partition("=")
        if not sep or not budget.strip():
            raise argparse.ArgumentTypeError(
                f"expected DEVICE=SIZE pairs such as '0=70GiB,1=70GiB', got {part!r}")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = budget.strip()
    if not out:
        raise argparse.ArgumentTypeError("expected DEVICE=SIZE pairs such as '0=70GiB,1=70GiB'")
    return out


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _positive_int(text: str) -> int:
    """An int >= 1 (argparse type)."""
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    """An int >= 0 (argparse type)."""
    return _whole_number(text, 0)


def layer_spec(text: str) -> tuple[int, ...]:
    """``"0,4,8"`` or ``"start:stop[:step]"`` -> layer indices (argparse type).

    Example:
        >>> layer_spec("0:8:4"), layer_spec("1,3")
        ((0, 4), (1, 3))
        >>> layer_spec("2:1")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: '2:1' selects no layer (start:stop takes start < stop, e.g. 0:32:4)
    """
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            layers = tuple(range(*parts))
        else:
            layers = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes '0,4,8' or 'start:stop[:step]' with step >= 1, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError(
            f"{text!r} selects no layer (start:stop takes start < stop, e.g. 0:32:4)")
    if min(layers) < 0:
        raise argparse.ArgumentTypeError(f"layers are counted from 0, got {text!r}")
    return layers


def _name_list(choices: Optional[Sequence[str]] = None, what: str = "name") -> Callable:
    """A comma-separated list, each item among ``choices`` (argparse type)."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s")
        bad = [s for s in items if choices is not None and s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from "
                                             f"{', '.join(choices)}")
        return items
    return parse


def _shard_spec(text: str):
    from tl_vlm.study.shards import Shard

    if text == "auto":
        return text   # resolved from the environment once the command runs
    try:
        return Shard.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--shard {text}: ")) from None


# -- parser --------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; a default shown once, only where it says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            default = (",".join(map(str, action.default))
                       if isinstance(action.default, (tuple, list)) else action.default)
            text += f" (default: {default})"
        return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that points at ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --n-devices (shared by the commands that load models)."""
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cpu; under torchrun: cuda:LOCAL_RANK "
                        "when CUDA is available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights and activations (the paper: bfloat16)")
    p.add_argument("--n-devices", type=_positive_int, default=None,
                   help="split each model over this many GPUs (a block per rank under torchrun)")
    p.add_argument("--device-map", default=None, type=_device_map,
                   help="split each model as accelerate does: auto, balanced, sequential, or a "
                        "JSON file {module path: device} ('cpu'/'disk' offload allowed, but not "
                        "mixed with GPUs)")
    p.add_argument("--max-memory", default=None, type=_max_memory,
                   help="per-device budgets for --device-map/--n-devices, e.g. "
                        "'0=70GiB,1=70GiB'")
    p.add_argument("--offload-folder", default=None,
                   help="folder for layers a --device-map puts on 'disk'")


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --task, --data: what one model is run on (narrow-gate, find-gate)."""
    p.add_argument("--model", default="toy-gated",
                   help=f"{' or '.join(TOY_MODELS)} (shipped), a local checkpoint or a hub id")
    p.add_argument("--task", default=None,
                   help=f"{', '.join(TASK_NAMES)}, or a JSONL file of {{image, question, "
                        f"answers}} lines (default: toy for the toy models)")
    p.add_argument("--data", default=None,
                   help="a local copy of the task's dataset: a directory laid out as "
                        "<dir>/data/<split>-*.parquet, a parquet file or a glob (default: "
                        "the hub)")


def _add_task_arguments(p: argparse.ArgumentParser) -> None:
    """Data, prompt, batching and random-knockout flags of the dataset tasks."""
    _add_data_arguments(p)
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="examples per batch; fixes padding and so the numerics: keep it when "
                        "resuming or sharding")
    p.add_argument("--random-k", type=_positive_int, default=10,
                   help="image tokens knocked out per random draw")
    p.add_argument("--random-draws", type=_positive_int, default=None,
                   help="random knockout draws (default: 5 for VQA and ImageNet, 3 for "
                        "captions and the toy task)")


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Which examples, where COCO's images are, the prompt templates."""
    p.add_argument("--n-examples", type=_positive_int, default=None,
                   help="examples per task: the first N of the paper's selection (default: "
                        "all of it; toy: 240)")
    p.add_argument("--coco-root", default=None,
                   help="folder holding the COCO images as <filepath>/<filename> (val2014/...)")
    p.add_argument("--image-cache", default=None,
                   help="cache of downloaded COCO images (default: $TL_VLM_IMAGE_CACHE or "
                        "~/.cache/tl_vlm/images)")
    p.add_argument("--prompt-style", default=None, choices=("paper", "clean", "chat"),
                   help="the authors' templates (paper, the default), the same without their "
                        "stray quotes (clean), or the checkpoint's chat template (chat)")
    p.add_argument("--vqa-mode", default="zero-shot", choices=("zero-shot", "prompt"),
                   help="VQA instruction: the short one or the authors' long block")


def _add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    """How recorded predictions are scored (no model needed to change them)."""
    p.add_argument("--vqa-normalise", default="always", choices=("always", "official"),
                   help="VQA answer normalisation: always (the paper) or as the official "
                        "script (only when the answers differ)")
    p.add_argument("--cider", default="raw", choices=("raw", "ptb-approx", "ptb"),
                   help="CIDEr tokenisation: raw whitespace tokens (the paper), ptb-approx "
                        "(pure Python PTB), ptb (Java; else ptb-approx)")
    p.add_argument("--extract", default="full", choices=("full", "first_line"),
                   help="which part of a generated answer is scored")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", type=_shard_spec, default=None,
                   help="compute shard K of N (K/N, K from 0), or 'auto' from "
                        "SLURM_ARRAY_TASK_ID/COUNT or torchrun's RANK/WORLD_SIZE; merge "
                        "with `tl-vlm merge OUT` (the last shard to finish merges by itself)")
    p.add_argument("--fresh", action="store_true",
                   help="discard what OUT holds (a shard: only its own records) and start over")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _narrow_gate_parser(sub) -> None:
    from tl_vlm.core.names import STEPS

    p = sub.add_parser(
        "narrow-gate", formatter_class=_Formatter,
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
    _add_source_arguments(p)
    p.add_argument("--out", default="narrow-gate-report", help="output directory (resumable)")
    p.add_argument("--steps", type=_name_list(STEPS, "step"), default=None,
                   help=f"comma-separated subset of {','.join(STEPS)} (default: the steps "
                        f"that apply to the task; all of them for the toy task)")
    p.add_argument("--conditions", type=_name_list(CONDITION_CHOICES, "condition"),
                   default=CONDITION_CHOICES, help="knockout conditions of the accuracy step")
    _add_task_arguments(p)
    p.add_argument("--patch-layers", type=layer_spec, default=None,
                   help="layers of the patching sweep: '0,4,8' or '0:32:4' (default: all)")
    p.add_argument("--patch-streams", type=_name_list(("resid_pre", "attn_in"), "stream"),
                   default=("resid_pre", "attn_in"), help="patched activations")
    p.add_argument("--n-pairs", type=_positive_int, default=128,
                   help="source/target pairs for patching")
    p.add_argument("--geometry-layers", type=layer_spec, default=None,
                   help="residual layers kept for separation and overlap, as --patch-layers "
                        "(default: all; the last block's output is always kept)")
    p.add_argument("--seed", type=int, default=0,
                   help="patching pairs, the separation step's token draws, the toy task's "
                        "held-out set")
    _add_model_arguments(p)
    _add_scoring_arguments(p)
    _add_run_arguments(p)
    p.set_defaults(run=_narrow_gate)


def _run_dir_command(sub, name: str, summary: str, description: str, out_help: str,
                     run: Callable[[argparse.Namespace], int]) -> None:
    """A command on a finished (or sharded) run directory: no model is loaded."""
    p = sub.add_parser(name, formatter_class=_Formatter, help=summary, description=description)
    p.add_argument("out", help=out_help)
    _add_scoring_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(run=run)


def _merge_parser(sub) -> None:
    _run_dir_command(
        sub, "merge", "merge the shards of a run (or of a table) and write the report",
        "Merge the shards of OUT: refuses a missing or unfinished shard, other settings or "
        "versions, and records that disagree; loads no model.",
        "the run (or table) directory the shards wrote to", _merge)


def _rescore_parser(sub) -> None:
    _run_dir_command(
        sub, "rescore", "score a finished run's recorded predictions again (no model)",
        "Recompute the accuracy and progressive steps of OUT from their recorded predictions "
        "with other scoring options, and rewrite the report (or the table).",
        "a run or table directory", _rescore)


def _table_parser(sub) -> None:
    from tl_vlm.study.table import _add_table_parser

    _add_table_parser(sub, _Formatter)


# The commands parsed here: each entry adds one subcommand (``sub.add_parser(...)``)
# and sets ``run=`` to the function that runs it.
from tl_vlm.cli.find_gate import add_commands as _gate_parsers  # noqa: E402  (find-gate, compare)

COMMANDS: list[Callable[[Any], None]] = [_narrow_gate_parser, _table_parser, _merge_parser,
                                         _rescore_parser, _gate_parsers]
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


# -- checks before loading ------------------------------------------------------------
def _checkpoint_dir(model: str) -> Optional[Path]:
    """The local directory of ``model`` (a toy model's or a path), None for a hub id."""
    if is_toy_model(model):
        return toy_model_path(model)
    path = Path(model).expanduser()
    return path if path.exists() else None


def checkpoint_layers(model: str) -> Optional[int]:
    """The decoder layers of ``model`` from its config alone (no weights); None when the
    config cannot be read here (a hub id offline: the load will say why).

    Example:
        >>> checkpoint_layers("toy-gated")
        4
    """
    path = _checkpoint_dir(model)
    if path is not None:
        if not (path / "config.json").is_file():
            raise CLIError(f"{model}: no config.json in {path}; expected a checkpoint "
                           f"directory (save_pretrained output)")
        config = json.loads((path / "config.json").read_text())
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model).to_dict()
        except Exception:  # offline or unknown: from_pretrained reports it properly
            return None
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict) and "num_hidden_layers" in config[key]:
            return int(config[key]["num_hidden_layers"])
    return int(config["num_hidden_layers"]) if "num_hidden_layers" in config else None


def _check_layers(flag: str, layers: Optional[Sequence[int]], n_layers: Optional[int],
                 model: str) -> None:
    if layers is None or n_layers is None:
        return
    outside = [l for l in layers if l >= n_layers]
    if outside:
        raise CLIError(f"{flag} asks for layer(s) {outside[:5]}, but {model} has {n_layers} "
                       f"layers (0-{n_layers - 1}); e.g. {flag} 0:{n_layers}")


def _cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is installed (without importing torch: no driver, no CUDA)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists() \
        or sys.platform not in ("linux",)


def _check_placement_flags(args: argparse.Namespace) -> None:
    """--device-map/--max-memory/--offload-folder against --device/--n-devices."""
    device_map = getattr(args, "device_map", None)
    if device_map is not None and args.device is not None:
        raise CLIError("--device and --device-map together: give one device, or a map that "
                       "splits the model")
    if device_map is not None and args.n_devices and args.n_devices > 1:
        raise CLIError("--device-map and --n-devices together: --n-devices N means "
                       "--device-map balanced over cuda:0..N-1; give one of them")
    split = device_map is not None or (args.n_devices or 0) > 1
    for flag in ("max_memory", "offload_folder"):
        if getattr(args, flag, None) is not None and not split:
            raise CLIError(f"--{flag.replace('_', '-')} only applies to a split model: add "
                           f"--device-map auto (or --n-devices N)")


def _check_device(device: Optional[str], n_devices: Optional[int]) -> None:
    wants_cuda = (device or "").startswith("cuda") or (n_devices or 0) > 1
    if not wants_cuda:
        if device is not None and device.split(":")[0] not in ("cpu", "mps", "xpu", "meta"):
            raise CLIError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N")
        return
    if n_devices and n_devices > 1 and device is not None:
        raise CLIError("--device and --n-devices together: give one device, or split the "
                       "model over --n-devices GPUs")
    available = 0
    if _cuda_driver_present():
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    what = f"--device {device}" if device else f"--n-devices {n_devices}"
    if available == 0:
        raise CLIError(f"{what}: CUDA is not available on this machine (no NVIDIA driver or "
                       f"a CPU-only torch); use --device cpu")
    index = int(device.split(":")[1]) if device and ":" in device else 0
    needed = max(index + 1, n_devices or 1)
    if needed > available:
        raise CLIError(f"{what}: this machine has {available} GPU(s) (cuda:0..{available - 1})")


def _check_model_name(model: str) -> None:
    """The checks of :func:`tl_vlm.core.model.resolve_model_name`, without importing torch:
    a toy name misspelt, a local path that does not exist."""
    if model in TOY_MODELS or Path(model).expanduser().exists():
        return
    close = [t for t in TOY_MODELS if t.replace("-", "") == model.replace("_", "").replace("-", "")]
    if close:
        raise CLIError(f"no model {model!r}: did you mean the shipped toy model {close[0]!r}?")
    if model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise CLIError(f"no checkpoint directory {model!r} (resolved to "
                       f"{os.path.abspath(os.path.expanduser(model))}); pass an existing "
                       f"directory or a hub id of the form 'org/name'")


def _check_geometry(steps: Sequence[str]) -> None:
    import importlib.util

    if {"separation", "overlap"} & set(steps) and not all(
            importlib.util.find_spec(m) for m in ("dadapy", "sklearn")):
        raise CLIError('the separation and overlap steps need DADApy: pip install '
                       '"tl-vlm[geometry]", or leave them out with --steps')


def _resolve_shard(spec: Any):
    """``--shard`` as a :class:`~tl_vlm.study.shards.Shard` (``auto``: from the environment).

    torchrun's ``WORLD_SIZE`` is removed once read, so that the libraries loading the
    model do not set up distributed execution of their own (VLMEvalKit does the same).
    """
    from tl_vlm.study.shards import Shard

    if spec != "auto":
        return spec
    try:
        shard = Shard.parse("auto")
    except ValueError as err:
        raise CLIError(str(err)) from None
    os.environ.pop("WORLD_SIZE", None)
    return shard


def _rank_device(args: argparse.Namespace) -> Optional[str]:
    """Under torchrun/accelerate with CUDA: this rank's GPU (``cuda:LOCAL_RANK``), or its
    block of ``--n-devices`` GPUs (made the only visible ones)."""
    import torch

    local = os.environ.get("LOCAL_RANK")
    if args.device is not None or local is None or not torch.cuda.is_available():
        return args.device
    if args.n_devices and args.n_devices > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        block = ids[int(local) * args.n_devices:(int(local) + 1) * args.n_devices]
        if len(block) < args.n_devices:
            raise CLIError(f"rank {local} needs GPUs {int(local) * args.n_devices}.."
                           f"{(int(local) + 1) * args.n_devices - 1} (--n-devices "
                           f"{args.n_devices}) but only {len(ids)} are visible")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(block)
        return None
    return f"cuda:{local}"


# -- narrow-gate -----------------------------------------------------------------------
def _task_defaults(args: argparse.Namespace) -> str:
    from tl_vlm.eval.taskset import DEFAULT_STEPS, task_kind

    task = args.task or ("toy" if args.model in TOY_MODELS else None)
    if task is None:
        raise CLIError("--task is required for a model other than the toy models: one of "
                       f"{', '.join(TASK_NAMES[1:])}, or a JSONL file")
    try:
        kind = task_kind(task)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    if args.data is not None:
        if kind in ("toy", "jsonl"):
            raise CLIError(f"--data gives a local copy of a dataset task; the {kind} task "
                           f"has its own data")
        _check_data_path(str(args.data))
    if args.coco_root is not None and not Path(args.coco_root).is_dir():
        raise CLIError(f"--coco-root {args.coco_root}: not a directory; expected the folder "
                       f"holding val2014/")
    if args.prompt_style is not None and kind == "toy":
        raise CLIError("--prompt-style applies to the dataset tasks; the toy task writes its "
                       "own prompts")
    args.task = task
    args.steps = args.steps or DEFAULT_STEPS[kind]
    return kind


def _check_data_path(path: str) -> None:
    import glob

    expanded = os.path.expanduser(path)
    if not (os.path.exists(expanded) or (glob.has_magic(expanded) and glob.glob(expanded))):
        raise CLIError(f"--data {path}: no such directory, file or files; expected a "
                       f"directory laid out as <dir>/data/<split>-*.parquet, a parquet file "
                       f"or a glob of them")


def _check_chat_template(args: argparse.Namespace) -> Any:
    """With ``--prompt-style chat``: the processor, checked for a chat template now."""
    if args.prompt_style != "chat":
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(_checkpoint_dir(args.model) or args.model))
    if not getattr(processor, "chat_template", None):
        raise CLIError(f"--prompt-style chat needs the checkpoint's chat template, but "
                       f"{args.model}'s processor has none; use --prompt-style paper or clean")
    return processor


def _validate_narrow_gate(args: argparse.Namespace) -> None:
    """Every check that needs no model weights (config and processor files only)."""
    _check_model_name(args.model)
    _task_defaults(args)
    _check_geometry(args.steps)
    _check_placement_flags(args)
    _check_device(args.device, args.n_devices)
    n_layers = checkpoint_layers(args.model)
    _check_layers("--patch-layers", args.patch_layers, n_layers, args.model)
    _check_layers("--geometry-layers", args.geometry_layers, n_layers, args.model)


def _prepare_run(args: argparse.Namespace, model_name: str, task_name: str,
                data: Optional[str], out: Path, steps: Sequence[str], shard,
                log: Callable[[str], None]):
    """Load the task (data, before any model) and open the run directory."""
    from tl_vlm.study.rundir import RunStore, dumps, write_atomic
    from tl_vlm.study.runner import StudySettings
    from tl_vlm.eval.taskset import RANDOM_DRAWS, load_task, prefetch_images, task_kind

    task, source = load_task(task_name, data=data, n=args.n_examples,
                             seed=getattr(args, "seed", 0), coco_root=args.coco_root,
                             image_cache=args.image_cache,
                             prompt_style=args.prompt_style or "paper", vqa_mode=args.vqa_mode)
    from tl_vlm.eval.data import selection_hash

    settings = StudySettings(
        model=model_name, task=task.name, n_examples=len(task), batch_size=args.batch_size,
        seed=getattr(args, "seed", 0), random_k=args.random_k,
        random_draws=args.random_draws or RANDOM_DRAWS.get(task_kind(task_name), 3),
        steps=tuple(steps), conditions=tuple(args.conditions),
        patch_layers=getattr(args, "patch_layers", None),
        patch_streams=tuple(getattr(args, "patch_streams", ("resid_pre", "attn_in"))),
        n_pairs=getattr(args, "n_pairs", 128),
        geometry_layers=getattr(args, "geometry_layers", None), dtype=args.dtype,
        task_settings=task.settings(),
        selection_hash=selection_hash([ex.id for ex in task.examples]))
    store = RunStore(out, settings.run_settings(), fresh=args.fresh,
                     shard=None if shard is None else (shard.index, shard.count))
    write_atomic(out / "source.json", dumps(source))
    owned = [ex for j, (_, chunk) in enumerate(task.batches(args.batch_size))
             if shard is None or shard.owns(j) for ex in chunk]
    if prefetch_images(owned):
        log(f"images of {len(owned)} examples found")
    return task, settings, store


def _load_model(name: str, args: argparse.Namespace, processor: Any = None):
    import torch
    from transformers.utils import logging as hf_logging

    from tl_vlm import HookedVLM

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()     # no carriage-return bars in a log file

    kwargs: dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    device = _rank_device(args)
    if getattr(args, "device_map", None) is not None:
        kwargs["device_map"] = args.device_map
    elif args.n_devices and args.n_devices > 1:
        kwargs["n_devices"] = args.n_devices
    else:
        kwargs["device"] = device
    for flag in ("max_memory", "offload_folder"):
        if getattr(args, flag, None) is not None:
            kwargs[flag] = getattr(args, flag)
    if processor is not None:
        kwargs["processor"] = processor
    return HookedVLM.from_pretrained(name, **kwargs)


def _run_meta(store, settings) -> dict[str, Any]:
    """What heads the report and ``results.json`` (settings-level: equal for every run
    and merge of the same settings)."""
    import json as _json

    from tl_vlm.study.shards import versions

    info = _json.loads((store.out / "model.json").read_text())
    return {"model": settings["model"], "family": info["family"], "gate": info["gate"],
            "task": settings["task"], "examples": settings["n_examples"],
            "layers": info["layers"], "heads": info["heads"], "dtype": settings["dtype"],
            "prompts": settings["task_settings"].get("prompt_style"),
            "tl_vlm": versions()["tl_vlm"]}


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


def _compute_seconds(out: Path) -> Optional[float]:
    """The compute time of every run, resume and shard that made ``out`` (None if unknown)."""
    path = out / "compute.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return round(sum(line["seconds"] for line in lines), 1)


def _write_run_report(store, header: Optional[dict] = None, log=print) -> Optional[Path]:
    """``index.html`` + ``results.json`` of a run whose planned steps are all finished.
    The page also shows ``header`` and the total compute time (not ``results.json``:
    it must not depend on how the run was split or resumed)."""
    from tl_vlm.study.report import write_report
    from tl_vlm.study.runner import study_results

    header = dict(header or {})
    total = _compute_seconds(store.out)
    if total is not None:
        header["compute_seconds"] = total
    results = study_results(store)
    path = write_report(results, store.out, _run_meta(store, store.settings), header=header)
    log(f"report: {path}")
    return path


def _narrow_gate(args: argparse.Namespace) -> int:
    log = _log
    _validate_narrow_gate(args)        # before anything heavy is imported or loaded
    from tl_vlm.study.runner import finish_without_model, run_study
    from tl_vlm.eval.tasks import Scoring

    processor = _check_chat_template(args)
    shard = _resolve_shard(args.shard)
    out = Path(args.out)
    task, settings, store = _prepare_run(args, args.model, args.task, args.data, out, args.steps,
                                        shard, log)
    t0 = time.time()
    scoring = Scoring(args.vqa_normalise, args.cider, args.extract)
    if shard is None and finish_without_model(store, settings, scoring, log):
        _write_run_report(store, log=log)     # nothing to compute: no model loaded
        return 0
    log(f"loading {args.model} ...")
    model = _load_model(args.model, args, processor)
    try:
        run_study(model, task, store, settings, log=log, scoring=scoring, shard=shard)
    finally:   # a resumed or sharded run adds up
        _add_compute_time(out, time.time() - t0, shard, _placement(model))
    if all(store.done(s) for s in settings.steps):
        _write_run_report(store, header={"device": str(model.cfg.device)}, log=log)
    else:
        log(f"shard {shard.index}/{shard.count} done; the last shard to finish (or "
            f"`tl-vlm merge {out}`) writes the report")
    return 0


# -- merge and rescore ---------------------------------------------------------------------
def _scoring(args: argparse.Namespace):
    from tl_vlm.eval.tasks import Scoring

    return Scoring(args.vqa_normalise, args.cider, args.extract)


def _merge(args: argparse.Namespace) -> int:
    from tl_vlm.study.rundir import RunStore
    from tl_vlm.study.shards import merge_run

    out = Path(args.out)
    if (out / "table-run.json").exists():
        from tl_vlm.study.table import _merge_table

        _merge_table(out, _scoring(args), log=_log)
        return 0
    merge_run(out, _scoring(args), log=_log)
    store = RunStore(out, json.loads((out / "run.json").read_text()))
    _write_run_report(store, log=_log)
    return 0


def _rescore(args: argparse.Namespace) -> int:
    from tl_vlm.study.rundir import RunStore
    from tl_vlm.study.runner import finalize_step

    out = Path(args.out)
    if (out / "table-run.json").exists():
        from tl_vlm.study.table import _rescore_table

        _rescore_table(out, _scoring(args), log=_log)
        return 0
    if not (out / "run.json").exists():
        raise CLIError(f"{out} holds no run.json: expected a tl-vlm run directory")
    store = RunStore(out, json.loads((out / "run.json").read_text()))
    steps = [s for s in ("accuracy", "progressive") if store.done(s)
             and store.load(s).get("skipped") is not True]
    if not steps:
        raise CLIError(f"{out} has no finished accuracy or progressive step to rescore")
    for step in steps:
        finalize_step(store, step, _scoring(args))
        _log(f"[{step}] rescored")
    _write_run_report(store, log=_log)
    return 0


# -- entry point -------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
        _log(f"\ntl-vlm: interrupted. Finished batches are saved{f' in {out}' if out else ''}; "
             f"run the same command again to resume.")
        return 130
    except Exception as err:
        if getattr(args, "debug", False) or not _is_user_error(err):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        hint = "" if isinstance(err, CLIError) else " (--debug shows the traceback)"
        _log(f"tl-vlm {args.command}: error: {message}{hint}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
