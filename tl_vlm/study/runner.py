"""The Narrow Gate study as one resumable, shardable run: the main job behind
``tl-vlm narrow-gate``.

Steps (each recorded chunk by chunk, then computed from its records; see
:class:`~tl_vlm.study.rundir.RunStore`):

- ``accuracy``: the task's predictions without knockout, with the gate knocked out,
  with img->text knocked out, and with ``random_k`` random image tokens knocked out
  (``random_draws`` draws: mean and spread); paper semantics (post-softmax zero), all
  layers. Predictions are recorded, scores computed at the end (re-scoring, e.g. another
  CIDEr tokenisation, needs no model: :func:`finalize_step`).
- ``progressive``: gate knockout in the last w layers only.
- ``contribution``: cross-modal attention contribution per layer and key group
  (per-chunk float64 totals, folded in chunk order).
- ``separation``: modality separation (|cos|, cluster homogeneity, intrinsic dimension).
- ``overlap``: neighbourhood overlap of gate / last-image / mean-image representations
  with the class labels.
- ``patching``: steering by patching the gate from an image of another class.

Work is cut into chunks: the batches of ``task.batches(batch_size)`` (patching: batches
of the global pair list). A shard ``K/N`` computes the chunks ``j`` with ``j % N == K``
and keeps its records under ``shards/K-of-N/``; :mod:`tl_vlm.study.shards` merges them. A
step's result is always computed from the sorted records of every chunk, in an
unsharded run as in a merge, so the two are equal to the byte.

Example:
    >>> import tempfile
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.eval.tasks import toy_task
    >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
    >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12,
    ...                          steps=("accuracy", "contribution"))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = RunStore(tmp.name, settings.run_settings())
    >>> results = run_study(model, task, store, settings)
    [accuracy] running
    [contribution] running
    >>> sorted(results), results["accuracy"]["conditions"]["none"]["mean"]
    (['accuracy', 'contribution'], 1.0)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from tl_vlm import analyses as A
from tl_vlm.core.progress import progress
from tl_vlm.study.rundir import RunStore, dumps, write_atomic
from tl_vlm.eval.tasks import (CaptionTask, Example, GenerationTask, NextTokenTask, OpenClassTask,
                          Predictions, Scoring, Task, overlap_k)

from tl_vlm.core.names import CONDITIONS, STEPS  # noqa: F401  (re-exported)

TASK_CLASSES = {cls.__name__: cls for cls in (NextTokenTask, GenerationTask, CaptionTask,
                                              OpenClassTask)}


@dataclass
class StudySettings:
    """What the study runs; saved with the run so a resume uses the same settings.

    Attributes:
        model, task: the model and task names (``task``: ``"toy"``, ``"vqav2"``, ...).
        n_examples: examples in the task.
        batch_size: examples per chunk (fixes padding, and so the numerics).
        seed: patching pairs and the separation step's token draws.
        random_k, random_draws: the random knockout: image tokens per draw, draws.
        steps: the steps to run (not a setting of the results: a rerun may add steps).
        conditions: the accuracy step's knockout conditions (a rerun may add some).
        patch_layers: layers of the patching sweep (None: every layer).
        patch_streams: ``"resid_pre"`` and/or ``"attn_in"``.
        n_pairs: patching pairs.
        geometry_layers: residual layers kept for separation and overlap (None: all).
        dtype: the model's dtype.
        task_settings: what else fixes the task's predictions (prompts, decoding).
        selection_hash: sha1 of the examples' ids, in order.

    Example:
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, patch_layers=(0, 2))
        >>> d = settings.run_settings()                 # JSON-ready: tuples become lists
        >>> d["patch_layers"], d["batch_size"], "steps" in d, "conditions" in d
        ([0, 2], 16, False, False)
    """

    model: str
    task: str
    n_examples: int
    batch_size: int = 16
    seed: int = 0
    random_k: int = 10
    random_draws: int = 3
    steps: tuple[str, ...] = STEPS
    conditions: tuple[str, ...] = CONDITIONS
    patch_layers: Optional[tuple[int, ...]] = None   # None: every layer
    patch_streams: tuple[str, ...] = ("resid_pre", "attn_in")
    n_pairs: int = 128
    geometry_layers: Optional[tuple[int, ...]] = None
    dtype: str = "float32"
    task_settings: dict[str, Any] = field(default_factory=dict)
    selection_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def run_settings(self) -> dict[str, Any]:
        """The settings that fix the results (``run.json``): all but the steps and
        conditions asked for this time."""
        return {k: v for k, v in self.to_dict().items() if k not in ("steps", "conditions")}

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_examples / self.batch_size)


def model_info(model, task: Task) -> dict[str, Any]:
    """What the results and the report need to know about the model (no weights).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model_info(HookedVLM.from_pretrained("toy-gated"), toy_task(4))["has_gate"]
        True
    """
    probe = task.prepare(model, task.examples[:1])
    return {"family": model.family.name, "gate": model.layout.gate_description,
            "has_gate": not probe.positions.gate.is_empty(), "layers": model.cfg.n_layers,
            "heads": model.cfg.n_heads}


def _examples_text(examples: Sequence[Example]) -> str:
    """``examples.jsonl``: what scoring needs of each example, one line each."""
    import json

    return "".join(json.dumps(ex.to_record()) + "\n" for ex in examples)


def load_examples(store: RunStore) -> list[Example]:
    """The examples of a run directory (without images), for scoring without a model.

    Example:
        >>> import tempfile
        >>> from tl_vlm.eval.tasks import toy_task
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, {})
        >>> store.write_once("examples.jsonl", _examples_text(toy_task(3).examples), "examples")
        >>> [(ex.id, ex.answers) for ex in load_examples(store)]
        [(0, ('red',)), (1, ('square',)), (2, ('top-left',))]
        >>> tmp.cleanup()
    """
    import json

    path = store.out / "examples.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {store.out} a tl-vlm run directory?")
    return [Example.from_record(json.loads(line)) for line in path.read_text().splitlines()]


def _scoring_task(settings: dict[str, Any], examples: list[Example]) -> Task:
    """A task that can score the run's predictions (its kind, its examples; no data)."""
    kind = settings["task_settings"].get("kind", "NextTokenTask")
    return TASK_CLASSES[kind](settings["task"], examples)


# -- steps --------------------------------------------------------------------------
@dataclass
class Plan:
    """A step's share of work: ``n_chunks`` chunks, each recorded once per key; or the
    reason the step does not apply to this model.

    Example:
        >>> Plan(3, ["none", "gate"]).to_dict()
        {'chunks': 3, 'keys': ['none', 'gate'], 'skipped': None}
    """

    n_chunks: int
    keys: list[str]
    skipped: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"chunks": self.n_chunks, "keys": self.keys, "skipped": self.skipped}


class _Context:
    """What a step's model pass needs: the model, the task, the store, the settings and
    the shard this process computes."""

    def __init__(self, model, task: Task, store: RunStore, settings: StudySettings,
                 info: dict[str, Any], shard: Optional[tuple[int, int]] = None) -> None:
        self.model, self.task, self.store, self.settings = model, task, store, settings
        self.info, self.shard = info, shard or (0, 1)

    def owned(self, chunks: Sequence[Any]) -> list[tuple[int, Any]]:
        index, count = self.shard
        return [(j, c) for j, c in enumerate(chunks) if j % count == index]

    def example_chunks(self) -> list[tuple[int, list[Example]]]:
        return list(self.task.batches(self.settings.batch_size))


class _Step:
    """One analysis: how it plans, records and finishes (subclasses below)."""

    name = ""

    def plan(self, ctx: _Context) -> Plan:
        return Plan(ctx.settings.n_chunks, [""])

    def produce(self, ctx: _Context, plan: Plan, log: Callable[[str], None]) -> None:
        raise NotImplementedError

    def finalize(self, records: list[dict], store: RunStore, settings: dict[str, Any],
                 scoring: Scoring) -> dict[str, Any]:
        raise NotImplementedError

    def covers(self, saved: dict[str, Any], settings: StudySettings) -> bool:
        """Whether a saved result holds what is asked now (else the model must run)."""
        return True

    def satisfied(self, saved: dict[str, Any], settings: StudySettings,
                  scoring: Scoring) -> bool:
        """Whether a saved result answers what is asked now, scoring included."""
        return saved.get("skipped") is True or (
            self.covers(saved, settings) and saved.get("scoring", scoring.to_dict())
            == scoring.to_dict())


def _batches_to_do(ctx: _Context, step: str, keys: Sequence[str], chunks):
    """The owned chunks with a key not yet recorded, and the recorded ``(chunk, key)``."""
    done = {(r["chunk"], r.get("key", "")) for r in ctx.store.records(step)}
    todo = [(j, c) for j, c in ctx.owned(chunks) if any((j, k) not in done for k in keys)]
    return todo, done


def _by_key(records: list[dict]) -> dict[str, list[dict]]:
    """Complete keys only: a key's records must cover every chunk (records say how many)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r.get("key", ""), []).append(r)
    return {k: rs for k, rs in groups.items()
            if sorted(r["chunk"] for r in rs) == list(range(rs[0]["of"]))}


class _PredictionStep(_Step):
    """Shared by ``accuracy`` and ``progressive``: the task's predictions under hooks."""

    def hooks(self, ctx: _Context, batch, keys: Sequence[str]) -> dict[str, list]:
        raise NotImplementedError

    def produce(self, ctx: _Context, plan: Plan, log) -> None:
        chunks = ctx.example_chunks()
        todo, done = _batches_to_do(ctx, self.name, plan.keys, chunks)
        for j, (start, examples) in progress(todo, len(todo), self.name, "batches"):
            batch = ctx.task.prepare(ctx.model, examples)
            for key, hooks in self.hooks(ctx, batch, plan.keys).items():
                if (j, key) in done:
                    continue
                said = ctx.task.predict(ctx.model, batch, examples, fwd_hooks=hooks)
                ctx.store.record(self.name, {
                    "chunk": j, "of": len(chunks), "key": key, "start": start,
                    "ids": [ex.id for ex in examples], "predictions": said.outputs,
                    "extra": said.extra}, said.tensors)

    def evaluate(self, store: RunStore, settings: dict[str, Any], scoring: Scoring,
                 records: list[dict]) -> tuple[Task, dict[str, Any]]:
        """Evaluation of each complete key, from its records in chunk order."""
        task = _scoring_task(settings, load_examples(store))
        out = {}
        for key, recs in _by_key(records).items():
            said = Predictions.concat([
                Predictions(r["predictions"], r["extra"], store.tensors(self.name, r))
                for r in recs])
            out[key] = task.evaluate(task.examples, said, scoring)
        return task, out


class _AccuracyStep(_PredictionStep):
    name = "accuracy"

    def plan(self, ctx: _Context) -> Plan:
        keys = self.condition_keys(ctx.settings.conditions, ctx.settings.random_draws,
                                   ctx.info["has_gate"])
        return Plan(ctx.settings.n_chunks, keys)

    @staticmethod
    def condition_keys(conditions: Sequence[str], draws: int, has_gate: bool) -> list[str]:
        keys = []
        for name in conditions:
            if name == "random":
                keys += [f"random/{d}" for d in range(draws)]
            elif name != "gate" or has_gate:
                keys.append(name)
        return keys

    def hooks(self, ctx: _Context, batch, keys: Sequence[str]) -> dict[str, list]:
        model, s = ctx.model, ctx.settings
        out = {}
        for key in keys:
            name, _, draw = key.partition("/")
            if name == "none":
                out[key] = []
            elif name == "gate":
                out[key] = A.gate_knockout(model, batch)
            elif name == "img_to_text":
                out[key] = A.image_to_text_knockout(model, batch)
            else:
                out[key] = A.random_image_knockout(model, batch, k=s.random_k, seed=int(draw))
        return out

    def covers(self, saved, settings) -> bool:
        asked = set(settings.conditions) - set(saved.get("skipped", {}))
        return asked <= set(saved["conditions"])

    def finalize(self, records, store, settings, scoring) -> dict[str, Any]:
        task, evaluations = self.evaluate(store, settings, scoring, records)
        draws_of: dict[str, list] = {}
        for key in sorted(evaluations):   # "random/0", "random/1", ... pool into "random"
            draws_of.setdefault(key.split("/")[0], []).append(evaluations[key])
        conditions = {}
        for name in [c for c in CONDITIONS if c in draws_of]:
            draws = draws_of[name]
            values = [e.value for e in draws]
            metrics = {m: sum(e.metrics[m] for e in draws) / len(draws) for m in draws[0].metrics}
            conditions[name] = {
                "mean": sum(values) / len(values), "n": len(draws[0].scores),
                "draws": len(draws), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "per_draw": values, "metrics": metrics}
        info = _load_model_info(store)
        details = next(iter(evaluations.values())).details
        result = {"metric": task.metric, "scoring": scoring.to_dict(), "conditions": conditions,
                  "chance": details.get("chance"), "skipped": {},
                  **{k: v for k, v in details.items() if k != "chance"}}
        if not info["has_gate"]:
            result["skipped"]["gate"] = f"{info['family']} has no gate token ({info['gate']})"
        return result


class _ProgressiveStep(_PredictionStep):
    name = "progressive"

    @staticmethod
    def widths(n_layers: int) -> list[int]:
        return sorted({max(1, round(n_layers * f)) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8,
                                                              3 / 4, 7 / 8, 1)}
                      | ({*range(1, n_layers + 1)} if n_layers <= 8 else set()))

    def plan(self, ctx: _Context) -> Plan:
        if not ctx.info["has_gate"]:
            return Plan(ctx.settings.n_chunks, [], skipped="no gate token")
        return Plan(ctx.settings.n_chunks, [str(w) for w in self.widths(ctx.info["layers"])])

    def hooks(self, ctx: _Context, batch, keys: Sequence[str]) -> dict[str, list]:
        return {k: A.gate_knockout(ctx.model, batch, layers=A.last_layers(ctx.model, int(k)))
                for k in keys}

    def finalize(self, records, store, settings, scoring) -> dict[str, Any]:
        task, evaluations = self.evaluate(store, settings, scoring, records)
        widths = sorted(int(k) for k in evaluations)
        chance = next(iter(evaluations.values())).details.get("chance")
        return {"widths": widths, "accuracy": [evaluations[str(w)].value for w in widths],
                "metric": task.metric, "scoring": scoring.to_dict(), "chance": chance}


class _ContributionStep(_Step):
    """Per chunk, the :class:`~tl_vlm.analyses.ContributionAccumulator`'s totals of that
    chunk (:meth:`take`); the result folds them in chunk order (float64), so shards merge
    exactly."""

    name = "contribution"
    SUMS = ("map_totals", "value_map_totals", "map_counts")

    def produce(self, ctx: _Context, plan: Plan, log) -> None:
        model, n = ctx.model, ctx.info["layers"]
        chunks = ctx.example_chunks()
        todo, _ = _batches_to_do(ctx, self.name, [""], chunks)
        acc = A.ContributionAccumulator(model, map_layers=list(range(n // 2, n)))
        for j, (start, examples) in progress(todo, len(todo), self.name, "batches"):
            batch = ctx.task.prepare(model, examples)
            with torch.no_grad():
                model.run_with_hooks(batch, fwd_hooks=acc.hooks(batch), output_attentions=False,
                                     logits_to_keep=1)      # the logits are not read
            part = acc.take()                     # this batch's sums (W_O Grams kept)
            tensors = {"weight_total": part.weight_total, "n_keys": part.n_keys}
            if part.value_total is not None:
                tensors["value_total"] = part.value_total
            for name in self.SUMS:
                for (rows, cols), t in getattr(part, name).items():
                    tensors[f"{name}/{rows}x{cols}"] = t
            ctx.store.record(self.name, {
                "chunk": j, "of": len(chunks), "key": "", "start": start,
                "n_examples": part.n_examples, "n_queries": part.n_queries,
                "layers": list(part.layers), "groups": list(part.groups),
                "map_layers": list(part.map_layers)}, tensors)

    def finalize(self, records, store, settings, scoring) -> dict[str, Any]:
        [recs] = _by_key(records).values()
        totals: dict[str, Tensor] = {}
        for r in recs:                       # chunk order: the same sums in every run
            for name, t in store.tensors(self.name, r).items():
                totals[name] = totals[name] + t if name in totals else torch.zeros_like(t) + t
        maps = {name: {tuple(int(x) for x in key.split("/")[1].split("x")): t
                       for key, t in totals.items() if key.startswith(name + "/")}
                for name in self.SUMS}
        res = A.CrossModalContribution(
            layers=tuple(recs[0]["layers"]), groups=tuple(recs[0]["groups"]),
            weight_total=totals["weight_total"], value_total=totals.get("value_total"),
            n_examples=sum(r["n_examples"] for r in recs),
            n_queries=sum(r["n_queries"] for r in recs), n_keys=totals["n_keys"],
            map_layers=tuple(recs[0]["map_layers"]), map_totals=maps["map_totals"],
            value_map_totals=maps["value_map_totals"] if "value_total" in totals else None,
            map_counts=maps["map_counts"])
        n = len(res.layers)
        grids = res.grids
        return {"groups": list(res.groups), "layers": list(res.layers),
                "weight": res.per_layer(value_weighted=False).tolist(),
                "value": res.per_layer(value_weighted=True).tolist(),
                "per_head_weight": res.weight.tolist(), "per_head_value": res.value.tolist(),
                "grid_map": res.token_map(grid=grids[0]).tolist() if len(grids) == 1 else None,
                "map_layers": f"{n // 2}-{n - 1}", "n_examples": res.n_examples}


# -- geometry: representations recorded per chunk, geometry computed at the end --------
def _nonempty(positions, what: str, j: int):
    empty = (positions.counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{what} is empty in example(s) {empty} of batch {j}: every example "
                         f"needs at least one such token")
    return positions


class _GeometryStep(_Step):
    def points(self, ctx: _Context) -> list[tuple[int, str]]:
        from tl_vlm.analyses.geometry import residual_points

        layers = ctx.settings.geometry_layers
        return residual_points(ctx.model, "all" if layers is None else list(layers))

    def picks(self, ctx: _Context, batch, j: int) -> dict[str, tuple[Tensor, str]]:
        raise NotImplementedError

    def produce(self, ctx: _Context, plan: Plan, log) -> None:
        from tl_vlm.analyses.geometry import collect_residuals

        chunks = ctx.example_chunks()
        points = self.points(ctx)
        todo, _ = _batches_to_do(ctx, self.name, [""], chunks)
        for j, (start, examples) in progress(todo, len(todo), self.name, "batches"):
            batch = ctx.task.prepare(ctx.model, examples)
            vectors = collect_residuals(ctx.model, batch, points, self.picks(ctx, batch, j))
            ctx.store.record(self.name, {"chunk": j, "of": len(chunks), "key": "",
                                         "start": start, "layers": [p for p, _ in points]},
                             vectors)

    def vectors(self, store: RunStore, records: list[dict]) -> tuple[list[int], dict]:
        [recs] = _by_key(records).values()
        parts = [store.tensors(self.name, r) for r in recs]
        return recs[0]["layers"], {k: torch.cat([p[k] for p in parts], dim=1).numpy()
                                   for k in parts[0]}


class _SeparationStep(_GeometryStep):
    """One random text token (after the image) and one random image token per example,
    drawn per chunk with ``seed + chunk`` (the draws of
    :func:`~tl_vlm.analyses.modality_separation` over the same batches)."""

    name = "separation"
    K, Z, METRIC, DENSITY = 16, 1.65, "cosine", "PAk"

    def picks(self, ctx: _Context, batch, j: int) -> dict[str, tuple[Tensor, str]]:
        pos, seed = batch.positions, ctx.settings.seed + j
        text = _nonempty(pos.check(pos.after_image, "text_tokens"), "text_tokens", j)
        image = _nonempty(pos.check(pos.image, "image_tokens"), "image_tokens", j)
        return {"text": (text.random(1, seed).mask, "each"),
                "image": (image.random(1, seed).mask, "each")}

    def finalize(self, records, store, settings, scoring) -> dict[str, Any]:
        from tl_vlm.analyses.geometry import separation_from_vectors

        layers, v = self.vectors(store, records)
        d = separation_from_vectors(v["text"], v["image"], layers, k=self.K, Z=self.Z,
                                    metric=self.METRIC, density=self.DENSITY,
                                    seed=settings["seed"]).to_dict()
        return {"layers": d["layers"], "median_abs_cos": d["cos_median"], "q25": d["cos_q25"],
                "q75": d["cos_q75"], "homogeneity": d["homogeneity"],
                "intrinsic_dim": d["intrinsic_dim"], "n_clusters": d["n_clusters"],
                "params": d["params"]}


class _OverlapStep(_GeometryStep):
    """The gate (if any), last-image and mean-image residual per example; the label
    overlap per layer at the end (k = :func:`~tl_vlm.eval.tasks.overlap_k`)."""

    name = "overlap"

    def picks(self, ctx: _Context, batch, j: int) -> dict[str, tuple[Tensor, str]]:
        from tl_vlm.analyses.geometry import representation_selector

        names = ("gate", "last_image", "image_mean")[0 if ctx.info["has_gate"] else 1:]
        out = {}
        for name in names:
            chosen = batch.positions.check(representation_selector(name)[1](batch), name)
            out[name] = (_nonempty(chosen, f"representation {name!r}", j).mask, "mean")
        return out

    def finalize(self, records, store, settings, scoring) -> dict[str, Any]:
        from tl_vlm.analyses.geometry import label_overlap

        layers, v = self.vectors(store, records)
        labels = [ex.klass for ex in load_examples(store)]
        k = overlap_k(len(labels))
        names = [n for n in ("gate", "last_image", "image_mean") if n in v]
        reps = {name: [label_overlap(v[name][i], labels, k=k) for i in range(len(layers))]
                for name in names}
        return {"layers": layers, "representations": reps, "k": k}


# -- patching ---------------------------------------------------------------------------
def patching_pairs(task: Task, n_pairs: int, seed: int) -> list[tuple[Example, Example]]:
    """``(source, target)`` pairs: with ``task.class_pairs`` (steering), images of the
    target class patched into images of the base class, the class pairs taking turns;
    otherwise random pairs of the same question kind and different answers.

    Example:
        >>> from tl_vlm.eval.tasks import toy_task
        >>> pairs = patching_pairs(toy_task(24), n_pairs=3, seed=0)
        >>> [(s.kind == t.kind, s.klass != t.klass) for s, t in pairs]
        [(True, True), (True, True), (True, True)]
    """
    if task.class_pairs:
        by_label: dict[str, list[Example]] = {}
        for ex in task.examples:
            by_label.setdefault(ex.klass, []).append(ex)
        columns = [list(zip(by_label.get(target, []), by_label.get(base, [])))
                   for base, target in task.class_pairs]
        pairs = [col[i] for i in range(max(map(len, columns), default=0))
                 for col in columns if i < len(col)][:n_pairs]
    else:
        rng = random.Random(seed)
        by_kind: dict[Any, list[Example]] = {}
        for ex in task.examples:
            by_kind.setdefault(ex.kind, []).append(ex)
        pairs = []
        targets = list(task.examples)
        rng.shuffle(targets)
        for target in targets:
            others = [ex for ex in by_kind[target.kind] if ex.klass != target.klass]
            if others:
                pairs.append((rng.choice(others), target))
            if len(pairs) == n_pairs:
                break
    if not pairs:
        raise ValueError("no two examples of the same kind have different answers: "
                         "nothing to patch between")
    return pairs


class _PatchingStep(_Step):
    name = "patching"

    def pair_chunks(self, ctx: _Context) -> list[list[tuple[Example, Example]]]:
        pairs = patching_pairs(ctx.task, ctx.settings.n_pairs, ctx.settings.seed)
        bs = ctx.settings.batch_size
        return [pairs[i:i + bs] for i in range(0, len(pairs), bs)]

    def plan(self, ctx: _Context) -> Plan:
        if not ctx.info["has_gate"]:
            return Plan(0, [], skipped="no gate token")
        return Plan(len(self.pair_chunks(ctx)), list(ctx.settings.patch_streams))

    def produce(self, ctx: _Context, plan: Plan, log) -> None:
        from tl_vlm.core.answers import answer_token_ids

        model, s = ctx.model, ctx.settings
        chunks = self.pair_chunks(ctx)
        layers = list(s.patch_layers) if s.patch_layers else "all"
        tok = model.layout.tokenizer
        todo, done = _batches_to_do(ctx, self.name, plan.keys, chunks)
        for j, chunk in progress(todo, len(todo), self.name, "pair batches"):
            source = ctx.task.prepare(model, [src for src, _ in chunk])
            target = ctx.task.prepare(model, [tgt for _, tgt in chunk])
            answers = (answer_token_ids(tok, [src.answers[0] for src, _ in chunk]),
                       answer_token_ids(tok, [tgt.answers[0] for _, tgt in chunk]))
            for stream in plan.keys:
                if (j, stream) in done:
                    continue
                res = A.patch_gate(model, source, target, layers=layers, stream=stream,
                                   answers=answers)
                ctx.store.record(self.name, {
                    "chunk": j, "of": len(chunks), "key": stream,
                    "start": j * s.batch_size, "layers": res.layers,
                    "flipped": res.flipped.int().tolist(), "overlap": res.overlap.tolist(),
                    "clean_overlap": res.clean_overlap.tolist()})

    def finalize(self, records, store, settings, scoring) -> dict[str, Any]:
        streams = {}
        groups = _by_key(records)
        for stream in settings["patch_streams"]:
            recs = groups[stream]
            flipped = torch.cat([torch.tensor(r["flipped"], dtype=torch.float) for r in recs], 1)
            ov = torch.cat([torch.tensor(r["overlap"]) for r in recs], dim=1)
            clean = torch.cat([torch.tensor(r["clean_overlap"]) for r in recs])
            streams[stream] = {"layers": recs[0]["layers"], "flip_rate": flipped.mean(1).tolist(),
                               "overlap": ov.mean(1).tolist(),
                               "clean_overlap": clean.mean().item()}
        return {"streams": streams, "n_pairs": int(flipped.shape[1])}


STEP_CLASSES: dict[str, _Step] = {s.name: s for s in (
    _AccuracyStep(), _ProgressiveStep(), _ContributionStep(), _SeparationStep(), _OverlapStep(),
    _PatchingStep())}


# -- running and finishing --------------------------------------------------------------
def _load_model_info(store: RunStore) -> dict[str, Any]:
    import json

    return json.loads((store.out / "model.json").read_text())


def finalize_step(store: RunStore, step: str, scoring: Scoring = Scoring(),
                  plan: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Compute and save ``step``'s result from the records in ``store.steps`` (no model).

    ``plan`` (a :meth:`Plan.to_dict`) is what the records must cover; without one the
    complete keys found are used (re-scoring a finished run).

    Example (a finished run re-scored; the model is not needed):
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(12)
        >>> settings = StudySettings("toy-gated", "toy", 12, batch_size=6, steps=("accuracy",),
        ...                          conditions=("none",), task_settings=task.settings())
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.run_settings())
        >>> _ = run_study(model, task, store, settings, log=lambda m: None)
        >>> del model
        >>> finalize_step(store, "accuracy")["conditions"]["none"]["mean"]
        1.0
        >>> tmp.cleanup()
    """
    if plan is not None and plan.get("skipped"):
        return store.save(step, {"skipped": True, "reason": plan["skipped"]})
    records = store.canonical_records(step)
    complete = _by_key(records)
    if plan is not None:
        missing = [k for k in plan["keys"] if k not in complete]
        if missing:
            raise RuntimeError(f"{step}: the records of {missing} do not cover every chunk; "
                               f"rerun to compute the missing ones")
    if not complete:
        raise RuntimeError(f"{step}: no complete records in {store.steps}; rerun the step")
    return store.save(step, STEP_CLASSES[step].finalize(records, store, store.settings, scoring))


def study_results(store: RunStore, steps: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The finished steps' results (skipped ones left out), in study order; the
    progressive curve gets the clean accuracy as its reference line.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, {})
        >>> _ = store.save("accuracy", {"conditions": {"none": {"mean": 0.9}}})
        >>> _ = store.save("progressive", {"widths": [1], "accuracy": [0.3]})
        >>> _ = store.save("patching", {"skipped": True, "reason": "no gate token"})
        >>> results = study_results(store)
        >>> sorted(results), results["progressive"]["clean"]
        (['accuracy', 'progressive'], 0.9)
        >>> tmp.cleanup()
    """
    saved = store.results()
    out = {s: saved[s] for s in STEPS if s in saved and (steps is None or s in steps)
           and saved[s].get("skipped") is not True}
    if "progressive" in out and "accuracy" in out:
        none = out["accuracy"]["conditions"].get("none")
        out["progressive"] = {**out["progressive"], "clean": none["mean"] if none else None}
    return out


def finish_without_model(store: RunStore, settings: StudySettings, scoring: Scoring = Scoring(),
                         log: Callable[[str], None] = print) -> bool:
    """If every step asked for is saved and holds what is asked, re-score those saved
    with other scoring options and return True: the model need not be loaded.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> settings = StudySettings("toy-gated", "toy", 12, steps=("accuracy",))
        >>> finish_without_model(RunStore(tmp.name, settings.run_settings()), settings)
        False
        >>> tmp.cleanup()
    """
    saved = {s: store.load(s) for s in settings.steps if store.done(s)}
    if len(saved) < len(settings.steps) or not all(
            r.get("skipped") is True or STEP_CLASSES[s].covers(r, settings)
            for s, r in saved.items()):
        return False
    for step, result in saved.items():
        if not STEP_CLASSES[step].satisfied(result, settings, scoring):
            finalize_step(store, step, scoring)
            log(f"[{step}] re-scored from its records")
        else:
            log(f"[{step}] already done: kept")
    return True


class Recorder(Protocol):
    """How a run records its progress and finishes its steps: :class:`WholeRun`, or a
    shard's :class:`tl_vlm.study.shards.ShardState` (shards plug in here; the runner
    never imports them)."""

    def open(self, store: RunStore, info: dict[str, Any]) -> None: ...
    def step_done(self, step: str, plan: Plan) -> bool: ...
    def begin(self, step: str, plan: Plan) -> None: ...
    def finish(self, step: str) -> None: ...
    def complete(self, store: RunStore, step: str, scoring: Scoring, plan: Plan,
                 log: Callable[[str], None]) -> None: ...


class WholeRun:
    """The :class:`Recorder` of an unsharded run: ``model.json``, and each step's result
    computed from its records as soon as it is produced.

    Example:
        >>> WholeRun().step_done("accuracy", Plan(3, ["none"]))
        False
    """

    def open(self, store: RunStore, info: dict[str, Any]) -> None:
        write_atomic(store.out / "model.json", dumps(info))

    def step_done(self, step: str, plan: Plan) -> bool:
        return False   # a finished step is kept by the caller (store.done)

    def begin(self, step: str, plan: Plan) -> None:
        pass

    def finish(self, step: str) -> None:
        pass

    def complete(self, store: RunStore, step: str, scoring: Scoring, plan: Plan,
                 log: Callable[[str], None]) -> None:
        finalize_step(store, step, scoring, plan.to_dict())


def run_study(model, task: Task, store: RunStore, settings: StudySettings,
              log: Callable[[str], None] = print, scoring: Scoring = Scoring(),
              shard: Optional[Any] = None) -> dict[str, Any]:
    """Run every step of ``settings.steps`` not yet saved in ``store``; returns all results.

    Steps that do not apply (no gate token) are saved as skipped and left out of the
    returned results. A rerun on the same ``store`` keeps the finished steps and, inside
    a step, the recorded chunks. With ``shard`` (a :class:`tl_vlm.study.shards.Shard`) only
    that shard's chunks are computed, and its recorder (``shard.recorder(out)``, a
    :class:`Recorder`) finishes a step in whichever shard completes it last
    (:func:`tl_vlm.study.shards.merge_step`); without, :class:`WholeRun` does.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12,
        ...                          steps=("accuracy", "progressive"))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.run_settings())
        >>> results = run_study(model, task, store, settings, log=lambda line: None)
        >>> sorted(results), results["progressive"]["clean"]
        (['accuracy', 'progressive'], 1.0)
        >>> _ = run_study(model, task, store, settings)                # resumed: nothing to do
        [accuracy] already done: kept
        [progressive] already done: kept
        >>> run_study(model, task, store, StudySettings("toy-gated", "toy", 24, steps=("knockout",)))
        Traceback (most recent call last):
        ...
        ValueError: unknown steps ['knockout']; choose from ['accuracy', 'progressive', ...]
        >>> tmp.cleanup()
    """
    unknown = [s for s in settings.steps if s not in STEP_CLASSES]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {list(STEP_CLASSES)}")
    store.write_once("examples.jsonl", _examples_text(task.examples), "examples")
    info = model_info(model, task)
    recorder = WholeRun() if shard is None else shard.recorder(store.out)
    recorder.open(store, info)
    ctx = _Context(model, task, store, settings, info,
                  None if shard is None else (shard.index, shard.count))
    for name in settings.steps:
        step = STEP_CLASSES[name]
        if store.done(name):
            saved = store.load(name)
            if saved.get("skipped") is True or step.satisfied(saved, settings, scoring):
                log(f"[{name}] already done: kept")
                continue
        plan = step.plan(ctx)
        if recorder.step_done(name, plan):
            log(f"[{name}] this shard's part is done")
        else:
            recorder.begin(name, plan)
            if plan.skipped is None:
                log(f"[{name}] running")
                step.produce(ctx, plan, log)
            recorder.finish(name)
        if plan.skipped is not None:
            log(f"[{name}] does not apply to this model ({plan.skipped}): skipped")
        recorder.complete(store, name, scoring, plan, log)
    return study_results(store, settings.steps)
