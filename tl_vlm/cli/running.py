"""Run-time helpers of the ``tl-vlm`` commands: the task and run directory, the model, the report.

What runs once every flag has been checked (:mod:`tl_vlm.cli.options`): torch and the
data libraries are imported inside these functions, never when the module loads.

Example:
    >>> import argparse
    >>> rank_device(argparse.Namespace(device="cpu", n_devices=None))
    'cpu'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tl_vlm.cli.options import CLIError


def rank_device(args: argparse.Namespace) -> Optional[str]:
    """Under torchrun/accelerate with CUDA: this rank's GPU (``cuda:LOCAL_RANK``), or its
    block of ``--n-devices`` GPUs (made the only visible ones).

    Example:
        >>> rank_device(argparse.Namespace(device="cpu", n_devices=None))
        'cpu'
    """
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



def prepare_run(args: argparse.Namespace, model_name: str, task_name: str,
                data: Optional[str], out: Path, steps: Sequence[str], shard,
                log: Callable[[str], None]):
    """Load the task (data, before any model) and open the run directory.

    Example:
        >>> import tempfile
        >>> from tl_vlm.cli.options import (add_model_arguments, add_run_arguments,
        ...                                 add_task_arguments, log)
        >>> p = argparse.ArgumentParser()
        >>> add_task_arguments(p); add_model_arguments(p); add_run_arguments(p)
        >>> args = p.parse_args(["--n-examples", "8"])
        >>> args.conditions = ("none", "gate")
        >>> tmp = tempfile.TemporaryDirectory()
        >>> task, settings, store = prepare_run(args, "toy-gated", "toy", None, Path(tmp.name),
        ...                                     ("accuracy",), None, log)
        >>> len(task), settings.steps, (Path(tmp.name) / "source.json").exists()
        (8, ('accuracy',), True)
        >>> tmp.cleanup()
    """
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
    write_atomic(store.path(RunStore.SOURCE), dumps(source))
    owned = [ex for j, (_, chunk) in enumerate(task.batches(args.batch_size))
             if shard is None or shard.owns(j) for ex in chunk]
    if prefetch_images(owned):
        log(f"images of {len(owned)} examples found")
    return task, settings, store


def load_model(name: str, args: argparse.Namespace, processor: Any = None):
    """The model, placed as --device/--n-devices/--device-map say, in --dtype.

    Example:
        >>> model = load_model("toy-gated", argparse.Namespace(dtype="float32", device="cpu",
        ...                                                    n_devices=None))
        >>> model.cfg.n_layers
        4
    """
    import torch
    from transformers.utils import logging as hf_logging

    from tl_vlm.core.model import HookedVLM
    from tl_vlm.core.registration import ensure_registered

    ensure_registered()      # what ``from tl_vlm import HookedVLM`` does on first use
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()     # no carriage-return bars in a log file

    kwargs: dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    device = rank_device(args)
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


def scoring(args: argparse.Namespace):
    """The :class:`~tl_vlm.eval.tasks.Scoring` the scoring flags ask for.

    Example:
        >>> scoring(argparse.Namespace(vqa_normalise="official", cider="raw",
        ...                            extract="full")).vqa_normalise
        'official'
    """
    from tl_vlm.eval.tasks import Scoring

    return Scoring(args.vqa_normalise, args.cider, args.extract)


def _run_meta(store, settings) -> dict[str, Any]:
    """What heads the report and ``results.json`` (settings-level: equal for every run
    and merge of the same settings)."""
    from tl_vlm.study.settings import load_model_info
    from tl_vlm.study.shards import versions

    info = load_model_info(store)
    return {"model": settings["model"], "family": info["family"], "gate": info["gate"],
            "task": settings["task"], "examples": settings["n_examples"],
            "layers": info["layers"], "heads": info["heads"], "dtype": settings["dtype"],
            "prompts": settings["task_settings"].get("prompt_style"),
            "tl_vlm": versions()["tl_vlm"]}


def compute_seconds(out: Path) -> Optional[float]:
    """The compute time of every run, resume and shard that made ``out`` (None if unknown).

    Example:
        >>> compute_seconds(Path("/no/such/run")) is None
        True
    """
    path = out / "compute.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return round(sum(line["seconds"] for line in lines), 1)


def write_run_report(store, header: Optional[dict] = None, log=print) -> Optional[Path]:
    """``index.html`` + ``results.json`` of a run whose planned steps are all finished.
    The page also shows ``header`` and the total compute time (not ``results.json``:
    it must not depend on how the run was split or resumed).

    Example (a run of the accuracy step on the toy model):
        >>> import tempfile
        >>> from tl_vlm.study.runner import run_study
        >>> from tl_vlm.cli.options import (add_model_arguments, add_run_arguments,
        ...                                 add_task_arguments, log)
        >>> p = argparse.ArgumentParser()
        >>> add_task_arguments(p); add_model_arguments(p); add_run_arguments(p)
        >>> args = p.parse_args(["--n-examples", "8"])
        >>> args.conditions = ("none",)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> task, settings, store = prepare_run(args, "toy-gated", "toy", None, Path(tmp.name),
        ...                                     ("accuracy",), None, log)
        >>> _ = run_study(load_model("toy-gated", args), task, store, settings,
        ...               log=lambda m: None)
        >>> write_run_report(store, log=lambda m: None).name
        'index.html'
        >>> tmp.cleanup()
    """
    from tl_vlm.study.report import write_report
    from tl_vlm.study.runner import study_results

    header = dict(header or {})
    total = compute_seconds(store.out)
    if total is not None:
        header["compute_seconds"] = total
    results = study_results(store)
    path = write_report(results, store.out, _run_meta(store, store.settings), header=header)
    log(f"report: {path}")
    return path
