"""Mistral 3 (Mistral Small 3.1 / 3.2): Pixtral's successor with a patch merger.

HF classes: ``Mistral3ForConditionalGeneration`` (``transformers.models.mistral3``) ->
``model.vision_tower`` (``PixtralVisionModel``: 2D-RoPE, block-diagonal attention
across images), ``model.multi_modal_projector`` (``Mistral3MultiModalProjector``: an
RMSNorm, ``patch_merger`` (``Mistral3PatchMerger``: each 2x2 block of tower patches,
unfolded and mixed by one linear layer, becomes one feature) and a two-layer MLP),
``model.language_model`` (``MistralModel``) and ``lm_head``. TL 4.3 has
``Mistral3ArchitectureAdapter`` (TL's LLaVA mapping with the Pixtral tower kept
opaque); tl_vlm subclasses it and routes text attention through the hooked function.

Layout (``PixtralProcessor`` with ``spatial_merge_size=2``): the processor resizes each
image so that both sides are multiples of ``patch_size * spatial_merge_size`` (28 px
for the released 14 px patches) and longest edge <= ``longest_edge``, and reports the
resized ``image_sizes``. Each ``[IMG]`` of the prompt becomes ``rows`` rows of ``cols``
``[IMG]`` ids (``rows``/``cols`` = resized height/width over 28 px: one id per merged
2x2 block), each row ended by an ``[IMG_BREAK]`` id except the last, which an
``[IMG_END]`` id ends. There is no BOI. ``[IMG_END]`` is the EOI and the position the
layout records as ``gate`` (the natural gate candidate); no gate is measured here:
``find_gates`` is the tool. Not a native multimodal model. Without torchvision the
processor is made loadable by :mod:`tl_vlm.core.hf_compat`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from transformer_lens.model_bridge.supported_architectures.mistral3 import (
    Mistral3ArchitectureAdapter,
)

from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.family import Family
from tl_vlm.core.layout import ImageLayout, LayoutError


class Mistral3Adapter(Mistral3ArchitectureAdapter):
    """TL's Mistral 3 adapter (Pixtral tower opaque) with hooked text attention."""

    def __init__(self, cfg: Any) -> None:
        # TL maps the tower whole (``vision_encoder``, a ``GeneralizedComponent``) and the
        # projector (norm + patch merger + MLP, called with ``image_sizes``) as
        # ``vision_projector``, each with hook_in / hook_out around it.
        super().__init__(cfg)
        use_hooked_attention(self)


class Mistral3Layout(ImageLayout):
    """``[IMG]`` x cols per row, rows ended by ``[IMG_BREAK]``, the last by ``[IMG_END]``.

    One ``[IMG]`` per merged 2x2 block of tower patches. ``row_breaks`` holds the
    ``[IMG_BREAK]`` ids only; ``[IMG_END]`` (which ends the last row) is the EOI and
    the gate. The default run-based locator reads it: an image is a maximal run of
    ``[IMG]``/``[IMG_BREAK]`` that must be followed by ``[IMG_END]``, so two images
    written back to back stay apart. Rows and columns come from the break ids and must
    equal ``image_sizes // (patch_size * spatial_merge_size)``.
    """

    placeholder = "[IMG]"
    content_token = "[IMG]"
    row_break_token = "[IMG_BREAK]"
    eoi_token = "[IMG_END]"
    native = False
    gate_description = ("`[IMG_END]` (EOI, recorded as `gate`); none measured: "
                        "`find_gates` is the tool")
    processor_counted = ("image", "row_breaks", "eoi")  # [IMG_END] replaces the last break
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token",
                        "row_break_token": "image_break_token", "eoi_token": "image_end_token"}

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        merge = getattr(processor, "spatial_merge_size", None)
        if merge is None:
            merge = getattr(config, "spatial_merge_size", 1)
        model_merge = getattr(config, "spatial_merge_size", None)
        if model_merge is not None and int(model_merge) != int(merge):
            raise LayoutError(
                f"the processor merges {merge}x{merge} patches per image token but the model "
                f"merges {model_merge}x{model_merge}: processor and checkpoint disagree")
        #: pixels per image token along each side (patch size x merge size)
        self.token_px = int(processor.patch_size) * int(merge)

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            if inputs.get("pixel_values") is not None:
                raise LayoutError("Mistral 3 inputs with pixel_values need the processor's "
                                  "image_sizes")
            return None
        sizes = torch.as_tensor(sizes).tolist()
        return [(int(h) // self.token_px, int(w) // self.token_px) for h, w in sizes]


FAMILY = Family(
    name="mistral3",
    title="Mistral 3 (Mistral Small 3.1 / 3.2)",
    image_tokens="`[IMG]` per merged 2x2 patch, `[IMG_BREAK]` after each row but the last, "
                 "`[IMG_END]`",
    architectures=("Mistral3ForConditionalGeneration",),
    adapter=Mistral3Adapter,
    layout=Mistral3Layout,
    example_ids=("mistralai/Mistral-Small-3.1-24B-Instruct-2503",
                 "mistralai/Mistral-Small-3.2-24B-Instruct-2506"),
)
