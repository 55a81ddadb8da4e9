"""``tl-vlm table``: the paper's Table 1 (models x tasks x knockout conditions).

Each (model, task) cell is an ordinary run directory (:func:`tl_vlm.study.table.cell_dir`)
holding the accuracy step only. A cell that is finished is skipped, and a model is
loaded only when one of its cells has work left, so a rerun after a kill redoes nothing
finished. :mod:`tl_vlm.study.table` computes and writes the table itself; ``tl-vlm merge``
and ``tl-vlm rescore`` on a table directory call :func:`merge_table` and
:func:`rescore_table`.

Example:
    >>> from tl_vlm.cli.commands import main
    >>> main(["table", "--models", "toy_gated", "--tasks", "toy"])
    2
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any, Callable

from tl_vlm.cli.options import (CLIError, Formatter, add_model_arguments, add_run_arguments,
                                add_scoring_arguments, add_task_arguments, check_data_path,
                                check_device, check_model_name, check_model_reachable,
                                check_out_dir, check_placement_flags, log, name_list,
                                study_config_from)
from tl_vlm.core.names import CONDITIONS as CONDITION_CHOICES
from tl_vlm.core.names import TOY_MODELS
from tl_vlm.study.rundir import RunStore, dumps, write_atomic
from tl_vlm.study.table import TABLE_REQUEST, TABLE_TASKS, cell_dir, parse_data, write_table


def add_parser(sub) -> None:
    """Add ``table`` to ``tl-vlm``'s sub-commands.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_parser(p.add_subparsers())
        >>> args = p.parse_args(["table", "--models", "toy-gated", "--tasks", "toy"])
        >>> args.models, args.tasks, args.conditions[:2]
        (('toy-gated',), ('toy',), ('none', 'gate'))
    """
    from tl_vlm.eval.taskset import TASK_NAMES

    p = sub.add_parser(
        "table", formatter_class=Formatter,
        help="the paper's table: task scores of several models under each knockout",
        description="Run the models x tasks x conditions matrix (the accuracy step of each "
                    "cell), skipping finished cells, and write OUT/table.json, table.md and "
                    "index.html next to the paper's published numbers.",
        epilog="example:\n  tl-vlm table --models facebook/chameleon-7b,"
               "mistral-community/pixtral-12b --tasks vqav2,flickr30k,coco,imagenet \\\n"
               "      --conditions none,gate,img_to_text,random --dtype bfloat16 --device cuda "
               "--out runs/table")
    p.add_argument("--models", type=name_list(what="model"), required=True,
                   help="comma-separated model names (toy models, local checkpoints, hub ids)")
    p.add_argument("--tasks", type=name_list(TASK_NAMES, "task"), default=TABLE_TASKS,
                   help="comma-separated tasks")
    p.add_argument("--conditions", type=name_list(CONDITION_CHOICES, "condition"),
                   default=CONDITION_CHOICES, help="knockout conditions")
    p.add_argument("--data", default=None,
                   help="local copies of the datasets: task=PATH,task=PATH (a directory "
                        "<dir>/data/<split>-*.parquet, a parquet file or a glob)")
    p.add_argument("--out", default="tl-vlm-table", help="output directory (resumable)")
    add_task_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="the toy task's held-out set")
    add_model_arguments(p)
    add_scoring_arguments(p)
    add_run_arguments(p)
    p.set_defaults(run=run_table)


def _cell_status(store: RunStore, settings, scoring) -> str:
    """``"done"``, ``"rescore"`` (no model needed) or ``"run"``."""
    from tl_vlm.study.runner import STEP_CLASSES

    if not store.done("accuracy"):
        return "run"
    saved = store.load("accuracy")
    asked = set(settings.conditions) - set(saved.get("skipped", {}))
    if not asked <= set(saved["conditions"]):
        return "run"
    return "done" if STEP_CLASSES["accuracy"].satisfied(saved, settings, scoring) else "rescore"


def validate_table(args: argparse.Namespace) -> dict[str, str]:
    """Every check of ``tl-vlm table`` that needs no model; returns ``--data`` by task.

    Example:
        >>> args = argparse.Namespace(models=("toy-gated",), tasks=("vqav2",),
        ...                           data="vqav2=/no/such/dir", prompt_style=None)
        >>> validate_table(args)
        Traceback (most recent call last):
        ...
        tl_vlm.cli.options.CLIError: --data /no/such/dir: no such directory, file or files; expected a directory laid out as <dir>/data/<split>-*.parquet, a parquet file or a glob of them
    """
    from tl_vlm.eval.taskset import DATASET_TASKS

    for model in args.models:
        check_model_name(model)
    try:
        data = parse_data(args.data, args.tasks)
    except ValueError as err:
        raise CLIError(str(err)) from None
    for task, path in data.items():
        if task not in DATASET_TASKS:
            raise CLIError(f"--data {task}=...: the {task} task has its own data")
        check_data_path(path)
    toy_only = [m for m in args.models if m not in TOY_MODELS]
    if "toy" in args.tasks and toy_only:
        raise CLIError(f"the toy task is for the toy models; {toy_only} cannot read its "
                       f"token images")
    if args.prompt_style == "chat":
        raise CLIError("--prompt-style chat: run `tl-vlm narrow-gate` per model (each "
                       "checkpoint's chat template is checked there)")
    check_placement_flags(args)
    check_device(args.device, args.n_devices)
    for model in args.models:
        check_model_reachable(model)
    check_out_dir(args.out)
    return data


def run_table(args: argparse.Namespace) -> int:
    """Run ``tl-vlm table`` (the parsed ``args``); returns the exit status.

    Example:
        >>> import tempfile
        >>> from tl_vlm.cli.commands import build_parser
        >>> tmp = tempfile.TemporaryDirectory()
        >>> args = build_parser().parse_args(["table", "--models", "toy-gated", "--tasks", "toy",
        ...                                   "--conditions", "none", "--n-examples", "8",
        ...                                   "--out", tmp.name])
        >>> run_table(args), (Path(tmp.name) / "table.md").exists()
        (0, True)
        >>> tmp.cleanup()
    """
    data = validate_table(args)        # before anything heavy is imported or loaded
    from tl_vlm.study.job import prepare_run
    from tl_vlm.study.runner import finalize_step, run_study

    # One StudyConfig for the whole table; each cell is it with its model, task and folder.
    config = study_config_from(argparse.Namespace(**{**vars(args), "model": args.models[0]}))
    shard, scoring = config.shard, config.scoring
    out = Path(args.out)
    write_atomic(out / TABLE_REQUEST, dumps({"models": list(args.models),
                                                "tasks": list(args.tasks),
                                                "conditions": list(args.conditions)}))
    for model_name in args.models:
        pending = []
        for task_name in args.tasks:
            cell = config.with_cell(model_name, task_name, data.get(task_name),
                                    str(cell_dir(out, model_name, task_name)), ("accuracy",))
            task, settings, store = prepare_run(cell, log)
            status = _cell_status(store, settings, scoring)
            if status == "done":
                log(f"[{model_name} / {task_name}] finished: kept")
            elif status == "rescore":
                finalize_step(store, "accuracy", scoring)
                log(f"[{model_name} / {task_name}] rescored")
            else:
                pending.append((task_name, task, settings, store))
        if not pending:
            continue
        log(f"loading {model_name} ...")
        model = config.placement.load(model_name)
        for task_name, task, settings, store in pending:
            log(f"[{model_name} / {task_name}]")
            run_study(model, task, store, settings, log=log, scoring=scoring, shard=shard)
        del model
        _free_memory()
    write_table(out, args.models, args.tasks, args.conditions, log=log)
    return 0


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _table_request(out) -> dict[str, Any]:
    path = Path(out) / TABLE_REQUEST
    return json.loads(path.read_text())


def merge_table(out, scoring=None, log: Callable[[str], None] = print) -> Path:
    """``tl-vlm merge`` for a table: merge each cell's shards, then write the table.

    Example:
        >>> merge_table("/no/such/table")
        Traceback (most recent call last):
        ...
        FileNotFoundError: [Errno 2] No such file or directory: '/no/such/table/table-run.json'
    """
    from tl_vlm.study.shards import merge_run

    request = _table_request(out)
    for model in request["models"]:
        for task in request["tasks"]:
            log(f"[{model} / {task}]")
            merge_run(cell_dir(out, model, task), scoring, log=log)
    return write_table(out, request["models"], request["tasks"], request["conditions"], log)


def rescore_table(out, scoring, log: Callable[[str], None] = print) -> Path:
    """``tl-vlm rescore`` for a table: score every finished cell again (no model).

    Example (a table with no finished cell yet: the paper's numbers and dashes):
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> write_atomic(Path(tmp.name) / TABLE_REQUEST, dumps(
        ...     {"models": ["toy-gated"], "tasks": ["toy"], "conditions": ["none"]}))
        >>> rescore_table(tmp.name, None, log=lambda m: None).name
        'index.html'
        >>> tmp.cleanup()
    """
    from tl_vlm.study.runner import finalize_step

    request = _table_request(out)
    for model in request["models"]:
        for task in request["tasks"]:
            path = cell_dir(out, model, task)
            if (path / RunStore.STEPS / "accuracy.json").exists():
                store = RunStore.open(path)
                finalize_step(store, "accuracy", scoring)
                log(f"[{model} / {task}] rescored")
    return write_table(out, request["models"], request["tasks"], request["conditions"], log)
