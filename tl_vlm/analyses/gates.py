"""Find the gate: which image-side positions carry the image to the text, how narrowly, where.

The Narrow Gate paper asks of each model whether the image reaches the text through
EOI. :func:`find_gates` asks the question without the guess. Its candidates are

- every position class the layout defines: ``boi``, ``first_image`` and ``last_image``
  (the first and last content token of each image), ``image`` (all content tokens),
  ``eoi``, ``gate`` (when it differs from EOI: Emu3's EOI + EOF), ``row_breaks``,
  ``specials``, each image row ``row r`` (its content tokens), and ``image_side`` (all of
  them: the reference);
- every single image-side position, named by its role: ``boi``, ``image (r, c)``,
  ``eoi``, ``row break k``, ``special k`` (``#n`` for the n-th image).

**Effect.** A candidate's effect is the drop of a differentiable task score
(:class:`GateMetric`: the answer's log-odds) when every position (queries ``"all"``,
including the candidate itself) stops attending to it in every layer, with the paper's
knockout (:func:`~tl_vlm.analyses.knockout.knockout_hooks`: post-softmax zero, no
renormalisation). Shares are effects divided by the ``image_side`` effect.

- Classes: exact, one forward each; the task's own score under the knockout is kept too.
- Single positions: an attribution-patching estimate from one backward pass. With
  ``A[l, h, q, k]`` the post-softmax pattern and ``M`` the metric,

      estimate(k) = sum over layers l, heads h, queries q of dM/dA[l, h, q, k] * A[l, h, q, k]

  is the first-order change of ``M`` (its drop) when the edges into ``k`` go from their
  clean values to their knocked-out value, zero. It is the derivative of ``M`` with
  respect to a scale ``s[l, k]`` on every edge into ``k``
  (:class:`~tl_vlm.core.attention_edits.KeyScale`), which the attention function applies to
  ``k``'s value vector (``p s v = p (s v)``): the pattern is never built, and the
  backward is SDPA's own. The "corrupted" run of attribution
  patching is the knockout of *every* image-side key: on the edges into any image-side
  key its pattern is exactly zero, the value a single knockout gives them, so the
  activation difference is ``-A`` on those edges and is known without running it. That
  corrupted forward is still run, as the ``image_side`` class: it measures the whole
  image's effect exactly, the denominator of every share. Per layer, the same sum
  restricted to one layer estimates the knockout of ``k`` in that layer only.

  With ``alpha < 1`` the gradient is taken with every image-side edge scaled by
  ``alpha`` instead (a one-point integrated gradient along the path from the clean run to
  the corrupted one; the pattern multiplying it is then that run's, unscaled, which makes
  the product exactly the derivative with respect to a gate variable on the key's edges).

  Each example's estimate is clipped at zero before the mean over examples. A knockout's
  exact drops are almost never negative (on the three toy models, 2-14% of their mass),
  the first-order ones often are (30-80%): at the clean run, paths through later layers
  cancel, and a key whose removal hurts can have a negative slope there (the toy's BOI).
  Clipped, the estimates rank every position better (Spearman with exhaustive exact
  knockouts at n=240: 0.88, 0.97, 0.89 on toy-gated, -distributed, -last-image; unclipped
  0.67, 0.73, 0.54).

  The estimate is first order: where the model saturates (the toy models answer with
  log-odds ~11), it can understate a gate's effect tenfold and more (``completeness``,
  the estimates' sum over the image side's exact effect, shows how much), and it cannot
  see a knockout that flips a few answers outright (the toy-last-image's second-best
  position drops the log-odds by 15-20 in 3% of the examples, by ~0 elsewhere). So it
  serves to say where to look:

- Per-example checks: in each example, the ``check_per_example`` (5) positions with the
  largest estimates are knocked out exactly; round j knocks out every example's own j-th
  best in one forward. Positions that a class of one position stands for in an example
  (BOI, EOI, the first and last image token) are exact there already, from the class's
  pass. A position's ``refined`` value is the mean over examples of its exact drop where
  it was measured and of its estimate elsewhere: the rare examples where one position
  flips the answer are the examples where it ranks high by estimate, so they are
  measured, not extrapolated. Refined, the top 5 was the exhaustive top 5 on all three
  toys (n=240, and n=24 under four seeds but for one position within the exact ties).
- Global checks: the ``check_top`` best by refined value and ``check_random`` random other
  positions are knocked out exactly in every example (Spearman correlation and top-k
  agreement of the estimate and of the refined values in :attr:`GateSearch.check`); a
  checked position's ``effect`` is its exact one, with its standard error
  (``exact_se``), every other position's its refined value.

**Verdict.** ``narrow`` when the best one or two single positions, knocked out together,
take at least ``narrow`` (0.6) of the image's effect; ``distributed`` when they take less
than ``distributed`` (0.25); ``mixed`` in between; ``no image effect`` when knocking out the
whole image side moves the score by less than ``min_effect``. The layers: the gate (or,
when distributed, the whole image side) is knocked out in the last ``w`` layers only;
"from layer L on" is the latest start that still has 0.9 of the all-layer effect.

**Cost per batch** (:attr:`GateSearch.cost`): one forward with gradients and its
backward (every single position, every layer), which at ``alpha`` = 1 is also the clean
run (task score, metric targets, the cross-modal contribution read-only) when the task
scores from one forward (next-token tasks; a task that generates runs its own clean
pass as well), and one forward per class (``image_side`` included). Every pass runs
PyTorch's SDPA kernel: knockouts of every query and the gradient's scales act on the
value vectors. A backward costs about two forwards, so the search costs
``3 + n_classes`` forward-equivalents (``budget_forwards``; ``time_ratio`` is the time
measured per batch over one plain forward). The checks (``check_per_example`` forwards
per batch, one per globally checked position, one for the best two together), the layer
sweep and the neighbourhood overlap are extra passes, counted apart
(``check_forwards_per_batch``).

Example (toy-gated routes every visual fact through EOI):
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.eval.tasks import toy_task
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> gates = find_gates(model, toy_task(24), batch_size=12, overlap=False)
    >>> gates.verdict, gates.gate
    ('narrow', ['eoi'])
    >>> gates.ranking[0].name, gates.ranking[0].kind           # the best single candidate
    ('eoi', 'position')
    >>> print(gates.summary().splitlines()[0])
    narrow: eoi carries 0.98 of the image effect (from layer 1 on)
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_vlm.analyses.contribution import ContributionAccumulator
from tl_vlm.analyses.knockout import Hook, knockout_hooks
from tl_vlm.analyses.logit_lens import final_logit_transform
from tl_vlm.core.attention_edits import KeyScale, PatternReader
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet
from tl_vlm.core.recompute import recompute_blocks

Key = tuple  # a single position's role: ("boi", n), ("image", image, row, col), ...
Queries = Literal["all", "text"]
_IMAGE_SIDE = "image_side"


# -- candidates --------------------------------------------------------------------------
def _image_row(pos: ImagePositions, row: int) -> PositionSet:
    """The content tokens in grid row ``row`` of every image."""
    rows = []
    for b, grid in enumerate(pos.grid):
        content = pos.image[b]
        rows.append(content[(grid[:, 1] == row).to(content.device)].tolist() if grid.numel() else [])
    return PositionSet.from_lists(rows, pos.seq_len)


def candidate_classes(pos: ImagePositions, rows: bool = True) -> dict[str, PositionSet]:
    """The position classes of a batch that are not empty in every example.

    ``image_side`` first (the reference), then the layout's classes and, with ``rows``,
    each image row. Two classes may hold the same positions (the toy's ``gate`` is its
    ``eoi``); :func:`find_gates` knocks such a set out once.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pos = model.prepare(make_examples(2).prompts).positions
        >>> list(candidate_classes(pos, rows=False))
        ['image_side', 'boi', 'first_image', 'last_image', 'image', 'eoi', 'gate']
        >>> candidate_classes(pos)["row 5"].tolist()[0]
        [32, 33, 34, 35, 36, 37]
    """
    pos = pos.to("cpu")
    named = {_IMAGE_SIDE: pos.image_side, "boi": pos.boi, "first_image": pos.first_image,
             "last_image": pos.last_image, "image": pos.image, "eoi": pos.eoi,
             "gate": pos.gate, "row_breaks": pos.row_breaks, "specials": pos.specials}
    if rows:
        n_rows = max((int(g[:, 1].max()) + 1 for g in pos.grid if g.numel()), default=0)
        named.update({f"row {r}": _image_row(pos, r) for r in range(n_rows)})
    return {name: s for name, s in named.items() if not s.is_empty()}


def position_roles(pos: ImagePositions, example: int) -> list[tuple[Key, int]]:
    """``(role, position)`` of every image-side position of one example, in order.

    Content tokens are ``("image", image, row, col)``; the others ``(kind, n)``, the n-th
    of that kind in the example (kinds: ``boi``, ``row_break``, ``eoi``, ``special``).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pos = model.prepare(make_examples(2).prompts).positions
        >>> roles = position_roles(pos, 0)
        >>> roles[:2], roles[-1], [role_label(r) for r, _ in roles[:2]]
        ([(('boi', 0), 1), (('image', 0, 0, 0), 2)], (('eoi', 0), 38), ['boi', 'image (0, 0)'])
    """
    pos = pos.to("cpu")
    cells = {int(p): tuple(int(v) for v in pos.grid[example][i].tolist())
             for i, p in enumerate(pos.image[example].tolist())}
    kinds = (("boi", pos.boi), ("row_break", pos.row_breaks), ("eoi", pos.eoi),
             ("special", pos.specials))
    seen: Counter = Counter()
    out = []
    for p in pos.image_side[example].tolist():
        if p in cells:
            out.append((("image",) + cells[p], p))
            continue
        kind = next(k for k, s in kinds if s.mask[example, p])
        out.append(((kind, seen[kind]), p))
        seen[kind] += 1
    return out


def role_label(key: Key, several_images: bool = False) -> str:
    """A readable name of a single position's role.

    Example:
        >>> role_label(("image", 0, 2, 5)), role_label(("image", 1, 2, 5), several_images=True)
        ('image (2, 5)', 'image 1 (2, 5)')
        >>> role_label(("eoi", 0)), role_label(("eoi", 1)), role_label(("row_break", 3))
        ('eoi', 'eoi #1', 'row break 3')
    """
    if key[0] == "image":
        _, image, row, col = key
        return f"image {image} ({row}, {col})" if several_images else f"image ({row}, {col})"
    kind, n = key
    if kind in ("boi", "eoi"):
        return kind if n == 0 else f"{kind} #{n}"
    return f"{kind.replace('_', ' ')} {n}"


# -- the score -----------------------------------------------------------------------------
@dataclass
class GateMetric:
    """The differentiable score whose drop measures a knockout: per example, the log-odds
    ``logit[target] - logsumexp(logits of the other candidates)`` at the last position
    (``kind="log_odds"``, which does not saturate when the model is sure), or the log
    probability of the target (``"logprob"``). Candidates are the task's closed set of
    answers for the example's question kind when it has one, else the whole vocabulary.

    Targets: a :class:`~tl_vlm.eval.tasks.NextTokenTask`'s answers; for any other task the
    clean model's own greedy next token.

    Example:
        >>> import torch
        >>> metric = GateMetric("log_odds")
        >>> logits = torch.tensor([[2.0, 0.0, 0.0, -1.0]])
        >>> round(metric(logits, torch.tensor([0]))[0].item(), 3)                   # 2 - log 2.37
        1.138
        >>> allowed = torch.tensor([[True, True, False, False]])
        >>> metric(logits, torch.tensor([0]), allowed).tolist()                     # closed set
        [2.0]
        >>> round(GateMetric("logprob")(logits, torch.tensor([0]), allowed).item(), 3)
        -0.127
    """

    kind: Literal["log_odds", "logprob"] = "log_odds"

    def __post_init__(self) -> None:
        if self.kind not in ("log_odds", "logprob"):
            raise ValueError(f"metric must be 'log_odds' or 'logprob', got {self.kind!r}")

    def __call__(self, logits: Float[Tensor, "batch vocab"], targets: Int[Tensor, "batch"],
                 allowed: Optional[Bool[Tensor, "batch vocab"]] = None) -> Float[Tensor, "batch"]:
        logits = logits.float()
        targets = targets.to(logits.device)
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        target = logits.gather(1, targets[:, None])[:, 0]
        if self.kind == "logprob":
            return target - logits.logsumexp(-1)
        others = logits.scatter(1, targets[:, None], float("-inf"))
        return target - others.logsumexp(-1)


class _Targets:
    """Per-batch targets and allowed answers of the metric, from the task."""

    def __init__(self, model, task) -> None:
        from tl_vlm.core.answers import answer_token_ids

        self.model = model
        self.task = task
        self.answers = callable(getattr(task, "answer_ids", None))   # a NextTokenTask
        self.closed: Optional[dict[Any, Tensor]] = None
        if self.answers and getattr(task, "closed_set", False) \
                and all(ex.kind is not None for ex in task.examples):
            words: dict[Any, set] = {}
            for ex in task.examples:
                words.setdefault(ex.kind, set()).add(ex.answers[0])
            tok = model.layout.tokenizer
            self.closed = {kind: answer_token_ids(tok, sorted(w), closed_set=True,
                                                  on_collision=getattr(task, "on_collision", "error"))
                           for kind, w in words.items()}

    def __call__(self, examples, clean_last: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if self.answers:
            targets = self.task.answer_ids(self.model, examples)
        else:
            targets = clean_last.argmax(-1).cpu()
        if self.closed is None:
            return targets, None
        allowed = torch.zeros(len(examples), clean_last.shape[-1], dtype=torch.bool)
        for b, ex in enumerate(examples):
            allowed[b, self.closed[ex.kind]] = True
        return targets, allowed


# -- results -----------------------------------------------------------------------------
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
            clipped at zero before the mean (see the module docstring); for a class, the
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
    """What :func:`find_gates` found. ``to_dict()``/``from_dict()`` round-trip through JSON.

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
        layers: the layer sweep: ``target`` (what was knocked out), ``widths`` (w, the
            last-w layers), ``effect`` (drop per w), ``from_layer``.
        check: the estimate against exact knockouts: ``names``, ``estimate``, ``exact``,
            ``exact_se``, ``spearman``, ``top_k``, ``top_k_agree`` (positions in both top-k
            lists, among the checked ones), ``settled`` and ``top_k_settled`` (which and
            how many of the exact top k lead the exact (k+1)-th, both among the checked
            positions, by more than two standard errors of their paired difference:
            beyond those, the sample does not rank the positions, and no list can agree
            but by chance), ``per_example``, ``refined``,
            ``refined_spearman`` and ``refined_top_k_agree`` (the same for the values the
            per-example checks refined), ``alpha``, ``completeness`` (the estimates' sum
            over ``total_effect``).
        cost: passes and seconds per phase; ``passes_per_batch`` (forwards and backwards
            run: 2 + ``n_classes`` for a next-token task, one more for a task that
            generates, one more with ``recompute_activations``), ``budget_forwards``
            (3 + ``n_classes``: a backward is about two forwards) and ``time_ratio`` (the
            search's seconds per batch over one plain forward's); the exact checks come apart (``check_forwards_per_batch``: the
            per-example ones, the best, the random sample, the best two together), as
            do the layer sweep's forwards (``passes["sweep_forward"]``).
        notes: anything skipped, and why.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
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
    layers: dict[str, Any]
    check: dict[str, Any]
    cost: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def ranking(self) -> list[GateCandidate]:
        """Single image-side positions by effect (exact where checked, else refined),
        largest first.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
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
            >>> model = HookedVLM.from_pretrained("toy-distributed")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> [c.name for c in gates.class_ranking][:1]               # all content tokens
            ['image']
        """
        return sorted((c for c in self.classes if c.name != _IMAGE_SIDE), key=lambda c: -c.effect)

    def candidate(self, name: str) -> GateCandidate:
        """A candidate by name (classes first).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.eval.tasks import toy_task
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
        if self.check.get("names"):
            settled = self.check.get("top_k_settled")
            refined = "" if not self.check.get("per_example") else (
                f"; refined by {self.check['per_example']} exact knockouts per example: "
                f"{fmt(self.check['refined_spearman'])}, {self.check['refined_top_k_agree']}")
            lines.append(f"estimate vs exact on {len(self.check['names'])} positions: Spearman "
                         f"{fmt(self.check['spearman'])}, top-{self.check['top_k']} agree on "
                         f"{self.check['top_k_agree']}{refined}" + ("" if settled is None else
                         f" (of the exact top {self.check['top_k']}, {settled} "
                         f"lead{'s' if settled == 1 else ''} the next by over 2 standard errors)"))
        budget = self.cost.get("budget_forwards", 3 + self.cost["n_classes"])
        checks = self.cost.get("check_forwards_per_batch")
        lines.append(f"cost: {self.cost['passes_per_batch']} passes per batch "
                     f"({self.cost['n_classes']} classes), {fmt(self.cost.get('time_ratio'))} x "
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
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> gates = find_gates(model, toy_task(12), rows=False, overlap=False, check_random=0)
            >>> again = GateSearch.from_dict(json.loads(json.dumps(gates.to_dict())))
            >>> again.summary() == gates.summary()
            True
        """
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateSearch":
        """The inverse of :meth:`to_dict` (see there)."""
        data = dict(data)
        for key in ("classes", "positions"):
            data[key] = [GateCandidate(**{**c, "grid": tuple(c["grid"]) if c.get("grid") else None})
                         for c in data[key]]
        return cls(**data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# -- one batch -----------------------------------------------------------------------------
class _Search:
    """Running sums of :func:`find_gates` over batches."""

    def __init__(self, model, task, metric: GateMetric, queries: Queries, rows: bool,
                 alpha: float, per_example: int = 0, recompute: bool = False) -> None:
        self.model, self.task, self.metric = model, task, metric
        self.queries, self.rows, self.alpha = queries, rows, alpha
        self.per_example, self.recompute = per_example, recompute
        self.targets = _Targets(model, task)
        self.transform = final_logit_transform(model)
        self.n_layers = model.cfg.n_layers
        self.n = 0
        self.clean_score = 0.0
        self.clean_metric = 0.0
        # class name -> [sum of scores, examples, positions]
        self.classes: dict[str, list[float]] = {}
        # class name -> batch start -> per-example drops (NaN where the class is absent)
        self.class_drops: dict[str, dict[int, Tensor]] = {}
        self.class_layers: dict[str, Tensor] = {}
        # role -> sums over the examples that have it
        self.est: dict[Key, Tensor] = {}          # [layer] summed estimate
        self.drop: Counter = Counter()              # summed per-example estimate clipped at 0
        self.refined: Counter = Counter()           # the same, exact where checked in the example
        self.checked_in: Counter = Counter()        # examples where it was checked exactly
        self.count: Counter = Counter()
        self.tokens: dict[Key, str] = {}
        self.member: dict[Key, set] = {}           # classes holding the role wherever it is
        self.several_images = False
        self.distinct: set = set()                  # classes knocked out on their own somewhere
        self.alias_of: dict[str, set] = {}          # class -> classes with the same positions
        self.class_forwards = 0
        self.batches = 0
        self.clean_of: dict[int, tuple] = {}       # batch start -> (metric, targets, allowed)
        self.starts: dict[int, int] = {}           # batch start -> its examples, in order
        self.logit_scoring = False                  # the task scores from the last logits
        self.cost = Counter()
        self.seconds = Counter()

    # the score under some hooks -------------------------------------------------------
    def query_set(self, pos: ImagePositions) -> PositionSet:
        return pos.all if self.queries == "all" else pos.text

    def knockout(self, batch: VLMBatch, keys: PositionSet, layers="all") -> list[Hook]:
        return knockout_hooks(self.model, batch, keys=keys, queries=self.query_set(batch.positions),
                              layers=layers)

    def scored(self, batch: VLMBatch, examples, hooks: Sequence[Hook]) -> tuple[Tensor, Tensor]:
        """(task scores, last-position logits of the prompt pass) under ``hooks``: one
        forward when the task scores from the last logits, else one ``task.score`` call,
        with a read-only hook keeping the logits of its prompt forward."""
        if self.logit_scoring:
            with torch.no_grad():
                raw = self.model.last_logits(batch, fwd_hooks=list(hooks))
            self.cost["forward"] += 1
            return (self.task.score_from_logits(self.model, examples, raw).float().cpu(),
                    self.transform(raw).float().cpu())
        kept: dict[str, Tensor] = {}

        def keep(logits: Tensor, hook) -> None:
            if "last" not in kept:           # later calls: cached generation steps
                # full logits, or only the last positions' (logits_to_keep): last_of reads both
                kept["last"] = self.transform(batch.last_of(logits.detach())).float().cpu()

        scores = self.task.score(self.model, batch, examples,
                                 fwd_hooks=list(hooks) + [("unembed.hook_out", keep)])
        if "last" not in kept:
            raise RuntimeError("the task's score never ran a forward pass over the whole prompt "
                               "(no logits at unembed.hook_out): find_gates needs one")
        self.cost["forward"] += 1
        return scores.float().cpu(), kept["last"]

    @torch.no_grad()
    def metric_under(self, batch: VLMBatch, hooks: Sequence[Hook], targets, allowed,
                     counter: str = "check_forward") -> Tensor:
        last = self.transform(self.model.last_logits(batch, fwd_hooks=hooks)).float().cpu()
        self.cost[counter] += 1
        return self.metric(last, targets, allowed)

    def check_per_example(self, batch: VLMBatch, drop: Float[Tensor, "batch pos"],
                          refined: Float[Tensor, "batch pos"], checked: Bool[Tensor, "batch pos"],
                          clean: Tensor, targets, allowed) -> None:
        """Each example's ``per_example`` image-side positions with the largest (clipped)
        estimates ``drop``, knocked out exactly: round j knocks out every example's j-th
        best, one forward for the batch. Positions already ``checked`` (a class of one
        position measured them) are skipped. Writes the exact drops into ``refined`` and
        marks them in ``checked``."""
        pos = batch.positions.to("cpu")
        candidates = drop.masked_fill(~pos.image_side.mask | checked, float("-inf"))
        rounds = min(self.per_example, int(candidates.isfinite().sum(1).max()))
        best = candidates.argsort(dim=1, descending=True, stable=True)[:, :rounds]   # [batch, rounds]
        rows = torch.arange(len(drop))
        for j in range(rounds):
            col = best[:, j]
            valid = candidates[rows, col].isfinite()
            keys = PositionSet.from_lists([[int(c)] if v else [] for c, v in zip(col, valid)],
                                          pos.seq_len)
            exact = clean - self.metric_under(batch, self.knockout(batch, keys), targets, allowed,
                                              counter="example_check_forward")
            refined[rows[valid], col[valid]] = exact[valid]
            checked[rows[valid], col[valid]] = True

    # attribution ---------------------------------------------------------------------
    def attribution(self, batch: VLMBatch, examples, extra: Sequence[Hook] = (),
                    clean: Optional[tuple] = None) -> dict[str, Any]:
        """Per (layer, example, key): the derivative of the metric with respect to a scale
        on every edge into the key (:class:`~tl_vlm.core.attention_edits.KeyScale`, applied to
        the values: SDPA forward and backward), taken with the image-side scales at
        ``alpha``: one forward, one backward. The sum over layers estimates the drop when
        the key is knocked out. ``extra`` hooks ride along (the contribution's readers);
        ``clean`` is ``(targets, allowed)`` when a clean pass already fixed them, else the
        targets are read from this pass's logits (at ``alpha`` = 1 it *is* the clean run).

        Returns ``estimate [layer, batch, pos]``, ``metric``, ``last`` (the final
        transform's logits) and ``raw_last`` (the model's), ``targets``, ``allowed``."""
        pos = batch.positions
        queries = None if self.queries == "all" else self.query_set(pos).mask
        base = torch.where(pos.image_side.mask, self.alpha, 1.0)
        scales = [base.clone().requires_grad_(True) for _ in range(self.n_layers)]
        hooks = list(extra) + [
            (f"blocks.{l}.attn.hook_pattern", KeyScale(s, query_mask=queries, padding=pos.padding.mask))
            for l, s in enumerate(scales)]
        # The hooks stay registered through the backward: recomputed blocks fire them again.
        with torch.enable_grad(), _no_weight_grads(self.model), self.model.hooks(fwd_hooks=hooks), \
                recompute_blocks(self.model, enabled=self.recompute):
            raw = self.model.last_logits(batch, use_cache=False)
            last = self.transform(raw)
            targets, allowed = clean if clean is not None else \
                self.targets(examples, last.detach().float().cpu())
            m = self.metric(last, targets, allowed)
            if not m.requires_grad:
                raise RuntimeError("no gradient reached the metric from the attention scales")
            grads = torch.autograd.grad(m.sum(), scales, allow_unused=True)
        self.cost["grad_forward"] += 1
        self.cost["backward"] += 1
        self.cost["recompute_forward"] += self.recompute
        missing = [l for l, g in enumerate(grads) if g is None]
        if missing:
            raise RuntimeError(f"no gradient reached the attention scales of layers {missing}")
        return {"estimate": torch.stack([g.float().cpu() for g in grads]),
                "metric": m.detach().float().cpu(), "last": last.detach().float().cpu(),
                "raw_last": raw.detach(), "targets": targets, "allowed": allowed}

    # one batch -------------------------------------------------------------------------
    def add(self, start: int, batch: VLMBatch, examples,
            contribution: Optional[ContributionAccumulator]) -> None:
        pos = batch.positions.to("cpu")
        t0 = time.perf_counter()
        extra = []
        if contribution is not None and not pos.after_image.is_empty():
            extra = [(name, _first_call_only(fn)) for name, fn in contribution.hooks(batch)]
        # At alpha = 1 the gradient pass is the clean run: when the task scores from the
        # last logits of one forward (next-token tasks), that pass is the clean one too.
        scores = None
        if self.alpha == 1.0:
            grad = self.attribution(batch, examples, extra)
            scores = self.task.score_from_logits(self.model, examples, grad["raw_last"])
            self.logit_scoring = scores is not None     # the class passes: one forward each
        if scores is None:       # a task that generates, or a gradient away from the clean run
            scores, clean_last = self.scored(batch, examples, [] if self.alpha == 1.0 else extra)
            targets, allowed = self.targets(examples, clean_last)
            clean = self.metric(clean_last, targets, allowed)
            if self.alpha == 1.0:
                # The same inputs must give the same metric (up to the dtype's rounding),
                # else the two passes measure different runs.
                tol = (1e-3 if self.model.dtype == torch.float32 else 5e-2) * (1 + clean.abs().max().item())
                if not torch.allclose(grad["metric"], clean, atol=tol):
                    raise RuntimeError("the gradient pass and the clean pass disagree on the metric "
                                       f"({grad['metric'].tolist()} vs {clean.tolist()})")
                if not torch.equal(grad["targets"], targets):
                    grad = self.attribution(batch, examples, clean=(targets, allowed))
            else:
                grad = self.attribution(batch, examples, clean=(targets, allowed))
        else:
            clean, targets, allowed = grad["metric"], grad["targets"], grad["allowed"]
            scores = scores.float().cpu()
        est = grad["estimate"]
        self.clean_of[start] = (clean, targets, allowed)    # the later passes' baseline
        self.starts[start] = len(examples)
        t2 = time.perf_counter()
        self.seconds["clean_and_gradient"] += t2 - t0
        self.n += len(examples)
        self.clean_score += scores.sum().item()
        self.clean_metric += clean.sum().item()
        named = candidate_classes(pos, self.rows)
        names = list(named)
        clipped = est.sum(0).clamp(min=0)                                 # [batch, pos]
        # Exact per-example drops known so far: a class of one position in an example
        # measured that position there.
        refined, checked = clipped.clone(), torch.zeros_like(clipped, dtype=torch.bool)
        done: list[tuple[str, PositionSet, Tensor, Tensor]] = []
        for name, keys in named.items():
            same = next(((n, sc, ls) for n, k, sc, ls in done if k == keys), None)
            if same is None:   # a set not knocked out yet in this batch
                scores_k, last_k = self.scored(batch, examples, self.knockout(batch, keys))
                done.append((name, keys, scores_k, last_k))
                self.distinct.add(name)
            else:
                _, scores_k, last_k = same
                self.alias_of.setdefault(name, set()).add(same[0])
            drops = clean - self.metric(last_k, targets, allowed)          # [batch]
            if name != _IMAGE_SIDE:
                single = keys.mask & (keys.counts == 1)[:, None]
                refined = torch.where(single, drops[:, None], refined)
                checked |= single
            present = keys.counts > 0
            self.class_drops.setdefault(name, {})[start] = drops.masked_fill(~present, float("nan"))
            entry = self.classes.setdefault(name, [0.0, 0, 0])
            entry[0] += scores_k[present].sum().item()
            entry[1] += int(present.sum())
            entry[2] += int(keys.counts.sum())
            layer_est = torch.einsum("lbp,bp->l", est, keys.mask.float())
            self.class_layers[name] = self.class_layers.get(name, torch.zeros(self.n_layers)) + layer_est
        self.class_forwards += len(done)
        self.batches += 1
        t3 = time.perf_counter()
        self.seconds["classes"] += t3 - t2
        if self.per_example:
            self.check_per_example(batch, clipped, refined, checked, clean, targets, allowed)
            self.seconds["example_checks"] += time.perf_counter() - t3
        t4 = time.perf_counter()            # the bookkeeping below counts with the classes
        # [batch, pos, class] membership, read as Python lists once (not per position)
        member = torch.stack([s.mask for s in named.values()], dim=-1).tolist()
        ids = batch.input_ids.tolist()
        for b in range(len(examples)):
            self.several_images |= pos.n_images(b) > 1
            roles = position_roles(pos, b)
            at = [p for _, p in roles]
            per_key = est[:, b, at].T                                     # [roles, layer]
            values = zip(clipped[b, at].tolist(), refined[b, at].tolist(), checked[b, at].tolist())
            for (key, p), value, (drop, better, was_checked) in zip(roles, per_key, values):
                self.est[key] = self.est.get(key, torch.zeros(self.n_layers)) + value
                self.drop[key] += drop
                self.refined[key] += better
                self.checked_in[key] += was_checked
                self.count[key] += 1
                inside = {n for n, is_in in zip(names, member[b][p]) if is_in}
                self.member[key] = self.member.get(key, inside) & inside
                if key not in self.tokens:
                    self.tokens[key] = self.model.layout.tokenizer.convert_ids_to_tokens(ids[b][p])
        self.seconds["classes"] += time.perf_counter() - t4

    def label(self, key: Key) -> str:
        return role_label(key, self.several_images)

    def class_exact(self, name: str) -> Tensor:
        """A class's exact drop per example, in order (NaN where the class is absent)."""
        return _per_example(self.class_drops[name], self.starts)


@contextlib.contextmanager
def _no_weight_grads(model) -> Iterator[None]:
    """Within the block no parameter requires grad: the backward computes the gradients
    of the attention scales only, and the forward keeps no input for a weight gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _FirstCallReader(PatternReader):
    """A :class:`~tl_vlm.core.attention_edits.PatternReader` that reads in its first attention
    call only, and is still one: the attention function keeps to SDPA and hands it its
    rows (a plain function in its place would make the layer eager)."""

    def __init__(self, reader: PatternReader) -> None:
        self.reader, self.calls = reader, 0

    def begin(self, q_len: int, k_len: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.reader.begin(q_len, k_len)

    def rows(self, q_len: int, k_len: int) -> Tensor:
        if self.calls == 1:
            return self.reader.rows(q_len, k_len)
        return torch.zeros(q_len, dtype=torch.bool)

    def read(self, rows: Tensor, pattern: Tensor) -> None:
        if self.calls == 1:
            self.reader.read(rows, pattern)


def _first_call_only(fn: Callable) -> Callable:
    """A hook that runs ``fn`` on its first call only: the prompt pass of a task that
    generates (the contribution measures one full pass, not the cached steps), or the
    forward of a gradient pass whose blocks are recomputed in the backward."""
    if isinstance(fn, PatternReader):
        return _FirstCallReader(fn)
    calls = []

    def hook(x: Tensor, hook) -> None:
        calls.append(None)
        if len(calls) == 1:
            fn(x, hook)

    return hook


def _role_of(key: Key) -> str:
    return key[0]


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN below 3 points."""
    if len(x) < 3:
        return float("nan")

    def ranks(v: Sequence[float]) -> Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for value in t.unique():                   # ties share their mean rank
            same = t == value
            r[same] = r[same].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float("nan") if denom == 0 else float((rx @ ry).item() / denom)


def _widths(n_layers: int) -> list[int]:
    """The layer sweep's w values (the study's progressive knockout widths)."""
    fractions = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1)
    return sorted({max(1, round(n_layers * f)) for f in fractions}
                  | (set(range(1, n_layers + 1)) if n_layers <= 8 else set()))


# -- the search ----------------------------------------------------------------------------
def find_gates(
    model,
    task,
    *,
    batch_size: int = 16,
    limit: Optional[int] = None,
    metric: Union[str, GateMetric] = "log_odds",
    queries: Queries = "all",
    rows: bool = True,
    check_per_example: int = 5,
    check_top: int = 5,
    check_random: int = 5,
    check_all: bool = False,
    alpha: float = 1.0,
    recompute_activations: bool = False,
    layer_sweep: bool = True,
    contribution: bool = True,
    overlap: Union[bool, str] = "auto",
    narrow: float = 0.6,
    distributed: float = 0.25,
    min_effect: float = 0.1,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> GateSearch:
    """Which image-side positions carry the image to the text (see the module docstring).

    Args:
        task: a :class:`~tl_vlm.eval.tasks.Task` (its examples, batching and score).
        batch_size, limit: examples per forward pass; only the first ``limit`` examples.
            The gradient pass keeps every layer's activations for its backward, as a
            training step does (but no weight gradients, no attention pattern): size
            ``batch_size`` for that, not for a plain forward, or pass
            ``recompute_activations=True``.
        metric: ``"log_odds"`` (default), ``"logprob"`` or a :class:`GateMetric`.
        queries: whose attention is cut: ``"all"`` positions (the paper's EOI knockout;
            generated tokens too) or ``"text"`` (non-image-side) only.
        rows: also each image row as a class (one forward per row and batch).
        check_per_example: in each example, the positions with the largest estimates
            knocked out exactly (one forward per batch each: every example knocks out its
            own j-th best), which refines every position's value (``refined``); 0: none.
        check_top, check_random: single positions checked by exact knockout in every
            example: the best by refined value and a seeded random sample of the others;
            ``check_all`` checks every position (one forward each per batch). Positions
            that a class of one position per example stands for (BOI, EOI, the first and
            last image token, in every example that has them) are exact from the class
            pass, and checked at no cost.
        alpha: where on the path from the clean run (1) to the corrupted one (0) the
            gradient is taken (see the module docstring).
        recompute_activations: the gradient pass keeps only each block's input and
            recomputes its activations in the backward (:mod:`tl_vlm.core.recompute`): memory
            for one residual per layer and one block's activations instead of every
            layer's, for one more forward per batch. For long inputs, big batches, deep
            models.
        layer_sweep: knock the gate out in the last w layers to find where it acts.
        contribution: accumulate the cross-modal contribution (read-only, in the clean pass).
        overlap: neighbourhood overlap of the classes with the examples' labels (DADApy; one
            more pass): True, False, or ``"auto"`` (when DADApy is installed and the task
            has more than 8 examples with at least two labels).
        narrow, distributed: the verdict's thresholds on the best two positions' share.
        min_effect: below this drop of the metric for the whole image side, the verdict is
            ``"no image effect"``.
        log: called with a line per phase (e.g. ``print``).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model = HookedVLM.from_pretrained("toy-last-image")    # gate planted on the last code
        >>> gates = find_gates(model, toy_task(24), batch_size=12, overlap=False)
        >>> gates.verdict, gates.gate, gates.best_class
        ('narrow', ['image (5, 5)'], 'last_image')
        >>> abs(gates.candidate("eoi").share) < 0.01                 # EOI carries nothing here
        True
        >>> gates.cost["passes_per_batch"], gates.cost["n_classes"]  # 12 classes; gate = eoi
        (14, 12)
        >>> find_gates(model, toy_task(12), queries="image")
        Traceback (most recent call last):
        ...
        ValueError: queries must be 'all' (every position, the paper's knockout) or 'text', got 'image'
    """
    if queries not in ("all", "text"):
        raise ValueError(f"queries must be 'all' (every position, the paper's knockout) or "
                         f"'text', got {queries!r}")
    if not all(hasattr(task, a) for a in ("batches", "prepare", "score", "examples")):
        raise TypeError(f"find_gates needs a tl_vlm.eval.tasks.Task (its examples, batching and "
                        f"score), got {type(task).__name__}; wrap your examples in a "
                        f"NextTokenTask or GenerationTask")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1] (1: the gradient at the clean run), got {alpha}")
    if check_top < 1:
        raise ValueError(f"check_top must be at least 1 (the verdict rests on the exact "
                         f"knockout of the best positions), got {check_top}")
    if isinstance(check_per_example, bool) or not isinstance(check_per_example, int) \
            or check_per_example < 0:
        raise ValueError(f"check_per_example must be a whole number >= 0 (positions knocked "
                         f"out exactly in each example; 0: none), got {check_per_example!r}")
    metric = metric if isinstance(metric, GateMetric) else GateMetric(metric)
    say = log or (lambda line: None)
    chunks = list(task.batches(batch_size))
    if limit is not None:
        chunks = [(s, ex[:max(0, limit - s)]) for s, ex in chunks if s < limit]
    if not chunks:
        raise ValueError("the task has no examples")
    search = _Search(model, task, metric, queries, rows, alpha, per_example=check_per_example,
                     recompute=recompute_activations)
    notes: list[str] = []

    # The contribution groups partition the image side so that each class's share is a
    # sum of groups: the gate beyond EOI (Emu3's EOF) and the first content token apart.
    groups = _contribution_groups()
    acc = ContributionAccumulator(model, groups=groups) if contribution else None
    baseline = _baseline_forward(model, task.prepare(model, chunks[0][1]))
    say(f"[find_gates] one forward: {baseline:.3f}s; pass 1 over {len(chunks)} batches")
    for start, examples in chunks:
        search.add(start, task.prepare(model, examples), examples, acc)
    contrib = acc.result() if acc is not None and acc.n_examples else None
    if contribution and contrib is None:
        notes.append("no contribution: no example has text after the image")

    # Single positions: estimates, refined by the per-example checks, then exact checks on
    # the best by refined value and a random sample.
    estimate = {k: search.drop[k] / search.count[k] for k in search.est}
    refined = {k: search.refined[k] / search.count[k] for k in search.est}
    keys = sorted(refined, key=lambda k: (-refined[k], -estimate[k]))
    rng = random.Random(seed)
    top = keys if check_all else keys[:check_top]
    rest = [k for k in keys if k not in top]
    checked = top + rng.sample(rest, min(check_random, len(rest)))
    # BOI, EOI, the first and last image token...: a class pass knocked them out already.
    known = _exact_from_classes(search)
    checked += [k for k in keys if k in known and k not in checked]
    total = _mean(search.class_exact(_IMAGE_SIDE))
    # key -> per-example exact drops (NaN where the example lacks the position)
    measured = {k: known[k] for k in checked if k in known}
    measured.update(_exact_positions(search, chunks, [k for k in checked if k not in known], say))
    exact = {k: _mean(drops) for k, drops in measured.items()}
    by_exact = sorted(exact, key=lambda k: -exact[k])
    best = by_exact[:2]
    union = _exact_positions(search, chunks, [tuple(best)], say, together=True) if len(best) == 2 else {}
    # Knockouts need not add up (cutting BOI as well can *lessen* a gate's effect), so
    # the best "one or two" is the larger of the best one and the best two together.
    one = exact[best[0]]
    two = max(one, _mean(union[tuple(best)])) if len(best) == 2 else one
    top_shares = [one / total, two / total] if total else [float("nan")] * 2

    # Verdict.
    if not total > min_effect:
        verdict, gate, gate_share = "no image effect", [], float("nan")
    else:
        one, two = top_shares
        verdict = "narrow" if two >= narrow else "distributed" if two < distributed else "mixed"
        if verdict == "distributed":
            gate, gate_share = [], float("nan")
        elif one >= narrow or one >= 0.85 * two:
            gate, gate_share = best[:1], one
        else:
            gate, gate_share = best, two
    layers = {"target": [], "widths": [], "effect": [], "from_layer": None}
    if layer_sweep and verdict != "no image effect":
        target = gate if verdict != "distributed" else None
        layers = _layer_sweep(search, chunks, target, total, say)
        layers["target"] = [search.label(k) for k in target] if target else [_IMAGE_SIDE]

    classes = [c for c in _class_candidates(search, total, contrib) if c.name in search.distinct]
    for name, same in search.alias_of.items():
        if name not in search.distinct:
            notes.append(f"{name}: the same positions as {' and '.join(sorted(same))} in every "
                         f"example (not listed apart)")
    overlap_note = _add_overlap(model, task, chunks, classes, overlap, search)
    if overlap_note:
        notes.append(overlap_note)
    positions = _position_candidates(search, keys, estimate, refined, measured, total, contrib,
                                     classes)
    # The narrowest class that carries (nearly) as much as the best one: last_image, not
    # the row it ends, when both carry everything.
    pool = [c for c in classes if c.name not in ("image", _IMAGE_SIDE)]
    top_effect = max((c.effect for c in pool), default=0.0)
    best_class = min((c for c in pool if c.effect >= top_effect - 0.05 * abs(top_effect)),
                     key=lambda c: (c.n_positions, -c.effect), default=None)
    k = min(check_top, len(checked))
    top_est = set(sorted(checked, key=lambda x: -estimate[x])[:k])
    top_refined = set(sorted(checked, key=lambda x: -refined[x])[:k])
    top_exact = set(by_exact[:k])
    settled = _settled(by_exact, measured, k)
    n_classes = search.class_forwards / search.batches
    n_classes = int(n_classes) if n_classes.is_integer() else round(n_classes, 2)
    per_batch = (search.seconds["clean_and_gradient"] + search.seconds["classes"]) / len(chunks)
    passes = (search.cost["forward"] + search.cost["grad_forward"] + search.cost["backward"]
              + search.cost["recompute_forward"]) / search.batches
    cost = {"batches": len(chunks), "n_classes": n_classes,
            "passes_per_batch": int(passes) if float(passes).is_integer() else round(passes, 2),
            "budget_forwards": 3 + n_classes,
            "check_forwards_per_batch": round((search.cost["check_forward"]
                                               + search.cost["example_check_forward"]) / len(chunks), 2),
            "passes": dict(search.cost), "seconds": {k: round(v, 4) for k, v in search.seconds.items()},
            "baseline_forward_s": round(baseline, 4),
            "time_ratio": round(per_batch / baseline, 2) if baseline > 0 else None}
    return GateSearch(
        model=getattr(model.cfg, "model_name", "") or type(model.hf_model).__name__,
        family=model.family.name, n_layers=search.n_layers, n_examples=search.n,
        metric=metric.kind, queries=queries, clean_score=search.clean_score / search.n,
        clean_metric=search.clean_metric / search.n, total_effect=total,
        classes=classes, positions=positions, verdict=verdict,
        gate=[search.label(k) for k in gate], gate_share=gate_share, top_shares=top_shares,
        best_class=None if best_class is None else best_class.name, layers=layers,
        check={"names": [search.label(k) for k in checked],
               "estimate": [estimate[k] for k in checked], "exact": [exact[k] for k in checked],
               "spearman": _spearman([estimate[k] for k in checked], [exact[k] for k in checked]),
               "exact_se": [_standard_error(measured[k]) for k in checked],
               "top_k": k, "top_k_agree": len(top_est & top_exact),
               "top_k_settled": len(settled), "settled": [search.label(x) for x in settled],
               "per_example": check_per_example, "refined": [refined[k] for k in checked],
               "refined_spearman": _spearman([refined[k] for k in checked],
                                             [exact[k] for k in checked]),
               "refined_top_k_agree": len(top_refined & top_exact), "alpha": alpha,
               "completeness": sum(estimate.values()) / total if total else float("nan")},
        cost=cost, notes=notes)


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


def _settled(by_exact: list, measured: dict[Any, Tensor], k: int) -> list:
    """The exact top ``k`` that lead the next one by more than two standard errors of
    their paired difference (both were knocked out in the same examples): the part of
    the top k this sample ranks at all. Empty when fewer than k + 1 were measured.

    Example (paired: a constant lead of 0.1 is settled however noisy the drops are):
        >>> drops = torch.tensor([0.0, 5.0, 1.0, 9.0])
        >>> _settled(["a", "b"], {"a": drops + 0.1, "b": drops}, 1)
        ['a']
    """
    if len(by_exact) <= k:
        return []
    runner_up = measured[by_exact[k]]
    out = []
    for key in by_exact[:k]:
        difference = measured[key] - runner_up            # NaN where either is absent
        se = _standard_error(difference)
        if se is not None and _mean(difference) > 2 * se:
            out.append(key)
    return out


def _mean(drops: Tensor) -> float:
    """Mean of the finite entries, in float64 (every exact drop is averaged this way)."""
    return float(drops[drops.isfinite()].double().mean())


def _standard_error(drops: Tensor) -> Optional[float]:
    """Standard error of the mean of the finite entries (None below two of them)."""
    values = drops[drops.isfinite()].double()
    if values.numel() < 2:
        return None
    return float(values.std() / math.sqrt(values.numel()))


def _per_example(by_start: dict[int, Tensor], starts: dict[int, int]) -> Tensor:
    """Per-batch vectors (keyed by batch start) as one vector over every example in
    order, NaN for batches that lack it (``starts``: batch start -> its size)."""
    return torch.cat([by_start.get(start, torch.full((n,), float("nan")))
                      for start, n in starts.items()])


def _exact_from_classes(search: _Search) -> dict:
    """Positions whose exact knockout a class pass has run: the class's one position per
    example, in exactly the examples that have the position (same drop, same examples).
    Key -> per-example drops (NaN where absent)."""
    known = {}
    for key, names in search.member.items():
        for name in sorted(names & search.distinct):
            _, n, n_pos = search.classes[name]
            if name != _IMAGE_SIDE and n_pos == n == search.count[key]:
                known[key] = search.class_exact(name)
                break
    return known


def _exact_positions(search: _Search, chunks, keys: Sequence, say, together: bool = False
                     ) -> dict:
    """Exact drops per role (or per tuple of roles knocked out together), per example in
    order (NaN where the example lacks it); keys no example has are left out."""
    drops_of: dict[Any, dict[int, Tensor]] = {}
    for start, examples in chunks:
        batch = search.task.prepare(search.model, examples)
        pos = batch.positions.to("cpu")
        roles = [dict(position_roles(pos, b)) for b in range(len(examples))]
        clean, targets, allowed = search.clean_of[start]
        for key in keys:
            wanted = key if together else (key,)
            rows = [[r[w] for w in wanted if w in r] for r in roles]
            present = torch.tensor([len(r) > 0 for r in rows])
            if not present.any():
                continue
            hooks = search.knockout(batch, PositionSet.from_lists(rows, pos.seq_len))
            drop = clean - search.metric_under(batch, hooks, targets, allowed)
            drops_of.setdefault(key, {})[start] = drop.masked_fill(~present, float("nan"))
    say(f"[find_gates] exact knockouts of {len(keys)} position set(s)")
    return {k: _per_example(drops_of[k], search.starts) for k in keys if k in drops_of}


def _layer_sweep(search: _Search, chunks, target: Optional[list], total: float, say) -> dict:
    """Drop of the metric with ``target`` (roles, or the whole image side when None)
    knocked out in the last w layers only."""
    widths = _widths(search.n_layers)
    sums, count = torch.zeros(len(widths)), 0
    for start, examples in chunks:
        batch = search.task.prepare(search.model, examples)
        pos = batch.positions.to("cpu")
        if target is None:
            keys = pos.image_side
        else:
            roles = [dict(position_roles(pos, b)) for b in range(len(examples))]
            keys = PositionSet.from_lists([[r[t] for t in target if t in r] for r in roles], pos.seq_len)
        clean, targets, allowed = search.clean_of[start]
        for i, w in enumerate(widths):
            layers = list(range(search.n_layers - w, search.n_layers))
            drop = clean - search.metric_under(batch, search.knockout(batch, keys, layers), targets,
                                               allowed, counter="sweep_forward")
            sums[i] += drop.sum().item()
        count += len(examples)
    effect = (sums / count).tolist()
    full = effect[-1]
    enough = [w for w, e in zip(widths, effect) if full > 0 and e >= 0.9 * full]
    say(f"[find_gates] layer sweep over {len(widths)} widths")
    return {"widths": widths, "effect": effect,
            "from_layer": search.n_layers - min(enough) if enough else None}


def _contribution_groups() -> dict[str, Callable[[ImagePositions], PositionSet]]:
    """A partition of the image side fine enough to read every class's share off it."""
    def first_only(p: ImagePositions) -> PositionSet:
        return p.first_image - p.gate

    def last_only(p: ImagePositions) -> PositionSet:
        return p.last_image - p.first_image - p.gate

    return {
        "eoi": lambda p: p.eoi,
        "gate_extra": lambda p: p.gate - p.eoi,
        "boi": lambda p: p.boi - p.gate,
        "first_image": first_only,
        "last_image": last_only,
        "image_rest": lambda p: p.image - p.first_image - p.last_image - p.gate,
        "row_breaks": lambda p: p.row_breaks - p.gate,
        "specials_rest": lambda p: p.specials - p.gate - p.eoi - p.boi - p.row_breaks,
    }


_CLASS_GROUPS = {
    _IMAGE_SIDE: None,  # all groups
    "eoi": ("eoi",), "gate": ("eoi", "gate_extra"), "boi": ("boi",),
    "first_image": ("first_image",), "last_image": ("last_image",),
    "image": ("first_image", "last_image", "image_rest"), "row_breaks": ("row_breaks",),
    "specials": ("gate_extra", "specials_rest"),
}


def _class_candidates(search: _Search, total: float, contrib) -> list[GateCandidate]:
    out = []
    pooled = per_layer = token_map = None
    if contrib is not None:
        value = contrib.value_total                                   # [layer, head, group]
        pooled = value.sum((0, 1)) / value.sum()
        per_layer = contrib.per_layer(value_weighted=True)            # [layer, group]
        token_map = contrib.token_map() if len(contrib.grids) == 1 else None
    for name, (score, n, n_pos) in search.classes.items():
        drops = search.class_exact(name)
        effect, se = _mean(drops), _standard_error(drops)
        share_c = layers_c = None
        if pooled is not None:
            if name in _CLASS_GROUPS:
                idx = [contrib.groups.index(g) for g in (_CLASS_GROUPS[name] or contrib.groups)]
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


def _position_candidates(search: _Search, keys, estimate, refined, measured, total, contrib,
                         classes: list[GateCandidate]) -> list[GateCandidate]:
    token_map = contrib.token_map() if contrib is not None and len(contrib.grids) == 1 else None
    single = {c.name: c for c in classes if c.n_positions == 1.0}
    # classes of one position per image (their aliases too: the toy's gate is its eoi)
    per_image = {name for name, (_, n, n_pos) in search.classes.items() if n_pos == n}
    single_names = per_image - {_IMAGE_SIDE}
    out = []
    for key in keys:
        drops = measured.get(key)
        exact = None if drops is None else _mean(drops)
        se = None if drops is None else _standard_error(drops)
        effect = refined[key] if exact is None else exact
        share_c = None
        if key[0] == "image" and token_map is not None and key[1] == 0:
            share_c = float(token_map[key[2], key[3]])
        elif key[0] in ("boi", "eoi") and key[1] == 0 and key[0] in single:
            share_c = single[key[0]].contribution
        out.append(GateCandidate(
            name=search.label(key), kind="position", role=_role_of(key), effect=effect,
            share=effect / total if total else float("nan"), estimate=estimate[key],
            refined=refined[key], checked_in=search.checked_in[key], exact=exact, exact_se=se,
            per_layer=(search.est[key] / search.count[key]).tolist(),
            contribution=share_c, n_examples=search.count[key],
            grid=tuple(key[1:]) if key[0] == "image" else None, token=search.tokens.get(key),
            in_classes=sorted(c for c in search.member[key] if c in single_names)))
    return out


_OVERLAP_CLASSES = ("boi", "first_image", "last_image", "image", "eoi", "gate", "row_breaks",
                    "specials")


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

    wanted = [c for c in classes if c.name in _OVERLAP_CLASSES and c.n_examples == search.n]
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
