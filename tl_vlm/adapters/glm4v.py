"""GLM-4.1V / GLM-4V (``Glm4vForConditionalGeneration``: GLM-4.1V-9B-Thinking, -Base).

HF classes (``transformers.models.glm4v.modeling_glm4v``):
``Glm4vForConditionalGeneration`` -> ``model.visual`` (``Glm4vVisionModel``: patch
embedding over ``patch_size`` x ``patch_size`` x ``temporal_patch_size`` patches,
learned position embeddings resampled bicubically to each image's grid, 2-D rotary
embeddings, RMS-normed ``blocks.{i}``, then a ``spatial_merge_size`` x
``spatial_merge_size`` convolution (``downsample``) and ``merger``: one text-side token
per merged patch), ``model.language_model`` (``Glm4vTextModel``: GLM-4-0414 layout with
sandwich norms (``post_self_attn_layernorm``, ``post_mlp_layernorm``), q/k/v biases, a
joint ``gate_up_proj`` MLP and M-RoPE over the first half of each head
(``partial_rotary_factor``), three position streams from ``get_rope_index``) and
``lm_head``. TL 4.3's ``Glm4vArchitectureAdapter`` maps these (``ln1_post`` and
``ln2_post`` are the sandwich norms); tl_vlm keeps its mapping without its torchvision
requirement (the PIL image processor is used) and routes text attention through the
hooked attention function, after HF has applied the partial M-RoPE.

Processor: ``Glm4vProcessor`` with ``Glm4vImageProcessorPil`` (without torchvision made
image-only by :mod:`tl_vlm.core.hf_compat`); it returns ``image_grid_thw`` and
``mm_token_type_ids`` (1 on ``<|image|>``), both forwarded for ``get_rope_index``.

Layout, from token ids: ``<|begin_of_image|>`` (BOI, config ``image_start_token_id``),
``rows x cols`` ``<|image|>`` (``image_token_id``) in row-major order, then
``<|end_of_image|>`` (EOI, ``image_end_token_id``); GLM's chat template writes the three
around each image and the processor repeats ``<|image|>`` once per merged patch.
``image_grid_thw`` row ``(t, h, w)`` counts patches: the grid is ``(t * h // m) x (w //
m)`` with ``m = spatial_merge_size``. No row breaks, tiles or thumbnail. GLM-4.1V is not
a native multimodal model (a ViT feeds a language model), so it has no gate in the
Narrow Gate sense; EOI ``<|end_of_image|>`` is recorded as ``gate`` so the knockout
presets can target it, and ``find_gates`` is the tool to look for one.
"""

from __future__ import annotations

from typing import Any

from transformer_lens.model_bridge.supported_architectures.glm4v import (
    Glm4vArchitectureAdapter,
)

from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.family import Family
from tl_vlm.core.merged_patches import MergedPatchLayout

GLM4V = "Glm4vForConditionalGeneration"


class Glm4vAdapter(Glm4vArchitectureAdapter):
    """TL's GLM-4V mapping without torchvision, with hooked text attention."""

    # The PIL image processor does GLM's resizing; nothing here imports torchvision.
    required_libraries: list[str] = []

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        use_hooked_attention(self)


class Glm4vLayout(MergedPatchLayout):
    """``<|begin_of_image|>`` + rows x cols ``<|image|>`` + ``<|end_of_image|>``.

    A prompt marks an image with ``<|begin_of_image|><|image|><|end_of_image|>`` (what
    GLM's chat template writes); a bare ``<|image|>`` is wrapped in the begin/end tokens,
    since the model always sees images between them.
    """

    placeholder = "<|begin_of_image|><|image|><|end_of_image|>"
    content_token = "<|image|>"
    boi_token = "<|begin_of_image|>"
    eoi_token = "<|end_of_image|>"
    gate_description = "none (non-native; EOI <|end_of_image|> recorded as gate)"

    config_token_ids = {"content_token": "image_token_id", "boi_token": "image_start_token_id",
                        "eoi_token": "image_end_token_id"}



FAMILY = Family(
    name="glm4v",
    title="GLM-4.1V",
    image_tokens="`<|begin_of_image|>` + merged patches `<|image|>` + `<|end_of_image|>`",
    architectures=(GLM4V,),
    adapter=Glm4vAdapter,
    layout=Glm4vLayout,
    example_ids=("zai-org/GLM-4.1V-9B-Thinking", "zai-org/GLM-4.1V-9B-Base"),
)
