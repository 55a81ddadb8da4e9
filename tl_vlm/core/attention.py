"""One attention mechanism for every family: transformers' attention interface, hooked.

(This module imports no TransformerLens: adapters import it while TransformerLens may
still be importing. The bridge that owns the hooks, ``HookedAttentionBridge``, and
``use_hooked_attention`` live in :mod:`tl_vlm.adapters`.)

Transformers routes every modern attention module through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` *after* it has projected,
normed and rotated q/k (M-RoPE included; Gemma 3's bidirectional image mask arrives in
``attention_mask``). tl_vlm registers one function, ``"tl_vlm"``
(:func:`hooked_attention`), for the text decoder. Per layer and per call it picks the
cheapest computation that honours the hooks attached *now*:

- **sdpa** -- nothing hooks ``hook_attn_scores``/``hook_pattern``: PyTorch's fused SDPA,
  exactly Hugging Face's ``attn_implementation="sdpa"`` (no pattern is ever built);
- **fused** -- every hook there is a knockout, a key scale or a pattern reader
  (:mod:`tl_vlm.core.attention_edits`): SDPA (on scaled values where an edit concerns every
  query) plus the pattern of the rows the other edits touch;
- **eager** -- anything else (a user's own pattern hook, a backward hook, a cache of the
  pattern): HF's eager attention, firing ``hook_attn_scores`` (pre-softmax, mask added)
  and ``hook_pattern`` (post-softmax) *inside* the computation, so edits reach the output.

``hook_rot_q``/``hook_rot_k`` fire on every path. Masks come from transformers' SDPA
mask builder (boolean, or None for a plain causal mask); the eager path turns them into
the additive mask HF's eager attention uses, so each path's numbers are HF's.

Example (``record_paths`` shows which computation each layer ran):
    >>> from tl_vlm import HookedVLM, analyses as A
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> batch = model.prepare(make_examples(2).prompts)
    >>> with record_paths() as paths:
    ...     _ = model.run_with_hooks(batch, fwd_hooks=A.gate_knockout(model, batch, layers=[1])
    ...                              + [("blocks.2.attn.hook_pattern", lambda p, hook: p)])
    >>> paths
    ['sdpa', 'fused', 'eager', 'sdpa']
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tl_vlm.core.attention_edits import AttentionEdit, EdgeCut, KeyScale, PatternReader, fused_attention
from tl_vlm.core.compat import hook_dicts

ATTN_IMPLEMENTATION = "tl_vlm"

# The HF attention module keeps a *weak* reference to the bridge that owns its hooks.
# (A global module -> bridge table would keep every model alive: the bridge holds the
# module.) The bridge holds the module, so the pair is freed together.
BRIDGE_ATTR = "_tl_vlm_bridge"
_paths: Optional[list[str]] = None      # set by record_paths()
_query_chunk: Optional[int] = None      # set by eager_query_chunks()


def bridge_of(module: torch.nn.Module) -> Optional[Any]:
    """The bridge (:class:`~tl_vlm.adapters.HookedAttentionBridge`) whose hooks
    ``module``'s attention fires (None for vision towers).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> bridge_of(model.blocks[0].attn.original_component) is model.blocks[0].attn
        True
    """
    ref = module.__dict__.get(BRIDGE_ATTR)
    return None if ref is None else ref()


@contextlib.contextmanager
def record_paths() -> Iterator[list[str]]:
    """Within the block, collect which computation each text-attention call ran
    (``"sdpa"``, ``"fused"`` or ``"eager"``), in call order.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> with record_paths() as paths:
        ...     _ = model.run_with_cache(model.prepare(make_examples(1).prompts),
        ...                              names_filter="blocks.0.attn.hook_pattern")
        >>> paths                                   # caching a pattern needs it built
        ['eager', 'sdpa', 'sdpa', 'sdpa']
    """
    global _paths
    saved, _paths = _paths, []
    try:
        yield _paths
    finally:
        _paths = saved


@contextlib.contextmanager
def eager_query_chunks(rows: Optional[int]) -> Iterator[None]:
    """Within the block, eager attention builds its pattern ``rows`` query rows at a time
    (into one full-size pattern): the full pattern still exists, because a hook asked for
    it, but not the several float32 full-size temporaries of a one-shot softmax.
    ``HookedVLM.run_with_cache(..., query_chunk=rows)`` uses it.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(2).prompts)
        >>> name = "blocks.1.attn.hook_pattern"
        >>> _, whole = model.run_with_cache(batch, names_filter=name)
        >>> with eager_query_chunks(8):
        ...     _, chunked = model.run_with_cache(batch, names_filter=name)
        >>> torch.allclose(whole[name], chunked[name], atol=1e-6)
        True
    """
    global _query_chunk
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"query_chunk must be a positive number of query rows, got {rows!r}")
    saved, _query_chunk = _query_chunk, rows
    try:
        yield
    finally:
        _query_chunk = saved


def _hooks_of(point: Any) -> Optional[list[Any]]:
    """The functions hooked on a HookPoint, in call order: [] for none, None when a hook
    cannot be classified (registered around TransformerLens' API, or a backward hook:
    it needs the real pattern in the autograd graph)."""
    if point is None:
        return []
    hooks = hook_dicts(point)
    if hooks["_backward_hooks"] or hooks["_backward_pre_hooks"] or getattr(point, "bwd_hooks", None):
        return None
    if hooks["_forward_pre_hooks"]:
        return None
    if not hooks["_forward_hooks"]:
        return []
    handles = getattr(point, "fwd_hooks", [])
    if len(handles) != len(hooks["_forward_hooks"]):
        return None
    functions = [getattr(h, "user_hook", None) for h in handles]
    return None if any(f is None for f in functions) else functions


def _plan(bridge) -> Optional[tuple[list[EdgeCut], list[AttentionEdit]]]:
    """(score cuts, pattern edits) when the hooks allow SDPA (both empty: plain SDPA);
    None when they need the eager computation."""
    scores = _hooks_of(getattr(bridge, "hook_attn_scores", None))
    pattern = _hooks_of(getattr(bridge, "hook_pattern", None))
    if scores is None or pattern is None:
        return None
    if not all(isinstance(f, EdgeCut) and f.point == "hook_attn_scores" for f in scores):
        return None
    if not all(isinstance(f, (PatternReader, KeyScale)) or
               (isinstance(f, EdgeCut) and f.point == "hook_pattern") for f in pattern):
        return None
    return scores, pattern


def hooked_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The ``"tl_vlm"`` attention function: SDPA, fused edits or eager, per call (see the
    module docstring). Returns ``(output [b, q, h, d], pattern or None)``.

    Example (what transformers calls for every text attention layer):
        >>> from transformers import AttentionInterface
        >>> AttentionInterface()["tl_vlm"] is hooked_attention
        True
    """
    bridge = bridge_of(module)
    if scaling is None:
        scaling = module.head_dim**-0.5
    if bridge is not None:
        query = bridge.hook_rot_q(query) if hasattr(bridge, "hook_rot_q") else query
        key = bridge.hook_rot_k(key) if hasattr(bridge, "hook_rot_k") else key
    plan = _plan(bridge) if bridge is not None else ([], [])
    # SDPA has no soft-capping and no dropout in training: eager then.
    if plan is None or softcap is not None or (dropout and module.training):
        path = "eager"
        out, pattern = _eager(module, bridge, query, key, value, attention_mask, dropout,
                              scaling, softcap)
    elif not plan[0] and not plan[1]:
        path, pattern = "sdpa", None
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        dropout=0.0, scaling=scaling, **kwargs)
    else:
        path, pattern = "fused", None
        out = fused_attention(sdpa_attention_forward, module, query, key, value, attention_mask,
                              scaling, plan[0], plan[1], **kwargs)
    if _paths is not None and bridge is not None:
        _paths.append(path)
    return out, pattern


def _additive_mask(mask: Optional[torch.Tensor], module, q_len: int, k_len: int,
                   dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """HF eager's additive mask (0 / dtype min) from the SDPA-style mask."""
    if mask is None:
        if q_len == 1 or not getattr(module, "is_causal", True):
            return None
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]
    if mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.zeros((), dtype=dtype, device=device),
                       torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))


def _eager(module, bridge, query, key, value, mask, dropout, scaling, softcap):
    """HF's eager attention with the score and pattern hooks fired inside it."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    key_states, value_states = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    q_len, k_len = query.shape[2], key_states.shape[2]
    additive = _additive_mask(mask, module, q_len, k_len, query.dtype, query.device)
    hooked_scores = bridge is not None and _hooks_of(getattr(bridge, "hook_attn_scores", None)) != []
    if _query_chunk is None or hooked_scores or softcap is not None or (dropout and module.training):
        scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if additive is not None:
            scores = scores + additive[:, :, :, :k_len]
        if bridge is not None:
            scores = bridge.hook_attn_scores(scores)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        del scores
        pattern = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
    else:  # the same ops, a chunk of query rows at a time, into one full-size pattern
        pattern = query.new_empty(query.shape[0], query.shape[1], q_len, k_len)
        for rows in torch.arange(q_len, device=query.device).split(_query_chunk):
            scores = torch.matmul(query[:, :, rows], key_states.transpose(2, 3)) * scaling
            if additive is not None:
                scores = scores + additive[:, :, rows, :k_len]
            pattern[:, :, rows] = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if bridge is not None:
        pattern = bridge.hook_pattern(pattern)
    out = torch.matmul(pattern, value_states).transpose(1, 2).contiguous()
    return out, pattern


AttentionInterface.register(ATTN_IMPLEMENTATION, hooked_attention)
# Boolean masks, skipped (None) when plain causal: what SDPA wants; eager converts them.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
