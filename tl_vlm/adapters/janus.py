"""Janus / Janus-Pro (``JanusForConditionalGeneration``), image understanding path.

HF classes: ``JanusForConditionalGeneration`` -> ``model.vision_model``
(``JanusVisionModel``, SigLIP-like: ``embeddings``, ``encoder.layers.{i}`` with
``layer_norm1``, ``self_attn.{q,k,v}_proj``/``projection_layer``, ``layer_norm2``,
``mlp.fc1``/``fc2``; ``post_layernorm``), ``model.aligner`` (MLP from vision to text
width), ``model.language_model`` (``LlamaModel``: ``embed_tokens``, ``layers.{i}``,
``norm``, ``rotary_emb``) and ``lm_head``. The generation path (``model.vqmodel``,
``generation_embeddings``, ``generation_aligner``, ``generation_head``) is left
unmapped: it does not run when Janus reads an image. TL 4.3 has no Janus adapter;
:class:`JanusAdapter` is the Llama mapping moved under ``model.language_model`` plus
the vision tower and aligner, with text attention through the hooked attention function.

Layout: the prompt's ``<image_placeholder>`` becomes ``<begin_of_image>`` (BOI),
``num_image_tokens`` x ``<image_placeholder>`` (one per aligned patch feature,
row-major over a ``side x side`` patch grid, ``side = image_size // patch_size``,
24x24 = 576 for the released checkpoints) and ``<end_of_image>`` (EOI). No row tokens.
Janus reads images through a ViT, so it is not native in the Narrow Gate sense; EOI is
still recorded as ``gate`` so knockouts can target it. The processor can prepend a
system prompt (``use_default_system_prompt``); positions are read from the ids, so
that only shifts them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    LinearBridge,
    SiglipVisionEncoderBridge,
    VisionProjectionBridge,
)
from transformer_lens.model_bridge.generalized_components.siglip_vision_encoder import (
    SiglipVisionEncoderLayerBridge,
)
from transformer_lens.model_bridge.supported_architectures.llama import (
    LlamaArchitectureAdapter,
)


from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import ImageLayout, LayoutError
from tl_vlm.core.layout import Box, padded_square_box

JANUS = "JanusForConditionalGeneration"


class JanusAdapter(LlamaArchitectureAdapter):
    """Llama decoder at ``model.language_model``, SigLIP-like tower, aligner, hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_multimodal = True
        self._reprefix_components("model.", "model.language_model.")
        # Janus' vision tower is SigLIP's with its own names: it sits directly under
        # model.vision_model and its attention output projection is projection_layer.
        vision_attn = AttentionBridge(
            name="self_attn", config=self.cfg, maintain_native_attention=True,
            submodules={"q": LinearBridge(name="q_proj"), "k": LinearBridge(name="k_proj"),
                        "v": LinearBridge(name="v_proj"),
                        "o": LinearBridge(name="projection_layer")},
        )
        layers = SiglipVisionEncoderLayerBridge(name="encoder.layers", config=self.cfg)
        layers.submodules["attn"] = vision_attn
        vision = SiglipVisionEncoderBridge(name="model.vision_model", config=self.cfg)
        vision.submodules["embeddings"].name = "embeddings"
        vision.submodules["encoder_layers"] = layers
        vision.submodules["post_layernorm"].name = "post_layernorm"
        self.component_mapping = {
            "vision_encoder": vision,
            "vision_projector": VisionProjectionBridge(name="model.aligner"),
            **self.component_mapping,
        }
        use_hooked_attention(self)


class JanusLayout(ImageLayout):
    """``<begin_of_image>`` + side x side ``<image_placeholder>`` + ``<end_of_image>``."""

    placeholder = "<image_placeholder>"
    content_token = "<image_placeholder>"
    boi_token = "<begin_of_image>"
    eoi_token = "<end_of_image>"
    gate_description = "none (non-native)"
    processor_counted = ("boi", "image", "eoi")
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token",
                        "boi_token": "image_start_token", "eoi_token": "image_end_token"}

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        self.n_tokens = int(processor.num_image_tokens)
        side = math.isqrt(self.n_tokens)
        vision = config.vision_config
        if side * side != self.n_tokens or side != vision.image_size // vision.patch_size:
            raise LayoutError(
                f"the processor's num_image_tokens={self.n_tokens} is not the tower's "
                f"{vision.image_size // vision.patch_size}^2 patch grid; processor and model "
                f"come from different checkpoints?"
            )
        self.side = side
        # JanusProcessor defaults to left padding unless the tokenizer was created with a
        # padding_side; record the tokenizer's own so HookedVLM.prepare(padding_side=...)
        # (which sets tokenizer.padding_side) is what the processor uses.
        self.tokenizer.init_kwargs.setdefault("padding_side", self.tokenizer.padding_side)

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        pixels = inputs.get("pixel_values")
        n_images = 0 if pixels is None else int(pixels.shape[0])
        return [(self.side, self.side)] * n_images

    def picture_box(self, height: int, width: int) -> Box:
        """The processor scales the longest edge to 384 and pads to a centred square."""
        if getattr(getattr(self.processor, "image_processor", None), "do_pad", True):
            return padded_square_box(height, width)
        return super().picture_box(height, width)


FAMILY = Family(
    name="janus",
    title="Janus, Janus-Pro",
    image_tokens="`<begin_of_image>` + 576 x `<image_placeholder>` + `<end_of_image>`",
    architectures=(JANUS,),
    adapter=JanusAdapter,
    layout=JanusLayout,
    example_ids=("deepseek-community/Janus-Pro-1B", "deepseek-community/Janus-Pro-7B"),
)
