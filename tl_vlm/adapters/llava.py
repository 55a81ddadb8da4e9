"""LLaVA-1.5 (``LlavaForConditionalGeneration`` with a CLIP or SigLIP tower).

HF classes: ``LlavaForConditionalGeneration`` -> ``model.vision_tower`` (CLIP),
``model.multi_modal_projector``, ``model.language_model`` (Llama/Mistral/Qwen2),
``lm_head``. TL 4.3's ``LlavaArchitectureAdapter`` maps these; tl_vlm keeps its mapping
and routes attention through the hooked attention function.

Layout: ``<image>`` expands to one token per projected patch (576 = 24x24 for
llava-1.5-7b), with no BOI/EOI/row tokens, so there is no gate token.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from transformer_lens.model_bridge.supported_architectures.llava import (
    LlavaArchitectureAdapter,
)

from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import ImageLayout
from tl_vlm.core.layout import Box, ImageView, LayoutError, resize_crop_box


def _is_pixtral_tower(hf_config: Any) -> bool:
    return getattr(getattr(hf_config, "vision_config", None), "model_type", "") == "pixtral"


class LlavaAdapter(LlavaArchitectureAdapter):
    """TL's LLaVA adapter with hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        use_hooked_attention(self)


class LlavaLayout(ImageLayout):
    """``<image>`` x (side x side) patch features; grid from the tower's patch count."""

    placeholder = "<image>"
    content_token = "<image>"
    gate_description = "none (no end-of-image token)"
    processor_counted = ("image",)
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token"}

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        n_images = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
        if self.config.vision_feature_select_strategy == "full":  # CLS kept: not a grid
            return [(1, side * side + 1)] * n_images
        return [(side, side)] * n_images

    def picture_box(self, height: int, width: int) -> Box:
        """What the CLIP processor keeps: shortest edge to 336, centre crop (after an
        optional pad to a square, ``do_pad``)."""
        return resize_crop_box(height, width, self.processor.image_processor)

    def image_views(self, rows: int, cols: int, image_size: Optional[tuple[int, int]] = None,
                    meta: Any = None) -> list[ImageView]:
        if self.config.vision_feature_select_strategy == "full":
            raise LayoutError(
                "this checkpoint keeps the CLS feature (vision_feature_select_strategy='full'), "
                "so its image tokens are not a patch grid and cannot be placed on the picture")
        return super().image_views(rows, cols, image_size, meta)


FAMILY = Family(
    name="llava",
    title="LLaVA-1.5 (CLIP tower)",
    image_tokens="576 x `<image>`",
    architectures=("LlavaForConditionalGeneration",),
    adapter=LlavaAdapter,
    layout=LlavaLayout,
    example_ids=("llava-hf/llava-1.5-7b-hf",),
    matches=lambda cfg: not _is_pixtral_tower(cfg),
)
