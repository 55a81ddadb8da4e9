"""Attention knockout: cut the edges from a query set to a key set.

Two semantics, named explicitly:

- ``"zero"`` (the Narrow Gate paper): post-softmax weights of the cut edges are set to
  zero at ``hook_pattern``, *without* renormalisation, so the row's remaining weights
  keep their values and the row sums to less than one.
- ``"mask"``: pre-softmax scores of the cut edges are set to ``-inf`` at
  ``hook_attn_scores``, so softmax renormalises over the remaining keys.

The hooks work on every step of cached generation: queries are then the new tokens
(which count as text and belong to every query set that asks for generated tokens),
keys the whole cache.

Example (the shipped ``toy-gated`` model routes all visual information through EOI):
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> data = make_examples(24, seed=0)
    >>> batch = model.prepare(data.prompts)              # the image is written as tokens
    >>> last, answers = batch.positions.last.mask, torch.tensor(data.answer_ids)
    >>> clean = model(batch)[last].argmax(-1)
    >>> cut = model.run_with_hooks(batch, fwd_hooks=gate_knockout(model, batch))[last].argmax(-1)
    >>> bool((clean == answers).all()), (cut == answers).float().mean().item() < 0.5
    (True, True)
"""

from __future__ import annotations

import operator

from typing import Callable, Literal, Optional, Sequence, Union

import torch  # noqa: F401  (the docstring examples use it)

from tl_vlm.core.attention_bridge import attention_layers
from tl_vlm.core.attention_edits import EdgeCut
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet

Layers = Union[Literal["all"], int, Sequence[int], range]
Hook = tuple[str, Callable]


def resolve_layers(model, layers: Layers) -> list[int]:
    """Layer indices from ``"all"``, an int, or a sequence; negative ints count from the end.

    Returns the sorted, de-duplicated, non-negative indices; raises IndexError for a
    layer outside the model and ValueError for an empty selection.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")      # 4 layers
        >>> resolve_layers(model, "all"), resolve_layers(model, [-1, 0, 0]), resolve_layers(model, 2)
        ([0, 1, 2, 3], [0, 3], [2])
        >>> resolve_layers(model, [0, 4])
        Traceback (most recent call last):
        ...
        IndexError: layer 4 is outside the model's 4 layers (0..3)
    """
    n = model.cfg.n_layers
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an int or a sequence of ints, got {layers!r}")
        return list(range(n))
    scalar = not hasattr(layers, "__iter__") or getattr(layers, "ndim", 1) == 0
    seq = [layers] if scalar else list(layers)
    out = []
    for layer in seq:
        # operator.index takes ints and integer numpy/torch scalars; bools are no layer.
        try:
            if isinstance(layer, bool):
                raise TypeError
            layer = operator.index(layer)
        except TypeError:
            raise TypeError(f"a layer must be an integer, got {layer!r}") from None
        if not -n <= layer < n:
            raise IndexError(f"layer {layer!r} is outside the model's {n} layers (0..{n - 1})")
        out.append(layer % n)
    if not out:
        raise ValueError("no layers selected")
    return sorted(set(out))


def last_layers(model, w: int) -> list[int]:
    """The last ``w`` layers (the paper's progressive knockout).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")      # 4 layers
        >>> last_layers(model, 1), last_layers(model, 3)
        ([3], [1, 2, 3])
        >>> last_layers(model, 0)
        Traceback (most recent call last):
        ...
        ValueError: w must be in 1..4, got 0
    """
    if not 1 <= w <= model.cfg.n_layers:
        raise ValueError(f"w must be in 1..{model.cfg.n_layers}, got {w}")
    return list(range(model.cfg.n_layers - w, model.cfg.n_layers))


def progressive_widths(n_layers: int) -> list[int]:
    """The w values of the progressive knockout (the gate knocked out in the last w layers):
    eighths of the depth, and every w on a model of at most 8 layers.

    Example:
        >>> progressive_widths(4), progressive_widths(32)
        ([1, 2, 3, 4], [4, 8, 12, 16, 20, 24, 28, 32])
    """
    fractions = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1)
    return sorted({max(1, round(n_layers * f)) for f in fractions}
                  | (set(range(1, n_layers + 1)) if n_layers <= 8 else set()))


def _positions(batch: Union[VLMBatch, ImagePositions]) -> ImagePositions:
    if isinstance(batch, VLMBatch):
        return batch.positions
    if isinstance(batch, ImagePositions):
        return batch
    hint = (" (did you swap model and batch? the model comes first)"
            if hasattr(batch, "cfg") and hasattr(batch, "layout") else "")
    raise TypeError(f"expected a VLMBatch from model.prepare(...) or its positions as the "
                    f"batch, got {type(batch).__name__}{hint}")


def knockout_hooks(
    model,
    batch: Union[VLMBatch, ImagePositions],
    keys: PositionSet,
    queries: Optional[PositionSet] = None,
    layers: Layers = "all",
    heads: Optional[Sequence[int]] = None,
    method: Literal["zero", "mask"] = "zero",
    generated_queries: bool = True,
) -> list[Hook]:
    """Hooks that cut attention from ``queries`` to ``keys`` in the chosen layers and heads.

    Args:
        keys: positions attended *to* that are cut.
        queries: positions whose attention is cut (default: every position).
        layers: ``"all"``, an int or a sequence of layer indices.
        heads: head indices (default: every head).
        method: ``"zero"`` post-softmax, no renormalisation (the paper), or ``"mask"``
            pre-softmax ``-inf`` (renormalised).
        generated_queries: tokens produced by ``generate`` are queries too (they are text).

    Returns one ``(hook name, function)`` per layer that has attention (in a hybrid
    decoder such as LFM2's, the chosen short-convolution layers are left out: they have
    no attention to cut, though they still move information between neighbouring
    positions; a choice without any attention layer raises), for ``run_with_hooks``,
    ``model.hooks`` or ``generate(fwd_hooks=...)``. Position sets of another batch, an
    empty key set or heads outside the model raise a clear error.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> pos = batch.positions
        >>> hooks = knockout_hooks(model, batch, keys=pos.gate, queries=pos.after_image,
        ...                        layers=[-1], heads=[0, 1])
        >>> [name for name, _ in hooks]
        ['blocks.3.attn.hook_pattern']
        >>> seen = {}
        >>> keep = ("blocks.3.attn.hook_pattern", lambda pattern, hook: seen.update(p=pattern))
        >>> logits = model.run_with_hooks(batch, fwd_hooks=hooks + [keep])
        >>> row = seen["p"][0, :, pos.last[0].item()]           # [head, k]: the last query
        >>> (row[:2, pos.gate[0]] == 0).all().item(), (row[:2].sum(-1) < 1).all().item()
        (True, True)
        >>> [n for n, _ in knockout_hooks(model, batch, keys=pos.gate, method="mask")][:2]
        ['blocks.0.attn.hook_attn_scores', 'blocks.1.attn.hook_attn_scores']
        >>> knockout_hooks(model, batch, keys=pos.row_breaks)    # the toy has no row breaks
        Traceback (most recent call last):
        ...
        ValueError: keys is empty in every example (...)
    """
    if not hasattr(model, "cfg") or not hasattr(model, "layout"):
        raise TypeError(f"expected a HookedVLM as the model, got {type(model).__name__}"
                        + (" (did you swap model and batch? the model comes first)"
                           if isinstance(model, (VLMBatch, ImagePositions)) else ""))
    pos = _positions(batch)
    queries = pos.all if queries is None else queries
    pos.check(keys, "keys", nonempty=True)
    pos.check(queries, "queries")
    if method not in ("zero", "mask"):
        raise ValueError(f"method must be 'zero' (post-softmax) or 'mask' (pre-softmax), got {method!r}")
    if heads is not None:
        bad = [h for h in heads if not 0 <= h < model.cfg.n_heads]
        if bad:
            raise IndexError(f"heads {bad} outside 0..{model.cfg.n_heads - 1}")
    # One EdgeCut for every layer: the attention function applies it without building
    # the [batch, head, query, key] pattern (SDPA on zeroed values when every query is
    # cut, else SDPA plus the cut rows); its masks are built once per sequence length and
    # device, shared across layers and generation steps.
    cut = EdgeCut(queries.mask, keys.mask, heads=heads, semantics=method,
                  generated_queries=generated_queries, padding=pos.padding.mask)
    return [(f"blocks.{layer}.attn.{cut.point}", cut)
            for layer in _with_attention(model, resolve_layers(model, layers))]


def _with_attention(model, layers: list[int]) -> list[int]:
    """The chosen layers that have attention: in a hybrid decoder (LFM2) the others have
    none to cut, and are left out; none of them having attention is an error."""
    have = attention_layers(model)
    kept = [layer for layer in layers if layer in have]
    if not kept:
        raise ValueError(f"layers {layers} have no attention to knock out; this model's "
                         f"attention layers are {have}")
    return kept


def gate_knockout(model, batch, layers: Layers = "all", **kw) -> list[Hook]:
    """The paper's [EOI] condition: every position stops attending to the gate
    (EOI; EOI and EOF for Emu3).

    ``batch`` is a VLMBatch or its ImagePositions; other keywords go to
    :func:`knockout_hooks` (``heads``, ``method``, ``generated_queries``).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> [name for name, _ in gate_knockout(model, batch, layers=last_layers(model, 2))]
        ['blocks.2.attn.hook_pattern', 'blocks.3.attn.hook_pattern']
        >>> data = make_examples(12, seed=0)
        >>> left = model.prepare(data.prompts, padding_side="left")     # for generation
        >>> model.generate(left, max_new_tokens=2).text == data.answers
        True
        >>> out = model.generate(left, fwd_hooks=gate_knockout(model, left), max_new_tokens=2)
        >>> sum(t == a for t, a in zip(out.text, data.answers)) < 6    # blind: guesses
        True
    """
    return knockout_hooks(model, batch, keys=_positions(batch).gate, layers=layers, **kw)


def image_to_text_knockout(model, batch, layers: Layers = "all", **kw) -> list[Hook]:
    """The paper's img->text condition: text after the image (and generated tokens)
    stops attending to BOI and the image tokens; the gate stays open.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> hooks = image_to_text_knockout(model, batch)          # every layer
        >>> len(hooks), model.run_with_hooks(batch, fwd_hooks=hooks).shape
        (4, torch.Size([12, 46, 54]))
    """
    pos = _positions(batch)
    keys = pos.image_side - pos.gate
    return knockout_hooks(model, batch, keys=keys, queries=pos.after_image, layers=layers, **kw)


def random_image_knockout(model, batch, k: int = 10, seed: int = 0, layers: Layers = "all",
                          **kw) -> list[Hook]:
    """The paper's control: ``k`` random image content tokens per example, seeded.

    Each example gets its own draw (:meth:`PositionSet.random`); the same ``seed`` gives
    the same tokens.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> hooks = random_image_knockout(model, batch, k=10, seed=1, layers=[0])
        >>> [name for name, _ in hooks]
        ['blocks.0.attn.hook_pattern']
        >>> random_image_knockout(model, batch, k=40)             # 36 codes per toy image
        Traceback (most recent call last):
        ...
        ValueError: asked for 40 random positions but example 0 has only 36
    """
    pos = _positions(batch)
    return knockout_hooks(model, batch, keys=pos.image.random(k, seed), layers=layers, **kw)
