"""The study's steps: what each computes, chunk by chunk, and how its result is
computed from the records (:mod:`tl_vlm.study.runner` runs them)."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from tl_vlm import analyses as A
from tl_vlm.core.names import CONDITIONS
from tl_vlm.core.progress import progress
from tl_vlm.eval.tasks import Example, Predictions, Scoring, Task, overlap_k
from tl_vlm.study.rundir import RunStore
from tl_vlm.study.settings import StudySettings, load_examples, load_model_info, scoring_task

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


class StepContext:
    """What a step's model pass needs: the model, the task, the store, the settings and
    the shard this process computes (see :func:`tl_vlm.study.runner.run_study`).

    Example:
        >>> ctx = StepContext(None, None, None, None, {}, shard=(1, 2))
        >>> ctx.owned(["a", "b", "c", "d"])                   # shard 1 of 2: odd chunks
        [(1, 'b'), (3, 'd')]
    """

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

    def plan(self, ctx: StepContext) -> Plan:
        return Plan(ctx.settings.n_chunks, [""])

    def produce(self, ctx: StepContext, plan: Plan, log: Callable[[str], None]) -> None:
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


def _batches_to_do(ctx: StepContext, step: str, keys: Sequence[str], chunks):
    """The owned chunks with a key not yet recorded, and the recorded ``(chunk, key)``."""
    done = {(r["chunk"], r.get("key", "")) for r in ctx.store.records(step)}
    todo = [(j, c) for j, c in ctx.owned(chunks) if any((j, k) not in done for k in keys)]
    return todo, done


def records_by_key(records: list[dict]) -> dict[str, list[dict]]:
    """Complete keys only: a key's records must cover every chunk (records say how many).

    Example:
        >>> records = [{"key": "none", "chunk": 0, "of": 2}, {"key": "none", "chunk": 1, "of": 2},
        ...            {"key": "gate", "chunk": 0, "of": 2}]
        >>> sorted(records_by_key(records))
        ['none']
    """
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r.get("key", ""), []).append(r)
    return {k: rs for k, rs in groups.items()
            if sorted(r["chunk"] for r in rs) == list(range(rs[0]["of"]))}


class _PredictionStep(_Step):
    """Shared by ``accuracy`` and ``progressive``: the task's predictions under hooks."""

    def hooks(self, ctx: StepContext, batch, keys: Sequence[str]) -> dict[str, list]:
        raise NotImplementedError

    def produce(self, ctx: StepContext, plan: Plan, log) -> None:
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
        task = scoring_task(settings, load_examples(store))
        out = {}
        for key, recs in records_by_key(records).items():
            said = Predictions.concat([
                Predictions(r["predictions"], r["extra"], store.tensors(self.name, r))
                for r in recs])
            out[key] = task.evaluate(task.examples, said, scoring)
        return task, out


class _AccuracyStep(_PredictionStep):
    name = "accuracy"

    def plan(self, ctx: StepContext) -> Plan:
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

    def hooks(self, ctx: StepContext, batch, keys: Sequence[str]) -> dict[str, list]:
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
        info = load_model_info(store)
        details = next(iter(evaluations.values())).details
        result = {"metric": task.metric, "scoring": scoring.to_dict(), "conditions": conditions,
                  "chance": details.get("chance"), "skipped": {},
                  **{k: v for k, v in details.items() if k != "chance"}}
        if not info["has_gate"]:
            result["skipped"]["gate"] = f"{info['family']} has no gate token ({info['gate']})"
        return result


class _ProgressiveStep(_PredictionStep):
    name = "progressive"

    widths = staticmethod(A.progressive_widths)

    def plan(self, ctx: StepContext) -> Plan:
        if not ctx.info["has_gate"]:
            return Plan(ctx.settings.n_chunks, [], skipped="no gate token")
        return Plan(ctx.settings.n_chunks, [str(w) for w in self.widths(ctx.info["layers"])])

    def hooks(self, ctx: StepContext, batch, keys: Sequence[str]) -> dict[str, list]:
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

    def produce(self, ctx: StepContext, plan: Plan, log) -> None:
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
        [recs] = records_by_key(records).values()
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
    def points(self, ctx: StepContext) -> list[tuple[int, str]]:
        from tl_vlm.analyses.geometry import residual_points

        layers = ctx.settings.geometry_layers
        return residual_points(ctx.model, "all" if layers is None else list(layers))

    def picks(self, ctx: StepContext, batch, j: int) -> dict[str, tuple[Tensor, str]]:
        raise NotImplementedError

    def produce(self, ctx: StepContext, plan: Plan, log) -> None:
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
        [recs] = records_by_key(records).values()
        parts = [store.tensors(self.name, r) for r in recs]
        return recs[0]["layers"], {k: torch.cat([p[k] for p in parts], dim=1).numpy()
                                   for k in parts[0]}


class _SeparationStep(_GeometryStep):
    """One random text token (after the image) and one random image token per example,
    drawn per chunk with ``seed + chunk`` (the draws of
    :func:`~tl_vlm.analyses.modality_separation` over the same batches)."""

    name = "separation"
    K, Z, METRIC, DENSITY = 16, 1.65, "cosine", "PAk"

    def picks(self, ctx: StepContext, batch, j: int) -> dict[str, tuple[Tensor, str]]:
        pos, seed = batch.positions, ctx.settings.seed + j
        text = _nonempty(pos.check(pos.after_image, "text_tokens"), "text_tokens", j)
        image = _nonempty(pos.check(pos.image, "image_tokens"), "image_tokens", j)
        return {"text": (text.random(1, seed).mask, "each"),
                "image": (image.random(1, seed).mask, "each")}

    def plan(self, ctx: StepContext) -> Plan:
        from tl_vlm.analyses.geometry import ADP_MIN_K

        points = 2 * ctx.settings.n_examples
        if points - 1 < ADP_MIN_K:
            return Plan(ctx.settings.n_chunks, [], skipped=f"{points} points (a text and an "
                        f"image token per example): ADP clustering needs more than {ADP_MIN_K}")
        return super().plan(ctx)

    def finalize(self, records, store, settings, scoring) -> dict[str, Any]:
        from tl_vlm.analyses.geometry import separation_from_vectors

        layers, v = self.vectors(store, records)
        # the paper's k=16 neighbours, or fewer when the task has fewer points (params say)
        k = min(self.K, v["text"].shape[1] + v["image"].shape[1] - 1)
        d = separation_from_vectors(v["text"], v["image"], layers, k=k, Z=self.Z,
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

    def picks(self, ctx: StepContext, batch, j: int) -> dict[str, tuple[Tensor, str]]:
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

    def pair_chunks(self, ctx: StepContext) -> list[list[tuple[Example, Example]]]:
        pairs = patching_pairs(ctx.task, ctx.settings.n_pairs, ctx.settings.seed)
        bs = ctx.settings.batch_size
        return [pairs[i:i + bs] for i in range(0, len(pairs), bs)]

    def plan(self, ctx: StepContext) -> Plan:
        if not ctx.info["has_gate"]:
            return Plan(0, [], skipped="no gate token")
        return Plan(len(self.pair_chunks(ctx)), list(ctx.settings.patch_streams))

    def produce(self, ctx: StepContext, plan: Plan, log) -> None:
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
        groups = records_by_key(records)
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
