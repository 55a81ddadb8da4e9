"""Qwen2-VL and Qwen2.5-VL: one adapter and one layout for both.

HF classes: ``Qwen2VLForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration``. Both hold ``model.visual`` (ViT over
``patch_size`` x ``patch_size`` x ``temporal_patch_size`` patches: ``patch_embed``,
``rotary_pos_emb``, ``blocks.{i}`` with ``norm1``/``norm2``, ``attn.qkv``/``attn.proj``
and an MLP, then ``merger`` which folds 2x2 patches into one text-side token),
``model.language_model`` (a Qwen2 decoder with q/k/v biases and M-RoPE) and
``lm_head``. The towers differ only in their MLP (Qwen2-VL: ``fc1``/``fc2``;
Qwen2.5-VL: gated ``gate_proj``/``up_proj``/``down_proj``) and in Qwen2.5-VL's
windowed attention, which stays inside HF's forward.

TL 4.3 has no Qwen2-VL adapter and its ``Qwen2_5_VLArchitectureAdapter`` refuses to
load without torchvision, which neither family needs once the PIL image processor
is used; :class:`Qwen2VLAdapter` serves both without that requirement. Text
attention runs through tl_vlm's hooked attention function, after HF has applied
M-RoPE with the 3-D position ids that ``get_rope_index`` computes from
``image_grid_thw`` and ``mm_token_type_ids`` (both forwarded from the processor).

Processor: without torchvision, ``Qwen2VLProcessor``/``Qwen2_5_VLProcessor`` are made
image-only by :mod:`tl_vlm.core.hf_compat`.

Layout: ``<|vision_start|>`` (BOI), ``rows x cols`` ``<|image_pad|>`` tokens in
row-major order, ``<|vision_end|>`` (EOI). ``image_grid_thw`` row ``(t, h, w)``
counts patches, so the text-side grid is ``(t * h // m) x (w // m)`` with
``m = spatial_merge_size`` (frames stacked as rows; images have ``t == 1``). There
are no row-break tokens. Qwen2-VL is not a native multimodal model (a ViT feeds a
language model), so it has no gate in the Narrow Gate sense; EOI is still recorded
as ``gate`` so knockout presets can target it.
"""

from __future__ import annotations

from typing import Any

from transformer_lens.model_bridge.generalized_components import LinearBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import (
    Qwen2_5_VLArchitectureAdapter,
)

from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.merged_patches import MergedPatchLayout

QWEN2_VL = "Qwen2VLForConditionalGeneration"
QWEN2_5_VL = "Qwen2_5_VLForConditionalGeneration"


def _is_qwen2_vl(cfg: Any) -> bool:
    """Whether the bridge config is Qwen2-VL (else Qwen2.5-VL).

    TL copies the HF config onto ``cfg``; Qwen2-VL's vision config has ``embed_dim``
    and ``mlp_ratio`` where Qwen2.5-VL's has ``intermediate_size``.
    """
    arch = getattr(cfg, "architecture", None)
    if arch in (QWEN2_VL, QWEN2_5_VL):
        return arch == QWEN2_VL
    vision = getattr(cfg, "vision_config", None)
    return getattr(vision, "model_type", "") == "qwen2_vl" or hasattr(vision, "mlp_ratio")


class Qwen2VLAdapter(Qwen2_5_VLArchitectureAdapter):
    """TL's Qwen2.5-VL mapping, without torchvision, with hooked attention, for both towers."""

    # The PIL image processor does Qwen's resizing; nothing here imports torchvision.
    required_libraries: list[str] = []

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if _is_qwen2_vl(cfg):
            # Qwen2-VL's vision MLP is fc1 -> act -> fc2 (not gated).
            blocks = self.component_mapping["vision_encoder"].submodules["blocks"]
            blocks.submodules["mlp"] = GeneralizedComponent(
                name="mlp",
                submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")},
            )
        use_hooked_attention(self)


class Qwen2VLLayout(MergedPatchLayout):
    """``<|vision_start|>`` + rows x cols ``<|image_pad|>`` + ``<|vision_end|>``.

    A prompt marks an image with ``<|vision_start|><|image_pad|><|vision_end|>`` (what
    Qwen's chat template writes); a bare ``<|image_pad|>`` is wrapped in the vision
    start/end tokens, since the model always sees images between them.
    """

    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    content_token = "<|image_pad|>"
    boi_token = "<|vision_start|>"
    eoi_token = "<|vision_end|>"
    gate_description = "none (non-native)"

    processor_tokens = {"content_token": "image_token"}



# Qwen2.5-VL is its own family (tl_vlm.adapters.qwen2_5_vl) because TL ships an
# adapter for it and not for Qwen2-VL; both use the classes above.
FAMILY = Family(
    name="qwen2_vl",
    title="Qwen2-VL",
    image_tokens="`<|vision_start|>` + merged patches `<|image_pad|>` + `<|vision_end|>`",
    architectures=(QWEN2_VL,),
    adapter=Qwen2VLAdapter,
    layout=Qwen2VLLayout,
    example_ids=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
)
