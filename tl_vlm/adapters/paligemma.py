"""PaliGemma 1 and 2 (``PaliGemmaForConditionalGeneration``).

HF classes: ``PaliGemmaForConditionalGeneration`` -> ``model.vision_tower``
(``SiglipVisionModel``, no pooling head), ``model.multi_modal_projector`` (one
``linear`` from the tower's width to the text width), ``model.language_model`` and
``lm_head`` (tied to the embedding). The text model is ``GemmaModel`` for PaliGemma 1
(``text_config.model_type == "gemma"``: ``input_layernorm`` before attention,
``post_attention_layernorm`` before the MLP) and ``Gemma2Model`` for PaliGemma 2
(``"gemma2"``: pre- and post-norms around attention and MLP, alternating sliding and
full layers, attention and final-logit soft-capping). TL 4.3 has no PaliGemma adapter;
:class:`PaliGemmaAdapter` is TL's Gemma 1 mapping moved under ``model.language_model``,
switched to Gemma 2's four block norms when the loaded decoder layers have them, plus
the SigLIP tower and projector, with text attention through the hooked attention
function. HF's attention module still applies its rotary embedding and (PaliGemma 2)
its ``attn_logit_softcapping``; tl_vlm's attention function runs HF's eager
computation whenever a soft-cap is set (SDPA has none), so PaliGemma 2 never takes
the SDPA or fused paths. ``PaliGemmaForConditionalGeneration.forward`` soft-caps the
logits after ``lm_head`` (PaliGemma 2); :data:`FAMILY` declares it (``final_logits``)
so the logit lens of the last layer equals the model's logits.

Attention mask (prefix-LM): ``PaliGemmaModel.forward`` turns the processor's
``token_type_ids`` into ``block_sequence_ids`` (0 where ``token_type_ids == 0``, -1
elsewhere): every token of the *prefix* (images, ``<bos>``, the prompt and its closing
``"\\n"``) attends to every other prefix token, before or after it; the *suffix*
(``token_type_ids == 1``) is causal. HF builds that mask and hands it to the attention
function in ``attention_mask``; tl_vlm's SDPA, fused (knockout, contribution) and eager
paths all apply exactly that mask, so a knockout of image -> text edges is meaningful
here (image tokens do see the prompt). The decoder's attention modules have
``is_causal = False`` (``use_bidirectional_attention``); with ``token_type_ids`` the mask
always comes materialised. Called without ``token_type_ids`` on an unpadded batch, HF
skips the SDPA mask and the modules' ``is_causal = False`` makes the whole sequence
bidirectional (all prefix, as without a suffix); tl_vlm's paths do the same, while HF's
eager implementation then builds a causal mask instead. ``HookedVLM.generate`` goes
through HF's ``generate``, which gives every generated token ``token_type_ids == 1``.

What ``prepare`` means by prompt and suffix: the prompt is the prefix. Without a suffix
(the usual case: ``model.prepare(prompts, images)``) the whole prompt is bidirectional
and the answer is generated as the causal suffix. ``model.prepare(prompts, images,
suffix=answers)`` passes ``suffix`` to the processor, which appends ``answer + <eos>``
with ``token_type_ids == 1`` (teacher forcing, causal); the suffix tokens are ``text``
positions and ``last`` is the ``<eos>``. The processor also returns ``labels`` (the
suffix ids, -100 elsewhere) for training; the layout drops them from the batch
(:meth:`PaliGemmaLayout.locate`), as a forward with labels computes a loss and
``generate`` cannot take them.

Layout: the processor writes ``<image>`` x ``image_seq_length`` per image (one token per
SigLIP patch, row-major over a ``side x side`` grid, ``side = image_size // patch_size``:
16x16 = 256 at 224 px, 32x32 = 1024 at 448 px, 64x64 = 4096 at 896 px), then ``<bos>``
right after the last image, the prompt, and ``"\\n"``. There is no BOI, no EOI and no
row token; images given to one prompt are adjacent runs of ``<image>`` and are told
apart by the grid size. ``<bos>`` follows the last image, not each image, and is the
first text token (``text``). PaliGemma reads pixels through a ViT: it is not native,
and has no gate token (``gate`` is empty); ``find_gates`` is the tool to look for one.
The processor refuses prompts without an image, so every prompt needs at least one.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from transformer_lens.model_bridge.generalized_components import (
    RMSNormalizationBridge,
    SiglipVisionEncoderBridge,
    VisionProjectionBridge,
)
from transformer_lens.model_bridge.supported_architectures.gemma1 import (
    Gemma1ArchitectureAdapter,
)

from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.family import Family
from tl_vlm.core.layout import GridQueue, ImageLayout, LayoutError, RowLayout, runs

PALIGEMMA = "PaliGemmaForConditionalGeneration"


class PaliGemmaAdapter(Gemma1ArchitectureAdapter):
    """Gemma decoder at ``model.language_model``, SigLIP tower, projector, hooked attention.

    The block norms are Gemma 1's (``ln1`` = ``input_layernorm``, ``ln2`` =
    ``post_attention_layernorm``, the pre-MLP norm) until the model is loaded; a
    decoder with Gemma 2's post-norms (PaliGemma 2) gets Gemma 2's four (``ln1``,
    ``ln1_post`` = ``post_attention_layernorm``, ``ln2`` = ``pre_feedforward_layernorm``,
    ``ln2_post``) in :meth:`prepare_model`.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_multimodal = True
        self._reprefix_components("model.", "model.language_model.")
        self.component_mapping = {
            "vision_encoder": SiglipVisionEncoderBridge(name="model.vision_tower", config=self.cfg),
            "vision_projector": VisionProjectionBridge(name="model.multi_modal_projector"),
            **self.component_mapping,
        }
        use_hooked_attention(self)

    def prepare_model(self, hf_model: Any) -> None:
        super().prepare_model(hf_model)
        layer = hf_model.model.language_model.layers[0]
        if hasattr(layer, "post_feedforward_layernorm"):      # Gemma 2 decoder
            norms = {
                "ln1": RMSNormalizationBridge(name="input_layernorm", config=self.cfg),
                "ln1_post": RMSNormalizationBridge(name="post_attention_layernorm", config=self.cfg),
                "ln2": RMSNormalizationBridge(name="pre_feedforward_layernorm", config=self.cfg),
                "ln2_post": RMSNormalizationBridge(name="post_feedforward_layernorm",
                                                   config=self.cfg),
            }
            submodules = self.component_mapping["blocks"].submodules
            rest = {k: v for k, v in submodules.items() if k not in ("ln1", "ln2")}
            submodules.clear()
            submodules.update({**norms, **rest})


def soft_cap_logits(model: Any):
    """PaliGemma 2's final soft-cap, ``tanh(logits / c) * c`` with ``c`` the text
    config's ``final_logit_softcapping`` (identity for PaliGemma 1, which has none)."""
    cap = getattr(model.hf_model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is None:
        return lambda logits: logits
    return lambda logits: torch.tanh(logits / cap) * cap


class PaliGemmaLayout(ImageLayout):
    """``<image>`` x (side x side) per image, adjacent images split by the grid size."""

    placeholder = "<image>"
    content_token = "<image>"
    gate_description = "none (no end-of-image token; use find_gates)"
    processor_counted = ("image",)
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token"}

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size
        n = getattr(processor, "image_seq_length", None)
        if n is not None and int(n) != self.side * self.side:
            raise LayoutError(
                f"the processor's image_seq_length={n} is not the tower's {self.side}x{self.side} "
                f"patch grid; processor and model come from different checkpoints?")

    def with_placeholders(self, prompt: str, n_images: int) -> str:
        """Placeholders first when the prompt has none, as the processor itself writes
        them (no separator: it puts ``<bos>`` right after the last one)."""
        if n_images == 0:
            raise LayoutError(
                f"PaliGemma's processor needs at least one image per prompt; none was given "
                f"for {prompt[:80]!r}")
        if self.count_placeholders(prompt) == 0:
            return self.placeholder * n_images + prompt
        return super().with_placeholders(prompt, n_images)

    def processor_images(self, per_prompt: list[list[Any]]) -> Any:
        """Nested, one list per prompt: the processor pairs them with the prompts."""
        return [list(imgs) for imgs in per_prompt]

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        n_images = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
        return [(self.side, self.side)] * n_images

    def locate(self, input_ids, attention_mask, inputs):
        """As :meth:`ImageLayout.locate`; also drops the processor's training ``labels``
        from ``inputs`` (a forward with labels computes a loss; ``generate`` refuses them)."""
        if isinstance(inputs, dict):
            inputs.pop("labels", None)
        return super().locate(input_ids, attention_mask, inputs)

    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        """Each run of ``<image>`` holds one or more whole images, one grid each."""
        content = self.token_id(self.content_token)
        out = RowLayout()
        n_img = 0
        for start, end in runs(ids, {content}):
            at = start
            while at < end:
                grid = grids.pop()
                rows, cols = grid if grid is not None else (self.side, self.side)
                n = rows * cols
                if at + n > end:
                    raise LayoutError(
                        f"image {n_img}: the processor metadata says a {rows}x{cols} grid "
                        f"({n} tokens) but the run of image tokens holds only {end - at} "
                        f"more; was the prompt truncated?")
                for k in range(n):
                    out.image.append(at + k)
                    out.grid.append((n_img, k // cols, k % cols))
                at += n
                n_img += 1
        return out


FAMILY = Family(
    name="paligemma",
    title="PaliGemma 1 / 2",
    image_tokens="256 x `<image>` (224 px; 1024 at 448, 4096 at 896), then `<bos>`",
    architectures=(PALIGEMMA,),
    adapter=PaliGemmaAdapter,
    layout=PaliGemmaLayout,
    example_ids=("google/paligemma-3b-pt-224", "google/paligemma2-3b-pt-224",
                 "google/paligemma2-3b-mix-448"),
    final_logits=soft_cap_logits,
)
