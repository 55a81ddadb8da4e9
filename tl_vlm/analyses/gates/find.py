"""The gate search itself: :func:`find_gates` runs the passes, decides, and assembles
the :class:`~tl_vlm.analyses.gates.GateSearch`.

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.eval.tasks import toy_task
    >>> gates = find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(12), rows=False,
    ...                    overlap=False, check_random=0)
    >>> gates.headline()
    'narrow: eoi carries 0.92 of the image effect (from layer 1 on)'
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Optional

import torch

from tl_vlm.analyses.contribution import ContributionAccumulator
from tl_vlm.analyses.gates.candidates import (CLASS_GROUPS, IMAGE_SIDE, OVERLAP_CLASSES,
                                              candidate_classes, contribution_groups)
from tl_vlm.analyses.gates.config import GateSearchConfig
from tl_vlm.analyses.gates.records import GateCheck, GateCost, LayerSweep
from tl_vlm.analyses.gates.result import GateCandidate, GateSearch
from tl_vlm.analyses.gates.search import BatchSearch
from tl_vlm.analyses.gates.stats import finite_mean, spearman, standard_error
from tl_vlm.analyses.gates.verdict import best_class, settled, verdict_of
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import PositionSet

def find_gates(model, task, config: Optional[GateSearchConfig] = None,
               **options: Any) -> GateSearch:
    """Which image-side positions carry the image to the text (see :mod:`tl_vlm.analyses.gates`).

    Args:
        task: a :class:`~tl_vlm.eval.tasks.Task` (its examples, batching and score).
        config: a :class:`GateSearchConfig` (default: its defaults).
        **options: any :class:`GateSearchConfig` field, over ``config``'s (``batch_size``,
            ``rows``, ``check_top``, ...; there, what each does). An unknown one is a
            TypeError that names the valid ones.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model = HookedVLM.from_pretrained("toy-last-image")    # gate planted on the last code
        >>> gates = find_gates(model, toy_task(24), batch_size=12, overlap=False)
        >>> gates.verdict, gates.gate, gates.best_class
        ('narrow', ['image (5, 5)'], 'last_image')
        >>> abs(gates.candidate("eoi").share) < 0.01                 # EOI carries nothing here
        True
        >>> gates.cost.passes_per_batch, gates.cost.n_classes      # 12 classes; gate = eoi
        (14, 12)
        >>> quick = GateSearchConfig(rows=False, overlap=False, check_random=0)
        >>> find_gates(model, toy_task(12), quick, check_top=1).gate     # one option changed
        ['image (5, 5)']
        >>> find_gates(model, toy_task(12), queries="image")
        Traceback (most recent call last):
        ...
        ValueError: queries must be 'all' (every position, the paper's knockout) or 'text', got 'image'
    """
    config = GateSearchConfig.from_options(config, **options)
    if not all(hasattr(task, a) for a in ("batches", "prepare", "score", "examples")):
        raise TypeError(f"find_gates needs a tl_vlm.eval.tasks.Task (its examples, batching and "
                        f"score), got {type(task).__name__}; wrap your examples in a "
                        f"NextTokenTask or GenerationTask")
    metric = config.metric
    say = config.log or (lambda line: None)
    chunks = list(task.batches(config.batch_size))
    limit = config.limit
    if limit is not None:
        chunks = [(s, ex[:max(0, limit - s)]) for s, ex in chunks if s < limit]
    if not chunks:
        raise ValueError("the task has no examples")
    search = BatchSearch(model, task, metric, config.queries, config.rows, config.alpha,
                         per_example=config.check_per_example,
                         recompute=config.recompute_activations)
    notes: list[str] = []

    # The contribution groups partition the image side so that each class's share is a
    # sum of groups: the gate beyond EOI (Emu3's EOF) and the first content token apart.
    acc = ContributionAccumulator(model, groups=contribution_groups()) \
        if config.contribution else None
    baseline = _baseline_forward(model, task.prepare(model, chunks[0][1]))
    say(f"[find_gates] one forward: {baseline:.3f}s; pass 1 over {len(chunks)} batches")
    for start, examples in chunks:
        search.add(start, task.prepare(model, examples), examples, acc)
    contrib = acc.result() if acc is not None and acc.n_examples else None
    if config.contribution and contrib is None:
        notes.append("no contribution: no example has text after the image")

    # Single positions: estimates, refined by the per-example checks, then exact checks on
    # the best by refined value and a random sample.
    estimate = {k: search.drop[k] / search.count[k] for k in search.est}
    refined = {k: search.refined[k] / search.count[k] for k in search.est}
    keys = sorted(refined, key=lambda k: (-refined[k], -estimate[k]))
    rng = random.Random(config.seed)
    top = keys if config.check_all else keys[:config.check_top]
    rest = [k for k in keys if k not in top]
    checked = top + rng.sample(rest, min(config.check_random, len(rest)))
    # BOI, EOI, the first and last image token...: a class pass knocked them out already.
    known = search.exact_from_classes()
    checked += [k for k in keys if k in known and k not in checked]
    total = finite_mean(search.class_exact(IMAGE_SIDE))
    # key -> per-example exact drops (NaN where the example lacks the position)
    measured = {k: known[k] for k in checked if k in known}
    measured.update(search.exact_positions(chunks, [k for k in checked if k not in known], say))
    exact = {k: finite_mean(drops) for k, drops in measured.items()}
    by_exact = sorted(exact, key=lambda k: -exact[k])
    best = by_exact[:2]
    union = search.exact_positions(chunks, [tuple(best)], say, together=True) \
        if len(best) == 2 else {}
    # Knockouts need not add up (cutting BOI as well can *lessen* a gate's effect), so
    # the best "one or two" is the larger of the best one and the best two together.
    one = exact[best[0]]
    two = max(one, finite_mean(union[tuple(best)])) if len(best) == 2 else one
    top_shares = [one / total, two / total] if total else [float("nan")] * 2

    verdict, gate, gate_share = verdict_of(top_shares, total, best, narrow=config.narrow,
                                           distributed=config.distributed,
                                           min_effect=config.min_effect)
    layers = LayerSweep()
    if config.layer_sweep and verdict != "no image effect":
        target = gate if verdict != "distributed" else None
        layers = LayerSweep(target=[search.label(k) for k in target] if target else [IMAGE_SIDE],
                            **search.layer_sweep(chunks, target, say))

    classes = [c for c in _class_candidates(search, total, contrib) if c.name in search.distinct]
    for name, same in search.alias_of.items():
        if name not in search.distinct:
            notes.append(f"{name}: the same positions as {' and '.join(sorted(same))} in every "
                         f"example (not listed apart)")
    overlap_note = _add_overlap(model, task, chunks, classes, config.overlap, search)
    if overlap_note:
        notes.append(overlap_note)
    positions = _position_candidates(search, keys, estimate, refined, measured, total, contrib,
                                     classes)
    best_by_class = best_class(classes)
    check = _check(search, config, checked, by_exact, estimate, refined, measured, total)
    return GateSearch(
        model=getattr(model.cfg, "model_name", "") or type(model.hf_model).__name__,
        family=model.family.name, n_layers=search.n_layers, n_examples=search.n,
        metric=metric.kind, queries=config.queries, clean_score=search.clean_score / search.n,
        clean_metric=search.clean_metric / search.n, total_effect=total,
        classes=classes, positions=positions, verdict=verdict,
        gate=[search.label(x) for x in gate], gate_share=gate_share, top_shares=top_shares,
        best_class=None if best_by_class is None else best_by_class.name, layers=layers,
        check=check, cost=_cost(search, len(chunks), baseline), notes=notes)


def _check(search: BatchSearch, config: GateSearchConfig, checked: list, by_exact: list,
           estimate: dict, refined: dict, measured: dict, total: float) -> GateCheck:
    """The estimates and refined values of the ``checked`` positions against their exact
    drops (``measured``, per example; ``by_exact``: the measured ones, best first)."""
    exact = {x: finite_mean(drops) for x, drops in measured.items()}
    k = min(config.check_top, len(checked))
    top_est = set(sorted(checked, key=lambda x: -estimate[x])[:k])
    top_refined = set(sorted(checked, key=lambda x: -refined[x])[:k])
    top_exact = set(by_exact[:k])
    lead = settled(by_exact, measured, k)
    return GateCheck(
        names=[search.label(x) for x in checked],
        estimate=[estimate[x] for x in checked], exact=[exact[x] for x in checked],
        spearman=spearman([estimate[x] for x in checked], [exact[x] for x in checked]),
        exact_se=[standard_error(measured[x]) for x in checked],
        top_k=k, top_k_agree=len(top_est & top_exact),
        top_k_settled=len(lead), settled=[search.label(x) for x in lead],
        per_example=config.check_per_example, refined=[refined[x] for x in checked],
        refined_spearman=spearman([refined[x] for x in checked], [exact[x] for x in checked]),
        refined_top_k_agree=len(top_refined & top_exact), alpha=config.alpha,
        completeness=sum(estimate.values()) / total if total else float("nan"))


def _cost(search: BatchSearch, n_batches: int, baseline: float) -> GateCost:
    """What the search ran, per batch, against one plain forward of ``baseline`` seconds."""
    n_classes = search.class_forwards / search.batches
    n_classes = int(n_classes) if n_classes.is_integer() else round(n_classes, 2)
    per_batch = (search.seconds["clean_and_gradient"] + search.seconds["classes"]) / n_batches
    passes = (search.cost["forward"] + search.cost["grad_forward"] + search.cost["backward"]
              + search.cost["recompute_forward"]) / search.batches
    return GateCost(
        batches=n_batches, n_classes=n_classes,
        passes_per_batch=int(passes) if float(passes).is_integer() else round(passes, 2),
        budget_forwards=3 + n_classes,
        check_forwards_per_batch=round((search.cost["check_forward"]
                                        + search.cost["example_check_forward"]) / n_batches, 2),
        passes=dict(search.cost), seconds={k: round(v, 4) for k, v in search.seconds.items()},
        baseline_forward_s=round(baseline, 4),
        time_ratio=round(per_batch / baseline, 2) if baseline > 0 else None)


def _baseline_forward(model, batch: VLMBatch, repeats: int = 3) -> float:
    """Seconds of one plain forward pass (the unit of the cost ratio): the fastest of
    ``repeats`` after a warm-up, as a busy machine only ever slows a pass down."""
    times = []
    with torch.no_grad():
        model(batch, output_attentions=False)          # warm-up (lazy inits, allocator)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(batch, output_attentions=False)
            times.append(time.perf_counter() - t0)
    return min(times)


def _class_candidates(search: BatchSearch, total: float, contrib) -> list[GateCandidate]:
    """The classes as candidates: exact effects, estimates, contribution shares."""
    out = []
    pooled = per_layer = token_map = None
    if contrib is not None:
        value = contrib.value_total                                   # [layer, head, group]
        pooled = value.sum((0, 1)) / value.sum()
        per_layer = contrib.per_layer(value_weighted=True)            # [layer, group]
        token_map = contrib.token_map() if len(contrib.grids) == 1 else None
    for name, (score, n, n_pos) in search.classes.items():
        drops = search.class_exact(name)
        effect, se = finite_mean(drops), standard_error(drops)
        share_c = layers_c = None
        if pooled is not None:
            if name in CLASS_GROUPS:
                idx = [contrib.groups.index(g) for g in (CLASS_GROUPS[name] or contrib.groups)]
                share_c = float(pooled[idx].sum())
                layers_c = per_layer[:, idx].sum(-1).tolist()
            elif name.startswith("row ") and token_map is not None:
                r = int(name.split()[1])
                share_c = float(token_map[r].nansum()) if r < len(token_map) else None
        out.append(GateCandidate(
            name=name, kind="class", role=name, effect=effect,
            share=effect / total if total else float("nan"),
            estimate=search.class_layers[name].sum().item() / n, exact=effect, exact_se=se,
            score=score / n,
            per_layer=(search.class_layers[name] / n).tolist(), contribution=share_c,
            contribution_per_layer=layers_c, n_examples=n, n_positions=n_pos / n))
    return out


def _position_candidates(search: BatchSearch, keys, estimate, refined, measured, total, contrib,
                         classes: list[GateCandidate]) -> list[GateCandidate]:
    """The single positions as candidates, in the order of ``keys``."""
    token_map = contrib.token_map() if contrib is not None and len(contrib.grids) == 1 else None
    single = {c.name: c for c in classes if c.n_positions == 1.0}
    # classes of one position per image (their aliases too: the toy's gate is its eoi)
    per_image = {name for name, (_, n, n_pos) in search.classes.items() if n_pos == n}
    single_names = per_image - {IMAGE_SIDE}
    out = []
    for key in keys:
        drops = measured.get(key)
        exact = None if drops is None else finite_mean(drops)
        se = None if drops is None else standard_error(drops)
        effect = refined[key] if exact is None else exact
        share_c = None
        if key[0] == "image" and token_map is not None and key[1] == 0:
            share_c = float(token_map[key[2], key[3]])
        elif key[0] in ("boi", "eoi") and key[1] == 0 and key[0] in single:
            share_c = single[key[0]].contribution
        out.append(GateCandidate(
            name=search.label(key), kind="position", role=key[0], effect=effect,
            share=effect / total if total else float("nan"), estimate=estimate[key],
            refined=refined[key], checked_in=search.checked_in[key], exact=exact, exact_se=se,
            per_layer=(search.est[key] / search.count[key]).tolist(),
            contribution=share_c, n_examples=search.count[key],
            grid=tuple(key[1:]) if key[0] == "image" else None, token=search.tokens.get(key),
            in_classes=sorted(c for c in search.member[key] if c in single_names)))
    return out


def _add_overlap(model, task, chunks, classes: list[GateCandidate], overlap, search) -> Optional[str]:
    """Neighbourhood overlap with the labels per class (one more pass); a note if skipped."""
    if overlap is False:
        return None
    labels = [ex.klass for _, examples in chunks for ex in examples]
    try:
        import dadapy  # noqa: F401
    except ImportError:
        if overlap is True:
            raise ImportError('neighbourhood overlap needs DADApy: pip install "tl-vlm[geometry]"')
        return "no neighbourhood overlap: DADApy is not installed"
    if len(set(labels)) < 2 or len(labels) <= 8:
        if overlap is True:
            raise ValueError(f"neighbourhood overlap needs more than 8 examples and two labels; "
                             f"got {len(labels)} examples, {len(set(labels))} label(s)")
        return "no neighbourhood overlap: too few examples or labels"
    from tl_vlm.analyses.geometry import neighbourhood_overlaps

    wanted = [c for c in classes if c.name in OVERLAP_CLASSES and c.n_examples == search.n]
    if not wanted:
        return "no neighbourhood overlap: no class is present in every example"
    selectors = {c.name: _class_selector(c.name) for c in wanted}
    batches = (task.prepare(model, examples) for _, examples in chunks)
    k = min(30, max(1, len(labels) // 8))
    result = neighbourhood_overlaps(model, batches, labels, list(selectors.values()), k=k)
    for c in wanted:
        c.overlap = [float(v) for v in result[c.name].overlap]
    search.cost["overlap_forward"] += len(chunks)
    return None


def _class_selector(name: str) -> Callable[[VLMBatch], PositionSet]:
    def select(batch: VLMBatch) -> PositionSet:
        return candidate_classes(batch.positions, rows=False)[name]

    select.__name__ = name
    return select
