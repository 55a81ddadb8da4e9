"""Cross-modal attention contribution: how much text attends to each part of the image side.

The Narrow Gate paper's analysis 2. For layer ``l`` and head ``h``, each image-side key
``j`` (BOI, image content, EOI, row breaks, specials) gets

    S[l, h, j] = sum over text queries i (after the image) of A[h, i, j]           (weight)
    S[l, h, j] = sum over text queries i of A[h, i, j] * ||W_O^h v_j^h||           (value)

where ``A`` is the post-softmax pattern and the value-weighted form is Kobayashi et al.
(2020): the norm of what key ``j`` actually writes into the residual through head ``h``
(``W_O^h`` is the head's ``d_model x d_head`` slice of the output projection, ``v_j^h``
the value of the kv head that ``h`` reads under GQA).

Averaging over a dataset, exactly:

1. per example, ``S`` is summed over the example's queries (the paper sums rows, so an
   example with more text weighs more) and over the keys of each group; keys of *every*
   image of the example count, each in its group;
2. these per-example group totals are summed over examples (``weight_total``); dividing
   by ``n_examples`` gives the dataset mean (``mean_weight``);
3. shares normalise the mean over groups: per (layer, head) in ``weight``/``value``, and
   per layer after the mean over heads in :meth:`CrossModalContribution.per_layer` (the
   paper's ``f``). Shares are ratios of means, so the example count cancels in them.

Accumulation is streamed and never builds a full pattern: the ``hook_pattern`` hooks
are pattern readers (:mod:`tl_vlm.core.attention_edits`), so the attention function computes
each layer's output with SDPA and hands the hooks only the rows of the text queries, a
chunk at a time; they reduce them to ``[head, image-side keys]`` sums, add those to
running totals and return nothing. They combine with other hooks (e.g. a knockout, listed
first) in one ``run_with_hooks``; with any other hook on ``hook_pattern`` the layer runs
eagerly and they read the same rows of the full pattern.

Keys are grouped by :data:`DEFAULT_GROUPS`: ``boi``, ``image`` (content tokens but the
last of each image), ``last_image``, ``eoi``, ``row_breaks``, ``specials``; a disjoint
cover of ``positions.image_side``, with groups a family lacks left at zero.

Example (in ``toy-gated`` the text reads the image through EOI only):
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> batches = [model.prepare(make_examples(12, seed=s).prompts) for s in (0, 1)]
    >>> contrib = cross_modal_contribution(model, batches)
    >>> contrib.groups
    ('boi', 'image', 'last_image', 'eoi', 'row_breaks', 'specials')
    >>> contrib.share("eoi").round(decimals=3)   # per layer, value-weighted: the gate's share
    tensor([1., 1., 1., 1.], dtype=torch.float64)
    >>> contrib.token_map().shape                # [rows, cols] share of each image token
    torch.Size([6, 6])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.core.devices import weights_of
from tl_vlm.core.progress import progress
from tl_vlm.core.attention_edits import PatternReader
from tl_vlm.analyses.knockout import Hook, Layers, resolve_layers
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet
from tl_vlm.core.reprs import short_repr

GroupFn = Callable[[ImagePositions], PositionSet]
Queries = Union[None, PositionSet, Callable[[ImagePositions], PositionSet]]
Grid = tuple[int, int]


def _content_but_last(pos: ImagePositions) -> PositionSet:
    return pos.image - pos.last_image


#: The default partition of the image side. Emu3's EOF and size prefix are "specials"
#: (its gate is EOI + EOF: pass ``groups`` with ``"gate": attrgetter("gate")`` and
#: ``"specials": lambda p: p.specials - p.gate`` to measure the gate as one group).
DEFAULT_GROUPS: dict[str, GroupFn] = {
    "boi": attrgetter("boi"),
    "image": _content_but_last,
    "last_image": attrgetter("last_image"),
    "eoi": attrgetter("eoi"),
    "row_breaks": attrgetter("row_breaks"),
    "specials": attrgetter("specials"),
}


# -- the result ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossModalContribution:
    """Cross-modal attention contribution accumulated over a dataset.

    Attributes:
        layers: model layer of each entry of the ``layer`` axis.
        groups: names of the ``group`` axis (a partition of the image side).
        weight_total: per (layer, head, group), the sum over examples of the per-example
            sum over queries and group keys of ``A`` (float64).
        value_total: the same for ``A * ||W_O^h v_j||``; None if not value-weighted.
        n_examples: examples accumulated.
        n_queries: text queries accumulated (all examples).
        n_keys: image-side keys per group, summed over examples.
        map_layers: layers averaged in the token maps.
        map_totals, value_map_totals: per image grid ``(rows, cols)``, the sum over images
            of each content token's contribution (mean over heads, summed over
            ``map_layers``).
        map_counts: per grid, how many images had a token at each cell.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> contrib = cross_modal_contribution(model, batch)
        >>> contrib.n_examples, contrib.n_keys.tolist()     # keys per group, all examples
        (12, [12, 420, 12, 12, 0, 0])
        >>> contrib.weight.shape, contrib.value.shape      # [layer, head, group]
        (torch.Size([4, 4, 6]), torch.Size([4, 4, 6]))
        >>> torch.equal(contrib.per_layer()[:, contrib.groups.index("eoi")], contrib.share("eoi"))
        True
    """

    __repr__ = short_repr   # shapes and headline numbers, not tensors

    layers: tuple[int, ...]
    groups: tuple[str, ...]
    weight_total: Float[Tensor, "layer head group"]
    value_total: Optional[Float[Tensor, "layer head group"]]
    n_examples: int
    n_queries: int
    n_keys: Int[Tensor, "group"]
    map_layers: tuple[int, ...]
    map_totals: dict[Grid, Float[Tensor, "row col"]] = field(repr=False)
    value_map_totals: Optional[dict[Grid, Float[Tensor, "row col"]]] = field(repr=False)
    map_counts: dict[Grid, Int[Tensor, "row col"]] = field(repr=False)

    def _total(self, value_weighted: bool) -> Float[Tensor, "layer head group"]:
        if not value_weighted:
            return self.weight_total
        if self.value_total is None:
            raise ValueError("accumulated with value_weighted=False: only the attention-weight "
                             "variant exists (pass value_weighted=False)")
        return self.value_total

    @property
    def weight(self) -> Float[Tensor, "layer head group"]:
        """Attention-weight shares, normalised over groups per (layer, head)."""
        return _normalise(self.weight_total)

    @property
    def value(self) -> Float[Tensor, "layer head group"]:
        """Value-weighted shares, normalised over groups per (layer, head)."""
        return _normalise(self._total(True))

    @property
    def mean_weight(self) -> Float[Tensor, "layer head group"]:
        """Un-normalised dataset mean (per example) of the summed attention weights."""
        return self.weight_total / self.n_examples

    @property
    def mean_value(self) -> Float[Tensor, "layer head group"]:
        """Un-normalised dataset mean (per example) of the value-weighted sums."""
        return self._total(True) / self.n_examples

    def per_layer(self, value_weighted: bool = True) -> Float[Tensor, "layer group"]:
        """The paper's ``f``: mean over heads, then normalised over groups.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(12, seed=0).prompts)
            >>> contrib = cross_modal_contribution(model, batch)
            >>> f = contrib.per_layer(value_weighted=False)     # [layer, group]
            >>> f.shape, f.sum(-1).round(decimals=6)
            (torch.Size([4, 6]), tensor([1., 1., 1., 1.], dtype=torch.float64))
        """
        return _normalise(self._total(value_weighted).sum(1))

    def share(self, group: str, value_weighted: bool = True) -> Float[Tensor, "layer"]:
        """One group's column of :meth:`per_layer`.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(12, seed=0).prompts)
            >>> contrib = cross_modal_contribution(model, batch)
            >>> contrib.share("eoi").round(decimals=3)
            tensor([1., 1., 1., 1.], dtype=torch.float64)
            >>> contrib.share("eoi", value_weighted=False).shape
            torch.Size([4])
            >>> contrib.share("gate")
            Traceback (most recent call last):
            ...
            KeyError: "no group 'gate'; groups are ['boi', 'image', 'last_image', 'eoi', ...]"
        """
        if group not in self.groups:
            raise KeyError(f"no group {group!r}; groups are {list(self.groups)}")
        return self.per_layer(value_weighted)[:, self.groups.index(group)]

    @property
    def grids(self) -> list[Grid]:
        """``(rows, cols)`` of the image grids seen, sorted.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(12, seed=0).prompts)
            >>> contrib = cross_modal_contribution(model, batch)
            >>> contrib.grids                               # the toy image is 6x6 codes
            [(6, 6)]
        """
        return sorted(self.map_counts)

    def token_map(self, value_weighted: bool = True, grid: Optional[Grid] = None
                  ) -> Float[Tensor, "row col"]:
        """Each content token's share of the image side, on the image grid.

        Cell ``(r, c)``: the token's contribution (summed over queries, mean over heads
        and ``map_layers``) averaged over the images that have that cell, divided by the
        mean per-example image-side total over the same layers and heads. So with one
        image per example, the map sums to the content tokens' share of the image side
        (pooled over ``map_layers`` and heads); NaN marks cells no image had.
        Images of different grids are kept apart: pass ``grid`` when there are several.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(12, seed=0).prompts)
            >>> contrib = cross_modal_contribution(model, batch)
            >>> m = contrib.token_map(grid=(6, 6))          # [row, col]
            >>> m.shape, bool(m.sum() < 0.01)               # the codes get (almost) nothing: EOI does
            (torch.Size([6, 6]), True)
        """
        if grid is None:
            if len(self.map_counts) != 1:
                raise ValueError(f"the images have {len(self.map_counts)} grids "
                                 f"{self.grids}: pick one with token_map(grid=(rows, cols))")
            grid = self.grids[0]
        if grid not in self.map_counts:
            raise KeyError(f"no image with grid {grid}; grids seen: {self.grids}")
        totals = self.value_map_totals if value_weighted else self.map_totals
        if totals is None:
            self._total(True)  # raises the value_weighted=False message
        rows = [self.layers.index(l) for l in self.map_layers]
        side = self._total(value_weighted)[rows].sum(-1).mean() / self.n_examples
        per_image = totals[grid] / (self.map_counts[grid] * len(self.map_layers))
        return per_image / side


def _normalise(total: Tensor) -> Tensor:
    return total / total.sum(-1, keepdim=True)


# -- accumulation ----------------------------------------------------------------------------
@dataclass
class _Image:
    """One image of one example: where its content keys sit among the example's side keys."""

    grid: Grid
    keys: Int[Tensor, "n"]    # indices into the example's side keys
    cells: Int[Tensor, "n"]   # row * cols + col


@dataclass
class _Example:
    """What the hooks need of one example, in index form."""

    queries: Int[Tensor, "q"]
    side: Int[Tensor, "k"]
    group: Int[Tensor, "k"]
    images: list[_Image]


class ContributionAccumulator:
    """Running sums for :func:`cross_modal_contribution`; feed it with :meth:`hooks`.

    Args:
        model: the HookedVLM.
        layers: layers to measure (``"all"``, an int or a sequence).
        value_weighted: also accumulate the value-weighted variant (needs ``hook_v``).
        map_layers: layers averaged in the token maps (default: ``layers``; must be among them).
        groups: name -> function of :class:`ImagePositions` giving that group's keys; the
            groups must partition ``image_side`` in every example (default
            :data:`DEFAULT_GROUPS`).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.analyses.knockout import image_to_text_knockout
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> acc = ContributionAccumulator(model, layers=[2, 3])
        >>> for seed in (0, 1):
        ...     batch = model.prepare(make_examples(12, seed=seed).prompts)
        ...     knockout = image_to_text_knockout(model, batch)
        ...     _ = model.run_with_hooks(batch, fwd_hooks=knockout + acc.hooks(batch),
        ...                              output_attentions=False)
        >>> contrib = acc.result()
        >>> contrib.layers, contrib.n_examples
        ((2, 3), 24)
        >>> contrib.share("image", value_weighted=False).tolist()      # cut: measured after the edit
        [0.0, 0.0]
        >>> ContributionAccumulator(model, layers=[0], map_layers=[1])
        Traceback (most recent call last):
        ...
        ValueError: map_layers [1] are not among the measured layers [0]; add them to layers
    """

    def __init__(self, model, layers: Layers = "all", value_weighted: bool = True,
                 map_layers: Optional[Layers] = None,
                 groups: Optional[Mapping[str, GroupFn]] = None) -> None:
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.map_layers = self.layers if map_layers is None else resolve_layers(model, map_layers)
        outside = sorted(set(self.map_layers) - set(self.layers))
        if outside:
            raise ValueError(f"map_layers {outside} are not among the measured layers "
                             f"{self.layers}; add them to layers")
        self.groups = dict(DEFAULT_GROUPS if groups is None else groups)
        if not self.groups:
            raise ValueError("groups is empty: give at least one image-side group")
        self.value_weighted = value_weighted
        n_layers, n_heads, n_groups = len(self.layers), model.cfg.n_heads, len(self.groups)
        self.weight_total = torch.zeros(n_layers, n_heads, n_groups, dtype=torch.float64)
        self.value_total = torch.zeros_like(self.weight_total) if value_weighted else None
        self.n_examples = 0
        self.n_queries = 0
        self.n_keys = torch.zeros(n_groups, dtype=torch.long)
        self.map_totals: dict[Grid, Tensor] = {}
        self.value_map_totals: dict[Grid, Tensor] = {}
        self.map_counts: dict[Grid, Tensor] = {}
        self._grams: dict[int, Tensor] = {}
        self._norms: dict[int, list[Tensor]] = {}   # layer -> per-example [head, key] norms

    # -- hooks -------------------------------------------------------------------------
    def hooks(self, batch: VLMBatch, queries: Queries = None) -> list[Hook]:
        """Hooks that add ``batch``'s contribution to the running sums (same as
        :func:`contribution_hooks`). Put them after any hook that edits the pattern, to
        measure the edited pattern.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(12, seed=0).prompts)
            >>> acc = ContributionAccumulator(model, value_weighted=False)
            >>> hooks = acc.hooks(batch, queries=batch.positions.last)    # the last token only
            >>> [name for name, _ in hooks][:2]
            ['blocks.0.attn.hook_pattern', 'blocks.1.attn.hook_pattern']
            >>> _ = model.run_with_hooks(batch, fwd_hooks=hooks, output_attentions=False)
            >>> acc.result().n_queries
            12
        """
        if not isinstance(batch, VLMBatch):
            raise TypeError(f"expected a VLMBatch from model.prepare(...), "
                            f"got {type(batch).__name__}")
        plan = self._plan(batch.positions, queries)
        seq = batch.positions.seq_len
        out: list[Hook] = []
        for index, layer in enumerate(self.layers):
            if self.value_weighted:
                out.append((f"blocks.{layer}.attn.hook_v", self._value_hook(layer, plan, seq)))
            out.append((f"blocks.{layer}.attn.hook_pattern",
                        self._pattern_hook(index, layer, plan, seq)))
        return out

    def _value_hook(self, layer: int, plan: list[_Example], seq: int) -> Callable:
        def store_norms(v: Float[Tensor, "batch pos kv_head d_head"], hook) -> None:
            _check_full_pass(v.shape[1], seq, "hook_v")
            v = v.detach()                              # reading joins no autograd graph
            gram = self._gram(layer).to(v.device)
            heads = gram.shape[0]
            group = heads // v.shape[2]                 # query heads per kv head (GQA)
            norms = []
            for b, ex in enumerate(plan):
                side = v[b, ex.side.to(v.device)]       # [key, kv_head, d]
                sq = torch.empty(heads, side.shape[0], dtype=torch.float64, device=v.device)
                for h in range(heads):                  # one head at a time: small float64 blocks
                    vh = side[:, h // group].double()   # [key, d]
                    sq[h] = ((vh @ gram[h]) * vh).sum(-1)
                norms.append(sq.clamp_min(0).sqrt().cpu())
            self._norms[layer] = norms

        return store_norms

    def _pattern_hook(self, index: int, layer: int, plan: list[_Example], seq: int) -> "_LayerSums":
        return _LayerSums(self, index, layer, plan, seq)

    # -- bookkeeping -------------------------------------------------------------------
    def _plan(self, pos: ImagePositions, queries: Queries) -> list[_Example]:
        """Index form of the batch: queries, image-side keys and their groups."""
        pos = pos.to("cpu")
        query_set = _resolve_queries(pos, queries)
        side = pos.image_side.mask
        if not side.any():
            raise ValueError("the batch has no image-side tokens: contribution needs images "
                             "(model.prepare(prompts, images=...))")
        if query_set.is_empty():
            raise ValueError("the query set is empty in every example (no text after the "
                             "image? the paper's queries are positions.after_image)")
        group_of = self._group_index(pos)
        plan = []
        for b in range(pos.batch_size):
            keys, rows = side[b].nonzero().flatten(), query_set[b]
            if keys.numel() == 0:
                raise ValueError(f"example {b} has no image-side tokens; every example "
                                 f"needs an image")
            if rows.numel() == 0:
                raise ValueError(f"example {b} has no query positions (no text after its "
                                 f"image?); drop it or pass queries=")
            plan.append(_Example(rows, keys, group_of[b, keys], _images(pos, b, keys)))
        return plan

    def _group_index(self, pos: ImagePositions) -> Int[Tensor, "batch pos"]:
        """Group number of every position (-1 outside the image side); checks the partition."""
        index = torch.full(pos.image.mask.shape, -1, dtype=torch.long)
        names = list(self.groups)
        for g, name in enumerate(names):
            keys = self.groups[name](pos)
            if not isinstance(keys, PositionSet) or keys.mask.shape != index.shape:
                raise ValueError(f"group {name!r} must give a PositionSet of the batch's shape")
            taken = keys.mask & (index >= 0)
            if taken.any():
                other = names[int(index[taken][0])]
                raise ValueError(f"groups {other!r} and {name!r} overlap; groups must be disjoint")
            index[keys.mask] = g
        outside = (index >= 0) & ~pos.image_side.mask
        missing = pos.image_side.mask & (index < 0)
        if outside.any() or missing.any():
            raise ValueError("the groups must cover exactly the image side: "
                             f"{int(missing.sum())} image-side keys in no group, "
                             f"{int(outside.sum())} group keys outside the image side")
        return index

    def _gram(self, layer: int) -> Float[Tensor, "head d_head d_head"]:
        """``W_O^h^T W_O^h`` per head, so ``||W_O^h v|| = sqrt(v^T G_h v)`` without ever
        materialising ``[key, head, d_model]``."""
        if layer not in self._grams:
            # One head's float64 slice at a time, from the weight in place (no copy of
            # W_O): at 7B width a copy plus all heads in float64 is ~200 MB per layer.
            with _output_weight(self.model, layer) as weight:
                heads = self.model.cfg.n_heads
                d_head = weight.shape[1] // heads
                grams = torch.empty(heads, d_head, d_head, dtype=torch.float64,
                                    device=weight.device)
                for h in range(heads):
                    w = weight[:, h * d_head:(h + 1) * d_head].double()
                    torch.matmul(w.T, w, out=grams[h])
                    del w
            self._grams[layer] = grams
        return self._grams[layer]

    def _add_map(self, maps: dict[Grid, Tensor], ex: _Example, per_key: Tensor) -> None:
        per_token = per_key.mean(0)  # mean over heads
        for img in ex.images:
            rows, cols = img.grid
            total = maps.setdefault(img.grid, torch.zeros(rows, cols, dtype=torch.float64))
            total.view(-1).index_add_(0, img.cells, per_token[img.keys])

    def _count(self, plan: list[_Example]) -> None:
        self.n_examples += len(plan)
        for ex in plan:
            self.n_queries += ex.queries.numel()
            self.n_keys += torch.bincount(ex.group, minlength=len(self.groups))
            for img in ex.images:
                rows, cols = img.grid
                count = self.map_counts.setdefault(img.grid,
                                                   torch.zeros(rows, cols, dtype=torch.long))
                count.view(-1).index_add_(0, img.cells, torch.ones_like(img.cells))

    def result(self) -> CrossModalContribution:
        """A snapshot of the sums so far (accumulation can go on afterwards).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> acc = ContributionAccumulator(model)
            >>> acc.result()
            Traceback (most recent call last):
            ...
            ValueError: nothing accumulated yet: run the model with these hooks first
            >>> batch = model.prepare(make_examples(12, seed=0).prompts)
            >>> _ = model.run_with_hooks(batch, fwd_hooks=acc.hooks(batch), output_attentions=False)
            >>> acc.result().per_layer().shape                         # [layer, group]
            torch.Size([4, 6])
        """
        if self.n_examples == 0:
            raise ValueError("nothing accumulated yet: run the model with these hooks first")
        clone = lambda maps: {g: t.clone() for g, t in maps.items()}  # noqa: E731
        return CrossModalContribution(
            layers=tuple(self.layers), groups=tuple(self.groups),
            weight_total=self.weight_total.clone(),
            value_total=None if self.value_total is None else self.value_total.clone(),
            n_examples=self.n_examples, n_queries=self.n_queries, n_keys=self.n_keys.clone(),
            map_layers=tuple(self.map_layers), map_totals=clone(self.map_totals),
            value_map_totals=clone(self.value_map_totals) if self.value_weighted else None,
            map_counts=clone(self.map_counts),
        )

    def take(self) -> CrossModalContribution:
        """:meth:`result`, then start the sums again from zero, keeping what is cached
        (each layer's ``W_O`` Gram matrices: a few GFLOP per layer for a 7B model). For
        per-batch partial sums, e.g. records of a sharded run.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> acc = ContributionAccumulator(model)
            >>> parts = []
            >>> for seed in (0, 1):
            ...     batch = model.prepare(make_examples(6, seed=seed).prompts)
            ...     _ = model.run_with_hooks(batch, fwd_hooks=acc.hooks(batch))
            ...     parts.append(acc.take())
            >>> [p.n_examples for p in parts], acc.n_examples
            ([6, 6], 0)
        """
        out = self.result()
        self.weight_total.zero_()
        if self.value_total is not None:
            self.value_total.zero_()
        self.n_examples = self.n_queries = 0
        self.n_keys.zero_()
        self.map_totals, self.value_map_totals, self.map_counts = {}, {}, {}
        return out


class _LayerSums(PatternReader):
    """One layer's contribution sums: reads the pattern rows of the text queries only.

    A :class:`~tl_vlm.core.attention_edits.PatternReader`, so the attention function hands it
    those rows a chunk at a time (SDPA computes the layer's output) instead of building
    the whole pattern; as a plain hook on a full pattern it reads the same rows at once.
    """

    def __init__(self, acc: "ContributionAccumulator", index: int, layer: int,
                 plan: list[_Example], seq: int) -> None:
        self.acc, self.index, self.layer, self.plan, self.seq = acc, index, layer, plan, seq
        self.in_map = layer in acc.map_layers
        self.query_masks = torch.zeros(len(plan), seq, dtype=torch.bool)
        for b, ex in enumerate(plan):
            self.query_masks[b, ex.queries] = True
        self._norms: Optional[list[Tensor]] = None

    def rows(self, q_len: int, k_len: int) -> Tensor:
        _check_full_pass(q_len, self.seq, "hook_pattern")
        return self.query_masks.any(0)

    def begin(self, q_len: int, k_len: int) -> None:
        _check_full_pass(q_len, self.seq, "hook_pattern")
        self._norms = self.acc._norms.pop(self.layer, None) if self.acc.value_weighted else None
        if self.acc.value_weighted and self._norms is None:
            raise RuntimeError(f"blocks.{self.layer}.attn.hook_v did not fire before "
                               f"hook_pattern; the value-weighted sums need it")
        if self.index == 0:  # count each example once per forward pass
            self.acc._count(self.plan)

    def read(self, rows: Tensor, pattern: Float[Tensor, "batch head r k"]) -> None:
        acc, norms = self.acc, self._norms
        masks = self.query_masks.to(rows.device)[:, rows]          # [batch, r]
        for b, ex in enumerate(self.plan):
            if not bool(masks[b].any()):
                continue
            block = pattern[b][:, masks[b]][:, :, ex.side.to(pattern.device)]
            per_key = block.sum(1, dtype=torch.float64).cpu()       # [head, side keys]
            acc.weight_total[self.index].index_add_(1, ex.group, per_key)
            if norms is not None:
                acc.value_total[self.index].index_add_(1, ex.group, per_key * norms[b])
            if self.in_map:
                acc._add_map(acc.map_totals, ex, per_key)
                if norms is not None:
                    acc._add_map(acc.value_map_totals, ex, per_key * norms[b])


def _resolve_queries(pos: ImagePositions, queries: Queries) -> PositionSet:
    out = pos.after_image if queries is None else queries if isinstance(queries, PositionSet) \
        else queries(pos)
    if not isinstance(out, PositionSet):
        raise TypeError("queries must be a PositionSet or a function of ImagePositions "
                        "giving one (e.g. lambda p: p.after_image)")
    return pos.check(out, "queries").to("cpu")


def _images(pos: ImagePositions, b: int, side_keys: Tensor) -> list[_Image]:
    """Each image's content keys (as indices among ``side_keys``) and grid cells."""
    grid, content = pos.grid[b].cpu(), pos.image[b]
    where = torch.searchsorted(side_keys, content)  # content is a subset of side keys
    out = []
    for i in grid[:, 0].unique().tolist():
        mine = grid[:, 0] == i
        rows, cols = (int(grid[mine, 1].max()) + 1, int(grid[mine, 2].max()) + 1)
        out.append(_Image((rows, cols), where[mine], grid[mine, 1] * cols + grid[mine, 2]))
    return out


def _check_full_pass(q_len: int, seq: int, point: str) -> None:
    if q_len != seq:
        raise ValueError(f"{point} has {q_len} positions but the batch has {seq}: contribution "
                         f"hooks measure one full forward pass (run_with_hooks), not cached "
                         f"generation steps")


# -- public functions ----------------------------------------------------------------------
def output_projection(model, layer: int) -> Float[Tensor, "d_model head_x_d_head"]:
    """The weight of layer ``layer``'s attention output projection (HF ``o_proj``).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> output_projection(model, 0).shape         # [d_model, n_heads * d_head]
        torch.Size([64, 64])
    """
    with _output_weight(model, layer) as weight:
        return weight.clone()


@contextlib.contextmanager
def _output_weight(model, layer: int) -> Iterator[Tensor]:
    """Layer ``layer``'s o-projection weight, readable inside the block (an offloaded
    layer's weight is meta outside a forward), checked to be a map from the heads."""
    o = model.blocks[layer].attn.o
    linear = getattr(o, "original_component", o)
    n_heads = model.cfg.n_heads
    with weights_of(linear):
        weight = getattr(linear, "weight", None)
        if weight is None or weight.ndim != 2 or weight.shape[1] % n_heads:
            raise ValueError(f"blocks.{layer}.attn.o is not a linear map from {n_heads} heads "
                             f"(got {type(linear).__name__}); cannot weight by values")
        yield weight.detach()


def contribution_hooks(model, batch: VLMBatch, accumulator: ContributionAccumulator,
                       queries: Queries = None) -> list[Hook]:
    """Read-only hooks adding ``batch``'s cross-modal contribution to ``accumulator``.

    Combine with editing hooks in one pass by listing those first (hooks run in order),
    so the contribution is measured on the edited pattern.

    Args:
        queries: the query positions (default: ``positions.after_image``), as a
            PositionSet of this batch or a function of its ImagePositions.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.analyses.knockout import gate_knockout
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> acc = ContributionAccumulator(model, layers="all")
        >>> knock = gate_knockout(model, batch)
        >>> _ = model.run_with_hooks(batch, fwd_hooks=knock + contribution_hooks(model, batch, acc),
        ...                          output_attentions=False)   # HF keeps no pattern either
        >>> acc.result().share("eoi").tolist()                 # zero: the gate is cut
        [0.0, 0.0, 0.0, 0.0]
    """
    if accumulator.model is not model:
        raise ValueError("this accumulator was built for another model")
    return accumulator.hooks(batch, queries)


@torch.no_grad()
def cross_modal_contribution(
    model,
    batches: Union[VLMBatch, Iterable[VLMBatch]],
    layers: Layers = "all",
    queries: Queries = None,
    value_weighted: bool = True,
    map_layers: Optional[Layers] = None,
    groups: Optional[Mapping[str, GroupFn]] = None,
    fwd_hooks: Sequence[Hook] = (),
    show_progress: bool = True,
) -> CrossModalContribution:
    """Cross-modal attention contribution (the paper's ``f``) over one or many batches.

    Args:
        batches: a VLMBatch or an iterable of them (streamed: one forward pass each).
        layers: layers to measure.
        queries: query positions (default ``after_image``); a function of ImagePositions
            when there are several batches.
        value_weighted: also compute the value-weighted variant.
        map_layers: layers averaged in the token map (default: ``layers``).
        groups: partition of the image side (default :data:`DEFAULT_GROUPS`).
        fwd_hooks: hooks to run first in every pass (e.g. a knockout to measure under).
        show_progress: report progress over the batches (a bar in terminals and
            notebooks, plain lines in logs).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-distributed")     # text reads the codes directly
        >>> batches = (model.prepare(make_examples(12, seed=s).prompts) for s in (0, 1))  # streamed
        >>> contrib = cross_modal_contribution(model, batches, layers=[-1], value_weighted=False)
        >>> contrib.per_layer(value_weighted=False).shape            # [layer, group], rows sum to 1
        torch.Size([1, 6])
        >>> bool(contrib.share("eoi", value_weighted=False)[0] < 0.1)   # the gate carries little
        True
        >>> contrib.weight[0, 2].shape                               # layer 3, head 2: per group
        torch.Size([6])
    """
    batches = [batches] if isinstance(batches, VLMBatch) else batches
    acc = ContributionAccumulator(model, layers, value_weighted, map_layers, groups)
    # Batches are consumed one at a time (a generator is never materialised).
    for batch in progress(batches, desc="contribution", enabled=show_progress):
        # TransformerLens boots HF configs with output_attentions=True, which would keep
        # every layer's pattern alive to the end of the pass; the hooks need none of them.
        model.run_with_hooks(batch, fwd_hooks=list(fwd_hooks) + acc.hooks(batch, queries),
                             output_attentions=False, logits_to_keep=1)   # logits unused
    if acc.n_examples == 0:
        raise ValueError("no batches given")
    return acc.result()
