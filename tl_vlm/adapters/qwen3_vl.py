"""Qwen3-VL (``Qwen3VLForConditionalGeneration``), with DeepStack kept in the residual stream.

HF classes (``transformers.models.qwen3_vl.modeling_qwen3_vl``):
``Qwen3VLForConditionalGeneration`` -> ``model.visual`` (``Qwen3VLVisionModel``: a ViT
over ``patch_size`` x ``patch_size`` x ``temporal_patch_size`` patches with a learned,
bilinearly resampled ``pos_embed`` and 2-D rotary embeddings, ``blocks.{i}`` with
``attn.qkv``/``attn.proj`` and ``mlp.linear_fc1``/``linear_fc2``; ``merger`` folds 2x2
patches into one text-side token; ``deepstack_merger_list.{k}`` does the same for the
output of vision block ``deepstack_visual_indexes[k]``), ``model.language_model``
(``Qwen3VLTextModel``: Qwen3 decoder, per-head q/k RMS norms, interleaved M-RoPE) and
``lm_head``. TL 4.3's ``Qwen3VLArchitectureAdapter`` maps these; tl_vlm keeps its
mapping (without its torchvision requirement: the PIL image processor is used), routes
text attention through the hooked attention function and keeps the q/k norm hooks.

DeepStack: HF's decoder loop adds, after decoder layer ``k`` (``k <
len(deepstack_visual_indexes)``), the ``k``-th DeepStack features to the hidden state at
the image positions, between two layer calls. Left there, ``blocks.{k}.hook_resid_post``
would miss that addition while ``blocks.{k+1}.hook_resid_pre`` holds it, and a run that
skips blocks (``start_at_layer``) or a last-layer logit lens would be wrong. tl_vlm moves
the addition into block ``k``, as the output of its ``deepstack`` component: the text
model is called without ``deepstack_visual_embeds`` (so HF's loop adds nothing) and block
``k`` adds ``blocks.{k}.deepstack``'s output (the features scattered onto the image
positions, zero elsewhere) to its own output, with HF's arithmetic. So
``hook_resid_post`` of block ``k`` equals ``hook_resid_pre`` of block ``k + 1``, both
equal HF's hidden state, and logits equal HF's. Hooks: ``blocks.{k}.deepstack.hook_in``
(the level's features, ``[image tokens of the batch, d_model]``) and
``blocks.{k}.deepstack.hook_out`` (the ``[batch, pos, d_model]`` term added to the
residual); they fire only on forwards with pixels, like HF's addition. DeepStack writes
only at image positions, so text positions still read the image only through attention
(attention knockouts of image keys stay complete); but ``blocks.0.hook_resid_pre`` no
longer holds all of the image: patching a whole image there leaves the DeepStack terms
of the other image, which must be patched too.

Processor: ``Qwen3VLProcessor`` with ``Qwen2VLImageProcessorPil`` (without torchvision
made image-only by :mod:`tl_vlm.core.hf_compat`); it returns ``image_grid_thw`` and
``mm_token_type_ids`` (1 on ``<|image_pad|>``), both forwarded for ``get_rope_index``.

Layout, from token ids: ``<|vision_start|>`` (BOI, config ``vision_start_token_id``),
``rows x cols`` ``<|image_pad|>`` (``image_token_id``) in row-major order, then
``<|vision_end|>`` (EOI, ``vision_end_token_id``). ``image_grid_thw`` row ``(t, h, w)``
counts patches: the text-side grid is ``(t * h // m) x (w // m)`` with ``m =
spatial_merge_size``. No row breaks, no thumbnail or tiles. Qwen3-VL is not a native
multimodal model (a ViT feeds a language model), so there is no gate in the Narrow Gate
sense; EOI is recorded as ``gate`` so the knockout presets can target it, and
``find_gates`` is the tool to look for one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.supported_architectures.qwen3_vl import (
    Qwen3VLArchitectureAdapter,
)

from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.family import Family
from tl_vlm.core.merged_patches import MergedPatchLayout

QWEN3_VL = "Qwen3VLForConditionalGeneration"


class _DeepStackState:
    """The DeepStack inputs of the text model's current forward (None without pixels).

    Set by a pre-hook on the text model at every call; kept until the next call, so a
    backward that recomputes blocks (``recompute_blocks``) adds the same features again.
    """

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self.embeds: Optional[list[torch.Tensor]] = None


class DeepStackInjection(torch.nn.Module):
    """What DeepStack adds to one decoder layer's output: that level's features at the
    image positions (``visual_pos_masks``), zero elsewhere. Attached to decoder layer
    ``k`` as ``deepstack`` (bridged as ``blocks.{k}.deepstack``)."""

    def __init__(self, state: _DeepStackState) -> None:
        super().__init__()
        self.state = state

    def forward(self, visual_embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.state.mask.to(hidden_states.device)
        term = torch.zeros_like(hidden_states)
        term[mask, :] = visual_embeds.to(hidden_states.device, hidden_states.dtype)
        return term


def _layer_adds_deepstack(level: int, state: _DeepStackState):
    """Forward hook of decoder layer ``level``: output + its DeepStack term.

    ``output + term`` equals HF's ``hidden[mask] = hidden[mask] + embeds`` exactly: the
    same sum at image positions, ``x + 0`` elsewhere.
    """

    def hook(layer: torch.nn.Module, args: Any, output: Any) -> Any:
        embeds = state.embeds
        if embeds is None or level >= len(embeds):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + layer.deepstack(embeds[level], hidden)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    return hook


def move_deepstack_into_blocks(hf_model: torch.nn.Module) -> None:
    """Make decoder layer ``k`` add DeepStack level ``k`` itself (see the module docstring).

    A pre-hook on the text model takes ``visual_pos_masks`` and
    ``deepstack_visual_embeds`` out of its call (HF's loop then adds nothing) and keeps
    them for the layers; each of the first ``len(deepstack_visual_indexes)`` layers gets a
    :class:`DeepStackInjection` and a forward hook that adds its output.
    """
    text_model = hf_model.model.language_model
    if getattr(text_model, "tl_vlm_deepstack", None) is not None:
        return
    state = _DeepStackState()
    text_model.tl_vlm_deepstack = state

    def take_deepstack(module: torch.nn.Module, args: Any, kwargs: dict) -> Any:
        state.mask = kwargs.get("visual_pos_masks")
        state.embeds = kwargs.get("deepstack_visual_embeds")
        if state.mask is None:
            state.embeds = None
        kwargs = dict(kwargs, visual_pos_masks=None, deepstack_visual_embeds=None)
        return args, kwargs

    text_model.register_forward_pre_hook(take_deepstack, with_kwargs=True)
    levels = len(hf_model.config.vision_config.deepstack_visual_indexes)
    for k, layer in enumerate(text_model.layers[:levels]):
        layer.deepstack = DeepStackInjection(state)
        layer.register_forward_hook(_layer_adds_deepstack(k, state))


class Qwen3VLAdapter(Qwen3VLArchitectureAdapter):
    """TL's Qwen3-VL mapping without torchvision, with hooked attention, q/k norm hooks
    and DeepStack inside the blocks (``blocks.{k}.deepstack``)."""

    # The PIL image processor does Qwen's resizing; nothing here imports torchvision.
    required_libraries: list[str] = []

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        blocks = self.component_mapping["blocks"]
        norms = {k: blocks.submodules["attn"].submodules[k] for k in ("q_norm", "k_norm")}
        use_hooked_attention(self)
        # use_hooked_attention keeps q/k/v/o only; keep TL's q/k norm hook points too.
        blocks.submodules["attn"].submodules.update(norms)
        # Only the first len(deepstack_visual_indexes) layers have one.
        blocks.submodules["deepstack"] = GeneralizedComponent(name="deepstack", optional=True)

    def prepare_model(self, hf_model: Any) -> None:
        super().prepare_model(hf_model)
        move_deepstack_into_blocks(hf_model)


class Qwen3VLLayout(MergedPatchLayout):
    """``<|vision_start|>`` + rows x cols ``<|image_pad|>`` + ``<|vision_end|>``.

    A prompt marks an image with ``<|vision_start|><|image_pad|><|vision_end|>`` (what
    Qwen's chat template writes); a bare ``<|image_pad|>`` is wrapped in the vision
    start/end tokens, since the model always sees images between them.
    """

    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    content_token = "<|image_pad|>"
    boi_token = "<|vision_start|>"
    eoi_token = "<|vision_end|>"
    gate_description = "none (non-native; EOI <|vision_end|> recorded as gate)"

    config_token_ids = {"content_token": "image_token_id", **MergedPatchLayout.config_token_ids}



FAMILY = Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    image_tokens="`<|vision_start|>` + merged patches `<|image_pad|>` + `<|vision_end|>` "
                 "(+ DeepStack features added at the image positions in the first layers)",
    architectures=(QWEN3_VL,),
    adapter=Qwen3VLAdapter,
    layout=Qwen3VLLayout,
    example_ids=("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
)
