"""Attention sinks on the image side: outlier residuals and the attention they draw.

Language models park attention on a few tokens whose residual stream carries *massive
activations* (Sun et al. 2024, arXiv 2402.17762; Xiao et al. 2023's attention sinks), and
vision-language models do it on a few image tokens too (Kang et al. 2025, arXiv
2503.03321). :func:`attention_sinks` finds, per layer, the image-side positions whose
residual is such an outlier, and measures how much of the text's attention they take;
:func:`sink_knockout` cuts them out of attention.

**The rule.** At layer ``l`` the residual entering the block (``blocks.{l}.hook_resid_pre``,
what the layer's attention reads) is compared across the image-side positions of one
example (content tokens, BOI, EOI, row breaks, other image markers; text is never a
candidate, so the usual BOS sink does not count):

- ``rule="norm"`` (default): position ``p`` is a sink when its residual norm ``n_p``
  is at least ``threshold`` robust standard deviations above the median,
  ``n_p >= median + threshold * 1.4826 * MAD`` (default ``threshold`` 10), **and** at
  least ``min_ratio`` times the median norm (default 5). The ratio floor keeps a
  narrow distribution (e.g. many repeated VQ codes with identical embeddings, MAD near
  0) from turning an ordinary token into an "outlier".
- ``rule="dims"``: ``p`` is a sink when one residual dimension has
  ``|x_pd| >= threshold * median |x|`` (the median over every image-side position and
  dimension of the example; default ``threshold`` 100): Sun et al.'s massive
  activations, which they find at about 1000x the median.

A layer *has sinks* when at least ``min_examples`` (default half) of the examples have
one there; the verdict is ``"sinks found"`` when some layer has sinks, else ``"none"``.

**The attention share.** Per layer, the attention weight text queries (default
``positions.after_image``, the question and answer tokens) put on that layer's sinks,
summed over the sinks, averaged over heads and queries, then over examples (an example
without a sink counts 0), next to the share the whole image side gets.

Example (a model with no sinks; ``tests/test_sinks.py`` plants one by editing weights):
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> sinks = attention_sinks(model, model.prepare(make_examples(12, seed=0).prompts))
    >>> sinks.verdict, sinks.sink_layers
    ('none', [])
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_vlm.analyses.knockout import Hook, Layers, knockout_hooks, resolve_layers
from tl_vlm.core.attention_edits import PatternReader
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet
from tl_vlm.core.progress import progress

Queries = Union[None, PositionSet, Callable[[ImagePositions], PositionSet]]
Candidates = Queries
DEFAULT_THRESHOLD = {"norm": 10.0, "dims": 100.0}
_MAD_TO_SD = 1.4826   # MAD of a normal distribution x 1.4826 = its standard deviation
_KINDS = ("image", "boi", "eoi", "row_break", "special")


def _kind_sets(pos: ImagePositions) -> list[tuple[str, PositionSet]]:
    return list(zip(_KINDS, (pos.image, pos.boi, pos.eoi, pos.row_breaks, pos.specials)))


# -- per-batch readers ----------------------------------------------------------------------
class _ResidualStats:
    """``blocks.{l}.hook_resid_pre``: the rule's statistic at each image-side position."""

    def __init__(self, side: Tensor, rule: str) -> None:
        self.side, self.rule = side, rule                        # side: [batch, seq] bool
        n_b, seq = side.shape
        self.value = torch.full((n_b, seq), float("nan"))        # robust z / peak ratio
        self.ratio = torch.full((n_b, seq), float("nan"))        # norm / median norm
        self.peak_dim = torch.full((n_b, seq), -1, dtype=torch.long)
        self.fired = False

    def __call__(self, act: Tensor, hook: Any) -> None:
        if act.shape[:2] != self.side.shape:
            raise ValueError(f"{hook.name if hook is not None else 'the residual'} has shape "
                             f"{tuple(act.shape)} but the batch is {tuple(self.side.shape)}: "
                             f"attention_sinks measures one full forward pass")
        for b in range(act.shape[0]):
            where = self.side[b].nonzero().flatten()
            if where.numel() == 0:
                continue
            x = act[b, where.to(act.device)].detach().float()     # [n_side, d]
            peak, dim = x.abs().max(-1)
            norm = x.norm(dim=-1)
            median = norm.median()
            if self.rule == "norm":
                mad = (norm - median).abs().median() * _MAD_TO_SD
                value = torch.where(mad > 0, (norm - median) / mad.clamp_min(1e-30),
                                    torch.where(norm > median, float("inf"), 0.0))
            else:
                value = peak / x.abs().median().clamp_min(1e-30)
            self.value[b, where] = value.cpu()
            self.ratio[b, where] = (norm / median.clamp_min(1e-30)).cpu()
            self.peak_dim[b, where] = dim.cpu()
        self.fired = True
        return None


class _KeyAttention(PatternReader):
    """``hook_pattern``: summed attention from each example's text queries to every key."""

    def __init__(self, queries: Tensor) -> None:
        self.queries = queries                                   # [batch, seq] bool
        self.total = torch.zeros(queries.shape, dtype=torch.float64)
        self.n_heads = 0

    def rows(self, q_len: int, k_len: int) -> Tensor:
        return self.queries.any(0)

    def begin(self, q_len: int, k_len: int) -> None:
        if q_len != self.queries.shape[1]:
            raise ValueError(f"hook_pattern has {q_len} queries but the batch has "
                             f"{self.queries.shape[1]} positions: attention_sinks measures one "
                             f"full forward pass, not cached generation steps")

    def read(self, rows: Tensor, pattern: Float[Tensor, "batch head r k"]) -> None:
        self.n_heads = pattern.shape[1]
        mine = self.queries.to(rows.device)[:, rows]             # [batch, r]
        for b in range(pattern.shape[0]):
            if bool(mine[b].any()):
                block = pattern[b][:, mine[b].to(pattern.device)]     # [head, q, k]
                self.total[b] += block.sum((0, 1), dtype=torch.float64).cpu()


# -- the result -----------------------------------------------------------------------------
@dataclass(repr=False)
class AttentionSinks:
    """Image-side sinks per layer and the text attention they draw.

    Attributes:
        layers: the layers measured (the first axis of the per-batch tensors).
        rule, threshold, min_ratio, min_examples: the rule applied (module docstring).
        mask: per analysed batch, ``[layer, batch, pos]``: the sinks.
        value: per batch, ``[layer, batch, pos]``: the rule's statistic at image-side
            positions (robust z of the norm, or the peak-to-median ratio), NaN elsewhere.
        ratio: per batch: residual norm / the median image-side norm, NaN off the image.
        peak_dim: per batch: the residual dimension of largest ``|x|`` (-1 off the image).
        key_attention: per batch, ``[layer, batch, pos]``: mean attention weight a text
            query puts on each key (over heads and queries; NaN for an example without
            text queries). Sum it over any position set to get that set's share.
        share: ``[layer]`` mean share of text-query attention on the layer's sinks (NaN
            for a block without attention, e.g. LFM2's convolution blocks).
        image_share: ``[layer]`` the same for the whole image side.
        examples_with_sinks: ``[layer]`` fraction of examples with a sink there.
        n_sinks: ``[layer]`` sink positions, all examples together.
        n_examples: examples analysed.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-distributed")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> sinks = attention_sinks(model, batch, layers=[0, 3])
        >>> print(sinks)                                            # doctest: +ELLIPSIS
        AttentionSinks(none: no image-side outlier in 12 examples at layers [0, 3] (norm rule: z >= 10 and >= 5x the median norm); largest z ...)
        >>> sinks.image_share.shape, bool(sinks.image_share[1] > 0.2)   # text reads the image
        (torch.Size([2]), True)
        >>> sinks.positions(0).is_empty()
        True
    """

    layers: list[int]
    rule: str
    threshold: float
    min_ratio: float
    min_examples: float
    mask: list[Bool[Tensor, "layer batch pos"]]
    value: list[Float[Tensor, "layer batch pos"]]
    ratio: list[Float[Tensor, "layer batch pos"]]
    peak_dim: list[Int[Tensor, "layer batch pos"]]
    key_attention: list[Float[Tensor, "layer batch pos"]]
    share: Float[Tensor, "layer"]
    image_share: Float[Tensor, "layer"]
    examples_with_sinks: Float[Tensor, "layer"]
    n_sinks: Int[Tensor, "layer"]
    n_examples: int
    kinds: dict[str, int] = field(default_factory=dict)
    input_ids: list[Tensor] = field(default_factory=list)

    @property
    def sink_layers(self) -> list[int]:
        """Layers where at least ``min_examples`` of the examples have a sink."""
        return [l for l, f in zip(self.layers, self.examples_with_sinks.tolist())
                if f > 0 and f >= self.min_examples]

    @property
    def found(self) -> bool:
        """Whether some layer has sinks (:attr:`sink_layers` is not empty)."""
        return bool(self.sink_layers)

    @property
    def verdict(self) -> str:
        """``"sinks found"`` or ``"none"``."""
        return "sinks found" if self.found else "none"

    def _layer_rows(self, layers: Optional[Layers]) -> list[int]:
        chosen = self.sink_layers if layers is None else (
            self.layers if layers == "all" else [layers] if isinstance(layers, int) else list(layers))
        missing = [l for l in chosen if l not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} were not measured (layers {self.layers})")
        return [self.layers.index(l) for l in chosen]

    def positions(self, batch_index: int = 0, layers: Optional[Layers] = None) -> PositionSet:
        """The sinks of analysed batch ``batch_index`` at any of ``layers`` (default:
        :attr:`sink_layers`), as a position set of that batch.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(2).prompts)
            >>> loose = attention_sinks(model, batch, threshold=2, min_ratio=1.2)   # a lax rule
            >>> loose.positions(0, layers=[3]) == PositionSet(loose.mask[0][3])
            True
            >>> loose.positions(0, layers=[3]).counts.tolist()   # it flags ordinary tokens
            [0, 6]
        """
        if not 0 <= batch_index < len(self.mask):
            raise IndexError(f"batch {batch_index} is outside the {len(self.mask)} analysed")
        rows = self._layer_rows(layers)
        mask = self.mask[batch_index]
        return PositionSet(mask[rows].any(0) if rows else torch.zeros_like(mask[0]))

    def dims(self, layer: Optional[int] = None) -> dict[int, int]:
        """How often each residual dimension is the largest one of a sink (at ``layer``, or
        at every sink layer), most frequent first: massive activations share dimensions.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> attention_sinks(model, model.prepare(make_examples(2).prompts)).dims()
            {}
        """
        rows = self._layer_rows(None if layer is None else [layer])
        counts: Counter = Counter()
        for mask, dim in zip(self.mask, self.peak_dim):
            for r in rows:
                counts.update(dim[r][mask[r]].tolist())
        return dict(counts.most_common())

    def index_of(self, batch: VLMBatch) -> int:
        """Which analysed batch ``batch`` is (matched by its token ids).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> a, b = (model.prepare(make_examples(2, seed=s).prompts) for s in (0, 1))
            >>> attention_sinks(model, [a, b]).index_of(b)
            1
        """
        ids = batch.input_ids.cpu()
        for i, seen in enumerate(self.input_ids):
            if seen.shape == ids.shape and torch.equal(seen, ids):
                return i
        raise ValueError("this batch was not analysed by attention_sinks; pass its sink "
                         "positions as a PositionSet, or analyse it")

    def _rule_text(self) -> str:
        if self.rule == "norm":
            return f"norm rule: z >= {self.threshold:g} and >= {self.min_ratio:g}x the median norm"
        return f"dims rule: |x| >= {self.threshold:g}x the median |x|"

    def __repr__(self) -> str:
        if not self.found:
            values = [v[torch.isfinite(v)] for v in self.value if bool(torch.isfinite(v).any())]
            top = max((float(v.max()) for v in values), default=float("nan"))
            ratio = max((float(r.nan_to_num(0).max()) for r in self.ratio), default=float("nan"))
            what = "z" if self.rule == "norm" else "ratio"
            return (f"AttentionSinks(none: no image-side outlier in {self.n_examples} examples at "
                    f"layers {self.layers} ({self._rule_text()}); largest {what} {top:.3g}, "
                    f"largest norm ratio {ratio:.3g})")
        idx = [self.layers.index(l) for l in self.sink_layers]
        kinds = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in self.kinds.items())
        shares = ", ".join(f"layer {self.layers[i]} {100 * float(self.share[i]):.1f}%"
                           for i in idx[:4]) + (", ..." if len(idx) > 4 else "")
        dims = list(self.dims())[:3]
        return (f"AttentionSinks(sinks found at layers {self.sink_layers} ({self._rule_text()}): "
                f"{sum(self.kinds.values())} positions ({kinds}) in {self.n_examples} examples; "
                f"text attention on them: {shares}; top dims {dims})")


# -- the analysis ---------------------------------------------------------------------------
def _resolve(pos: ImagePositions, chosen: Queries, default: PositionSet, what: str) -> PositionSet:
    out = default if chosen is None else chosen if isinstance(chosen, PositionSet) else chosen(pos)
    if not isinstance(out, PositionSet):
        raise TypeError(f"{what} must be a PositionSet or a function of ImagePositions giving "
                        f"one (e.g. lambda p: p.after_image)")
    return pos.check(out, what)


def attention_sinks(
    model,
    batches: Union[VLMBatch, Iterable[VLMBatch]],
    layers: Layers = "all",
    rule: Literal["norm", "dims"] = "norm",
    threshold: Optional[float] = None,
    min_ratio: float = 5.0,
    queries: Queries = None,
    min_examples: float = 0.5,
    candidates: Candidates = None,
    fwd_hooks: Sequence[Hook] = (),
    show_progress: bool = False,
) -> AttentionSinks:
    """Image-side attention sinks per layer (the module docstring gives the rule).

    One forward pass per batch reads the residual entering every chosen block at the
    image-side positions and the attention rows of the text queries (never the whole
    ``[query, key]`` pattern).

    Args:
        batches: a VLMBatch or an iterable of them (streamed).
        layers: ``"all"``, an int or a sequence of layer indices.
        rule: ``"norm"`` (outlier residual norm) or ``"dims"`` (a massive dimension).
        threshold: robust z for ``"norm"`` (default 10), ratio to the median ``|x|`` for
            ``"dims"`` (default 100).
        min_ratio: ``"norm"`` only: a sink's norm is also at least this many medians.
        queries: the text queries whose attention is measured (default
            ``positions.after_image``); a function of ImagePositions for several batches.
        min_examples: the fraction of examples that must have a sink at a layer for the
            layer to count (the verdict).
        candidates: the positions compared (default ``positions.image_side``; e.g.
            ``lambda p: p.image`` for content tokens only, when the markers' embeddings
            live on another scale than the projected patches); a function of
            ImagePositions for several batches.
        fwd_hooks: interventions active during the passes.
        show_progress: report progress over the batches.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-last-image")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> sinks = attention_sinks(model, batch, rule="dims")
        >>> sinks.verdict, sinks.n_sinks.tolist()
        ('none', [0, 0, 0, 0])
        >>> attention_sinks(model, batch, rule="max")
        Traceback (most recent call last):
        ...
        ValueError: rule must be 'norm' or 'dims', got 'max'
    """
    if rule not in DEFAULT_THRESHOLD:
        raise ValueError(f"rule must be 'norm' or 'dims', got {rule!r}")
    threshold = DEFAULT_THRESHOLD[rule] if threshold is None else float(threshold)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if not min_ratio >= 1:
        raise ValueError(f"min_ratio must be at least 1, got {min_ratio}")
    if not 0 <= min_examples <= 1:
        raise ValueError(f"min_examples must be a fraction in [0, 1], got {min_examples}")
    chosen = resolve_layers(model, layers)
    # blocks without attention (LFM2's convolution blocks) have no pattern to read
    attended = {l for l in chosen if f"blocks.{l}.attn.hook_pattern" in model.hook_dict}
    batches = [batches] if isinstance(batches, VLMBatch) else batches
    per_batch: list[dict[str, Any]] = []
    for batch in progress(batches, desc="attention sinks", enabled=show_progress):
        if not isinstance(batch, VLMBatch):
            raise TypeError(f"batches must be VLMBatches from model.prepare(...), got "
                            f"{type(batch).__name__}")
        pos = batch.positions
        query_mask = _resolve(pos, queries, pos.after_image, "queries").mask.cpu()
        side = _resolve(pos, candidates, pos.image_side, "candidates").mask.cpu()
        stats = {l: _ResidualStats(side, rule) for l in chosen}
        readers = {l: _KeyAttention(query_mask) for l in chosen if l in attended}
        hooks = list(fwd_hooks) + [(f"blocks.{l}.hook_resid_pre", stats[l]) for l in chosen]
        hooks += [(f"blocks.{l}.attn.hook_pattern", r) for l, r in readers.items()]
        with torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=hooks, output_attentions=False, logits_to_keep=1)
        silent = [l for l in chosen if not stats[l].fired]
        if silent:
            raise RuntimeError(f"blocks.{silent[0]}.hook_resid_pre did not fire on this model")
        n_q = query_mask.sum(1).double()
        nan = torch.full(query_mask.shape, float("nan"))
        key = torch.stack([(readers[l].total / (n_q * max(readers[l].n_heads, 1))[:, None]).float()
                           if l in readers else nan for l in chosen])
        key[:, n_q == 0] = float("nan")
        value = torch.stack([stats[l].value for l in chosen])
        ratio = torch.stack([stats[l].ratio for l in chosen])
        if rule == "norm":
            mask = (value >= threshold) & (ratio >= min_ratio)
        else:
            mask = value >= threshold
        per_batch.append(dict(mask=mask, value=value, ratio=ratio, key=key,
                              side=pos.image_side.mask.cpu(),
                              peak_dim=torch.stack([stats[l].peak_dim for l in chosen]),
                              kinds=[(k, s.mask.cpu()) for k, s in _kind_sets(pos)],
                              ids=batch.input_ids.cpu()))
    if not per_batch:
        raise ValueError("no batches given")
    return _summarise(per_batch, chosen, rule, threshold, min_ratio, min_examples)


def _summarise(per_batch: list[dict], layers: list[int], rule: str, threshold: float,
               min_ratio: float, min_examples: float) -> AttentionSinks:
    n_l = len(layers)
    share_sum, image_sum, counted = torch.zeros(n_l, dtype=torch.float64), torch.zeros(n_l, dtype=torch.float64), 0
    with_sinks, n_sinks, n_examples = torch.zeros(n_l), torch.zeros(n_l, dtype=torch.long), 0
    for r in per_batch:
        mask, key, side = r["mask"], r["key"], r["side"]
        has_q = (~key.isnan().all(-1)).any(0)                             # [batch]
        share_sum += (key.nan_to_num(0) * mask).sum(-1)[:, has_q].sum(-1).double()
        image_sum += (key.nan_to_num(0) * side).sum(-1)[:, has_q].sum(-1).double()
        counted += int(has_q.sum())
        with_sinks += mask.any(-1).float().sum(-1)
        n_sinks += mask.sum((1, 2))
        n_examples += mask.shape[1]
    share = (share_sum / counted).float() if counted else torch.full((n_l,), float("nan"))
    image_share = (image_sum / counted).float() if counted else torch.full((n_l,), float("nan"))
    no_attention = per_batch[0]["key"].isnan().flatten(1).all(-1)        # a block without one
    share[no_attention], image_share[no_attention] = float("nan"), float("nan")
    result = AttentionSinks(
        layers, rule, threshold, min_ratio, min_examples,
        [r["mask"] for r in per_batch], [r["value"] for r in per_batch],
        [r["ratio"] for r in per_batch], [r["peak_dim"] for r in per_batch],
        [r["key"] for r in per_batch], share, image_share, with_sinks / n_examples, n_sinks,
        n_examples, input_ids=[r["ids"] for r in per_batch])
    rows = [layers.index(l) for l in result.sink_layers]
    kinds: Counter = Counter()
    for r in per_batch:
        sinks = r["mask"][rows].any(0) if rows else torch.zeros_like(r["side"])
        taken = torch.zeros_like(sinks)
        for kind, m in r["kinds"]:
            kinds[kind] += int((sinks & m & ~taken).sum())
            taken |= m
    result.kinds = {k: kinds[k] for k in _KINDS if kinds[k]}
    return result


def sink_knockout(
    model,
    batch: VLMBatch,
    sinks: Union[AttentionSinks, PositionSet],
    layers: Layers = "all",
    queries: Optional[PositionSet] = None,
    method: Literal["zero", "mask"] = "zero",
    sink_layers: Optional[Layers] = None,
) -> list[Hook]:
    """Hooks that cut the sinks out of attention: :func:`knockout_hooks` with the sinks as keys.

    Args:
        sinks: an :class:`AttentionSinks` that analysed ``batch`` (its sinks at any of
            ``sink_layers``, default its :attr:`~AttentionSinks.sink_layers`) or a
            position set of ``batch``.
        layers: the layers whose attention is cut (default every layer).
        queries: whose attention to the sinks is cut (default every position).
        method: ``"zero"`` (post-softmax, no renormalisation, the Narrow Gate paper's
            knockout) or ``"mask"`` (pre-softmax ``-inf``: the attention the sinks held is
            spread over the other keys).
        sink_layers: with an :class:`AttentionSinks`, the layers whose sinks are taken.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(2).prompts)
        >>> loose = attention_sinks(model, batch, threshold=2, min_ratio=1.2)   # a lax rule
        >>> hooks = sink_knockout(model, batch, loose, layers=[3], sink_layers=[3])
        >>> [name for name, _ in hooks]
        ['blocks.3.attn.hook_pattern']
        >>> sink_knockout(model, batch, attention_sinks(model, batch))
        Traceback (most recent call last):
        ...
        ValueError: no sinks to knock out: attention_sinks found none (verdict 'none') ...
    """
    if isinstance(sinks, AttentionSinks):
        keys = sinks.positions(sinks.index_of(batch), sink_layers)
        if keys.is_empty():
            raise ValueError(f"no sinks to knock out: attention_sinks found none (verdict "
                             f"{sinks.verdict!r}) at layers "
                             f"{sinks.sink_layers if sink_layers is None else sink_layers}")
    elif isinstance(sinks, PositionSet):
        keys = sinks
    else:
        raise TypeError(f"sinks must be an AttentionSinks or a PositionSet, got {type(sinks).__name__}")
    return knockout_hooks(model, batch, keys=keys, queries=queries, layers=layers, method=method)
