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

# The HF attention module keeps a *weak* reference to the bridge that owns its hooks.
# (A global module -> bridge table would keep every model alive: the bridge holds the
# module.) The bridge holds the module, so the pair is freed together.
_BRIDGE_ATTR = "_tl_vlm_bridge"


def bridge_of(module: torch.nn.Module) -> Optional["HookedAttentionBridge"]:
    """The bridge whose hooks ``module``'s attention fires (None for vision towers)."""
    ref = module.__dict__.get(_BRIDGE_ATTR)
    return None if ref is None else ref()


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
    bridge = bridge_of(module)
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
        original_component.__dict__[_BRIDGE_ATTR] = weakref.ref(self)

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
    makes the model load with ``attn_implementation="tl_vlm"``. Once loaded, every
    other sub-model (vision towers) is put back on Hugging Face's default attention
    (:func:`default_attention_outside_text`): only the text decoder has hooks, and a
    tower running eager attention over all patches of a batch at once wastes memory.
    """
    blocks = adapter.component_mapping["blocks"]
    old = blocks.submodules["attn"]
    submodules = {k: v for k, v in old.submodules.items() if k in ("q", "k", "v", "o")}
    blocks.submodules["attn"] = HookedAttentionBridge(
        name=old.name, config=adapter.cfg, submodules=submodules
    )
    adapter.cfg.attn_implementation = ATTN_IMPLEMENTATION
    if "prepare_model" not in adapter.__dict__:  # once, even if called again (Chameleon swin)
        prepare_model = adapter.prepare_model

        def prepare_then_restore_towers(hf_model: torch.nn.Module) -> None:
            prepare_model(hf_model)
            default_attention_outside_text(hf_model)

        adapter.prepare_model = prepare_then_restore_towers


def default_attention_outside_text(hf_model: torch.nn.Module) -> dict[str, str]:
    """Give every sub-model but the text decoder Hugging Face's default attention.

    ``attn_implementation`` reaches every sub-config at load time; the text decoder's
    config (``config.get_text_config()``) keeps ``"tl_vlm"``, every other sub-model
    that runs transformers' attention interface gets ``"sdpa"`` where it supports it
    (else ``"eager"``), as ``from_pretrained`` would have chosen. Returns
    ``{module path: implementation}`` of what was changed.
    """
    from transformers import PreTrainedModel

    text_config = hf_model.config.get_text_config()
    changed = {}
    for path, module in hf_model.named_modules():
        config = getattr(module, "config", None)
        if (not isinstance(module, PreTrainedModel) or config is None
                or config is text_config or config is hf_model.config
                or config._attn_implementation != ATTN_IMPLEMENTATION):
            continue
        default = module.get_correct_attn_implementation(None)
        config._attn_implementation_internal = default
        changed[path] = default
    return changed
