"""Run a VLM from decoder layer ``l`` on a given residual, skipping blocks ``0..l-1``.

A layer sweep (activation patching at every layer, say) re-runs the same unpatched
prefix over and over: layers before ``l`` see exactly the clean input. Caching the
clean ``blocks.{l}.hook_resid_pre`` once and restarting each patched run at block ``l``
saves about half the work of a full sweep.

TransformerLens 4.3's ``forward(..., start_at_layer=k)`` cannot do this for a VLM: it
feeds the residual to Hugging Face as ``inputs_embeds`` (so the model loses
``pixel_values``, the M-RoPE positions that Qwen2-VL derives from ``image_grid_thw``,
Gemma 3's ``token_type_ids`` image mask, ...) and still computes blocks ``0..k-1``.

:func:`start_at_layer` instead runs the model's *normal* forward with the batch's
full inputs, so every mask and position id is built exactly as usual, while

- blocks ``0..l-1`` do not run: their bridge ``forward`` is temporarily replaced by a
  pass-through (none of their hooks fire, no attention or MLP is computed);
- block ``l`` receives the given residual instead of whatever came in, then runs as
  usual (its ``hook_resid_pre`` fires on the given residual).

The pass-through returns a one-element tuple: decoder loops that read
``layer(...)[0]`` (Chameleon in transformers 5) and loops that take the layer's return
value as the next hidden state (every other family) both reach block ``l`` without
error, and block ``l`` discards its incoming hidden state anyway. A decoder loop that
does arithmetic on the hidden state between layers (none of the supported families)
would fail loudly rather than silently.

The image encoder still runs (its output is discarded with the rest of the prefix).

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> batch = model.prepare(make_examples(12, seed=0).prompts)
    >>> _, cache = model.run_with_cache(batch, names_filter="blocks.2.hook_resid_pre")
    >>> logits = model.run_from_layer(batch, 2, cache["blocks.2.hook_resid_pre"])
    >>> torch.allclose(logits, model(batch), atol=1e-5)
    True
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.core.devices import execution_device
from tl_vlm.core.batch import VLMBatch

Hook = tuple[Any, Callable]


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The model's decoder blocks, or a clear error for a model without a block stack.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> len(decoder_blocks(HookedVLM.from_pretrained("toy-gated")))
        4
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise NotImplementedError(
            f"{type(model).__name__} has no 'blocks' stack; running from a layer needs one"
        )
    return list(blocks)


def _check_layer(model, layer: int) -> int:
    """The block index ``layer`` (negative counts from the end), or a clear IndexError."""
    n = len(decoder_blocks(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise IndexError(f"layer {layer!r} is outside the model's {n} layers (0..{n - 1})")
    return layer % n


def _check_residual(model, batch: Any, resid: Tensor) -> None:
    if not isinstance(resid, Tensor) or not resid.is_floating_point() or resid.ndim != 3:
        got = tuple(resid.shape) if isinstance(resid, Tensor) else type(resid).__name__
        raise ValueError(
            f"resid must be a float tensor [batch, pos, d_model], got {got}; take it from a "
            f"clean run, e.g. cache['blocks.{{l}}.hook_resid_pre']"
        )
    d_model = model.cfg.d_model
    if resid.shape[-1] != d_model:
        raise ValueError(f"resid has width {resid.shape[-1]} but the model's d_model is {d_model}")
    ids = batch.input_ids if isinstance(batch, VLMBatch) else None
    if ids is not None and tuple(resid.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"resid covers {tuple(resid.shape[:2])} [batch, pos] but the batch is "
            f"{tuple(ids.shape)}: the residual must come from a run on this same batch"
        )


@contextlib.contextmanager
def overridden_forwards(forwards: dict[torch.nn.Module, Callable], who: str) -> Iterator[None]:
    """Within the block, each block in ``forwards`` runs the given function instead of its
    own ``forward`` (which that function may call); restored on exit, exceptions too.

    The one way tl_vlm replaces a decoder block's forward (:func:`start_at_layer`,
    :func:`~tl_vlm.core.recompute.recompute_blocks`): two at once would silently nest, so a
    block already overridden is refused, naming ``who`` asked.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> block = decoder_blocks(model)[0]
        >>> with overridden_forwards({block: lambda *a, **k: "replaced"}, "an example"):
        ...     block.forward()
        'replaced'
        >>> "forward" in block.__dict__
        False
    """
    if any("forward" in block.__dict__ for block in forwards):
        raise RuntimeError(f"a block's forward is already overridden (another start_at_layer "
                           f"or recompute_blocks around it); {who} needs the plain blocks: "
                           f"run one at a time")
    try:
        # object.__setattr__: a bridge forwards plain attribute writes to the HF module.
        for block, forward in forwards.items():
            object.__setattr__(block, "forward", forward)
        yield
    finally:
        for block in forwards:
            block.__dict__.pop("forward", None)


def _pass_through(*args: Any, **kwargs: Any) -> tuple:
    """A skipped block: hand the incoming hidden state on, as a one-element tuple."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden if isinstance(hidden, tuple) else (hidden,)


@contextlib.contextmanager
def start_at_layer(model, layer: int, resid: Float[Tensor, "batch pos d_model"],
                   batch: Any = None) -> Iterator[int]:
    """Within the block, forwards skip blocks ``0..layer-1`` and start block ``layer`` on ``resid``.

    Any forward of ``model`` inside the ``with`` (``model(batch)``, ``run_with_hooks``,
    ``run_with_cache``) must be on the batch ``resid`` was computed for; pass ``batch``
    to have its shape checked. Yields the (non-negative) layer index.

    Raises IndexError for a layer outside the model and ValueError for a residual that
    is not ``[batch, pos, d_model]`` (of ``batch``, when given).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> _, cache = model.run_with_cache(batch, names_filter="blocks.3.hook_resid_pre")
        >>> resid = cache["blocks.3.hook_resid_pre"]                  # [batch, pos, d_model]
        >>> with start_at_layer(model, -1, resid, batch=batch) as layer:
        ...     logits, tail = model.run_with_cache(batch)
        >>> layer, sorted({name.split(".")[1] for name in tail if name.startswith("blocks.")})
        (3, ['3'])
        >>> with start_at_layer(model, 4, resid):
        ...     pass
        Traceback (most recent call last):
        ...
        IndexError: layer 4 is outside the model's 4 layers (0..3)
    """
    blocks = decoder_blocks(model)
    layer = _check_layer(model, layer)
    _check_residual(model, batch, resid)
    first = blocks[layer]
    # Where the block runs, not where its parameters sit: an offloaded block's are meta.
    device = execution_device(first)
    dtype = next((p.dtype for p in first.parameters() if p.is_floating_point()), resid.dtype)
    resid = resid.to(device=device if device is not None else resid.device, dtype=dtype)

    # Inject through a wrapper around the block's normal forward, so block ``layer``
    # runs its own code (hooks, kwargs filtering) on the given residual.
    bound_forward = first.forward

    def inject(*args: Any, **kwargs: Any) -> Any:
        incoming = args[0] if args else kwargs.get("hidden_states")
        incoming = incoming[0] if isinstance(incoming, tuple) and incoming else incoming
        if isinstance(incoming, Tensor) and incoming.shape[:-1] != resid.shape[:-1]:
            raise ValueError(
                f"block {layer} got hidden states {tuple(incoming.shape)} but the residual to "
                f"inject is {tuple(resid.shape)}: start_at_layer covers forwards over the batch "
                f"the residual came from (not cached generation steps)"
            )
        if args:
            args = (resid,) + tuple(args[1:])
        elif "hidden_states" in kwargs:
            kwargs["hidden_states"] = resid
        else:
            raise RuntimeError(
                f"block {layer} was called without a hidden state; cannot inject the residual"
            )
        return bound_forward(*args, **kwargs)

    forwards = {**{block: _pass_through for block in blocks[:layer]}, first: inject}
    with overridden_forwards(forwards, "start_at_layer"):
        yield layer


def run_from_layer(
    model,
    batch: VLMBatch,
    layer: int,
    resid: Float[Tensor, "batch pos d_model"],
    fwd_hooks: Sequence[Hook] = (),
    **forward_kwargs: Any,
) -> Any:
    """The model's output when block ``layer`` gets ``resid`` as input; earlier blocks never run.

    Every other input of the batch (pixels, image metadata, attention mask, token type
    ids) is used as in a full forward, so masks and positions are the family's own.
    Equals ``run_with_hooks(batch, fwd_hooks=...)`` with blocks ``>= layer`` seeing the
    same residual, at the cost of blocks ``layer..n-1`` (plus embedding and the image
    encoder). ``forward_kwargs`` go to the forward (e.g. ``return_type``); the KV cache
    is off unless asked for.

    Args:
        batch: the batch ``resid`` was computed on.
        layer: index of the first block to run (negative counts from the end).
        resid: the input of block ``layer``, e.g. ``cache[f"blocks.{layer}.hook_resid_pre"]``.
        fwd_hooks: ``(hook name or filter, function)`` pairs, active during the run.

    Returns:
        What the forward returns (logits ``[batch, pos, d_vocab]`` by default).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> _, cache = model.run_with_cache(batch)
        >>> zero_gate = lambda resid, hook: resid * ~batch.positions.gate.mask[..., None]
        >>> logits = run_from_layer(model, batch, 1, cache["blocks.1.hook_resid_pre"],
        ...                         fwd_hooks=[("blocks.2.hook_resid_pre", zero_gate)])
        >>> full = model.run_with_hooks(batch, fwd_hooks=[("blocks.2.hook_resid_pre", zero_gate)])
        >>> logits.shape, torch.allclose(logits, full, atol=1e-5)
        (torch.Size([12, 46, 54]), True)
        >>> run_from_layer(model, batch, 1, cache["blocks.1.hook_resid_pre"][:2])
        Traceback (most recent call last):
        ...
        ValueError: resid covers (2, 46) [batch, pos] but the batch is (12, 46): ...
    """
    if not isinstance(batch, VLMBatch):
        raise TypeError("run_from_layer takes a VLMBatch from model.prepare(...)")
    forward_kwargs.setdefault("use_cache", False)
    with start_at_layer(model, layer, resid, batch=batch):
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            return model(batch, **forward_kwargs)
