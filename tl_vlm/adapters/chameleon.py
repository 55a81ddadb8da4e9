"""Chameleon (``ChameleonForConditionalGeneration``): early-fusion VQ image tokens.

HF classes and module paths covered:

- ``model.embed_tokens`` (embed), ``model.rotary_emb``, ``model.norm`` (ln_final),
  ``lm_head`` (unembed).
- ``model.layers`` (blocks): ``ChameleonDecoderLayer`` (7B, pre-norm:
  ``input_layernorm`` -> ``ln1``, ``post_attention_layernorm`` -> ``ln2``) or
  ``ChameleonSwinDecoderLayer`` (30B/34B, ``config.swin_norm=True``: the same two
  modules normalise the *outputs* of attention and MLP, so they map to
  ``ln1_post``/``ln2_post`` and there is no ``ln1``/``ln2``).
- ``self_attn`` (``ChameleonAttention``: ``q_proj``/``k_proj``/``v_proj``/``o_proj``;
  its per-head QK LayerNorms ``q_norm``/``k_norm`` run inside the wrapped HF module),
  ``mlp`` (SwiGLU ``gate_proj``/``up_proj``/``down_proj``).
- ``model.vqmodel`` (``ChameleonVQVAE``) is not mapped: it only turns pixels into
  codebook ids; reach it via ``bridge.original_model.model.vqmodel``.

TransformerLens 4.3 has no Chameleon adapter; tl_vlm registers this one with TL, so
plain ``TransformerBridge.boot_transformers(path)`` works too.

Layout: the prompt's ``<image>`` becomes ``<racm3:break>`` (BOI) + ``image_seq_length``
x ``<image>`` + ``<eoss>`` (EOI). Inside the HF forward the ``<image>`` placeholders are
replaced by the embeddings of the image's VQ codes, which are ordinary vocabulary
entries (``IMGIMG...`` tokens via ``config.vocabulary_map``), so the decoder sees real
tokens. The codes are the VQ latent grid read row-major: 32x32 = 1024 for 512px
images. The gate is EOI; there are no row-break tokens.

A prompt may also hold an image already tokenised: ``<racm3:break>``, the VQ code
tokens themselves (any ``IMGIMG...`` entry of ``config.vocabulary_map``), ``<eoss>``,
with no pixels (the toy models of :mod:`tl_vlm.toy` are prompted this way). Such an
image's grid is square (``sqrt`` of its code count), as every real Chameleon image is.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import (
    BlockBridge,
    EmbeddingBridge,
    RMSNormalizationBridge,
    RotaryEmbeddingBridge,
    UnembeddingBridge,
)

from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import GridQueue, ImageLayout, LayoutError, RowLayout, runs
from tl_vlm.core.layout import Box, resize_crop_box


class ChameleonAdapter(ArchitectureAdapter):
    """TransformerLens adapter for ``ChameleonForConditionalGeneration`` (both layouts).

    The bridge config does not carry ``swin_norm``, so the block mapping is built for
    the 7B layout here and switched in :meth:`prepare_model`, which TL calls with the
    loaded HF model before it builds the bridge.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_multimodal = True
        self._set_rms_rotary_defaults()
        self.weight_processing_conversions = {**self._qkvo_weight_conversions()}
        self.swin_norm = False
        self.component_mapping = {
            "embed": EmbeddingBridge(name="model.embed_tokens"),
            "rotary_emb": RotaryEmbeddingBridge(name="model.rotary_emb"),
            "blocks": self._blocks(swin_norm=False),
            "ln_final": RMSNormalizationBridge(name="model.norm", config=self.cfg),
            "unembed": UnembeddingBridge(name="lm_head", config=self.cfg),
        }
        use_hooked_attention(self)

    def _blocks(self, swin_norm: bool) -> BlockBridge:
        first = RMSNormalizationBridge(name="input_layernorm", config=self.cfg)
        second = RMSNormalizationBridge(name="post_attention_layernorm", config=self.cfg)
        # Swin layers normalise the sublayer outputs before the residual add: post-norms.
        norms = {"ln1_post": first, "ln2_post": second} if swin_norm else {"ln1": first, "ln2": second}
        return BlockBridge(
            name="model.layers",
            submodules={**norms, "attn": self._build_attention_bridge(), "mlp": self._gated_mlp()},
        )

    def use_swin_norm(self) -> None:
        """Switch the block mapping to the 30B/34B post-norm layout."""
        self.swin_norm = True
        # Folding a norm into the next layer's weights (and centring the writing
        # weights) assumes the norm feeds that layer; post-norms do not.
        self.supports_fold_ln = False
        self.supports_center_writing_weights = False
        self.component_mapping["blocks"] = self._blocks(swin_norm=True)
        use_hooked_attention(self)

    def prepare_loading(self, model_name: str, model_kwargs: dict) -> None:
        super().prepare_loading(model_name, model_kwargs)
        if getattr(model_kwargs.get("config"), "swin_norm", False) and not self.swin_norm:
            self.use_swin_norm()

    def prepare_model(self, hf_model: Any) -> None:
        super().prepare_model(hf_model)
        if getattr(hf_model.config, "swin_norm", False) and not self.swin_norm:
            self.use_swin_norm()


def _downsampled(size: int, levels: int) -> int:
    """Latent side after the VQ encoder's ``levels`` pad(0,1)+conv(k3,s2) downsamplings."""
    for _ in range(levels):
        size = (size + 1 - 3) // 2 + 1
    return size


class ChameleonLayout(ImageLayout):
    """``<racm3:break>`` + rows x cols ``<image>`` (VQ codes, row-major) + ``<eoss>``.

    The content between BOI and EOI is either ``<image>`` placeholders (expanded by the
    processor from pixels; grid from the pixel size) or the VQ code tokens themselves
    (a pre-tokenised image; square grid). One image cannot mix the two.
    """

    placeholder = "<image>"
    content_token = "<image>"
    boi_token = "<racm3:break>"
    eoi_token = "<eoss>"
    native = True
    gate_description = "EOI <eoss>"
    processor_counted = ("boi", "image", "eoi")  # image_seq_length codes + BOI + EOI
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token",
                        "boi_token": "image_start_token", "eoi_token": "image_end_token"}

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        """The VQ latent grid of every image, from the pixel size and the encoder depth."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return []
        if pixels.ndim != 4:
            raise LayoutError(
                f"Chameleon pixel_values should be [images, channels, height, width], got "
                f"shape {tuple(pixels.shape)}"
            )
        levels = len(self.config.vq_config.channel_multiplier) - 1
        rows, cols = (_downsampled(s, levels) for s in pixels.shape[-2:])
        return [(rows, cols)] * pixels.shape[0]

    def picture_box(self, height: int, width: int) -> Box:
        """The centre crop the image processor keeps (shortest edge to 512, crop 512x512)."""
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None:
            return super().picture_box(height, width)
        return resize_crop_box(height, width, image_processor)

    @cached_property
    def code_token_ids(self) -> frozenset[int]:
        """Ids of the VQ code tokens (``IMGIMG...`` entries of ``config.vocabulary_map``)."""
        vocab = getattr(self.config, "vocabulary_map", None) or {}
        return frozenset(int(i) for name, i in vocab.items() if name.startswith("IMGIMG"))

    def pretokenised_images(self, prompt: str) -> int:
        """Runs of VQ code tokens in the prompt (each one image written as tokens)."""
        if not self.code_token_ids or self.boi_token not in prompt:
            return 0
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return len(runs(ids, self.code_token_ids))

    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        """Like the default locator, with pre-tokenised images (code tokens) as content too.

        Runs of ``<image>`` placeholders take their grid from the pixel metadata, runs of
        code tokens a square grid; a run mixing both is refused.
        """
        placeholder = self.token_id(self.content_token)
        codes = self.code_token_ids
        out = RowLayout()
        for n_img, (start, end) in enumerate(runs(ids, {placeholder} | codes)):
            self.expect_token(ids, start - 1, "boi", n_img)
            out.boi.append(start - 1)
            self.expect_token(ids, end, "eoi", n_img)
            out.eoi.append(end)
            out.gate.append(end)
            span = list(range(start, end))
            n_placeholders = sum(ids[p] == placeholder for p in span)
            if n_placeholders == len(span):
                grid = grids.pop()
            elif n_placeholders == 0:
                grid = self._square_grid(len(span), n_img)
            else:
                raise LayoutError(
                    f"image {n_img} at position {start} mixes {n_placeholders} <image> "
                    f"placeholders with {len(span) - n_placeholders} VQ code tokens; an "
                    f"image is either pixels (placeholders) or pre-tokenised codes"
                )
            self._grid_span(ids, span, n_img, placeholder, None, grid, out)
        return out

    @staticmethod
    def _square_grid(n: int, n_img: int) -> tuple[int, int]:
        side = math.isqrt(n)
        if side * side != n:
            raise LayoutError(
                f"pre-tokenised image {n_img} holds {n} VQ code tokens, which is not a "
                f"square number: without pixels its grid is taken to be square (real "
                f"Chameleon images are 32x32 = 1024 codes)"
            )
        return side, side


def mask_image_vocabulary(model) -> Callable[[Tensor], Tensor]:
    """``ChameleonForConditionalGeneration`` sets its image-token logits to ``finfo.min``
    (text generation never emits VQ codes); the logit lens does the same."""
    image_tokens = model.hf_model.model.vocabulary_mapping.image_tokens

    def transform(logits: Tensor) -> Tensor:
        logits = logits.clone()
        logits[..., image_tokens] = torch.finfo(logits.dtype).min
        return logits

    return transform


FAMILY = Family(
    name="chameleon",
    title="Chameleon (7B; 30B/34B `swin_norm`)",
    image_tokens="`<racm3:break>` + 1024 VQ codes + `<eoss>`",
    architectures=("ChameleonForConditionalGeneration",),
    adapter=ChameleonAdapter,
    layout=ChameleonLayout,
    example_ids=("facebook/chameleon-7b", "facebook/chameleon-30b"),
    final_logits=mask_image_vocabulary,
)
