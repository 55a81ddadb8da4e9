"""The typed records of a gate search: :class:`GateCheck` (its estimates against exact
knockouts), :class:`GateCost` (what it ran) and :class:`LayerSweep` (where the gate acts). Each is a dataclass that also reads like
the dict it replaced, and writes the same dict into ``gates.json``.

Example:
    >>> cost = GateCost.from_dict({"batches": 2, "n_classes": 6, "passes_per_batch": 8})
    >>> cost.n_classes, cost["passes_per_batch"], cost.budget_forwards, "budget_forwards" in cost
    (6, 8, None, False)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Optional


class _Record(Mapping):
    """A dataclass that reads like the dict it replaced: ``record["key"]``, ``.get``,
    ``in`` and iteration cover the keys it holds. A record read from a saved search keeps
    the saved keys only (a key the file lacks reads as the field's default by attribute,
    and is absent as a key) and any key this version does not know, so that
    :meth:`to_dict` writes back what it read."""

    def _fields(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in ("extra", "missing")]

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key in self.missing or key not in self._fields():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self._fields() if k not in self.missing)
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to_dict(self) -> dict[str, Any]:
        """The record as the dict saved in ``gates.json`` (same keys, same order)."""
        return {k: copy.deepcopy(self[k]) for k in self}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The inverse of :meth:`to_dict`; reads the dicts of older versions too."""
        known = [f.name for f in fields(cls) if f.name not in ("extra", "missing")]
        return cls(**{k: data[k] for k in known if k in data},
                   extra={k: v for k, v in data.items() if k not in known},
                   missing=frozenset(k for k in known if k not in data))


@dataclass(eq=False)
class GateCheck(_Record):
    """The attribution estimate against exact knockouts (:attr:`GateSearch.check`), over the
    positions checked exactly. Reads as a dict too (``check["spearman"]``).

    Attributes:
        names: the checked positions; estimate, exact, exact_se, refined: their
            estimated, exact (and its standard error) and refined drops, in that order.
        spearman: rank correlation of the estimates with the exact drops (NaN below three
            positions; None after a JSON round trip).
        top_k: k = ``check_top`` (at most the number checked); top_k_agree: positions in
            both top-k lists.
        settled, top_k_settled: which and how many of the exact top k lead the exact
            (k+1)-th by more than two standard errors of their paired difference: beyond
            those, the sample does not rank the positions, and no list can agree but by
            chance.
        per_example: exact knockouts per example that refined the values
            (``check_per_example``); refined_spearman, refined_top_k_agree: the same
            statistics for the refined values.
        alpha: where the gradient was taken; completeness: the estimates' sum over the
            whole image side's exact effect.
        extra, missing: keys of a saved search this version does not know, and the
            fields a search saved by an older version lacks (None or empty here).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> from tl_vlm.analyses.gates import find_gates
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> check = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0).check
        >>> check.names[:2], check.top_k, check["top_k"]
        (['eoi', 'image (0, 0)'], 5, 5)
        >>> old = GateCheck.from_dict({"names": ["eoi"], "spearman": None})   # an older file
        >>> old.per_example, "per_example" in old, old.to_dict()
        (None, False, {'names': ['eoi'], 'spearman': None})
    """

    names: list[str] = field(default_factory=list)
    estimate: list[float] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)
    spearman: Optional[float] = None
    exact_se: list[Optional[float]] = field(default_factory=list)
    top_k: int = 0
    top_k_agree: int = 0
    top_k_settled: Optional[int] = None
    settled: Optional[list[str]] = None
    per_example: Optional[int] = None
    refined: Optional[list[float]] = None
    refined_spearman: Optional[float] = None
    refined_top_k_agree: Optional[int] = None
    alpha: Optional[float] = None
    completeness: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    missing: frozenset = field(default=frozenset(), repr=False)


@dataclass(eq=False)
class GateCost(_Record):
    """What a search ran and how long it took (:attr:`GateSearch.cost`). Reads as a dict
    too (``cost["passes"]["forward"]``).

    Attributes:
        batches: batches searched; n_classes: distinct class knockouts per batch.
        passes_per_batch: forwards and backwards of the search run per batch:
            2 + ``n_classes`` for a next-token task, one more for a task that generates,
            one more with ``recompute_activations``.
        budget_forwards: 3 + ``n_classes`` (a backward is about two forwards).
        check_forwards_per_batch: the exact checks' forwards per batch (the per-example
            ones, the best, the random sample, the best two together), apart from the
            search's.
        passes: every pass run, by kind (``forward``, ``grad_forward``, ``backward``,
            ``recompute_forward``, ``check_forward``, ``example_check_forward``,
            ``sweep_forward``, ``overlap_forward``).
        seconds: seconds per phase (``clean_and_gradient``, ``classes``,
            ``example_checks``).
        baseline_forward_s: one plain forward's seconds (the fastest of three);
            time_ratio: the search's seconds per batch over it (None when not timed).
        extra, missing: as in :class:`GateCheck`.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> from tl_vlm.analyses.gates import find_gates
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> cost = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0).cost
        >>> cost.passes_per_batch, cost.budget_forwards, cost["passes"]["backward"]
        (8, 9, 1)
    """

    batches: int = 0
    n_classes: float = 0
    passes_per_batch: float = 0
    budget_forwards: Optional[float] = None
    check_forwards_per_batch: Optional[float] = None
    passes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    baseline_forward_s: Optional[float] = None
    time_ratio: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    missing: frozenset = field(default=frozenset(), repr=False)


@dataclass(eq=False)
class LayerSweep(_Record):
    """Where the gate acts (:attr:`GateSearch.layers`): the gate (or, when the image is
    distributed, the whole image side) knocked out in the last w layers only, for growing
    w. Reads as a dict too (``layers["widths"]``).

    Attributes:
        target: what was knocked out (position names; ``["image_side"]`` when the verdict
            is distributed); empty when no sweep ran.
        widths: the w of each knockout (the last w layers).
        effect: the share of the image effect each knockout removes, per width.
        from_layer: the first layer of the smallest window that removes most of the
            effect (None when none does).
        extra, missing: as in :class:`GateCheck`.

    Example:
        >>> sweep = LayerSweep(target=["eoi"], widths=[1, 2], effect=[0.3, 0.9], from_layer=2)
        >>> sweep["widths"], sweep.from_layer, sweep.to_dict()["target"]
        ([1, 2], 2, ['eoi'])
    """

    target: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    effect: list[float] = field(default_factory=list)
    from_layer: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    missing: frozenset = field(default=frozenset(), repr=False)
