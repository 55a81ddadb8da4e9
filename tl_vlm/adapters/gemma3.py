"""Gemma 3 (``Gemma3ForConditionalGeneration``: Gemma 3 4B/12B/27B, MedGemma).

HF classes: ``Gemma3ForConditionalGeneration`` -> ``model.vision_tower`` (SigLIP),
``model.multi_modal_projector`` (avg-pool to ``mm_tokens_per_image`` tokens, RMSNorm,
projection), ``model.language_model`` (``Gemma3TextModel``: q/k norms, post-attention
and post-feedforward norms, sliding-window and full layers), ``lm_head``. TL 4.3's
``Gemma3MultimodalArchitectureAdapter`` maps these; tl_vlm keeps its mapping and routes
attention through the hooked attention function. The HF attention module still applies
its q/k norms and the per-layer-type rotary embedding, and HF builds the per-layer masks
(sliding window; bidirectional attention inside each image span, read from the
processor's ``token_type_ids``) that arrive in ``attention_mask``. Gemma 3's attention
never passes ``attn_logit_softcapping`` to the attention function, so neither HF's eager
path nor tl_vlm soft-caps.

Layout: the processor expands each ``<start_of_image>`` in the prompt into
``"\\n\\n<start_of_image>" + mm_tokens_per_image x "<image_soft_token>" +
"<end_of_image>\\n\\n"``. BOI is ``<start_of_image>``, content ``<image_soft_token>``, EOI
(and the gate) ``<end_of_image>``; there are no row tokens and the content is a square
``sqrt(mm_tokens_per_image)`` grid, row-major (256 = 16x16 for the released models).
The surrounding ``"\\n\\n"`` tokens are ordinary text tokens and count as text. Gemma 3
is not a native multimodal model (a SigLIP tower feeds a text LM); ``eoi``/``gate``
still hold ``<end_of_image>`` so the same analyses run on it as a non-native comparison.
Pan-and-scan (``do_pan_and_scan=True``, off by default) adds one span per crop, so a
prompt's ids then hold more image spans than it was given images and ``prepare``
raises :class:`~tl_vlm.core.layout.LayoutError`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from transformer_lens.model_bridge.supported_architectures.gemma3_multimodal import (
    Gemma3MultimodalArchitectureAdapter,
)

from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import ImageLayout, LayoutError


class Gemma3Adapter(Gemma3MultimodalArchitectureAdapter):
    """TL's Gemma 3 multimodal adapter with hooked attention.

    HF's default Gemma 3 cache keeps only the last ``sliding_window`` keys on sliding
    layers, so cached steps would see a rolling key axis; ``HookedVLM.generate`` passes
    a full-length ``DynamicCache`` instead (same numbers: the sliding mask still limits
    the window), so key index == sequence position on every layer.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        tl_attn = self.component_mapping["blocks"].submodules["attn"]
        super_norms = {k: tl_attn.submodules[k] for k in ("q_norm", "k_norm")}
        use_hooked_attention(self)
        # use_hooked_attention keeps q/k/v/o only; keep TL's q/k norm hook points too.
        self.component_mapping["blocks"].submodules["attn"].submodules.update(super_norms)


class Gemma3Layout(ImageLayout):
    """BOI, a square grid of soft tokens, EOI; token strings read from the processor."""

    placeholder = "<start_of_image>"
    content_token = "<image_soft_token>"
    boi_token = "<start_of_image>"
    eoi_token = "<end_of_image>"
    native = False
    gate_description = "none (non-native)"
    processor_counted = ("image",)

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        tok = self.tokenizer
        # Gemma's tokenizer names its image tokens; the class defaults are the released
        # strings. The prompt placeholder is the BOI token itself (the processor's
        # ``image_token``), which the processor replaces by the full image sequence.
        self.boi_token = getattr(tok, "boi_token", None) or type(self).boi_token
        self.content_token = getattr(tok, "image_token", None) or type(self).content_token
        self.eoi_token = getattr(tok, "eoi_token", None) or type(self).eoi_token
        self.placeholder = getattr(processor, "boi_token", None) or self.boi_token
        n = int(config.mm_tokens_per_image)
        side = math.isqrt(n)
        if side * side != n:
            raise LayoutError(f"mm_tokens_per_image={n} is not a square number")
        self.side = side

    def processor_images(self, per_prompt: list[list[Any]]) -> Any:
        """Nested, one list per prompt: Gemma3Processor checks the count per prompt."""
        return [list(imgs) for imgs in per_prompt]

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        """One ``side x side`` grid per row of ``pixel_values`` (pan-and-scan off)."""
        n_images = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
        return [(self.side, self.side)] * n_images


FAMILY = Family(
    name="gemma3",
    title="Gemma 3",
    image_tokens="`<start_of_image>` + 256 x `<image_soft_token>` + `<end_of_image>`",
    architectures=("Gemma3ForConditionalGeneration",),
    adapter=Gemma3Adapter,
    layout=Gemma3Layout,
    example_ids=("google/gemma-3-4b-it", "google/medgemma-4b-it"),
)
