"""The main job's tasks by name: the toy task, the paper's evaluation sets, a JSONL file.

:func:`load_task` turns ``"vqav2"``, ``"flickr30k"``, ``"coco"``, ``"imagenet"``,
``"imagenet_open"``, ``"steering"``, ``"toy"`` or the path of a JSONL file into a
:class:`~tl_vlm.eval.tasks.Task`
and a provenance record for the run directory. The paper's sets load through
:func:`tl_vlm.eval.data.load_rows`, from the hub or from a local copy (``data``: a
directory laid out as ``<dir>/data/<split>-*.parquet``, or a parquet file or glob) by
the same ``load_dataset`` call; images stay on disk until a batch needs them.

============= ============================ ============================================
name          task                         prompt, decoding, metric
============= ============================ ============================================
vqav2         :class:`GenerationTask`      VQA template, greedy 20 tokens, VQA accuracy
flickr30k     :class:`CaptionTask`         caption template, greedy 60 tokens, CIDEr-D
coco          :class:`CaptionTask`         same; images from URLs (``coco_root``/cache)
imagenet      :class:`NextTokenTask`       image + "This animal is a", closed set over the
                                           100 class names (merged first tokens), chi_out
imagenet_open :class:`OpenClassTask`       the same rows, greedy 5 tokens, correct when the
                                           continuation starts with one of the lemmas
steering      :class:`NextTokenTask`       the counterfactual set: root-label classes,
                                           patching pairs from sorted root labels
toy           :class:`NextTokenTask`       the toy models' task (held-out examples)
============= ============================ ============================================

Example:
    >>> task, source = load_task("toy", n=24)
    >>> type(task).__name__, len(task), source["task"]
    ('NextTokenTask', 24, 'toy')
    >>> load_task("gqa")
    Traceback (most recent call last):
    ...
    ValueError: unknown task 'gqa': choose from toy, vqav2, flickr30k, coco, imagenet, steering, imagenet_open, or give the path of a JSONL file

    The paper's VQAv2 questions on a host with hub access, or from a local copy:

    >>> task, source = load_task("vqav2")                                # doctest: +SKIP
    >>> task, source = load_task("vqav2", data="/data/vqav2", n=200)     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from tl_vlm.core.names import DEFAULT_STEPS, RANDOM_DRAWS, TASK_NAMES  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # torch comes with the tasks: importing this module stays light
    from tl_vlm.eval.tasks import Example, Task

DATASET_TASKS = TASK_NAMES[1:]


def task_kind(name: str) -> str:
    """``name`` itself for a registered task, ``"jsonl"`` for a JSONL file; an error
    that lists the choices otherwise (checked before anything is loaded).

    Example:
        >>> task_kind("coco")
        'coco'
        >>> task_kind("questions.jsonl")
        Traceback (most recent call last):
        ...
        FileNotFoundError: task file 'questions.jsonl' does not exist: expected a JSONL file of {image, question, answers} lines
    """
    if name in TASK_NAMES:
        return name
    if str(name).endswith(".jsonl"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"task file {name!r} does not exist: expected a JSONL file "
                                    f"of {{image, question, answers}} lines")
        return "jsonl"
    raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASK_NAMES)}, or give "
                     f"the path of a JSONL file")


def _selection(source, n_rows: int, n: Optional[int]) -> list[int]:
    """The paper's rows, or their first ``n``; a set smaller than the paper's (a local
    sample) is selected by the same rule with ``n`` rows."""
    from tl_vlm.eval.data import select_indices

    paper_n = source.n if source.n is not None else n_rows
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n_rows >= paper_n:
        indices = select_indices(source, n_rows)
        return indices if n is None else indices[:n]
    if n is None:
        raise ValueError(f"{source.name}: the loaded rows hold {n_rows} examples, fewer than "
                         f"the paper's {paper_n}; pass the number to use (--n-examples, at "
                         f"most {n_rows})")
    return select_indices(source, n_rows, n=n)


def load_task(name: str, data: Optional[Union[str, Path]] = None, n: Optional[int] = None, *,
              seed: int = 0, coco_root: Optional[Union[str, Path]] = None,
              image_cache: Optional[Union[str, Path]] = None, prompt_style: str = "paper",
              vqa_mode: str = "zero-shot") -> tuple["Task", dict[str, Any]]:
    """The task called ``name`` and a record of where its examples came from.

    Args:
        name: a name of :data:`TASK_NAMES` or the path of a JSONL file.
        data: a local copy of a dataset task's rows (directory, parquet file or glob);
            default: the hub source of :data:`tl_vlm.eval.data.SOURCES`.
        n: use the first ``n`` examples of the paper's selection (default: all of it).
        seed: the toy task's held-out set (ignored by the dataset tasks, whose selection
            is the paper's).
        coco_root, image_cache: where COCO images are found (see
            :class:`~tl_vlm.eval.data.ImageResolver`).
        prompt_style, vqa_mode: see :mod:`tl_vlm.eval.prompts`.

    Example:
        >>> import json, pathlib, tempfile
        >>> from PIL import Image
        >>> tmp = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(tmp / "a.png")
        >>> _ = (tmp / "q.jsonl").write_text(json.dumps(
        ...     {"image": "a.png", "question": "What colour?", "answers": ["black"]}))
        >>> task, source = load_task(str(tmp / "q.jsonl"))
        >>> task.name, task.prompt_kind, source["n_examples"]
        ('q', 'vqa', 1)
    """
    from tl_vlm.eval.tasks import GenerationTask, toy_task

    kind = task_kind(str(name))
    style = dict(prompt_style=prompt_style, vqa_mode=vqa_mode)
    if kind == "toy":
        task = toy_task(n=240 if n is None else n, seed=seed)
        return task, {"task": "toy", "seed": seed, "n_examples": len(task)}
    if kind == "jsonl":
        task = GenerationTask.from_jsonl(name, limit=n, **style)
        return task, {"task": "jsonl", "path": str(Path(name).resolve()),
                      "n_examples": len(task)}
    return _dataset_task(kind, data, n, coco_root, image_cache, style)


def _dataset_task(name: str, data, n, coco_root, image_cache, style) -> tuple["Task", dict]:
    from tl_vlm.eval.tasks import CaptionTask, GenerationTask, NextTokenTask, OpenClassTask
    from tl_vlm.eval.data import (SOURCES, ImageResolver, load_rows, row_ids, source_record,
                                 steering_pairs, to_examples)

    source = SOURCES[name]
    rows = load_rows(source.spec, None if data is None else str(data))
    source.check_columns(rows)
    indices = _selection(source, len(rows), n)
    ids = row_ids(rows, indices, source.id_column)
    record = {"task": name, **source_record(source.spec, rows, None if data is None else
                                            str(data), indices, ids),
              "n_examples": len(indices), "notes": source.notes}
    resolver = None
    if name == "coco":
        resolver = ImageResolver(coco_root=coco_root, cache_dir=image_cache)
        record["coco_root"] = None if coco_root is None else str(coco_root)
    examples = to_examples(source, rows, indices, resolver, lazy_images=True)
    if name == "vqav2":
        return GenerationTask(name, examples, max_new_tokens=20, **style), record
    if name in ("flickr30k", "coco"):
        return CaptionTask(name, examples, max_new_tokens=60, **style), record
    if name == "imagenet":
        return NextTokenTask(name, examples, prompt_kind="imagenet", on_collision="merge",
                             final_representation=True, **style), record
    if name == "imagenet_open":
        return OpenClassTask(name, examples, max_new_tokens=5, prompt_kind="imagenet",
                             **style), record
    # steering: the classes are the root labels; the model names one ("dog").
    examples = [replace(ex, answers=(root_label_name(ex.klass),), kind="steering")
                for ex in examples]
    pairs = steering_pairs([ex.klass for ex in examples])
    record["class_pairs"] = [list(p) for p in pairs]
    return NextTokenTask(name, examples, prompt_kind="imagenet", on_collision="merge",
                         class_pairs=tuple(pairs), **style), record


def root_label_name(root_label: str) -> str:
    """The word for a WordNet root label: ``"dog.n.01"`` -> ``"dog"``.

    Example:
        >>> root_label_name("domestic_cat.n.01"), root_label_name("fish")
        ('domestic cat', 'fish')
    """
    return root_label.split(".")[0].replace("_", " ").strip()


def prefetch_images(examples: list["Example"]) -> int:
    """Resolve every URL image of ``examples`` now (download into the cache if needed),
    so that a missing image fails before the model is loaded. Returns how many.

    Example:
        >>> from tl_vlm.eval.tasks import toy_task
        >>> prefetch_images(toy_task(4).examples)      # the toy task has no image files
        0
    """
    from tl_vlm.eval.data import UrlImage

    n = 0
    for ex in examples:
        for image in ex.images:
            if isinstance(image, UrlImage):
                image.resolve()
                n += 1
    return n
