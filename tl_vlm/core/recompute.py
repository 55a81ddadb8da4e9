"""Activation checkpointing for a backward through the decoder: keep each block's input,
recompute its activations in the backward.

A backward from the last logits through L decoder layers keeps, as a training step does,
every layer's activations: at 48 layers, hidden 8192, 4k tokens and a batch of 8 in bf16
that is roughly 9 GB a layer. Within :func:`recompute_blocks` each block keeps only its
input (the residual, 0.5 GB there) and runs again in the backward (PyTorch's
non-reentrant :func:`torch.utils.checkpoint.checkpoint`): memory for L residuals and one
block's activations, time for one more forward.

Hooks fire again when a block is recomputed, with the same inputs, so the forward hooks
must stay registered until the backward is done: register them with ``model.hooks(...)``
around both, not with ``fwd_hooks=`` of a single call. A hook that accumulates (a
contribution reader) must count its first call only. The forward must run without a KV
cache (``use_cache=False``): the recomputation would fill it twice.

Example (the gradient with respect to a key scale, with and without recomputation):
    >>> import torch
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.core.attention_edits import KeyScale
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> batch = model.prepare(make_examples(2).prompts)
    >>> def gradient(recompute: bool) -> torch.Tensor:
    ...     scale = torch.ones(batch.input_ids.shape, requires_grad=True)
    ...     hooks = [("blocks.1.attn.hook_pattern", KeyScale(scale))]
    ...     with model.hooks(fwd_hooks=hooks), recompute_blocks(model, enabled=recompute):
    ...         logits = model.last_logits(batch, use_cache=False)    # no KV cache to refill
    ...         return torch.autograd.grad(logits.sum(), scale)[0]
    >>> torch.allclose(gradient(True), gradient(False), atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from tl_vlm.core.prefix import decoder_blocks, overridden_forwards


def _checkpointed(forward: Callable) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():              # nothing to keep: run as usual
            return forward(*args, **kwargs)
        if any(isinstance(value, Cache) for value in (*args, *kwargs.values())):
            # the recomputation would append its keys to the cache a second time
            raise RuntimeError("recompute_blocks: the forward passes a KV cache to the blocks; "
                               "run it with use_cache=False")
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def recompute_blocks(model, enabled: bool = True) -> Iterator[None]:
    """Within the block, every decoder block of ``model`` keeps only its input for the
    backward and recomputes its activations there (see the module docstring).
    ``enabled=False`` changes nothing.

    Raises RuntimeError when a block's forward is already overridden (a
    :func:`~tl_vlm.core.prefix.start_at_layer` around it, or a nested ``recompute_blocks``),
    and, in the forward, when the blocks are handed a KV cache.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(2).prompts)
        >>> with recompute_blocks(model):
        ...     model.last_logits(batch, use_cache=False).sum().backward()   # weights' grads
        >>> model.zero_grad(set_to_none=True)
        >>> with recompute_blocks(model):
        ...     model.last_logits(batch).sum().backward()
        Traceback (most recent call last):
        ...
        RuntimeError: recompute_blocks: the forward passes a KV cache to the blocks; run it with use_cache=False
        >>> with recompute_blocks(model), recompute_blocks(model):
        ...     pass
        Traceback (most recent call last):
        ...
        RuntimeError: a block's forward is already overridden (another start_at_layer or recompute_blocks around it); recompute_blocks needs the plain blocks: run one at a time
    """
    if not enabled:
        yield
        return
    forwards = {block: _checkpointed(block.forward) for block in decoder_blocks(model)}
    with overridden_forwards(forwards, "recompute_blocks"):
        yield
