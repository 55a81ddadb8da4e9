"""What a gate search found: its candidates, the check of its estimates, its cost.

:class:`GateSearch` holds :class:`GateCandidate` s (classes and single positions), a
:class:`GateCheck` and a :class:`GateCost`; ``to_dict()``/``from_dict()`` round-trip it
through JSON (``gates.json`` of ``tl-vlm find-gate``), searches saved by older versions
included.

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.eval.tasks import toy_task
    >>> from tl_vlm.analyses.gates import find_gates
    >>> gates = find_gates(HookedVLM.from_pretrained("toy-gated"), toy_task(12), rows=False,
    ...                    overlap=False, check_random=0)
    >>> gates.check.spearman > 0.5, gates.cost.n_classes, gates.ranking[0].name
    (True, 6, 'eoi')
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.analyses.gates.candidates import IMAGE_SIDE
from tl_vlm.analyses.gates.records import GateCheck, GateCost, LayerSweep
from tl_vlm.core.jsonable import jsonable


@dataclass
class GateCandidate:
    """One candidate: a position class or a single image-side position.

    Attributes:
        name: ``"eoi"``, ``"row 3"``, ``"image (2, 5)"``, ...
        kind: ``"class"`` or ``"position"``.
        role: the class a position belongs to (``boi``, ``image``, ``row_break``, ``eoi``,
            ``special``); for a class, its own name.
        effect: mean drop of the metric when it is knocked out: exact where known
            (``exact``), else ``refined``.
        share: ``effect`` over the whole image side's exact effect.
        estimate: the first-order (attribution) estimate of the drop, each example's
            clipped at zero before the mean (:mod:`tl_vlm.analyses.gates.search`); for a class, the
            sum of its positions' unclipped estimates.
        refined: for a position, the mean over examples of its exact drop where it was
            measured in that example (``checked_in`` examples: by the per-example checks,
            or by the pass of a class that is this one position there), its clipped
            estimate elsewhere; None for a class.
        exact: the exact knockout's drop (classes; checked positions); None if not run.
        exact_se: its standard error over the examples (None below two examples): two
            positions whose exact drops differ by less than a few of these are not ranked
            by this sample.
        score: the task's score under the knockout (classes).
        per_layer: estimated drop when it is knocked out in one layer only, per layer
            (unclipped: their sum is the plain first-order mean).
        contribution: its share of the value-weighted text -> image-side attention,
            pooled over layers (None where the contribution groups cannot tell).
        contribution_per_layer: the same per layer (classes that are contribution groups).
        overlap: neighbourhood overlap with the class labels per layer (classes).
        n_examples: examples that have it; n_positions: its mean size per example.
        grid: ``(image, row, col)`` of a content position.
        token: the token at the position (first example that has it).
        in_classes: for a position, the classes of one position per example that hold
            it in every example that has it (``eoi``, ``last_image``, ...).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> from tl_vlm.analyses.gates import find_gates
        >>> model = HookedVLM.from_pretrained("toy-last-image")
        >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
        >>> gate = gates.ranking[0]
        >>> gate.name, gate.kind, gate.role, gate.grid, gate.in_classes
        ('image (5, 5)', 'position', 'image', (0, 5, 5), ['last_image'])
        >>> gate.exact > 10 * gate.estimate > 0          # first order: far below the exact drop
        True
        >>> len(gate.per_layer), gates.candidate("last_image").score    # task accuracy when cut
        (4, 0.25)
    """

    name: str
    kind: str
    role: str
    effect: float
    share: float
    estimate: Optional[float] = None
    refined: Optional[float] = None
    checked_in: int = 0
    exact: Optional[float] = None
    exact_se: Optional[float] = None
    score: Optional[float] = None
    per_layer: list[float] = field(default_factory=list)
    contribution: Optional[float] = None
    contribution_per_layer: Optional[list[float]] = None
    overlap: Optional[list[float]] = None
    n_examples: int = 0
    n_positions: float = 1.0
    grid: Optional[tuple[int, int, int]] = None
    token: Optional[str] = None
    in_classes: list[str] = field(default_factory=list)


@dataclass
class GateSearch:
    """What :func:`~tl_vlm.analyses.gates.find_gates` found. ``to_dict()``/``from_dict()``
    round-trip through JSON.

    Attributes:
        model, family: what was searched; n_layers, n_examples, metric, queries: how.
        clean_score: the task's mean score without knockout; clean_metric: the metric's.
        total_effect: the exact drop of the metric with the whole image side knocked out.
        classes, positions: the candidates (positions in order of their refined value).
        verdict: ``"narrow"``, ``"mixed"``, ``"distributed"`` or ``"no image effect"``.
        gate: names of the one or two positions the verdict is about (best first; none
            when distributed).
        gate_share: the exact share of the image effect of ``gate`` knocked out together;
            top_shares: the same for the best one and the best two positions.
        best_class: the class (other than ``image`` and ``image_side``) with the largest
            exact share; of those within 5% of it, the one with the fewest positions.
        layers: the layer sweep (:class:`LayerSweep`): ``target`` (what was knocked out),
            ``widths`` (w, the last-w layers), ``effect`` (drop per w), ``from_layer``.
        check: the estimate against exact knockouts (:class:`GateCheck`: Spearman,
            top-k agreement, the positions the sample settles, the refined values').
        cost: passes and seconds per phase (:class:`GateCost`): the search's passes per
            batch against its budget of ``3 + n_classes`` forwards, the exact checks'
            apart.
        notes: anything skipped, and why.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> from tl_vlm.analyses.gates import find_gates
        >>> model = HookedVLM.from_pretrained("toy-distributed")
        >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
        >>> gates.verdict, gates.gate, gates.clean_score, len(gates.positions)
        ('distributed', [], 1.0, 38)
        >>> gates.layers["target"], gates.layers["widths"]   # the whole image side, last w layers
        (['image_side'], [1, 2, 3, 4])
    """

    model: str
    family: str
    n_layers: int
    n_examples: int
    metric: str
    queries: str
    clean_score: float
    clean_metric: float
    total_effect: float
    classes: list[GateCandidate]
    positions: list[GateCandidate]
    verdict: str
    gate: list[str]
    gate_share: float
    top_shares: list[float]
    best_class: Optional[str]
    layers: LayerSweep
    check: GateCheck
    cost: GateCost
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the dicts of a saved search (or of code that builds one by hand) become records
        if not isinstance(self.check, GateCheck):
            self.check = GateCheck.from_dict(self.check)
        if not isinstance(self.cost, GateCost):
            self.cost = GateCost.from_dict(self.cost)
        if not isinstance(self.layers, LayerSweep):
            self.layers = LayerSweep.from_dict(self.layers)

    @property
    def ranking(self) -> list[GateCandidate]:
        """Single image-side positions by effect (exact where checked, else refined),
        largest first.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
            >>> from tl_vlm.analyses.gates import find_gates
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> [(c.name, c.in_classes) for c in gates.ranking[:1]]
            [('eoi', ['eoi', 'gate'])]
        """
        return sorted(self.positions, key=lambda c: -c.effect)

    @property
    def class_ranking(self) -> list[GateCandidate]:
        """Position classes (but ``image_side``) by exact effect, largest first.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
            >>> from tl_vlm.analyses.gates import find_gates
            >>> model = HookedVLM.from_pretrained("toy-distributed")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> [c.name for c in gates.class_ranking][:1]               # all content tokens
            ['image']
        """
        return sorted((c for c in self.classes if c.name != IMAGE_SIDE), key=lambda c: -c.effect)

    def candidate(self, name: str) -> GateCandidate:
        """A candidate by name (classes first).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
            >>> from tl_vlm.analyses.gates import find_gates
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> gates.candidate("eoi").kind, gates.candidate("eoi").share > 0.9
            ('class', True)
            >>> gates.candidate("nothing")
            Traceback (most recent call last):
            ...
            KeyError: "no candidate 'nothing'; classes are ['image_side', 'boi', ...]"
        """
        for c in self.classes + self.positions:
            if c.name == name:
                return c
        raise KeyError(f"no candidate {name!r}; classes are {[c.name for c in self.classes]} "
                       f"and positions are named like {[c.name for c in self.positions[:3]]}")

    def effect_grid(self, value: Literal["effect", "refined", "estimate", "contribution"] = "estimate",
                    image: int = 0) -> Float[Tensor, "row col"]:
        """A content-position value on image ``image``'s grid (NaN where no position).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
            >>> from tl_vlm.analyses.gates import find_gates
            >>> model = HookedVLM.from_pretrained("toy-distributed")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> gates.effect_grid().shape
            torch.Size([6, 6])
        """
        cells = [c for c in self.positions if c.grid is not None and c.grid[0] == image]
        if not cells:
            raise ValueError(f"no content positions of image {image} among the candidates")
        rows = max(c.grid[1] for c in cells) + 1
        cols = max(c.grid[2] for c in cells) + 1
        out = torch.full((rows, cols), float("nan"))
        for c in cells:
            v = getattr(c, value)
            out[c.grid[1], c.grid[2]] = float("nan") if v is None else v
        return out

    def summary(self) -> str:
        """The verdict and the numbers behind it, as text.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
            >>> from tl_vlm.analyses.gates import find_gates
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> print(gates.summary())                                  # doctest: +ELLIPSIS
            narrow: eoi carries 0.92 of the image effect (from layer 1 on)
            ... 12 examples; metric: log_odds of the answer; knockout queries: all; ...
            best one / two positions: 0.921 / 0.926 of the image effect; best class: eoi (0.921)
            layers (eoi knocked out in the last w layers, ...): last 1: 0.286, ..., last 4: 0.921
            estimate vs exact on 6 positions: Spearman 1, top-5 agree on 5; refined by 5 exact knockouts per example: ...
            cost: 8 passes per batch (6 classes), ... x one forward (budget: 9); exact checks: 8 forwards per batch
            classes (exact): image 1.11, image_side 1, eoi 0.921, first_image 0.028, boi ...
            top positions (share ± standard error): eoi 0.921 ± 0.14, image (0, 0) 0.028 ± 0.013, ...
            note: gate: the same positions as eoi in every example (not listed apart)
        """
        def fmt(x: Optional[float]) -> str:
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

        lines = [self.headline()]
        lines.append(f"{self.model} ({self.family}, {self.n_layers} layers), {self.n_examples} "
                     f"examples; metric: {self.metric} of the answer; knockout queries: "
                     f"{self.queries}; clean score {fmt(self.clean_score)}, clean metric "
                     f"{fmt(self.clean_metric)}, whole image side knocked out: drop "
                     f"{fmt(self.total_effect)}")
        lines.append(f"best one / two positions: {fmt(self.top_shares[0])} / "
                     f"{fmt(self.top_shares[1])} of the image effect; best class: "
                     f"{self.best_class} ({fmt(self._share(self.best_class))})")
        if self.layers.get("widths"):
            sweep = ", ".join(f"last {w}: {fmt(e / self.total_effect if self.total_effect else None)}"
                              for w, e in zip(self.layers["widths"], self.layers["effect"]))
            lines.append(f"layers ({' + '.join(self.layers['target'])} knocked out in the last "
                         f"w layers, share of the image effect): {sweep}")
        check, cost = self.check, self.cost
        if check.names:
            settled = check.top_k_settled
            refined = "" if not check.per_example else (
                f"; refined by {check.per_example} exact knockouts per example: "
                f"{fmt(check.refined_spearman)}, {check.refined_top_k_agree}")
            lines.append(f"estimate vs exact on {len(check.names)} positions: Spearman "
                         f"{fmt(check.spearman)}, top-{check.top_k} agree on "
                         f"{check.top_k_agree}{refined}" + ("" if settled is None else
                         f" (of the exact top {check.top_k}, {settled} "
                         f"lead{'s' if settled == 1 else ''} the next by over 2 standard errors)"))
        budget = 3 + cost.n_classes if "budget_forwards" in cost.missing else cost.budget_forwards
        checks = cost.check_forwards_per_batch
        lines.append(f"cost: {cost.passes_per_batch} passes per batch "
                     f"({cost.n_classes} classes), {fmt(cost.time_ratio)} x "
                     f"one forward (budget: {budget})" + ("" if checks is None else
                     f"; exact checks: {fmt(checks)} forwards per batch"))
        lines.append("classes (exact): " + ", ".join(
            f"{c.name} {fmt(c.share)}" for c in sorted(self.classes, key=lambda c: -c.effect)))
        def share_of(c: GateCandidate) -> str:
            if c.exact is None:
                return f"{fmt(c.share)} ({'refined' if c.checked_in else 'est.'})"
            if c.exact_se is None or not self.total_effect:
                return fmt(c.share)
            return f"{fmt(c.share)} ± {c.exact_se / abs(self.total_effect):.2g}"

        lines.append("top positions (share ± standard error): " + ", ".join(
            f"{c.name} {share_of(c)}" for c in self.ranking[:5]))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def headline(self) -> str:
        """The summary's first line.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
            >>> from tl_vlm.analyses.gates import find_gates
            >>> model = HookedVLM.from_pretrained("toy-distributed")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> gates.headline()                                    # doctest: +ELLIPSIS
            'distributed: no one or two image-side positions carry more than 0... of the image effect; ...'
        """
        layers = self.layers.get("from_layer")
        where = "" if layers is None else f" (from layer {layers} on)"
        if self.verdict == "no image effect":
            return (f"no image effect: knocking out the whole image side changes the "
                    f"{self.metric} by {self.total_effect:.3g}")
        if self.verdict == "distributed":
            return (f"distributed: no one or two image-side positions carry more than "
                    f"{self.top_shares[1]:.2f} of the image effect; the best class is "
                    f"{self.best_class} ({self._share(self.best_class):.2f}){where}")
        named = []
        for name in self.gate:
            also = [c for c in self.candidate(name).in_classes if c not in (name, "gate")]
            named.append(f"{name} ({also[0]})" if also and name not in also else name)
        return (f"{self.verdict}: {' + '.join(named)} carr{'ies' if len(named) == 1 else 'y'} "
                f"{self.gate_share:.2f} of the image effect{where}")

    def _share(self, name: Optional[str]) -> float:
        return float("nan") if name is None else self.candidate(name).share

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (candidates become dicts).

        Example:
            >>> import json
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
            >>> from tl_vlm.analyses.gates import find_gates
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> again = GateSearch.from_dict(json.loads(json.dumps(gates.to_dict())))
            >>> again.summary() == gates.summary()
            True
        """
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(classes=[asdict(c) for c in self.classes],
                    positions=[asdict(c) for c in self.positions],
                    check=self.check.to_dict(), cost=self.cost.to_dict(),
                    layers=self.layers.to_dict())
        return jsonable(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateSearch":
        """The inverse of :meth:`to_dict` (see there); reads the searches older versions
        saved (without refined values, standard errors, settled positions, ...)."""
        data = dict(data)
        for key in ("classes", "positions"):
            data[key] = [GateCandidate(**{**c, "grid": tuple(c["grid"]) if c.get("grid") else None})
                         for c in data[key]]
        return cls(**data)


