"""Activation patching: write a source run's activations into a target run.

The Narrow Gate paper steers what a native VLM says an image shows by patching the
gate (the end-of-image token): run an image of class A (the *source*), keep the gate's
activation, run an image of class B (the *target*) with the gate's activation replaced.
Two variants:

- residual stream: the input of decoder layer ``l`` (``blocks.{l}.hook_resid_pre``),
  one layer at a time;
- attention stream: the input of self-attention after its norm
  (``blocks.{l}.attn.hook_in``), in every layer from ``l`` to the end.

Scores, at the last position of the target (where the next token is predicted):

- flip rate: fraction of examples where ``sign(logit(B) - logit(A))`` differs from the
  unpatched target's (A, B: first tokens of the class names);
- overlap: ``sum_v min(p_patched(v), p_source(v))`` of the next-token distributions.

:func:`patch_hooks` is the general tool (any position sets, any ``[batch, pos, ...]``
hook); :func:`patch_positions` runs a layer sweep and scores it; :func:`patch_gate` is
the paper's preset. Sweeps reuse the unpatched prefix: one clean target forward caches
every needed ``hook_resid_pre``, then each layer's patched run starts at that layer
(:func:`tl_vlm.core.prefix.run_from_layer`), skipping the blocks before it.

Example (``toy-gated``: the gate carries what the text says about the image):
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_pairs
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> pairs = make_pairs(12, seed=0)             # same background, the asked attribute differs
    >>> source = model.prepare([p.source.prompt for p in pairs])
    >>> target = model.prepare([p.target.prompt for p in pairs])
    >>> answers = [(p.source.answer, p.target.answer) for p in pairs]
    >>> res = patch_gate(model, source, target, stream="attn_in", answers=answers)
    >>> res.flip_rate.shape, res.flip_rate[0].item()     # [layer]; from layer 0 on: all flip
    (torch.Size([4]), 1.0)
    >>> res.overlap.mean(-1).shape                       # [layer]
    torch.Size([4])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_vlm.core.progress import progress
from tl_vlm.analyses.knockout import Layers, resolve_layers
from tl_vlm.core.answers import answer_token_id
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet
from tl_vlm.core.prefix import run_from_layer
from tl_vlm.core.reprs import short_repr

Hook = tuple[str, Callable]
Span = Literal["layer", "to_end"]
PositionsArg = Union[str, PositionSet, tuple[PositionSet, PositionSet]]
AnswerArg = Union[Sequence[tuple[Union[int, str], Union[int, str]]], tuple[Tensor, Tensor]]

#: Named streams: hook-name template and the layers each sweep step patches.
STREAMS: dict[str, tuple[str, Span]] = {
    "resid_pre": ("blocks.{layer}.hook_resid_pre", "layer"),
    "attn_in": ("blocks.{layer}.attn.hook_in", "to_end"),
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


# -- the hook factory ----------------------------------------------------------------
class PatchHook:
    """A forward hook writing stored source values into the target's positions.

    ``calls`` counts the calls that patched (so a caller can check the hook fired).
    Built by :func:`patch_hooks`, which gathers ``values`` from a source cache.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> gate = batch.positions.gate.mask.nonzero(as_tuple=True)         # (batch idx, pos idx)
        >>> hook = PatchHook("blocks.1.hook_resid_pre", torch.zeros(12, 64), gate, (12, 46))
        >>> _ = model.run_with_hooks(batch, fwd_hooks=[(hook.name, hook)])
        >>> hook.calls
        1
    """

    def __init__(self, name: str, values: Float[Tensor, "n_patched ..."],
                 target_index: tuple[Int[Tensor, "n_patched"], Int[Tensor, "n_patched"]],
                 target_shape: tuple[int, int]) -> None:
        self.name = name
        self.values = values                       # [n_patched, ...]
        self.target_index = target_index           # (batch idx, pos idx), each [n_patched]
        self.target_shape = target_shape           # (batch, seq) of the target
        self.calls = 0

    def __call__(self, act: Float[Tensor, "batch pos ..."], hook: Any) -> Tensor:
        batch, seq = self.target_shape
        if act.ndim < 2 or act.shape[0] != batch:
            raise ValueError(
                f"{self.name} gave a tensor of shape {tuple(act.shape)}; patching needs "
                f"[batch={batch}, pos, ...] (hooks such as hook_pattern [batch, head, q, k] "
                f"do not have positions in dim 1)"
            )
        if act.shape[1] != seq:
            if self.calls and act.shape[1] < seq:
                return act  # a cached generation step: the patched positions are in the cache
            raise ValueError(
                f"{self.name} has {act.shape[1]} positions but the target batch has {seq}: "
                f"the hooks were built for another batch"
            )
        if act.shape[2:] != self.values.shape[1:]:
            raise ValueError(
                f"{self.name}: source values have shape {tuple(self.values.shape[1:])} per "
                f"position but the target activation has {tuple(act.shape[2:])}"
            )
        b, p = self.target_index
        out = act.clone()
        out[b.to(act.device), p.to(act.device)] = self.values.to(device=act.device, dtype=act.dtype)
        self.calls += 1
        return out


def _flat_index(positions: PositionSet) -> tuple[Tensor, Tensor]:
    """(batch, pos) indices of every member, example by example, ascending positions."""
    b, p = positions.mask.nonzero(as_tuple=True)
    return b, p


def _check_position_counts(source_positions: PositionSet, target_positions: PositionSet) -> None:
    """Raise unless both sets cover the same number of examples and, per example, the same
    number of positions (the k-th source position goes to the k-th target position).

    Example:
        >>> a = PositionSet.from_lists([[1], [2]], seq_len=4)
        >>> _check_position_counts(a, PositionSet.from_lists([[3], [0]], seq_len=5))
        >>> _check_position_counts(a, PositionSet.from_lists([[3], [0, 1]], seq_len=5))
        Traceback (most recent call last):
        ...
        ValueError: example 1: 1 source position(s) [2] but 2 target position(s) [0, 1]; ...
    """
    for name, s in (("source_positions", source_positions), ("target_positions", target_positions)):
        if not isinstance(s, PositionSet):
            raise TypeError(f"{name} must be a PositionSet (e.g. batch.positions.gate), "
                            f"got {type(s).__name__}")
    if len(source_positions) != len(target_positions):
        raise ValueError(
            f"source has {len(source_positions)} examples but target has "
            f"{len(target_positions)}: example b of the source patches example b of the target"
        )
    src, tgt = source_positions.counts.cpu(), target_positions.counts.cpu()
    bad = (src != tgt).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        raise ValueError(
            f"example {b}: {int(src[b])} source position(s) {source_positions[b].tolist()} but "
            f"{int(tgt[b])} target position(s) {target_positions[b].tolist()}; the k-th "
            f"source position goes to the k-th target position, so the counts must match "
            f"in every example (mismatched examples: {bad})"
        )
    if not bool(source_positions.mask.any()):
        raise ValueError(
            "no positions to patch in any example (does this family have the token you asked "
            "for? e.g. LLaVA has no end-of-image token: use positions.last_image)"
        )


def _check_hook_names(model, names: Sequence[str]) -> None:
    """Raise a clear KeyError for hook names the model does not have.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> _check_hook_names(model, ["blocks.0.hook_resid_pre"])
        >>> _check_hook_names(model, ["blocks.0.resid_pre"])
        Traceback (most recent call last):
        ...
        KeyError: "unknown hook name(s) ['blocks.0.resid_pre']; hook names look like ..."
    """
    known = model.hook_dict
    missing = [n for n in names if n not in known]
    if missing:
        example = [k for k in known if k.startswith("blocks.0.")][:6]
        raise KeyError(
            f"unknown hook name(s) {missing}; hook names look like {example} "
            f"(model.hook_dict lists them all)"
        )


def patch_hooks(
    model,
    hook_names: Union[str, Sequence[str]],
    source_acts: Mapping[str, Float[Tensor, "batch src_pos ..."]],
    source_positions: PositionSet,
    target_positions: PositionSet,
) -> list[Hook]:
    """Hooks that write ``source_acts[name]`` at ``source_positions`` into ``target_positions``.

    Works with any hook whose tensor is ``[batch, pos, ...]`` (residuals, attention or
    MLP inputs and outputs, ``hook_z`` ...). Source and target may differ in length,
    layout and padding side: positions are resolved per example, and the k-th source
    position of example b replaces the k-th target position of example b. The values
    are gathered now, so the source cache can be dropped afterwards.

    Each returned function is a :class:`PatchHook` with a ``calls`` counter; during
    cached generation, steps after the prompt leave activations alone (the patched
    positions live in the KV cache).

    Args:
        hook_names: TL hook names, e.g. ``"blocks.3.hook_resid_pre"``.
        source_acts: the source run's activations by hook name (an ``ActivationCache``
            or a dict), each ``[batch, src_pos, ...]``.
        source_positions: positions in the source batch (e.g. ``source.positions.gate``).
        target_positions: positions in the target batch, same count per example.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_pairs
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pairs = make_pairs(12, seed=0)             # same background, the asked attribute differs
        >>> source = model.prepare([p.source.prompt for p in pairs])
        >>> target = model.prepare([p.target.prompt for p in pairs])
        >>> answers = [(p.source.answer, p.target.answer) for p in pairs]
        >>> names = [f"blocks.{layer}.attn.hook_in" for layer in range(4)]   # every layer
        >>> _, cache = model.run_with_cache(source, names_filter=names)
        >>> hooks = patch_hooks(model, names, cache, source.positions.gate, target.positions.gate)
        >>> logits = model.run_with_hooks(target, fwd_hooks=hooks)
        >>> [fn.calls for _, fn in hooks]
        [1, 1, 1, 1]
        >>> predicted = logits[target.positions.last.mask].argmax(-1)   # now the source's answer
        >>> predicted.tolist() == first_token_ids(model, [p.source.answer for p in pairs]).tolist()
        True
        >>> patch_hooks(model, names, cache, source.positions.gate, target.positions.image)
        Traceback (most recent call last):
        ...
        ValueError: example 0: 1 source position(s) [38] but 36 target position(s) [...]; ...
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ValueError("no hook names given")
    _check_hook_names(model, names)
    _check_position_counts(source_positions, target_positions)
    src_b, src_p = _flat_index(source_positions)
    tgt_index = _flat_index(target_positions)
    hooks: list[Hook] = []
    for name in names:
        try:
            act = source_acts[name]
        except KeyError:
            raise KeyError(
                f"source_acts has no {name!r}; cache it, e.g. "
                f"model.run_with_cache(source, names_filter={names!r})"
            ) from None
        if act.ndim < 2 or tuple(act.shape[:2]) != tuple(source_positions.mask.shape):
            raise ValueError(
                f"source {name} has shape {tuple(act.shape)} but source_positions cover "
                f"{tuple(source_positions.mask.shape)} [batch, pos]"
            )
        values = act[src_b.to(act.device), src_p.to(act.device)].detach()
        hooks.append((name, PatchHook(name, values, tgt_index,
                                      tuple(target_positions.mask.shape))))
    return hooks


# -- answers -------------------------------------------------------------------------
def first_token_ids(model, names: Sequence[Union[int, str]]) -> Int[Tensor, "n"]:
    """The token of each class name (ints pass through), by tl_vlm's one answer policy:
    the first token that carries the word as it follows a space
    (:func:`tl_vlm.core.answers.answer_token_id`; a bare ``"▁"`` piece is never taken, an
    unknown word is an error).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")       # a word-level toy tokenizer
        >>> first_token_ids(model, ["red", " blue", 7])
        tensor([18, 20,  7])
    """
    tokenizer = model.layout.tokenizer
    out = []
    for name in names:
        if isinstance(name, (int,)) and not isinstance(name, bool):
            out.append(int(name))
        elif isinstance(name, str):
            out.append(answer_token_id(tokenizer, name))
        else:
            raise TypeError(f"answers must be token ids or strings, got {name!r}")
    return torch.tensor(out, dtype=torch.long)


def _resolve_answers(model, answers: AnswerArg, batch_size: int
                    ) -> tuple[Int[Tensor, "batch"], Int[Tensor, "batch"]]:
    """``(source_answer, target_answer)`` token ids, one per example.

    ``answers`` is either a pair of int tensors ``(source_ids [batch], target_ids [batch])``
    or a sequence of one ``(A, B)`` pair per example, A the source class and B the target
    class, each a token id or a class name (its first token is used).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> _resolve_answers(model, [("red", "blue"), (20, 18)], batch_size=2)
        (tensor([18, 20]), tensor([20, 18]))
        >>> _resolve_answers(model, [("red", "red")], batch_size=1)
        Traceback (most recent call last):
        ...
        ValueError: examples [0]: source and target answers are the same token (18), ...
    """
    if isinstance(answers, tuple) and len(answers) == 2 and all(isinstance(a, Tensor) for a in answers):
        src, tgt = (a.long().flatten().cpu() for a in answers)
    else:
        pairs = list(answers)
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise ValueError(
                "answers must be one (source_class, target_class) pair per example, or a "
                "tuple of two token-id tensors (source_ids, target_ids)"
            )
        src = first_token_ids(model, [p[0] for p in pairs])
        tgt = first_token_ids(model, [p[1] for p in pairs])
    if len(src) != batch_size or len(tgt) != batch_size:
        raise ValueError(f"got answers for {len(src)}/{len(tgt)} examples, the batch has {batch_size}")
    vocab = model.cfg.d_vocab
    for ids in (src, tgt):
        if bool(((ids < 0) | (ids >= vocab)).any()):
            raise IndexError(f"answer token ids {ids.tolist()} outside the vocabulary (0..{vocab - 1})")
    same = (src == tgt).nonzero().flatten().tolist()
    if same:
        raise ValueError(
            f"examples {same}: source and target answers are the same token "
            f"({src[same[0]].item()}), so logit(B) - logit(A) is always 0; pick names whose "
            f"first tokens differ"
        )
    return src, tgt


# -- results -------------------------------------------------------------------------
def overlap(p: Float[Tensor, "... vocab"], q: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """``sum_v min(p_v, q_v)`` of two distributions (1 = identical, 0 = disjoint).

    Example:
        >>> p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
        >>> overlap(p, torch.tensor([0.0, 0.5, 0.5]))
        tensor([0.5000, 0.0000])
    """
    return torch.minimum(p, q).sum(-1)


@dataclass
class PatchingResult:
    """A patching sweep, scored at the target's last position.

    Attributes:
        layers: the sweep's layers (each row of ``logits``).
        hook_names: per layer, the hooks that were patched.
        logits: patched next-token logits, ``[layer, batch, vocab]``.
        clean_logits: the unpatched target's, ``[batch, vocab]``.
        source_logits: the unpatched source's (at its own last position), ``[batch, vocab]``.
        source_answer, target_answer: answer token ids ``[batch]`` (class A of the
            source, class B of the target), when given.

    All tensors are float32 on the CPU.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_pairs
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pairs = make_pairs(12, seed=0)             # same background, the asked attribute differs
        >>> source = model.prepare([p.source.prompt for p in pairs])
        >>> target = model.prepare([p.target.prompt for p in pairs])
        >>> answers = [(p.source.answer, p.target.answer) for p in pairs]
        >>> res = patch_gate(model, source, target, layers=[0, 2], answers=answers)
        >>> res.logits.shape, res.clean_logits.shape            # [layer, batch, vocab], [batch, vocab]
        (torch.Size([2, 12, 54]), torch.Size([12, 54]))
        >>> res.flipped.shape, res.flip_rate.shape, res.overlap.shape, res.clean_overlap.shape
        (torch.Size([2, 12]), torch.Size([2]), torch.Size([2, 12]), torch.Size([12]))
        >>> print(res.table())
        layer   flip  overlap
            0   0.00    0.000
            2   ...
        clean overlap 0.000
    """

    __repr__ = short_repr   # shapes and headline numbers, not tensors

    layers: list[int]
    hook_names: list[list[str]]
    logits: Float[Tensor, "layer batch vocab"]
    clean_logits: Float[Tensor, "batch vocab"]
    source_logits: Float[Tensor, "batch vocab"]
    source_answer: Optional[Int[Tensor, "batch"]] = None
    target_answer: Optional[Int[Tensor, "batch"]] = None
    stream: str = field(default="")

    @property
    def log_probs(self) -> Float[Tensor, "layer batch vocab"]:
        return self.logits.log_softmax(-1)

    @property
    def probs(self) -> Float[Tensor, "layer batch vocab"]:
        return self.logits.softmax(-1)

    @property
    def overlap(self) -> Float[Tensor, "layer batch"]:
        """``sum_v min(p_patched, p_source)`` per layer and example."""
        return overlap(self.probs, self.source_logits.softmax(-1)[None])

    @property
    def clean_overlap(self) -> Float[Tensor, "batch"]:
        """The baseline: overlap of the unpatched target with the source."""
        return overlap(self.clean_logits.softmax(-1), self.source_logits.softmax(-1))

    def _answers(self) -> tuple[Tensor, Tensor]:
        if self.source_answer is None or self.target_answer is None:
            raise ValueError("no answers were given: pass answers=[(class_A, class_B), ...]")
        return self.source_answer, self.target_answer

    @property
    def logit_diff(self) -> Float[Tensor, "layer batch"]:
        """``logit(B) - logit(A)`` after patching (B: target class, A: source class)."""
        a, b = self._answers()
        return _diff(self.logits, a, b)

    @property
    def clean_logit_diff(self) -> Float[Tensor, "batch"]:
        a, b = self._answers()
        return _diff(self.clean_logits, a, b)

    @property
    def flipped(self) -> Bool[Tensor, "layer batch"]:
        """Where ``sign(logit(B) - logit(A))`` differs from the unpatched target's."""
        return torch.sign(self.logit_diff) != torch.sign(self.clean_logit_diff)[None]

    @property
    def flip_rate(self) -> Float[Tensor, "layer"]:
        return self.flipped.float().mean(-1)

    def table(self) -> str:
        """One line per layer: flip rate (if answers) and mean overlap."""
        has = self.source_answer is not None
        lines = [f"{'layer':>5} {'flip':>6} {'overlap':>8}"]
        flips = self.flip_rate if has else None
        ov = self.overlap.mean(-1)
        for i, layer in enumerate(self.layers):
            f = f"{flips[i].item():6.2f}" if has else f"{'-':>6}"
            lines.append(f"{layer:>5} {f} {ov[i].item():8.3f}")
        lines.append(f"clean overlap {self.clean_overlap.mean().item():.3f}")
        return "\n".join(lines)


def _diff(logits: Tensor, a: Tensor, b: Tensor) -> Tensor:
    idx = torch.arange(logits.shape[-2])
    return logits[..., idx, b] - logits[..., idx, a]


# -- sweeps --------------------------------------------------------------------------
def _resolve_stream(model, stream: str, span: Optional[Span]) -> tuple[str, Span]:
    if stream in STREAMS:
        template, default_span = STREAMS[stream]
    elif "{layer}" in stream:
        template, default_span = stream, "layer"
    else:
        raise ValueError(
            f"unknown stream {stream!r}: use 'resid_pre' (decoder-layer input, one layer at "
            f"a time), 'attn_in' (attention input after the norm, every layer from l on) or "
            f"a hook-name template such as 'blocks.{{layer}}.hook_resid_post'"
        )
    span = default_span if span is None else span
    if span not in ("layer", "to_end"):
        raise ValueError(f"span must be 'layer' or 'to_end', got {span!r}")
    _check_hook_names(model, [template.format(layer=0)])
    return template, span


def _resolve_positions(positions: PositionsArg, source: VLMBatch, target: VLMBatch
                       ) -> tuple[PositionSet, PositionSet]:
    if isinstance(positions, str):
        sets = []
        for batch in (source, target):
            value = getattr(batch.positions, positions, None)
            if not isinstance(value, PositionSet):
                names = [n for n in dir(ImagePositions)
                         if not n.startswith("_") and isinstance(getattr(batch.positions, n, None), PositionSet)]
                raise ValueError(f"unknown position set {positions!r}; choose one of {sorted(names)}")
            sets.append(value)
        return sets[0], sets[1]
    if isinstance(positions, PositionSet):
        return positions, positions
    if isinstance(positions, tuple) and len(positions) == 2:
        return positions[0], positions[1]
    raise TypeError(
        "positions must be the name of a position set ('gate', 'eoi', 'last_image', ...), a "
        "PositionSet used on both batches, or a (source_set, target_set) pair"
    )


def _last(logits: Tensor, batch: VLMBatch) -> Float[Tensor, "batch vocab"]:
    return batch.last_of(logits).float().cpu()


def _first_block(names: Sequence[str]) -> Optional[int]:
    found = [_BLOCK.match(n) for n in names]
    if not all(found):
        return None
    return min(int(m.group(1)) for m in found)


@torch.no_grad()
def patch_positions(
    model,
    source: VLMBatch,
    target: VLMBatch,
    positions: PositionsArg = "gate",
    layers: Layers = "all",
    stream: str = "resid_pre",
    span: Optional[Span] = None,
    answers: Optional[AnswerArg] = None,
    reuse_prefix: bool = True,
    show_progress: bool = True,
) -> PatchingResult:
    """Patch ``positions`` of ``source`` into ``target`` at each layer of a sweep, and score.

    For each layer ``l`` of ``layers``, one run of the whole target batch with the
    source activations written in at ``stream``: in layer ``l`` only (``span="layer"``,
    the default for ``"resid_pre"`` and templates) or in every layer from ``l`` to the
    last (``span="to_end"``, the default for ``"attn_in"``). Example b of the source
    patches example b of the target.

    Args:
        source, target: batches of the same size (lengths, layouts and padding may differ).
        positions: a position-set name resolved on each batch (``"gate"``, ``"eoi"``,
            ``"last_image"``, ``"all"``...), a PositionSet for both, or a
            ``(source_set, target_set)`` pair.
        layers: ``"all"``, an int or a sequence of layer indices.
        stream: ``"resid_pre"``, ``"attn_in"`` or a hook-name template with ``{layer}``.
        span: ``"layer"`` or ``"to_end"`` (defaults as above).
        answers: for flip rates, ``(A, B)`` per example (A: source class, B: target class;
            names or token ids) or ``(source_ids, target_ids)`` tensors.
        show_progress: report progress over the layers (terminal/notebook bar, log lines).
        reuse_prefix: start each patched run at the first patched layer from the clean
            target's cached ``hook_resid_pre`` (same result, fewer blocks computed).

    Returns:
        A :class:`PatchingResult`.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_pairs
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pairs = make_pairs(12, seed=0)             # same background, the asked attribute differs
        >>> source = model.prepare([p.source.prompt for p in pairs])
        >>> target = model.prepare([p.target.prompt for p in pairs])
        >>> answers = [(p.source.answer, p.target.answer) for p in pairs]
        >>> res = patch_positions(model, source, target, positions="image", layers=[0, 3],
        ...                       answers=answers)      # every code, at the input of layer 0 or 3
        >>> res.layers, res.hook_names
        ([0, 3], [['blocks.0.hook_resid_pre'], ['blocks.3.hook_resid_pre']])
        >>> res.flip_rate[0].item()                     # the target now shows the source's object
        1.0
        >>> res = patch_positions(model, source, target, positions="last_image", layers=[1],
        ...                       stream="blocks.{layer}.hook_resid_post")
        >>> res.hook_names
        [['blocks.1.hook_resid_post']]
        >>> patch_positions(model, source, target, positions="row_breaks")
        Traceback (most recent call last):
        ...
        ValueError: no positions to patch in any example (...)
    """
    for name, b in (("source", source), ("target", target)):
        if not isinstance(b, VLMBatch):
            raise TypeError(f"{name} must be a VLMBatch from model.prepare(...)")
    if len(source) != len(target):
        raise ValueError(
            f"source has {len(source)} examples and target {len(target)}: example b of the "
            f"source patches example b of the target, so the sizes must match"
        )
    template, span = _resolve_stream(model, stream, span)
    layer_list = resolve_layers(model, layers)
    src_pos, tgt_pos = _resolve_positions(positions, source, target)
    _check_position_counts(src_pos, tgt_pos)
    n = model.cfg.n_layers
    names_at = {l: [template.format(layer=j) for j in (range(l, n) if span == "to_end" else [l])]
                for l in layer_list}
    all_names = sorted({name for names in names_at.values() for name in names})
    _check_hook_names(model, all_names)
    src_answer = tgt_answer = None
    if answers is not None:
        src_answer, tgt_answer = _resolve_answers(model, answers, len(target))

    # Only the last position's logits are read: compute only those rows of the unembedding.
    source_logits, source_cache = model.run_with_cache(source, names_filter=all_names,
                                                       logits_to_keep=source.logits_to_keep)
    source_last = _last(source_logits, source)
    silent = [name for name in all_names if name not in source_cache]
    if silent:
        raise RuntimeError(
            f"hook(s) {silent[:4]}{'...' if len(silent) > 4 else ''} never fired on this "
            f"family, so nothing could be patched; choose another stream"
        )
    # Gather the source values once; the full source cache is not kept.
    hook_of = dict(patch_hooks(model, all_names, source_cache, src_pos, tgt_pos))
    del source_logits, source_cache

    keep = target.logits_to_keep
    starts = {l: _first_block(names_at[l]) if reuse_prefix else None for l in layer_list}
    resid_names = sorted({f"blocks.{s}.hook_resid_pre" for s in starts.values() if s is not None})
    if resid_names:
        clean_logits, clean_cache = model.run_with_cache(target, names_filter=resid_names,
                                                         logits_to_keep=keep)
    else:
        clean_logits, clean_cache = model(target, logits_to_keep=keep), {}
    clean_last = _last(clean_logits, target)
    del clean_logits

    patched = []
    for l in progress(layer_list, desc="patching", unit="layers", enabled=show_progress):
        hooks = [(name, hook_of[name]) for name in names_at[l]]
        for _, fn in hooks:
            fn.calls = 0
        start = starts[l]
        if start is None:
            logits = model.run_with_hooks(target, fwd_hooks=hooks, logits_to_keep=keep)
        else:
            logits = run_from_layer(model, target, start, clean_cache[f"blocks.{start}.hook_resid_pre"],
                                    fwd_hooks=hooks, logits_to_keep=keep)
        silent = [name for name, fn in hooks if fn.calls == 0]
        if silent:
            raise RuntimeError(
                f"hook(s) {silent} never fired on this family, so nothing was patched; "
                f"choose another stream"
            )
        patched.append(_last(logits, target))
        del logits
    return PatchingResult(
        layers=layer_list,
        hook_names=[names_at[l] for l in layer_list],
        logits=torch.stack(patched),
        clean_logits=clean_last,
        source_logits=source_last,
        source_answer=src_answer,
        target_answer=tgt_answer,
        stream=template,
    )


def patch_gate(
    model,
    source: VLMBatch,
    target: VLMBatch,
    layers: Layers = "all",
    stream: str = "resid_pre",
    answers: Optional[AnswerArg] = None,
    positions: Optional[PositionsArg] = None,
    **kw: Any,
) -> PatchingResult:
    """The paper's steering experiment: patch the gate (EOI; EOF and EOI for Emu3) of
    ``source`` into ``target`` at each layer, and score flips and overlap.

    ``stream="resid_pre"`` patches the input of layer ``l`` only; ``stream="attn_in"``
    patches the attention input (after the norm) of every layer from ``l`` on.
    ``positions`` overrides the gate (e.g. ``"last_image"`` for families without one).
    Other keywords go to :func:`patch_positions`.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_pairs
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pairs = make_pairs(12, seed=0)             # same background, the asked attribute differs
        >>> source = model.prepare([p.source.prompt for p in pairs])
        >>> target = model.prepare([p.target.prompt for p in pairs])
        >>> answers = [(p.source.answer, p.target.answer) for p in pairs]
        >>> res = patch_gate(model, source, target, layers=[0, 1], stream="attn_in", answers=answers)
        >>> res.flip_rate                # one value per layer
        tensor([1., 1.])

        With a real checkpoint and images (``cats``, ``dogs``: lists of PIL images):

        >>> model = HookedVLM.from_pretrained("facebook/chameleon-7b")         # doctest: +SKIP
        >>> source = model.prepare(["What is this?"] * 8, images=cats)         # doctest: +SKIP
        >>> target = model.prepare(["What is this?"] * 8, images=dogs)         # doctest: +SKIP
        >>> res = patch_gate(model, source, target, answers=[(" cat", " dog")] * 8)  # doctest: +SKIP
    """
    return patch_positions(model, source, target, positions="gate" if positions is None else positions,
                           layers=layers, stream=stream, answers=answers, **kw)
