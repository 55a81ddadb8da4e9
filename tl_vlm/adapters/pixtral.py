"""Pixtral as packaged on the hub: a LLaVA checkpoint with a Pixtral vision tower.

HF classes: ``LlavaForConditionalGeneration`` whose ``vision_config.model_type`` is
``"pixtral"`` (mistral-community/pixtral-12b) -> ``model.vision_tower``
(``PixtralVisionModel``: 2D-RoPE, block-diagonal attention across images),
``model.multi_modal_projector``, ``model.language_model`` (Mistral), ``lm_head``.
TL 4.3's ``LlavaArchitectureAdapter`` maps this tower with a CLIP bridge, which does
not fit; tl_vlm keeps the tower whole (an opaque component, as TL's Mistral 3 adapter
does for the same tower) and routes text attention through the hooked function.

Layout (``PixtralProcessor``): each ``[IMG]`` in the prompt becomes ``rows`` rows of
``cols`` ``[IMG]`` tokens, every row ended by ``[IMG_BREAK]`` except the last, which is
ended by ``[IMG_END]``. ``rows``/``cols`` are the resized image's height/width over the
patch size (times ``spatial_merge_size``), so they differ per image; the processor's
``image_sizes`` gives them and the break tokens must agree. ``[IMG_END]`` is the EOI
and the gate; there is no BOI. Not a native multimodal model. Without torchvision the
processor is made loadable by :mod:`tl_vlm.core.hf_compat`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.supported_architectures.llava import (
    LlavaArchitectureAdapter,
)

from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import ImageLayout, LayoutError


def _is_pixtral_tower(hf_config: Any) -> bool:
    return getattr(getattr(hf_config, "vision_config", None), "model_type", "") == "pixtral"


class PixtralAdapter(LlavaArchitectureAdapter):
    """TL's LLaVA adapter with the Pixtral tower kept opaque and hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        # No TL bridge fits Pixtral's 2D-RoPE tower; wrap it whole (hook_in/hook_out).
        self.component_mapping["vision_encoder"] = GeneralizedComponent(name="model.vision_tower")
        use_hooked_attention(self)


class PixtralLayout(ImageLayout):
    """``[IMG]`` x cols per row, rows ended by ``[IMG_BREAK]``, the last by ``[IMG_END]``.

    ``row_breaks`` holds the ``[IMG_BREAK]`` tokens only; ``[IMG_END]`` (which ends the
    last row) is the EOI and the gate. The default run-based locator fits: an image is
    a maximal run of ``[IMG]``/``[IMG_BREAK]`` that must be followed by ``[IMG_END]``,
    so two images written back to back stay apart. Rows and columns come from the
    break tokens and must equal ``image_sizes // (patch_size * spatial_merge_size)``.
    """

    placeholder = "[IMG]"
    content_token = "[IMG]"
    row_break_token = "[IMG_BREAK]"
    eoi_token = "[IMG_END]"
    last_row_break_is_eoi = True
    native = False
    gate_description = "none; attention gathers on row breaks"
    processor_counted = ("image", "row_breaks", "eoi")  # [IMG_END] replaces the last row's break
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token",
                        "row_break_token": "image_break_token", "eoi_token": "image_end_token"}

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        self.patch = int(processor.patch_size) * int(getattr(processor, "spatial_merge_size", 1))

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            if inputs.get("pixel_values") is not None:
                raise LayoutError("Pixtral inputs with pixel_values need the processor's image_sizes")
            return None
        sizes = torch.as_tensor(sizes).tolist()
        return [(int(h) // self.patch, int(w) // self.patch) for h, w in sizes]


FAMILY = Family(
    name="pixtral",
    title="Pixtral (Pixtral tower in LLaVA packaging)",
    image_tokens="`[IMG]` rows, `[IMG_BREAK]` after each row but the last, `[IMG_END]`",
    architectures=("LlavaForConditionalGeneration",),
    adapter=PixtralAdapter,
    layout=PixtralLayout,
    example_ids=("mistral-community/pixtral-12b",),
    matches=_is_pixtral_tower,
)
