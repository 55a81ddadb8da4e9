"""Attention over generation: while the model writes, how much of each new token's
attention goes to the image, the gate, the prompt's text and what it already wrote, per
layer.

At every generation step the query is the position that predicts the next token (the
prompt's last position at the first step, then each token just written). Its attention
row, averaged over heads, is summed over each key group; the groups are disjoint, so
with ``"rest"`` (keys in no group: BOI, row breaks, padding is excluded) they add up to
one for every step and layer.

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> batch = model.prepare(make_examples(2).prompts, padding_side="left")
    >>> attn = attention_over_generation(model, batch, max_new_tokens=2)
    >>> attn.shares.shape, attn.groups                 # [batch, step, layer, group]
    (torch.Size([2, 2, 4, 5]), ['image', 'gate', 'text', 'generated', 'rest'])
    >>> bool(torch.allclose(attn.shares.sum(-1), torch.ones(2, 2, 4), atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.analyses.knockout import Layers, resolve_layers
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet

GroupSpec = Union[str, Callable[[ImagePositions], PositionSet]]

#: the prompt's key groups by default; "generated" and "rest" are added
DEFAULT_GROUPS: dict[str, GroupSpec] = {"image": "image", "gate": "gate", "text": "text"}


@dataclass
class GenerationAttention:
    """What :func:`attention_over_generation` measured.

    Attributes:
        groups: the key groups, then ``"generated"`` and ``"rest"``.
        layers: the layers measured.
        shares: ``[batch, step, layer, group]``: the share of the step's query attention
            (mean over heads) on each group; NaN after an example finished (EOS).
        text: what was generated, per example.

    Example:
        >>> r = GenerationAttention(["image", "rest"], [0], torch.tensor([[[[0.25, 0.75]]]]), ["a"])
        >>> r
        GenerationAttention(1 examples, 1 steps, 1 layers; mean share image 0.25, rest 0.75)
        >>> r.mean().shape
        torch.Size([1, 1, 2])
    """

    groups: list[str]
    layers: list[int]
    shares: Float[Tensor, "batch step layer group"]
    text: list[str]

    def mean(self) -> Float[Tensor, "step layer group"]:
        """The shares averaged over examples (NaN steps of finished examples left out)."""
        return self.shares.nanmean(0)

    def __repr__(self) -> str:
        b, s, l, _ = self.shares.shape
        overall = self.shares.nanmean(dim=(0, 1, 2)).tolist()
        shown = ", ".join(f"{g} {v:.2f}" for g, v in zip(self.groups, overall))
        return (f"GenerationAttention({b} examples, {s} steps, {l} layers; mean share "
                f"{shown})")

    def figure(self, example: Optional[int] = None) -> Any:
        """Share per group over generation steps (mean over layers; one example or all).

        Example:
            >>> r = GenerationAttention(["image", "rest"], [0], torch.tensor([[[[0.25, 0.75]]]]), ["a"])
            >>> [t.name for t in r.figure().data]
            ['image', 'rest']
        """
        from tl_vlm.plot import layer_curves

        values = self.mean() if example is None else self.shares[example]
        per_step = values.nanmean(1)                                    # [step, group]
        return layer_curves({g: per_step[:, i] for i, g in enumerate(self.groups)},
                            list(range(per_step.shape[0])), x_title="generation step",
                            y_title="attention share (mean over layers and heads)",
                            y_range=(0, 1.05), title="Attention of each new token, by key group")


def _group(positions: ImagePositions, spec: GroupSpec, name: str) -> PositionSet:
    value = getattr(positions, spec, None) if isinstance(spec, str) else spec(positions)
    if not isinstance(value, PositionSet):
        raise ValueError(f"group {name!r}: {spec!r} is not a position set of the batch "
                         f"(e.g. 'image', 'gate', 'text', 'row_breaks')")
    return value


def attention_over_generation(model, batch: VLMBatch, max_new_tokens: int = 20,
                              groups: Optional[Mapping[str, GroupSpec]] = None,
                              layers: Layers = "all") -> GenerationAttention:
    """Generate greedily and record each new token's attention share per key group and
    layer; see the module doc.

    Args:
        batch: a left-padded batch (``model.prepare(..., padding_side="left")``).
        max_new_tokens: generation steps.
        groups: key groups of the prompt, name -> ``ImagePositions`` attribute or function
            (default: image, gate, text); overlapping groups are refused.
        layers: the layers to record.

    Example (the gated toy's last layer reads the gate more than all image tokens):
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(8).prompts, padding_side="left")
        >>> last = attention_over_generation(model, batch, max_new_tokens=1).mean()[0, -1]
        >>> bool(last[1] > last[0])                     # groups: image, gate, ...
        True
    """
    if not isinstance(batch, VLMBatch):
        raise TypeError(f"attention_over_generation takes a VLMBatch from model.prepare(...), "
                        f"got {type(batch).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    chosen = resolve_layers(model, layers)
    pos = batch.positions
    specs = dict(DEFAULT_GROUPS if groups is None else groups)
    sets = {name: _group(pos, spec, name).mask.cpu() for name, spec in specs.items()}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if (sets[a] & sets[b]).any():
                raise ValueError(f"groups {a!r} and {b!r} overlap; give disjoint groups "
                                 f"(e.g. text=lambda p: p.text - p.gate)")
    prompt_len = pos.seq_len
    padding = pos.padding.mask.cpu()
    records: list[dict[int, Tensor]] = []

    def record(layer: int):
        def hook(pattern: Tensor, hook) -> None:
            if layer == chosen[0]:
                records.append({})
            row = pattern[:, :, -1, :].float().mean(1).detach().cpu()        # [batch, key]
            records[-1][layer] = row
        return hook

    hooks = [(f"blocks.{layer}.attn.hook_pattern", record(layer)) for layer in chosen]
    out = model.generate(batch, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
    n_steps = len(records)
    shares = torch.full((len(batch), n_steps, len(chosen), len(names) + 2), float("nan"))
    for s, step in enumerate(records):
        for li, layer in enumerate(chosen):
            row = step[layer]
            keys = row.shape[-1]
            masks = [torch.cat([m, torch.zeros(len(batch), keys - prompt_len, dtype=torch.bool)],
                               1) for m in sets.values()]
            generated = torch.zeros(len(batch), keys, dtype=torch.bool)
            generated[:, prompt_len:] = True
            pad = torch.cat([padding, torch.zeros(len(batch), keys - prompt_len,
                                                  dtype=torch.bool)], 1)
            rest = ~(torch.stack(masks).any(0) | generated | pad)
            for g, mask in enumerate(masks + [generated, rest]):
                shares[:, s, li, g] = (row * mask).sum(-1)
    finished = (out.new_tokens == model.layout.tokenizer.eos_token_id).int().cumsum(1)
    for b in range(len(batch)):               # steps after an EOS predict nothing
        done = (finished[b] > 0).nonzero()
        if len(done):
            shares[b, int(done[0]) + 1:] = float("nan")
    return GenerationAttention(names + ["generated", "rest"], chosen, shares, list(out.text))
