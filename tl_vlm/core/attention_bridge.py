"""The text-attention bridge every family's adapter uses (see :mod:`tl_vlm.core.attention`).

:class:`HookedAttentionBridge` owns the hook points (``hook_rot_q/k``,
``hook_attn_scores``, ``hook_pattern``) that :func:`tl_vlm.core.attention.hooked_attention`
fires; :func:`use_hooked_attention` puts it in an adapter's component mapping and makes
the model load with ``attn_implementation="tl_vlm"`` for its text decoder only.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

from tl_vlm.core.attention import BRIDGE_ATTR, ATTN_IMPLEMENTATION
from tl_vlm.core.compat import attn_implementation, set_attn_implementation


class HookedAttentionBridge(AttentionBridge):
    """Wraps an HF attention module whose core runs through :func:`hooked_attention`.

    The HF module keeps doing its own projections, norms and rotary embedding (so
    M-RoPE, per-head QK norms and soft-capping stay exactly HF's); this bridge only
    owns the hook points that the attention function fires.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> type(model.blocks[0].attn).__name__, type(model.blocks[0].attn.original_component).__name__
        ('HookedAttentionBridge', 'ChameleonAttention')
    """

    def __init__(self, name: Optional[str], config: Any, submodules: Optional[dict] = None,
                 **kwargs: Any) -> None:
        kwargs.update(maintain_native_attention=True)
        super().__init__(name, config, submodules=submodules, **kwargs)

    def set_original_component(self, original_component: torch.nn.Module) -> None:
        super().set_original_component(original_component)
        original_component.__dict__[BRIDGE_ATTR] = weakref.ref(self)

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
    """Route the adapter's text attention through :func:`hooked_attention`.

    Replaces ``blocks.attn`` in ``adapter.component_mapping`` by a
    :class:`HookedAttentionBridge` over the same HF path and q/k/v/o submodules, and
    makes the model load with ``attn_implementation="tl_vlm"``. Once loaded, every
    other sub-model (vision towers) is put back on Hugging Face's default attention
    (:func:`default_attention_outside_text`): only the text decoder has hooks, and a
    tower running eager attention over all patches of a batch at once wastes memory.

    Example (every family's adapter calls it once, in ``__init__``):
        >>> from tl_vlm.adapters.chameleon import ChameleonAdapter
        >>> import inspect
        >>> "use_hooked_attention(self)" in inspect.getsource(ChameleonAdapter.__init__)
        True
    """
    blocks = adapter.component_mapping["blocks"]
    old = blocks.submodules["attn"]
    submodules = {k: v for k, v in old.submodules.items() if k in ("q", "k", "v", "o")}
    # ``optional`` carries over: in hybrid decoders (LFM2's short-convolution layers)
    # some blocks have no attention module, and TL then leaves ``blocks.i.attn`` out.
    blocks.submodules["attn"] = HookedAttentionBridge(
        name=old.name, config=adapter.cfg, submodules=submodules,
        optional=getattr(old, "optional", False),
    )
    adapter.cfg.attn_implementation = ATTN_IMPLEMENTATION
    if "prepare_model" not in adapter.__dict__:  # once, even if called again (Chameleon swin)
        prepare_model = adapter.prepare_model

        def prepare_then_restore_towers(hf_model: torch.nn.Module) -> None:
            prepare_model(hf_model)
            default_attention_outside_text(hf_model)

        adapter.prepare_model = prepare_then_restore_towers


def attention_layers(model: Any) -> list[int]:
    """Indices of the text blocks that have attention (``blocks.{i}.attn``): every block,
    except in hybrid decoders, whose other blocks mix positions otherwise (LFM2's
    short-convolution layers) and carry no attention hook points.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> attention_layers(HookedVLM.from_pretrained("toy-gated"))     # 4 attention layers
        [0, 1, 2, 3]
    """
    return [i for i, block in enumerate(model.blocks)
            if isinstance(getattr(block, "attn", None), torch.nn.Module)]


def default_attention_outside_text(hf_model: torch.nn.Module) -> dict[str, str]:
    """Give every sub-model but the text decoder Hugging Face's default attention.

    ``attn_implementation`` reaches every sub-config at load time; the text decoder's
    config (``config.get_text_config()``) keeps ``"tl_vlm"``, every other sub-model
    that runs transformers' attention interface gets ``"sdpa"`` where it supports it
    (else ``"eager"``), as ``from_pretrained`` would have chosen. Returns
    ``{module path: implementation}`` of what was changed.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")     # Chameleon: one config, no tower
        >>> default_attention_outside_text(model.hf_model), attn_implementation(model.hf_model.config)
        ({}, 'tl_vlm')
    """
    from transformers import PreTrainedModel

    text_config = hf_model.config.get_text_config()
    changed = {}
    for path, module in hf_model.named_modules():
        config = getattr(module, "config", None)
        if (not isinstance(module, PreTrainedModel) or config is None
                or config is text_config or config is hf_model.config
                or attn_implementation(config) != ATTN_IMPLEMENTATION):
            continue
        default = module.get_correct_attn_implementation(None)
        set_attn_implementation(config, default)
        changed[path] = default
    return changed


from tl_vlm.core import autoload as _autoload  # noqa: E402

_autoload.retry_pending()   # TransformerLens may have been imported while this module was
