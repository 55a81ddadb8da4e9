"""The Narrow Gate study as one resumable run: the main job behind ``tl-vlm narrow-gate``.

Steps (each saved when finished; see :class:`~tl_vlm.runstore.RunStore`):

- ``accuracy``: task accuracy without knockout, with the gate knocked out, with
  img->text knocked out, and with ``random_k`` random image tokens knocked out (mean
  over ``random_seeds`` draws); paper semantics (post-softmax zero), all layers.
- ``progressive``: gate knockout in the last w layers only.
- ``contribution``: cross-modal attention contribution per layer and key group.
- ``separation``: modality separation (|cos|, cluster homogeneity, intrinsic dimension).
- ``overlap``: neighbourhood overlap of gate / last-image / mean-image representations
  with the class labels.
- ``patching``: steering by patching the gate from an image of another class.

Example:
    >>> import tempfile
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.tasks import toy_task
    >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
    >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12,
    ...                          steps=("accuracy", "contribution"))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = RunStore(tmp.name, settings.to_dict())
    >>> results = run_study(model, task, store, settings)
    [accuracy] running
    [contribution] running
    >>> sorted(results), results["accuracy"]["conditions"]["none"]["mean"]
    (['accuracy', 'contribution'], 1.0)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from tl_vlm import analyses as A
from tl_vlm.runstore import RunStore
from tl_vlm.tasks import Example, Task

STEPS = ("accuracy", "progressive", "contribution", "separation", "overlap", "patching")


@dataclass
class StudySettings:
    """What the study runs; saved with the run so a resume uses the same settings.

    Example:
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, patch_layers=(0, 2))
        >>> d = settings.to_dict()                      # JSON-ready: tuples become lists
        >>> d["steps"][:2], d["patch_layers"], d["batch_size"]
        (['accuracy', 'progressive'], [0, 2], 16)
    """

    model: str
    dataset: str
    n_examples: int
    batch_size: int = 16
    seed: int = 0
    random_k: int = 10
    random_seeds: int = 3
    steps: tuple[str, ...] = STEPS
    patch_layers: Optional[tuple[int, ...]] = None   # None: every layer
    patch_streams: tuple[str, ...] = ("resid_pre", "attn_in")
    n_pairs: int = 128

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _progress(iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr,
                disable=not sys.stderr.isatty())


def _chunks(task: Task, settings: StudySettings):
    return list(task.batches(settings.batch_size))


def _scores_under(model, task: Task, store: RunStore, settings: StudySettings, step: str,
                  conditions: Callable[[Any], Optional[dict[str, list]]]) -> Optional[dict[str, list[float]]]:
    """Per-example task scores under each condition's hooks, resumable batch by batch.

    ``conditions(batch)`` maps a condition name to its hooks (None: the step does not
    apply). Each (condition, batch) score is recorded as soon as it is known, so a rerun
    scores only what is missing. Returns the scores per condition, in example order.
    """
    done = {(r["condition"], r["start"]): r["scores"] for r in store.records(step)}
    chunks = _chunks(task, settings)
    for start, examples in _progress(chunks, len(chunks), step):
        batch = task.prepare(model, examples)
        hooks_of = conditions(batch)
        if hooks_of is None:
            return None
        for name, hooks in hooks_of.items():
            if (name, start) not in done:
                scores = task.score(model, batch, examples, fwd_hooks=hooks).tolist()
                store.record(step, {"condition": name, "start": start, "scores": scores})
                done[(name, start)] = scores
    out: dict[str, list[float]] = {}
    for (name, _), scores in sorted(done.items(), key=lambda kv: kv[0][1]):
        out.setdefault(name, []).extend(scores)
    return out


def step_accuracy(model, task: Task, store: RunStore, settings: StudySettings) -> dict:
    """Accuracy per knockout condition; every finished batch is recorded for resuming.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.to_dict())
        >>> res = step_accuracy(model, task, store, settings)
        >>> sorted(res["conditions"]), res["chance"]
        (['gate', 'img_to_text', 'none', 'random'], 0.25)
        >>> res["conditions"]["none"]["mean"], res["conditions"]["gate"]["mean"] < 0.5
        (1.0, True)
        >>> len(store.records("accuracy"))          # 2 batches x (none, gate, img_to_text, 3 random)
        12
        >>> tmp.cleanup()
    """
    def hooks_for(batch) -> dict[str, list]:
        pos = batch.positions
        hooks = {"none": []}
        if not pos.gate.is_empty():
            hooks["gate"] = A.gate_knockout(model, batch)
        hooks["img_to_text"] = A.image_to_text_knockout(model, batch)
        for seed in range(settings.random_seeds):
            hooks[f"random/{seed}"] = A.random_image_knockout(model, batch, k=settings.random_k,
                                                              seed=seed)
        return hooks

    scores = _scores_under(model, task, store, settings, "accuracy", hooks_for)
    per_condition: dict[str, list[float]] = {}
    for name, s in scores.items():   # the random draws pool into one condition
        per_condition.setdefault(name.split("/")[0], []).append(s)
    conditions = {name: {"mean": sum(map(sum, draws)) / sum(map(len, draws)), "n": len(draws[0]),
                         "draws": len(draws)}
                  for name, draws in per_condition.items()}
    result = {"conditions": conditions, "chance": task.chance(), "skipped": {}}
    if "gate" not in conditions:
        result["skipped"]["gate"] = f"{model.family.name} has no gate token ({model.layout.gate_description})"
    return result


def step_progressive(model, task: Task, store: RunStore, settings: StudySettings) -> Optional[dict]:
    """Gate knockout in the last w layers, for w from 1 to every layer.

    None when the model has no gate token (the step is then skipped).

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.to_dict())
        >>> res = step_progressive(model, task, store, settings)
        >>> res["widths"], res["accuracy"][-1], res["chance"]      # w = 4: every layer
        ([1, 2, 3, 4], 0.25, 0.25)
        >>> tmp.cleanup()
    """
    n_layers = model.cfg.n_layers
    widths = sorted({max(1, round(n_layers * f)) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1)}
                    | ({*range(1, n_layers + 1)} if n_layers <= 8 else set()))

    def hooks_for(batch) -> Optional[dict[str, list]]:
        if batch.positions.gate.is_empty():
            return None
        return {str(w): A.gate_knockout(model, batch, layers=A.last_layers(model, w))
                for w in widths}

    scores = _scores_under(model, task, store, settings, "progressive", hooks_for)
    if scores is None:
        return None
    accuracy = [sum(scores[str(w)]) / len(scores[str(w)]) for w in widths]
    clean = store.load("accuracy")["conditions"]["none"]["mean"] if store.done("accuracy") else None
    return {"widths": widths, "accuracy": accuracy, "clean": clean, "chance": task.chance()}


def _batches(model, task: Task, settings: StudySettings) -> Iterator:
    chunks = _chunks(task, settings)
    for _, examples in _progress(chunks, len(chunks), "activations"):
        yield task.prepare(model, examples)


def step_contribution(model, task: Task, store: RunStore, settings: StudySettings) -> dict:
    """Share of text->image attention per key group and layer; token map of the last half.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.to_dict())
        >>> res = step_contribution(model, task, store, settings)
        >>> res["groups"][3], [round(row[3], 3) for row in res["value"]]    # EOI's share per layer
        ('eoi', [1.0, 1.0, 1.0, 1.0])
        >>> res["map_layers"], len(res["grid_map"]), res["n_examples"]
        ('2-3', 6, 24)
        >>> tmp.cleanup()
    """
    n = model.cfg.n_layers
    res = A.cross_modal_contribution(model, _batches(model, task, settings),
                                     map_layers=list(range(n // 2, n)))
    grids = res.grids
    grid_map = res.token_map(grid=grids[0]).tolist() if len(grids) == 1 else None
    return {"groups": list(res.groups), "layers": list(range(n)),
            "weight": res.per_layer(value_weighted=False).tolist(),
            "value": res.per_layer(value_weighted=True).tolist(),
            "per_head_weight": res.weight.tolist(), "per_head_value": res.value.tolist(),
            "grid_map": grid_map, "map_layers": f"{n // 2}-{n - 1}",
            "n_examples": res.n_examples}


def step_separation(model, task: Task, store: RunStore, settings: StudySettings) -> dict:
    """Median |cos| between text and image residuals, cluster homogeneity, intrinsic dim.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.to_dict())
        >>> res = step_separation(model, task, store, settings)
        >>> res["layers"], len(res["median_abs_cos"]), res["params"]["k"]
        ([0, 1, 2, 3, 4], 5, 16)
        >>> tmp.cleanup()
    """
    res = A.modality_separation(model, _batches(model, task, settings), seed=settings.seed)
    d = res.to_dict()
    return {"layers": d["layers"], "median_abs_cos": d["cos_median"], "q25": d["cos_q25"],
            "q75": d["cos_q75"], "homogeneity": d["homogeneity"],
            "intrinsic_dim": d["intrinsic_dim"], "n_clusters": d["n_clusters"],
            "params": d["params"]}


def step_overlap(model, task: Task, store: RunStore, settings: StudySettings) -> dict:
    """Neighbourhood overlap with the class labels of the gate, last image token and mean.

    ``k`` is 30 or an eighth of the examples, whichever is smaller.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.to_dict())
        >>> res = step_overlap(model, task, store, settings)
        >>> sorted(res["representations"]), res["k"], len(res["representations"]["gate"])
        (['gate', 'image_mean', 'last_image'], 3, 5)
        >>> tmp.cleanup()
    """
    labels = [ex.klass for ex in task.examples]
    k = min(30, max(1, len(labels) // 8))
    has_gate = not task.prepare(model, task.examples[:1]).positions.gate.is_empty()
    names = ("gate", "last_image", "image_mean")[0 if has_gate else 1:]
    results = A.neighbourhood_overlaps(model, _batches(model, task, settings), labels, names, k=k)
    reps = {name: r.to_dict()["overlap"] for name, r in results.items()}
    layers = next(iter(results.values())).layers
    return {"layers": layers, "representations": reps, "k": k}


def patching_pairs(task: Task, n_pairs: int, seed: int) -> list[tuple[Example, Example]]:
    """``(source, target)`` pairs of the same question kind and different answers.

    Example:
        >>> from tl_vlm.tasks import toy_task
        >>> pairs = patching_pairs(toy_task(24), n_pairs=3, seed=0)
        >>> [(s.kind == t.kind, s.klass != t.klass) for s, t in pairs]
        [(True, True), (True, True), (True, True)]
    """
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


def step_patching(model, task: Task, store: RunStore, settings: StudySettings) -> Optional[dict]:
    """Patch the gate of a source image into a target image of another class, per layer.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12,
        ...                          n_pairs=12, patch_streams=("attn_in",))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.to_dict())
        >>> res = step_patching(model, task, store, settings)
        >>> attn_in = res["streams"]["attn_in"]
        >>> res["n_pairs"], attn_in["layers"], attn_in["flip_rate"][0]     # from layer 0: all flip
        (12, [0, 1, 2, 3], 1.0)
        >>> tmp.cleanup()
    """
    from tl_vlm.answers import answer_token_ids

    pairs = patching_pairs(task, settings.n_pairs, settings.seed)
    layers = list(settings.patch_layers) if settings.patch_layers else "all"
    tok = model.layout.tokenizer
    done = {(r["stream"], r["start"]): r for r in store.records("patching")}
    chunks = [(i, pairs[i:i + settings.batch_size]) for i in range(0, len(pairs), settings.batch_size)]
    for start, chunk in _progress(chunks, len(chunks), "patching"):
        source = task.prepare(model, [s for s, _ in chunk])
        target = task.prepare(model, [t for _, t in chunk])
        if target.positions.gate.is_empty():
            return None
        answers = (answer_token_ids(tok, [s.answers[0] for s, _ in chunk]),
                   answer_token_ids(tok, [t.answers[0] for _, t in chunk]))
        for stream in settings.patch_streams:
            if (stream, start) in done:
                continue
            res = A.patch_gate(model, source, target, layers=layers, stream=stream, answers=answers)
            record = {"stream": stream, "start": start, "layers": res.layers,
                      "flipped": res.flipped.int().tolist(), "overlap": res.overlap.tolist(),
                      "clean_overlap": res.clean_overlap.tolist()}
            store.record("patching", record)
            done[(stream, start)] = record
    streams = {}
    for stream in settings.patch_streams:
        recs = [r for (s, _), r in sorted(done.items()) if s == stream]
        flipped = torch.cat([torch.tensor(r["flipped"], dtype=torch.float) for r in recs], dim=1)
        ov = torch.cat([torch.tensor(r["overlap"]) for r in recs], dim=1)
        clean = torch.cat([torch.tensor(r["clean_overlap"]) for r in recs])
        streams[stream] = {"layers": recs[0]["layers"], "flip_rate": flipped.mean(1).tolist(),
                           "overlap": ov.mean(1).tolist(), "clean_overlap": clean.mean().item()}
    return {"streams": streams, "n_pairs": len(pairs)}


STEP_FUNCTIONS: dict[str, Callable[..., Optional[dict]]] = {
    "accuracy": step_accuracy,
    "progressive": step_progressive,
    "contribution": step_contribution,
    "separation": step_separation,
    "overlap": step_overlap,
    "patching": step_patching,
}


def run_study(model, task: Task, store: RunStore, settings: StudySettings,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step of ``settings.steps`` not yet saved in ``store``; returns all results.

    Steps that do not apply (no gate token) are saved as skipped and left out of the
    returned results. A rerun on the same ``store`` keeps the finished steps.

    Example:
        >>> import tempfile
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.tasks import toy_task
        >>> model, task = HookedVLM.from_pretrained("toy-gated"), toy_task(24)
        >>> settings = StudySettings("toy-gated", "toy", n_examples=24, batch_size=12,
        ...                          steps=("accuracy", "progressive"))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> store = RunStore(tmp.name, settings.to_dict())
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
    unknown = [s for s in settings.steps if s not in STEP_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {list(STEP_FUNCTIONS)}")
    for step in settings.steps:
        if store.done(step):
            log(f"[{step}] already done: kept")
            continue
        log(f"[{step}] running")
        result = STEP_FUNCTIONS[step](model, task, store, settings)
        if result is None:
            log(f"[{step}] does not apply to this model: skipped")
            result = {"skipped": True}
        store.save(step, result)
    return {k: v for k, v in store.results().items() if not v.get("skipped") is True}
