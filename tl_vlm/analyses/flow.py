"""Information-flow maps: which edges between token groups carry the answer, and in which
layers.

An edge ``source -> target`` is cut by attention knockout: the ``target`` positions stop
attending to the ``source`` positions (the paper's post-softmax zero, no renormalisation)
in the layers of one window of ``window`` consecutive layers, and nowhere else. For every
edge and every window position the map holds the relative change of the probability of
the correct answer at the last position (in %, mean over examples, with its standard
error) and, where the task scores from one forward, the task's accuracy. This is the
analysis of Geva et al. (2023) for text and of Zhang et al. (2024, "Cross-modal
information flow in multimodal LLMs") for images, with the Narrow Gate's gate as a group
of its own.

Groups (per example, from :class:`~tl_vlm.core.positions.ImagePositions`): ``image`` (the
content image tokens), ``gate`` (the family's gate, EOI where it has one), ``boi``,
``question`` (the text before the last position) and ``last``; pass ``groups`` to add or
replace any (an ``ImagePositions`` attribute name, or ``positions -> PositionSet``).
An edge whose source or target is empty in every example (no gate, say) is skipped and
listed with the reason.

Cost per batch: one clean forward that caches the residual at each window's first layer,
then one forward per edge and window that starts at the window's first layer (earlier
blocks do not run: :func:`tl_vlm.core.prefix.run_from_layer`), so W windows and P edges
cost at most ``1 + W x P`` forwards, less by the shared prefixes.

Example (toy-gated routes the image through its gate; toy-distributed does not):
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.eval.tasks import toy_task
    >>> flow = flow_map(HookedVLM.from_pretrained("toy-gated"), toy_task(16), window=1,
    ...                 show_progress=False)
    >>> flow.layers, [round(x) for x in flow.edges["gate->last"]]
    ([0, 1, 2, 3], [-3, -43, 0, -21])
    >>> [round(x) for x in flow.edges["image->last"]]      # the image does not go around it
    [0, 0, 0, 0]
    >>> flow                                                         # doctest: +ELLIPSIS
    FlowMap(... on toy: 16 examples, window 1, 4 window(s); largest drop ...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.analyses.knockout import knockout_hooks
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet
from tl_vlm.core.prefix import run_from_layer
from tl_vlm.core.progress import progress

GroupSpec = Union[str, Callable[[ImagePositions], PositionSet]]

#: the edges a flow map cuts by default, as ``"source->target"``
DEFAULT_EDGES = ("image->question", "image->last", "question->last", "image->gate",
                 "gate->question", "gate->last")
METRICS = ("prob",)


def question(positions: ImagePositions) -> PositionSet:
    """The text before the last position (the ``question`` group).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pos = model.prepare(make_examples(1).prompts).positions
        >>> q = question(pos)
        >>> bool((q.mask & pos.last.mask).any()), q.counts.tolist() == (pos.text.counts - 1).tolist()
        (False, True)
    """
    return positions.text - positions.last


DEFAULT_GROUPS: dict[str, GroupSpec] = {"image": "image", "gate": "gate", "boi": "boi",
                                        "question": question, "last": "last"}


def parse_edge(edge: str, groups: Mapping[str, Any]) -> tuple[str, str]:
    """``"source->target"`` as ``(source, target)``, both groups of ``groups``.

    Example:
        >>> parse_edge("image->last", DEFAULT_GROUPS)
        ('image', 'last')
        >>> parse_edge("image->answer", DEFAULT_GROUPS)
        Traceback (most recent call last):
        ...
        ValueError: edge 'image->answer': no group 'answer'; groups are image, gate, boi, question, last (add one with groups={'answer': ...})
    """
    if not isinstance(edge, str) or edge.count("->") != 1:
        raise ValueError(f"an edge is 'source->target' (e.g. 'image->last'), got {edge!r}")
    source, target = (part.strip() for part in edge.split("->"))
    for name in (source, target):
        if name not in groups:
            raise ValueError(f"edge {edge!r}: no group {name!r}; groups are "
                             f"{', '.join(groups)} (add one with groups={{{name!r}: ...}})")
    if source == target:
        raise ValueError(f"edge {edge!r}: source and target are the same group")
    return source, target


def group_positions(positions: ImagePositions, spec: GroupSpec, name: str) -> PositionSet:
    """One group's positions in a batch (``spec``: an attribute name or a function).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> pos = HookedVLM.from_pretrained("toy-gated").prepare(make_examples(2).prompts).positions
        >>> group_positions(pos, "gate", "gate").tolist()
        [[38], [38]]
    """
    if isinstance(spec, str):
        value = getattr(positions, spec, None)
    elif callable(spec):
        value = spec(positions)
    else:
        raise TypeError(f"group {name!r}: expected an ImagePositions attribute name or a "
                        f"function positions -> PositionSet, got {type(spec).__name__}")
    if not isinstance(value, PositionSet):
        raise ValueError(f"group {name!r}: {spec!r} gives {type(value).__name__}, not a "
                         f"PositionSet (e.g. 'image', 'gate', 'last_image', 'row_breaks')")
    return value


def windows(n_layers: int, width: int) -> list[list[int]]:
    """Every window of ``width`` consecutive layers, by first layer.

    Example:
        >>> windows(4, 2)
        [[0, 1], [1, 2], [2, 3]]
    """
    return [list(range(start, start + width)) for start in range(n_layers - width + 1)]


def default_window(n_layers: int) -> int:
    """About a quarter of the depth, at least 1.

    Example:
        >>> default_window(4), default_window(32), default_window(2)
        (1, 8, 1)
    """
    return max(1, round(n_layers / 4))


@dataclass
class FlowMap:
    """What :func:`flow_map` measured.

    Attributes:
        model, task, metric: what was cut and read (``"prob"``: the correct answer's
            probability at the last position).
        window: layers per window; layers: the first layer of each window.
        clean: the mean clean probability; clean_accuracy: the task's clean accuracy
            (None when the task cannot be scored from one forward, e.g. generation).
        edges: ``"source->target"`` -> relative change of the probability per window,
            in % (mean over examples of ``100 (p_cut - p_clean) / p_clean``).
        se: the same keys: standard errors over examples.
        accuracy: the same keys: the task's accuracy per window (None as above).
        skipped: edges not cut, and why.
        n_examples: examples measured.

    Example:
        >>> flow = FlowMap("m", "t", "prob", 1, [0, 1], 0.5, 1.0, {"image->last": [-10.0, 0.0]},
        ...                {"image->last": [1.0, 0.0]}, {"image->last": [0.5, 1.0]}, {}, 4)
        >>> flow.to_dict()["edges"]["image->last"], flow.largest_drop()
        ([-10.0, 0.0], ('image->last', 0, -10.0))
    """

    model: str
    task: str
    metric: str
    window: int
    layers: list[int]
    clean: float
    clean_accuracy: Optional[float]
    edges: dict[str, list[float]]
    se: dict[str, list[float]]
    accuracy: dict[str, list[Optional[float]]]
    skipped: dict[str, str] = field(default_factory=dict)
    n_examples: int = 0

    def largest_drop(self) -> Optional[tuple[str, int, float]]:
        """``(edge, first layer of the window, change %)`` of the largest drop."""
        found = [(v, edge, self.layers[i]) for edge, vals in self.edges.items()
                 for i, v in enumerate(vals) if not math.isnan(v)]
        if not found:
            return None
        value, edge, layer = min(found)
        return edge, layer, value

    def to_dict(self) -> dict[str, Any]:
        """What ``tl-vlm flow`` writes to ``flow.json``."""
        from tl_vlm.core.jsonable import jsonable

        return jsonable({"model": self.model, "task": self.task, "metric": self.metric,
                         "clean": self.clean, "clean_accuracy": self.clean_accuracy,
                         "window": self.window, "layers": self.layers, "edges": self.edges,
                         "accuracy": self.accuracy, "se": self.se, "skipped": self.skipped,
                         "n_examples": self.n_examples})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FlowMap":
        """The inverse of :meth:`to_dict` (NaN were written as null)."""
        nan = lambda vals: [float("nan") if v is None else v for v in vals]
        return cls(data["model"], data["task"], data["metric"], data["window"],
                   list(data["layers"]), data["clean"], data.get("clean_accuracy"),
                   {k: nan(v) for k, v in data["edges"].items()},
                   {k: nan(v) for k, v in data["se"].items()}, dict(data["accuracy"]),
                   dict(data.get("skipped", {})), data.get("n_examples", 0))

    def __repr__(self) -> str:
        drop = self.largest_drop()
        where = ("" if drop is None else
                 f"; largest drop {drop[0]} {drop[2]:+.0f}% (window from layer {drop[1]})")
        return (f"FlowMap({self.model} on {self.task}: {self.n_examples} examples, window "
                f"{self.window}, {len(self.layers)} window(s){where})")


def _probabilities(last: Float[Tensor, "batch vocab"], targets: Tensor) -> Tensor:
    return last.float().softmax(-1).gather(1, targets[:, None].to(last.device))[:, 0].cpu()


def _check_options(model, edges, groups, window, metric) -> tuple[dict, list, int]:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    all_groups = dict(DEFAULT_GROUPS)
    if groups is not None:
        if not isinstance(groups, Mapping):
            raise TypeError(f"groups must be a dict name -> attribute name or function, got "
                            f"{type(groups).__name__}")
        all_groups.update(groups)
    edges = list(DEFAULT_EDGES if edges is None else edges)
    if not edges:
        raise ValueError("no edges to cut: give e.g. edges=['image->last']")
    if len(set(edges)) != len(edges):
        raise ValueError(f"edges {edges} name an edge twice")
    parsed = [(edge, *parse_edge(edge, all_groups)) for edge in edges]
    n = model.cfg.n_layers
    width = default_window(n) if window is None else window
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n:
        raise ValueError(f"window must be a whole number of layers in 1..{n}, got {window!r}")
    return all_groups, parsed, width


def flow_map(model, task, groups: Optional[Mapping[str, GroupSpec]] = None,
             window: Optional[int] = None, metric: str = "prob",
             edges: Optional[Sequence[str]] = None, batch_size: int = 16,
             show_progress: bool = True) -> FlowMap:
    """Cut each edge between token groups in each window of layers; see the module doc.

    Args:
        model: a :class:`~tl_vlm.core.model.HookedVLM`.
        task: a :class:`~tl_vlm.eval.tasks.Task`; the correct answer is a
            :class:`~tl_vlm.eval.tasks.NextTokenTask`'s answer token, or for any other task
            the clean model's own greedy next token.
        groups: groups to add or replace (name -> ``ImagePositions`` attribute or function).
        window: layers per window (default: about a quarter of the depth, at least 1).
        metric: ``"prob"``.
        edges: ``"source->target"`` edges (default :data:`DEFAULT_EDGES`).
        batch_size: examples per forward.
        show_progress: report progress over the batches.

    Example (toy-last-image: its planted last image token carries the image, not the rest):
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> flow = flow_map(HookedVLM.from_pretrained("toy-last-image"), toy_task(16), window=4,
        ...                 groups={"planted": "last_image", "rest": lambda p: p.image - p.last_image},
        ...                 edges=["planted->last", "rest->last"], show_progress=False)
        >>> flow.edges["planted->last"][0] < -50, abs(flow.edges["rest->last"][0]) < 1
        (True, True)
    """
    from tl_vlm.analyses.gates.metric import AnswerTargets

    all_groups, parsed, width = _check_options(model, edges, groups, window, metric)
    spans = windows(model.cfg.n_layers, width)
    starts = [span[0] for span in spans]
    targets_of = AnswerTargets(model, task)
    names = [edge for edge, _, _ in parsed]
    change: dict[str, list[list[Tensor]]] = {e: [[] for _ in spans] for e in names}
    correct: dict[str, list[list[Tensor]]] = {e: [[] for _ in spans] for e in names}
    present: dict[str, bool] = {e: False for e in names}
    clean_probs, clean_scores = [], []
    seen: set[str] = set()
    scorable = True
    chunks = list(task.batches(batch_size))
    for _, examples in progress(chunks, desc="flow map", enabled=show_progress):
        batch: VLMBatch = task.prepare(model, examples)
        pos = batch.positions
        cached = [f"blocks.{s}.hook_resid_pre" for s in starts]
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch, names_filter=lambda n: n in cached,
                                                 output_attentions=False)
        clean_last = batch.last_of(logits)
        targets, _ = targets_of(examples, clean_last)
        p_clean = _probabilities(clean_last, targets)
        clean_probs.append(p_clean)
        score = task.score_from_logits(model, examples, clean_last)
        scorable = scorable and score is not None
        if score is not None:
            clean_scores.append(score)
        sets = {name: group_positions(pos, spec, name) for name, spec in all_groups.items()}
        seen.update(name for name, positions in sets.items() if not positions.is_empty())
        for edge, source, target in parsed:
            if sets[source].is_empty() or sets[target].is_empty():
                continue
            present[edge] = True
            for i, span in enumerate(spans):
                hooks = knockout_hooks(model, batch, keys=sets[source], queries=sets[target],
                                       layers=span)
                with torch.no_grad():
                    out = run_from_layer(model, batch, span[0], cache[cached[i]], fwd_hooks=hooks,
                                         logits_to_keep=batch.logits_to_keep)
                last = batch.last_of(out)
                change[edge][i].append(100 * (_probabilities(last, targets) - p_clean) / p_clean)
                if scorable:
                    correct[edge][i].append(task.score_from_logits(model, examples, last))
        del cache

    p_all = torch.cat(clean_probs)
    skipped = {edge: " and ".join(f"the {g} group is empty in every example"
                                  for g in (source, target) if g not in seen)
               for edge, source, target in parsed if not present[edge]}
    mean = {e: [float(torch.cat(v).mean()) for v in change[e]] for e in names if present[e]}
    se = {e: [_standard_error(torch.cat(v)) for v in change[e]] for e in names if present[e]}
    accuracy = {e: [float(torch.cat(v).mean()) if scorable else None for v in correct[e]]
                for e in names if present[e]}
    return FlowMap(model=getattr(model.cfg, "model_name", "") or type(model.hf_model).__name__,
                   task=task.name, metric=metric, window=width, layers=starts,
                   clean=float(p_all.mean()),
                   clean_accuracy=float(torch.cat(clean_scores).mean()) if scorable else None,
                   edges=mean, se=se, accuracy=accuracy, skipped=skipped,
                   n_examples=len(p_all))


def _standard_error(values: Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 \
        else float("nan")
