"""One typed configuration for the main job: what to run, on what, where, and how to score.

:class:`StudyConfig` is what ``tl-vlm narrow-gate`` builds from its flags (each option
group of :mod:`tl_vlm.cli.options` fills one part) and what
:func:`tl_vlm.study.job.run_main_job` runs; a notebook builds the same object and gets
the same run directory. Its parts are also used alone: :class:`Placement` (where and in
which dtype a model is loaded: ``find-gate``, ``table``) and :class:`TaskSource` (which
examples: every command that reads a task).

Every value is checked when the object is made (a ``ValueError`` naming the field, what
was expected and what was found), so a mistyped setting fails before any data or model
is loaded. Nothing here imports torch.

Example:
    >>> config = StudyConfig(model="toy-gated", source=TaskSource(n_examples=8),
    ...                      steps=("accuracy",), conditions=("none",), out="runs/toy")
    >>> resolved = config.resolved()             # the toy task and its steps filled in
    >>> resolved.source.task, resolved.steps, resolved.placement.dtype
    ('toy', ('accuracy',), 'float32')
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

from tl_vlm.core.names import CONDITIONS, STEPS, TOY_MODELS
from tl_vlm.eval.scoring import Scoring

DTYPES = ("float32", "bfloat16", "float16")
PATCH_STREAMS = ("resid_pre", "attn_in")
PROMPT_STYLES = ("paper", "clean", "chat")
VQA_MODES = ("zero-shot", "prompt")


class StudyConfigError(ValueError):
    """A setting of a :class:`StudyConfig` (or of one of its parts) that cannot run.

    Example:
        >>> Placement(dtype="fp32")
        Traceback (most recent call last):
        ...
        tl_vlm.study.config.StudyConfigError: dtype must be one of ('float32', 'bfloat16', 'float16'), got 'fp32'
    """


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise StudyConfigError(f"{name} must be one of {allowed}, got {value!r}")


def _names_in(name: str, values: Any, allowed: tuple) -> None:
    if isinstance(values, str) or not all(v in allowed for v in values):
        raise StudyConfigError(f"{name} must be a tuple of names from {allowed}, got {values!r}")


def _positive(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StudyConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def _layers(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise StudyConfigError(f"{name} must be None (every layer) or a tuple of layer "
                               f"indices >= 0, got {value!r}")


@dataclass(frozen=True)
class Placement:
    """Where a model is loaded and in which dtype (``--dtype``, ``--device``,
    ``--n-devices``, ``--device-map``, ``--max-memory``, ``--offload-folder``).

    Attributes:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None: cpu, or under torchrun
            with CUDA this rank's GPU.
        n_devices: split the model over this many GPUs (a block per rank under torchrun).
        device_map: as accelerate's (``"auto"``, ``"balanced"``, ... or a dict).
        max_memory: per-device budgets for a split model (``{0: "70GiB"}``).
        offload_folder: where a device map's ``"disk"`` layers go.

    Example:
        >>> Placement(device="cpu").load("toy-gated").cfg.n_layers
        4
        >>> Placement(device="cpu", device_map="auto")
        Traceback (most recent call last):
        ...
        tl_vlm.study.config.StudyConfigError: device and device_map together: give one device, or a map that splits the model
    """

    dtype: str = "float32"
    device: Optional[str] = None
    n_devices: Optional[int] = None
    device_map: Any = None
    max_memory: Optional[dict] = None
    offload_folder: Optional[str] = None

    def __post_init__(self) -> None:
        _one_of("dtype", self.dtype, DTYPES)
        _positive("n_devices", self.n_devices, optional=True)
        if self.device_map is not None and self.device is not None:
            raise StudyConfigError("device and device_map together: give one device, or a "
                                   "map that splits the model")
        if self.device_map is not None and (self.n_devices or 0) > 1:
            raise StudyConfigError("device_map and n_devices together: n_devices=N means "
                                   "device_map='balanced' over cuda:0..N-1; give one of them")
        split = self.device_map is not None or (self.n_devices or 0) > 1
        for name in ("max_memory", "offload_folder"):
            if getattr(self, name) is not None and not split:
                raise StudyConfigError(f"{name} only applies to a split model: add "
                                       f"device_map='auto' (or n_devices=N)")

    def rank_device(self) -> Optional[str]:
        """The device to load on: ``device``, or under torchrun/accelerate with CUDA this
        rank's GPU (``cuda:LOCAL_RANK``), or its block of ``n_devices`` GPUs (made the only
        visible ones; None is returned then).

        Example:
            >>> Placement(device="cpu").rank_device()
            'cpu'
        """
        import torch

        local = os.environ.get("LOCAL_RANK")
        if self.device is not None or local is None or not torch.cuda.is_available():
            return self.device
        if self.n_devices and self.n_devices > 1:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = (visible.split(",") if visible
                   else [str(i) for i in range(torch.cuda.device_count())])
            first = int(local) * self.n_devices
            block = ids[first:first + self.n_devices]
            if len(block) < self.n_devices:
                raise StudyConfigError(
                    f"rank {local} needs GPUs {first}..{first + self.n_devices - 1} "
                    f"(n_devices={self.n_devices}) but only {len(ids)} are visible")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(block)
            return None
        return f"cuda:{local}"

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`HookedVLM.from_pretrained` for this placement.

        Example:
            >>> Placement(dtype="bfloat16", device="cpu").load_kwargs()
            {'dtype': torch.bfloat16, 'device': 'cpu'}
        """
        import torch

        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        device = self.rank_device()
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        elif self.n_devices and self.n_devices > 1:
            kwargs["n_devices"] = self.n_devices
        else:
            kwargs["device"] = device
        for name in ("max_memory", "offload_folder"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs

    def load(self, model_name: str, processor: Any = None):
        """The :class:`~tl_vlm.core.model.HookedVLM` of ``model_name``, placed so. Progress
        bars are off when stderr is not a terminal (no carriage-return bars in a log file).

        Example:
            >>> Placement(device="cpu").load("toy-gated").family.name
            'chameleon'
        """
        import sys

        from transformers.utils import logging as hf_logging

        from tl_vlm.core.model import HookedVLM
        from tl_vlm.core.registration import ensure_registered

        ensure_registered()
        if not sys.stderr.isatty():
            hf_logging.disable_progress_bar()
        kwargs = self.load_kwargs()
        if processor is not None:
            kwargs["processor"] = processor
        return HookedVLM.from_pretrained(model_name, **kwargs)


@dataclass(frozen=True)
class TaskSource:
    """Which examples a command runs on (``--task``, ``--data``, ``--n-examples``, ...).

    Attributes:
        task: ``"toy"``, a dataset task (``"vqav2"``, ``"coco"``, ...) or a JSONL file;
            None: the toy task for the toy models (:meth:`StudyConfig.resolved`).
        data: a local copy of a dataset task's data (a directory, parquet file or glob).
        n_examples: the first N of the task's selection (None: all of it; toy: 240).
        seed: the toy task's held-out set; the study's patching pairs and token draws.
        coco_root, image_cache: where COCO's images are, where downloaded ones are kept.
        prompt_style: ``"paper"`` (None means it), ``"clean"`` or ``"chat"``.
        vqa_mode: ``"zero-shot"`` or ``"prompt"``.

    Example:
        >>> task, source = TaskSource("toy", n_examples=4).load()
        >>> len(task), source["task"]
        (4, 'toy')
    """

    task: Optional[str] = None
    data: Optional[str] = None
    n_examples: Optional[int] = None
    seed: int = 0
    coco_root: Optional[str] = None
    image_cache: Optional[str] = None
    prompt_style: Optional[str] = None
    vqa_mode: str = "zero-shot"

    def __post_init__(self) -> None:
        _positive("n_examples", self.n_examples, optional=True)
        if self.prompt_style is not None:
            _one_of("prompt_style", self.prompt_style, PROMPT_STYLES)
        _one_of("vqa_mode", self.vqa_mode, VQA_MODES)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StudyConfigError(f"seed must be a whole number, got {self.seed!r}")

    def load(self):
        """``(task, source)``: the :class:`~tl_vlm.eval.tasks.Task` and where its examples
        came from (:func:`tl_vlm.eval.taskset.load_task`)."""
        from tl_vlm.eval.taskset import load_task

        if self.task is None:
            raise StudyConfigError("task is not set: name a task (toy, vqav2, ...) or a JSONL "
                                   "file, or call StudyConfig.resolved() for the toy default")
        return load_task(self.task, data=self.data, n=self.n_examples, seed=self.seed,
                         coco_root=self.coco_root, image_cache=self.image_cache,
                         prompt_style=self.prompt_style or "paper", vqa_mode=self.vqa_mode)


@dataclass(frozen=True)
class StudyConfig:
    """The main job (``tl-vlm narrow-gate``): every setting, typed and checked.

    Attributes:
        model: a shipped toy model's name, a local checkpoint or a hub id.
        source: the examples (:class:`TaskSource`).
        placement: where the model runs (:class:`Placement`).
        scoring: how predictions are scored (:class:`~tl_vlm.eval.tasks.Scoring`).
        out: the run directory (resumable).
        steps: the steps to run (None: the task's default steps, :meth:`resolved`).
        conditions: the accuracy step's knockout conditions.
        batch_size: examples per batch; fixes padding and so the numerics.
        random_k, random_draws: the random knockout (``random_draws`` None: the task's
            default, 5 for VQA and ImageNet, 3 otherwise).
        patch_layers, patch_streams, n_pairs: the patching sweep (layers None: all).
        geometry_layers: residual layers kept for separation and overlap (None: all).
        shard: a :class:`~tl_vlm.study.shards.Shard` (compute its chunks only) or None.
        fresh: discard what ``out`` holds (a shard: only its own records).

    Example:
        >>> StudyConfig(batch_size=0)
        Traceback (most recent call last):
        ...
        tl_vlm.study.config.StudyConfigError: batch_size must be a whole number >= 1, got 0
        >>> StudyConfig(steps=("accuracy", "speed"))   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tl_vlm.study.config.StudyConfigError: steps must be a tuple of names from ('accuracy', ...), got ('accuracy', 'speed')
    """

    model: str = "toy-gated"
    source: TaskSource = field(default_factory=TaskSource)
    placement: Placement = field(default_factory=Placement)
    scoring: Scoring = field(default_factory=Scoring)
    out: str = "narrow-gate-report"
    steps: Optional[tuple[str, ...]] = None
    conditions: tuple[str, ...] = CONDITIONS
    batch_size: int = 32
    random_k: int = 10
    random_draws: Optional[int] = None
    patch_layers: Optional[tuple[int, ...]] = None
    patch_streams: tuple[str, ...] = PATCH_STREAMS
    n_pairs: int = 128
    geometry_layers: Optional[tuple[int, ...]] = None
    shard: Any = None
    fresh: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise StudyConfigError(f"model must be a model name or path, got {self.model!r}")
        for name, kind in (("source", TaskSource), ("placement", Placement),
                           ("scoring", Scoring)):
            if not isinstance(getattr(self, name), kind):
                raise StudyConfigError(f"{name} must be a {kind.__name__}, got "
                                       f"{type(getattr(self, name)).__name__}")
        if self.steps is not None:
            _names_in("steps", self.steps, STEPS)
        _names_in("conditions", self.conditions, CONDITIONS)
        _names_in("patch_streams", self.patch_streams, PATCH_STREAMS)
        for name in ("batch_size", "random_k", "n_pairs"):
            _positive(name, getattr(self, name))
        _positive("random_draws", self.random_draws, optional=True)
        _layers("patch_layers", self.patch_layers)
        _layers("geometry_layers", self.geometry_layers)

    @property
    def task_kind(self) -> str:
        """``"toy"``, ``"vqa"``, ``"caption"``, ``"imagenet"`` or ``"jsonl"``."""
        from tl_vlm.eval.taskset import task_kind

        return task_kind(self.resolved().source.task)

    def resolved(self) -> "StudyConfig":
        """This config with the defaults that depend on other settings filled in: the toy
        task for a toy model without a task, the task's default steps.

        Example:
            >>> StudyConfig(model="facebook/chameleon-7b").resolved()
            Traceback (most recent call last):
            ...
            tl_vlm.study.config.StudyConfigError: task is required for a model other than the toy models: one of vqav2, flickr30k, coco, imagenet, steering, imagenet_open, or a JSONL file
        """
        from tl_vlm.core.names import TASK_NAMES
        from tl_vlm.eval.taskset import DEFAULT_STEPS, task_kind

        task = self.source.task or ("toy" if self.model in TOY_MODELS else None)
        if task is None:
            raise StudyConfigError("task is required for a model other than the toy models: "
                                   f"one of {', '.join(TASK_NAMES[1:])}, or a JSONL file")
        try:
            kind = task_kind(task)
        except (ValueError, FileNotFoundError) as err:
            raise StudyConfigError(str(err)) from None
        return replace(self, source=replace(self.source, task=task),
                       steps=self.steps or DEFAULT_STEPS[kind])

    def with_cell(self, model: str, task: str, data: Optional[str], out: str,
                  steps: tuple[str, ...]) -> "StudyConfig":
        """The same settings for another model, task and run directory (one cell of
        ``tl-vlm table``).

        Example:
            >>> StudyConfig().with_cell("toy-plain", "toy", None, "t/cell", ("accuracy",)).out
            't/cell'
        """
        return replace(self, model=model, source=replace(self.source, task=task, data=data),
                       out=out, steps=steps)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain JSON-ready values (the shard as ``"K/N"``).

        Example:
            >>> StudyConfig().to_dict()["placement"]["dtype"]
            'float32'
        """
        from tl_vlm.core.jsonable import jsonable

        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "shard":
                value = None if value is None else f"{value.index}/{value.count}"
            elif hasattr(value, "__dataclass_fields__"):
                value = {g.name: jsonable(getattr(value, g.name)) for g in fields(value)}
            out[f.name] = jsonable(value)
        return out


ConfigPart = Union[StudyConfig, Placement, TaskSource]
