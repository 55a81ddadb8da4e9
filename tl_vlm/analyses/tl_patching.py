"""Run ``transformer_lens.patching`` helpers on VLM batches.

TransformerLens's patching helpers (``get_act_patch_resid_pre``, ``..._attn_head_out_by_pos``,
``generic_activation_patch``, ...) call ``model.run_with_hooks(corrupted_tokens, ...)``
with token ids only, so a VLM would run without ``pixel_values`` (and without
``image_grid_thw``, ``image_sizes``, the attention mask...): the image tokens would be
embedded as plain text and the "corrupted run" would not see any image.

:func:`batch_inputs` fixes that without touching TransformerLens: while it is active,
whenever the model is called with the token ids of one of the given batches, the rest
of that batch's processor output is passed along. :func:`run_patching` wraps the usual
call (clean cache, corrupted tokens, context) in one line.

Example:
    >>> from transformer_lens import patching
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_pairs
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> pair = make_pairs(1, seed=0)[0]                   # same layout, another colour
    >>> clean, corrupted = model.prepare([pair.source.prompt]), model.prepare([pair.target.prompt])
    >>> tok = model.layout.tokenizer
    >>> a, b = tok.convert_tokens_to_ids([pair.source.answer, pair.target.answer])
    >>> metric = lambda logits: logits[0, -1, a] - logits[0, -1, b]
    >>> effect = run_patching(patching.get_act_patch_resid_pre, model, corrupted, clean, metric)
    >>> effect.shape                                      # [layer, pos]
    torch.Size([4, 46])
    >>> gate = clean.positions.gate[0].item()
    >>> bool(effect[1, gate] > 0)                         # the clean gate restores the answer
    True
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Union

import torch
from torch import Tensor

from tl_vlm.core.batch import VLMBatch

_MISSING = object()


def _same_inputs(a: VLMBatch, b: VLMBatch) -> bool:
    """Whether two batches would give the model the same processor inputs."""
    if a.inputs.keys() != b.inputs.keys():
        return False
    for key, x in a.inputs.items():
        y = b.inputs[key]
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if x.shape != y.shape or not torch.equal(x, y.to(x.device)):
                return False
        elif x is not y and x != y:
            return False
    return True


def _match(batches: tuple[VLMBatch, ...], tokens: Tensor) -> Union[VLMBatch, None]:
    for batch in batches:  # the very tensor of a batch: no ambiguity
        if tokens is batch.input_ids:
            return batch
    equal = [b for b in batches if b.input_ids.shape == tokens.shape
             and torch.equal(b.input_ids, tokens.to(b.input_ids.device))]
    if len(equal) > 1 and not all(_same_inputs(equal[0], b) for b in equal[1:]):
        raise ValueError(
            "these token ids belong to several bound batches with different images; pass the "
            "batch's own tensor (batch.input_ids) so the call can tell them apart, or bind "
            "one batch at a time"
        )
    return equal[0] if equal else None


@contextlib.contextmanager
def batch_inputs(model, *batches: VLMBatch, strict: bool = True) -> Iterator[Any]:
    """Within the block, calling ``model`` with a batch's ``input_ids`` runs the whole batch.

    The model's ``forward`` is wrapped for the duration of the block (and restored after,
    even on error), so every entry point that ends in ``forward`` -- ``model(tokens)``,
    ``run_with_hooks``, ``run_with_cache``, and through them every
    ``transformer_lens.patching`` helper -- gets the batch's pixels and metadata.
    Keyword arguments given explicitly to the call win over the batch's.

    Args:
        batches: the batches whose token ids will be passed around (usually the corrupted
            batch).
        strict: refuse (ValueError) calls with integer token ids of no bound batch, which
            would otherwise run text-only; False lets them through unchanged.

    Example:
        >>> from transformer_lens import patching
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_pairs
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pair = make_pairs(1, seed=0)[0]                   # same layout, another colour
        >>> clean, corrupted = model.prepare([pair.source.prompt]), model.prepare([pair.target.prompt])
        >>> tok = model.layout.tokenizer
        >>> a, b = tok.convert_tokens_to_ids([pair.source.answer, pair.target.answer])
        >>> metric = lambda logits: logits[0, -1, a] - logits[0, -1, b]
        >>> _, clean_cache = model.run_with_cache(clean)
        >>> with batch_inputs(model, corrupted):
        ...     effect = patching.get_act_patch_attn_head_v_all_pos(
        ...         model, corrupted.input_ids, clean_cache, metric)
        >>> effect.shape                                      # [layer, head]
        torch.Size([4, 4])
        >>> with batch_inputs(model, corrupted):
        ...     model(clean.input_ids)                        # ids of no bound batch
        Traceback (most recent call last):
        ...
        ValueError: the model was called with token ids (1, 46) that match none of the bound batches ...
    """
    if not batches:
        raise ValueError("bind at least one VLMBatch: batch_inputs(model, batch)")
    for i, batch in enumerate(batches):
        if not isinstance(batch, VLMBatch):
            raise TypeError(f"argument {i} is a {type(batch).__name__}, not a VLMBatch from "
                            f"model.prepare(...)")
    saved = model.__dict__.get("forward", _MISSING)
    inner: Callable = model.forward

    def forward(input: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(input, Tensor) and not input.is_floating_point():
            batch = _match(batches, input)
            if batch is not None:
                merged = dict(batch.model_kwargs)
                merged.update(kwargs)
                return inner(input, *args, **merged)
            if strict:
                shapes = [tuple(b.input_ids.shape) for b in batches]
                raise ValueError(
                    f"the model was called with token ids {tuple(input.shape)} that match none "
                    f"of the bound batches {shapes}; inside batch_inputs() such a call would run "
                    f"without its images. Pass a bound batch's input_ids, bind this batch too, "
                    f"or use strict=False"
                )
        return inner(input, *args, **kwargs)

    model.forward = forward
    try:
        yield model
    finally:
        if saved is _MISSING:
            del model.forward
        else:
            model.forward = saved


def run_patching(
    patch_fn: Callable,
    model,
    corrupted: VLMBatch,
    clean: Any,
    patching_metric: Callable,
    **kwargs: Any,
) -> Any:
    """``patch_fn(model, corrupted.input_ids, clean_cache, patching_metric, **kwargs)`` with images.

    Args:
        patch_fn: a ``transformer_lens.patching`` helper (``get_act_patch_resid_pre``,
            ``get_act_patch_attn_head_out_by_pos``, ``generic_activation_patch`` with its
            setter, ...).
        corrupted: the batch patched into.
        clean: the source batch (its full cache is computed here) or an ``ActivationCache``
            already computed from it.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce=...``), as TL
            expects.

    Position-wise patching assumes the two batches place every token at the same
    position, so a clean batch must have the same shape and the same image positions.

    Example:
        >>> from transformer_lens import patching
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_pairs
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pair = make_pairs(1, seed=0)[0]                   # same layout, another colour
        >>> clean, corrupted = model.prepare([pair.source.prompt]), model.prepare([pair.target.prompt])
        >>> tok = model.layout.tokenizer
        >>> a, b = tok.convert_tokens_to_ids([pair.source.answer, pair.target.answer])
        >>> metric = lambda logits: logits[0, -1, a] - logits[0, -1, b]
        >>> effect = run_patching(patching.get_act_patch_attn_head_out_all_pos, model,
        ...                       corrupted, clean, metric)
        >>> effect.shape                                      # [layer, head]
        torch.Size([4, 4])
        >>> run_patching(patching.get_act_patch_resid_pre, model, corrupted,
        ...              model.prepare([pair.source.prompt + " ?"]), metric)
        Traceback (most recent call last):
        ...
        ValueError: clean (1, 47) and corrupted (1, 46) batches differ in shape; ...
    """
    if not isinstance(corrupted, VLMBatch):
        raise TypeError("corrupted must be a VLMBatch from model.prepare(...)")
    if isinstance(clean, VLMBatch):
        if clean.input_ids.shape != corrupted.input_ids.shape:
            raise ValueError(
                f"clean {tuple(clean.input_ids.shape)} and corrupted "
                f"{tuple(corrupted.input_ids.shape)} batches differ in shape; position-wise "
                f"patching needs the same token layout (same prompts, same image sizes)"
            )
        for name in ("image", "padding"):
            if getattr(clean.positions, name) != getattr(corrupted.positions, name):
                raise ValueError(
                    f"clean and corrupted batches place their {name} tokens differently; "
                    f"position-wise patching would move activations between different tokens"
                )
        with torch.no_grad():
            _, clean = model.run_with_cache(clean)
    with batch_inputs(model, corrupted):
        return patch_fn(model, corrupted.input_ids, clean, patching_metric, **kwargs)
