"""One attention mechanism for every family: transformers' attention interface, hooked.

Transformers routes every modern attention module through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` *after* it has projected,
normed and rotated q/k (including M-RoPE and Gemma 3's bidirectional image mask,
which arrive inside ``attention_mask``). tl_vlm registers one eager function,
``"tl_vlm"``, that fires the owning bridge's ``hook_rot_q``/``hook_rot_k``,
``hook_attn_scores`` (pre-softmax, mask added) and ``hook_pattern`` (post-softmax)
*inside* the computation. Edits to those hooks therefore reach the output on every
family, and the unhooked numerics are HF's eager attention exactly. It also runs on
cached generation steps, where queries are the new tokens and keys the whole cache.

Adapters opt in with :func:`use_hooked_attention`.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

ATTN_IMPLEMENTATION = "tl_vlm"

# HF attention module -> the bridge that owns its hooks. Weak, so models can be freed.
_BRIDGE_OF: "weakref.WeakKeyDictionary[torch.nn.Module, HookedAttentionBridge]" = (
    weakref.WeakKeyDictionary()
)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, pos, d] -> [batch, kv_heads * n_rep, pos, d] (GQA)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def hooked_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (the same ops as HF's ``eager_attention_forward``) with hooks.

    Modules without a bridge (vision towers) run it unhooked.
    """
    bridge = _BRIDGE_OF.get(module)
    if scaling is None:
        scaling = module.head_dim**-0.5
    if bridge is not None:
        query = bridge.hook_rot_q(query) if hasattr(bridge, "hook_rot_q") else query
        key = bridge.hook_rot_k(key) if hasattr(bridge, "hook_rot_k") else key
    n_rep = getattr(module, "num_key_value_groups", 1)
    key_states = _repeat_kv(key, n_rep)
    value_states = _repeat_kv(value, n_rep)

    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key_states.shape[-2]]
    if bridge is not None:
        scores = bridge.hook_attn_scores(scores)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
    if bridge is not None:
        pattern = bridge.hook_pattern(pattern)
    out = torch.matmul(pattern, value_states).transpose(1, 2).contiguous()
    return out, pattern


AttentionInterface.register(ATTN_IMPLEMENTATION, hooked_eager_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


class HookedAttentionBridge(AttentionBridge):
    """Wraps an HF attention module whose core runs through :func:`hooked_eager_attention`.

    The HF module keeps doing its own projections, norms and rotary embedding (so
    M-RoPE, per-head QK norms and soft-capping stay exactly HF's); this bridge only
    owns the hook points that the attention function fires.
    """

    def __init__(self, name: Optional[str], config: Any, submodules: Optional[dict] = None,
                 **kwargs: Any) -> None:
        kwargs.update(maintain_native_attention=True)
        super().__init__(name, config, submodules=submodules, **kwargs)

    def set_original_component(self, original_component: torch.nn.Module) -> None:
        super().set_original_component(original_component)
        _BRIDGE_OF[original_component] = self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = self.hook_in(kwargs["hidden_states"])
        else:
            args = (self.hook_in(args[0]),) + tuple(args[1:])
        output = self.original_component(*args, **kwargs)
        if isinstance(output, tuple):
            return (self.hook_out(output[0]),) + tuple(output[1:])
        return self.hook_out(output)


def use_hooked_attention(adapter: Any) -> None:
    """Route the adapter's text attention through :func:`hooked_eager_attention`.

    Replaces ``blocks.attn`` in ``adapter.component_mapping`` by a
    :class:`HookedAttentionBridge` over the same HF path and q/k/v/o submodules, and
    makes the model load with ``attn_implementation="tl_vlm"``.
    """
    blocks = adapter.component_mapping["blocks"]
    old = blocks.submodules["attn"]
    submodules = {k: v for k, v in old.submodules.items() if k in ("q", "k", "v", "o")}
    blocks.submodules["attn"] = HookedAttentionBridge(
        name=old.name, config=adapter.cfg, submodules=submodules
    )
    adapter.cfg.attn_implementation = ATTN_IMPLEMENTATION
