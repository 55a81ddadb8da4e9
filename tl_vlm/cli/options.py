"""What the ``tl-vlm`` commands share before they run: option groups, argument types, checks.

Every check here runs before a model is loaded (layer ranges against the checkpoint's
config, read without its weights), and this module imports no torch at module level:
a typo fails in a moment. A user error is a :class:`CLIError`, printed as one line.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(formatter_class=Formatter)
    >>> add_task_arguments(p)
    >>> p.parse_args(["--batch-size", "8"]).batch_size
    8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tl_vlm.core.names import TASK_NAMES, TOY_MODELS, is_toy_model, toy_model_path


class CLIError(Exception):
    """A user error: printed as one line, no traceback.

    Example:
        >>> check_model_name("toy_gated")
        Traceback (most recent call last):
        ...
        tl_vlm.cli.options.CLIError: no model 'toy_gated': did you mean the shipped toy model 'toy-gated'?
    """


def log(message: str) -> None:
    """Print a progress line on stderr (stdout is kept for results).

    Example:
        >>> log("loading toy-gated ...")
    """
    print(message, file=sys.stderr, flush=True)


# -- argument types ------------------------------------------------------------------
def device_map(text: str):
    """``auto``/``balanced``/``balanced_low_0``/``sequential``, or a JSON file of a map.

    Example:
        >>> device_map("auto")
        'auto'
        >>> device_map("map.json")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected auto, balanced, balanced_low_0, sequential or a JSON file holding {module path: device}, got 'map.json' (no such file)
    """
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


def max_memory(text: str) -> dict:
    """``'0=70GiB,1=70GiB,cpu=100GiB'`` -> ``{0: '70GiB', 1: '70GiB', 'cpu': '100GiB'}``.

    Example:
        >>> max_memory("0=70GiB,cpu=100GiB")
        {0: '70GiB', 'cpu': '100GiB'}
    """
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


def positive_int(text: str) -> int:
    """An int >= 1 (argparse type).

    Example:
        >>> positive_int("3")
        3
        >>> positive_int("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be at least 1, got 0
    """
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """An int >= 0 (argparse type).

    Example:
        >>> non_negative_int("0")
        0
    """
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


def name_list(choices: Optional[Sequence[str]] = None, what: str = "name") -> Callable:
    """A comma-separated list, each item among ``choices`` (argparse type).

    Example:
        >>> name_list(("none", "gate"), "condition")("gate,none,gate")
        ('gate', 'none')
        >>> name_list(("none", "gate"), "condition")("eoi")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: unknown condition ['eoi']; choose from none, gate
    """
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


def shard_spec(text: str):
    """``--shard``: ``K/N`` as a :class:`~tl_vlm.study.shards.Shard`, or ``"auto"`` (resolved
    from the environment by :func:`resolve_shard` once the command runs).

    Example:
        >>> shard_spec("1/4").name, shard_spec("auto")
        ('1-of-4', 'auto')
    """
    from tl_vlm.study.shards import Shard

    if text == "auto":
        return text   # resolved from the environment once the command runs
    try:
        return Shard.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--shard {text}: ")) from None


# -- option groups ---------------------------------------------------------------------
class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; a default shown once, only where it says something.

    Example:
        >>> p = argparse.ArgumentParser(prog="x", formatter_class=Formatter)
        >>> _ = p.add_argument("--n", type=int, default=3, help="how many")
        >>> "how many (default: 3)" in p.format_help()
        True
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            default = (",".join(map(str, action.default))
                       if isinstance(action.default, (tuple, list)) else action.default)
            text += f" (default: {default})"
        return text


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --n-devices (shared by the commands that load models).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_model_arguments(p)
        >>> p.parse_args(["--max-memory", "0=70GiB"]).max_memory
        {0: '70GiB'}
    """
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cpu; under torchrun: cuda:LOCAL_RANK "
                        "when CUDA is available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights and activations (the paper: bfloat16)")
    p.add_argument("--n-devices", type=positive_int, default=None,
                   help="split each model over this many GPUs (a block per rank under torchrun)")
    p.add_argument("--device-map", default=None, type=device_map,
                   help="split each model as accelerate does: auto, balanced, sequential, or a "
                        "JSON file {module path: device} ('cpu'/'disk' offload allowed, but not "
                        "mixed with GPUs)")
    p.add_argument("--max-memory", default=None, type=max_memory,
                   help="per-device budgets for --device-map/--n-devices, e.g. "
                        "'0=70GiB,1=70GiB'")
    p.add_argument("--offload-folder", default=None,
                   help="folder for layers a --device-map puts on 'disk'")


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --task, --data: what one model is run on (narrow-gate, find-gate).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_source_arguments(p)
        >>> p.parse_args([]).model
        'toy-gated'
    """
    p.add_argument("--model", default="toy-gated",
                   help=f"{' or '.join(TOY_MODELS)} (shipped), a local checkpoint or a hub id")
    p.add_argument("--task", default=None,
                   help=f"{', '.join(TASK_NAMES)}, or a JSONL file of {{image, question, "
                        f"answers}} lines (default: toy for the toy models)")
    p.add_argument("--data", default=None,
                   help="a local copy of the task's dataset: a directory laid out as "
                        "<dir>/data/<split>-*.parquet, a parquet file or a glob (default: "
                        "the hub)")


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """Data, prompt, batching and random-knockout flags of the dataset tasks.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_task_arguments(p)
        >>> args = p.parse_args([])
        >>> args.batch_size, args.random_k, args.vqa_mode
        (32, 10, 'zero-shot')
    """
    add_data_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="examples per batch; fixes padding and so the numerics: keep it when "
                        "resuming or sharding")
    p.add_argument("--random-k", type=positive_int, default=10,
                   help="image tokens knocked out per random draw")
    p.add_argument("--random-draws", type=positive_int, default=None,
                   help="random knockout draws (default: 5 for VQA and ImageNet, 3 for "
                        "captions and the toy task)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Which examples, where COCO's images are, the prompt templates.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_data_arguments(p)
        >>> p.parse_args(["--n-examples", "50", "--prompt-style", "clean"]).n_examples
        50
    """
    p.add_argument("--n-examples", type=positive_int, default=None,
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


def add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    """How recorded predictions are scored (no model needed to change them).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_scoring_arguments(p)
        >>> p.parse_args(["--cider", "ptb-approx"]).cider
        'ptb-approx'
    """
    p.add_argument("--vqa-normalise", default="always", choices=("always", "official"),
                   help="VQA answer normalisation: always (the paper) or as the official "
                        "script (only when the answers differ)")
    p.add_argument("--cider", default="raw", choices=("raw", "ptb-approx", "ptb"),
                   help="CIDEr tokenisation: raw whitespace tokens (the paper), ptb-approx "
                        "(pure Python PTB), ptb (Java; else ptb-approx)")
    p.add_argument("--extract", default="full", choices=("full", "first_line"),
                   help="which part of a generated answer is scored")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--shard, --fresh, --debug: how a resumable run is split and restarted.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_run_arguments(p)
        >>> p.parse_args(["--shard", "0/2"]).shard.count
        2
    """
    p.add_argument("--shard", type=shard_spec, default=None,
                   help="compute shard K of N (K/N, K from 0), or 'auto' from "
                        "SLURM_ARRAY_TASK_ID/COUNT or torchrun's RANK/WORLD_SIZE; merge "
                        "with `tl-vlm merge OUT` (the last shard to finish merges by itself)")
    p.add_argument("--fresh", action="store_true",
                   help="discard what OUT holds (a shard: only its own records) and start over")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def add_run_dir_command(sub, name: str, summary: str, description: str, out_help: str,
                        run: Callable[[argparse.Namespace], int]) -> None:
    """A command on a finished (or sharded) run directory: no model is loaded.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_run_dir_command(p.add_subparsers(), "show", "s", "d", "the run", run=print)
        >>> p.parse_args(["show", "runs/a"]).out
        'runs/a'
    """
    p = sub.add_parser(name, formatter_class=Formatter, help=summary, description=description)
    p.add_argument("out", help=out_help)
    add_scoring_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(run=run)


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


def _cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is installed (without importing torch: no driver, no CUDA)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists() \
        or sys.platform not in ("linux",)


def check_placement_flags(args: argparse.Namespace) -> None:
    """--device-map/--max-memory/--offload-folder against --device/--n-devices.

    Example:
        >>> check_placement_flags(argparse.Namespace(device="cpu", device_map="auto",
        ...                                          n_devices=None))
        Traceback (most recent call last):
        ...
        tl_vlm.cli.options.CLIError: --device and --device-map together: give one device, or a map that splits the model
    """
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


def check_device(device: Optional[str], n_devices: Optional[int]) -> None:
    """--device and --n-devices against the GPUs of this machine (torch only for CUDA).

    Example:
        >>> check_device("cpu", None)
        >>> check_device("gpu", None)
        Traceback (most recent call last):
        ...
        tl_vlm.cli.options.CLIError: --device 'gpu' is not a device; use cpu, cuda or cuda:N
    """
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


def check_model_name(model: str) -> None:
    """The checks of :func:`tl_vlm.core.loading.resolve_model_name` (no torch import), as
    a one-line CLI error: a toy name misspelt, a local path that does not exist.

    Example:
        >>> check_model_name("toy-gated")
        >>> check_model_name("toy-gatd")
        Traceback (most recent call last):
        ...
        tl_vlm.cli.options.CLIError: no model 'toy-gatd': did you mean the shipped toy model 'toy-gated'?
    """
    from tl_vlm.core.loading import resolve_model_name

    try:
        resolve_model_name(model)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None


def check_out_dir(out: Any, flag: str = "--out") -> Path:
    """The output directory: it may exist (a run resumes) but must not be a file.

    Example:
        >>> import tempfile
        >>> check_out_dir(tempfile.mkdtemp()).is_dir()
        True
        >>> check_out_dir(tempfile.mkstemp()[1])                    # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tl_vlm.cli.options.CLIError: --out ...: a file is in the way; give a directory (it is created, or resumed if it holds a run)
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {out}: a file is in the way; give a directory (it is created, "
                       f"or resumed if it holds a run)")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise CLIError(f"{flag} {out}: {parent} is a file, not a directory")
    return path


def check_model_reachable(model: str) -> None:
    """A hub id's model can be loaded from here: the hub answers (a probe of a few
    seconds) or the model is in the local cache; else a one-line CLI error, before any
    run directory is made. Toy models and local directories pass at once.

    Example:
        >>> check_model_reachable("toy-gated")
        >>> check_model_reachable("facebook/chameleon-7b")                 # doctest: +SKIP
        Traceback (most recent call last):
        ...
        tl_vlm.cli.options.CLIError: facebook/chameleon-7b: the Hugging Face hub cannot be reached (no network) and the model is not in the local cache; pass a local directory ...
    """
    from tl_vlm.core.loading import HubUnreachableError, check_hub_access, resolve_model_name

    path = resolve_model_name(model)
    if os.path.exists(path):
        return
    try:
        check_hub_access(path)
    except HubUnreachableError as err:
        raise CLIError(str(err)) from None


def resolve_shard(spec: Any):
    """``--shard`` as a :class:`~tl_vlm.study.shards.Shard` (``auto``: from the environment).

    torchrun's ``WORLD_SIZE`` is removed once read, so that the libraries loading the
    model do not set up distributed execution of their own (VLMEvalKit does the same).

    Example:
        >>> resolve_shard(None), resolve_shard(shard_spec("0/2")).name
        (None, '0-of-2')
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


def resolve_task(config):
    """Check --task, --data, --coco-root and --prompt-style of a
    :class:`~tl_vlm.study.config.StudyConfig`; returns it with the toy task and the task's
    default steps filled in (:meth:`~tl_vlm.study.config.StudyConfig.resolved`).

    Example:
        >>> from tl_vlm.study.config import StudyConfig
        >>> config = resolve_task(StudyConfig(model="toy-gated"))
        >>> config.source.task, config.steps[:2]
        ('toy', ('accuracy', 'progressive'))
    """
    from tl_vlm.study.config import StudyConfigError

    source = config.source
    if source.task is None and config.model not in TOY_MODELS:
        raise CLIError("--task is required for a model other than the toy models: one of "
                       f"{', '.join(TASK_NAMES[1:])}, or a JSONL file")
    try:
        config = config.resolved()
    except StudyConfigError as err:
        raise CLIError(str(err)) from None
    kind = config.task_kind
    if source.data is not None:
        if kind in ("toy", "jsonl"):
            raise CLIError(f"--data gives a local copy of a dataset task; the {kind} task "
                           f"has its own data")
        check_data_path(str(source.data))
    if source.coco_root is not None and not Path(source.coco_root).is_dir():
        raise CLIError(f"--coco-root {source.coco_root}: not a directory; expected the folder "
                       f"holding val2014/")
    if source.prompt_style is not None and kind == "toy":
        raise CLIError("--prompt-style applies to the dataset tasks; the toy task writes its "
                       "own prompts")
    return config


# -- option groups -> the typed configuration ------------------------------------------
def placement_from(args: argparse.Namespace):
    """The :class:`~tl_vlm.study.config.Placement` of :func:`add_model_arguments`' flags
    (checked first, so that a clash is named by its flags).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_model_arguments(p)
        >>> placement_from(p.parse_args(["--dtype", "bfloat16"])).dtype
        'bfloat16'
    """
    from tl_vlm.study.config import Placement

    check_placement_flags(args)
    return Placement(dtype=args.dtype, device=args.device, n_devices=args.n_devices,
                     device_map=getattr(args, "device_map", None),
                     max_memory=getattr(args, "max_memory", None),
                     offload_folder=getattr(args, "offload_folder", None))


def task_source_from(args: argparse.Namespace, task: Optional[str] = None,
                     data: Optional[str] = None):
    """The :class:`~tl_vlm.study.config.TaskSource` of :func:`add_source_arguments` and
    :func:`add_data_arguments` (``task``/``data`` for the commands that take several).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_source_arguments(p); add_data_arguments(p)
        >>> task_source_from(p.parse_args(["--task", "toy", "--n-examples", "8"])).n_examples
        8
    """
    from tl_vlm.study.config import TaskSource

    return TaskSource(task=task or getattr(args, "task", None),
                      data=data or getattr(args, "data", None), n_examples=args.n_examples,
                      seed=getattr(args, "seed", 0), coco_root=args.coco_root,
                      image_cache=args.image_cache, prompt_style=args.prompt_style,
                      vqa_mode=args.vqa_mode)


def scoring_from(args: argparse.Namespace):
    """The :class:`~tl_vlm.eval.scoring.Scoring` of :func:`add_scoring_arguments`' flags.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_scoring_arguments(p)
        >>> scoring_from(p.parse_args(["--cider", "ptb"])).cider
        'ptb'
    """
    from tl_vlm.eval.scoring import Scoring

    return Scoring(args.vqa_normalise, args.cider, args.extract)


def study_config_from(args: argparse.Namespace):
    """The :class:`~tl_vlm.study.config.StudyConfig` of ``tl-vlm narrow-gate``'s flags
    (``--shard auto`` read from the environment), not yet resolved.

    Example:
        >>> from tl_vlm.cli.commands import build_parser
        >>> args = build_parser().parse_args(["narrow-gate", "--n-examples", "8",
        ...                                   "--patch-layers", "0:4:2"])
        >>> config = study_config_from(args)
        >>> config.source.n_examples, config.patch_layers, config.steps
        (8, (0, 2), None)
    """
    from tl_vlm.study.config import StudyConfig

    steps = getattr(args, "steps", None)
    return StudyConfig(
        model=args.model, source=task_source_from(args), placement=placement_from(args),
        scoring=scoring_from(args), out=str(args.out),
        steps=None if steps is None else tuple(steps), conditions=tuple(args.conditions),
        batch_size=args.batch_size, random_k=args.random_k, random_draws=args.random_draws,
        patch_layers=getattr(args, "patch_layers", None),
        patch_streams=tuple(getattr(args, "patch_streams", ("resid_pre", "attn_in"))),
        n_pairs=getattr(args, "n_pairs", 128),
        geometry_layers=getattr(args, "geometry_layers", None),
        shard=resolve_shard(args.shard), fresh=args.fresh)


def check_data_path(path: str) -> None:
    """``--data``: an existing directory, file, or glob that matches.

    Example:
        >>> check_data_path("/no/such/dir")
        Traceback (most recent call last):
        ...
        tl_vlm.cli.options.CLIError: --data /no/such/dir: no such directory, file or files; expected a directory laid out as <dir>/data/<split>-*.parquet, a parquet file or a glob of them
    """
    import glob

    expanded = os.path.expanduser(path)
    if not (os.path.exists(expanded) or (glob.has_magic(expanded) and glob.glob(expanded))):
        raise CLIError(f"--data {path}: no such directory, file or files; expected a "
                       f"directory laid out as <dir>/data/<split>-*.parquet, a parquet file "
                       f"or a glob of them")


def check_chat_template(model: str, prompt_style: Optional[str]) -> Any:
    """With ``--prompt-style chat``: the processor, checked for a chat template now.

    Example:
        >>> check_chat_template("toy-gated", "paper") is None
        True
    """
    if prompt_style != "chat":
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(_checkpoint_dir(model) or model))
    if not getattr(processor, "chat_template", None):
        raise CLIError(f"--prompt-style chat needs the checkpoint's chat template, but "
                       f"{model}'s processor has none; use --prompt-style paper or clean")
    return processor
