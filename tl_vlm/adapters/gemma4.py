"""Gemma 4 (``Gemma4ForConditionalGeneration``: Gemma 4 E2B/E4B/31B/26B-A4B).

HF classes (``transformers.models.gemma4.modeling_gemma4``):
``Gemma4ForConditionalGeneration`` -> ``model.vision_tower`` (``Gemma4VisionModel``: a
ViT over variable-size patch sequences with 2-D positions, then a ``k x k`` average pool
to soft tokens), ``model.embed_vision`` (``Gemma4MultimodalEmbedder``: RMSNorm +
projection), ``model.audio_tower`` / ``model.embed_audio`` (E2B/E4B; unused here),
``model.language_model`` (``Gemma4TextModel``), ``lm_head``. TL 4.3's
``Gemma4ArchitectureAdapter`` maps these; tl_vlm keeps its mapping and routes attention
through the hooked attention function.

What is new against Gemma 3, and how tl_vlm treats it:

- **Sliding and full layers differ in shape**: full-attention layers have their own
  head size (``global_head_dim``), key/value head count (``num_global_key_value_heads``)
  and partial "proportional" RoPE; with ``attention_k_eq_v`` (31B, 26B-A4B) they have no
  ``v_proj`` and values are the (un-rotated, v-normed) keys. HF's attention module does
  all of it; ``hook_rot_q``/``hook_rot_k``/``hook_pattern`` have each layer's own head
  size, so ``cfg.d_head`` is the sliding layers'. Attention scaling is 1 (q/k norms).
- **Per-layer embeddings** (PLE, E2B/E4B): a second embedding of the token ids (image
  tokens read as padding) plus a projection of the input embedding feed a gated
  residual branch at the end of every layer (``per_layer_input_gate``,
  ``per_layer_projection``, ``post_per_layer_input_norm``, mapped as TL hook points);
  every layer's output is then scaled by its ``layer_scalar``. Both sit inside the
  block, so ``hook_resid_post`` is after them.
- **KV sharing** (E2B: last 20 of 35 layers, E4B: 18 of 42): those layers have no k/v
  projections and attend over the keys/values stored by the last earlier layer of
  their type. ``hook_rot_k`` on such a layer fires on the borrowed keys. HF stores the
  producer's keys before its attention function runs, so an edit at the producer's
  ``hook_rot_k`` stays in the producer; one at its ``attn.k_norm`` output (before RoPE)
  reaches the consumers too. HF runs the shared layers on the last position only when
  ``logits_to_keep`` is an int (``generate``'s prompt pass, ``last_logits`` on a
  left-padded batch): their hooks then see one query row. ``run_from_layer`` cannot
  start past a layer that stores keys for the shared ones (HF fails: they were never
  computed).
- **MoE** (26B-A4B): a routed expert block runs beside the dense MLP, each with its own
  norms; both are inside the block (``router``/``experts`` hook points from TL).
- **Bidirectional image attention** (31B, 26B-A4B: ``use_bidirectional_attention=
  "vision"``): only on *sliding* layers, image tokens see the whole of their own image;
  full layers stay causal. HF builds the masks from the processor's
  ``mm_token_type_ids``; they reach the attention function as ``attention_mask``.
- **Final soft-capping** of the logits (``final_logit_softcapping``, 30 in every
  release): :data:`FAMILY` declares it (``final_logits``) for the logit lens.

Layout: the processor expands each ``<|image|>`` in the prompt into ``<|image>`` (BOI),
``n`` x ``<|image|>`` (content) and ``<image|>`` (EOI), with no newline or row tokens.
The image processor resizes each picture, keeping its aspect ratio, to the largest size
that is a multiple of ``pooling_kernel_size * patch_size`` (48 px released) on both
sides and holds at most ``max_soft_tokens * k^2`` patches (280 soft tokens released);
each soft token pools ``k x k`` patches, so an image is a ``rows x cols`` grid,
row-major, with ``rows * cols <= max_soft_tokens`` that depends on the aspect ratio. The
grid is read from ``image_position_ids`` (each real patch's ``(x, y)``; padding patches
are ``(-1, -1)``). BOI and EOI are recorded as ``boi``/``eoi``; the gate candidate is
``<image|>`` (EOI), as for Gemma 3. Gemma 4 is natively multimodal (trained with image
tokens from the start), but whether EOI gates is for ``find_gates`` to show.

Without torchvision the processor cannot be built (its video processor needs it):
:func:`allow_image_only_processor` makes ``Gemma4Processor`` image- and audio-only there.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Any, Mapping, Optional

import torch
from transformer_lens.model_bridge.generalized_components import RMSNormalizationBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.supported_architectures.gemma4 import (
    Gemma4ArchitectureAdapter,
)

from tl_vlm.core.attention_bridge import HookedAttentionBridge, use_hooked_attention
from tl_vlm.core.family import Family
from tl_vlm.core.layout import ImageLayout, LayoutError


class Gemma4AttentionBridge(HookedAttentionBridge):
    """Hooked attention whose ``hook_v`` is the value attention reads: ``v_norm``'s
    output ``[batch, pos, kv_head, d_head]`` (HF normalises values without a scale, and
    on ``attention_k_eq_v`` layers they come from ``k_proj``: there is no ``v_proj``).
    A KV-shared layer has neither and no ``hook_v``."""

    hook_aliases = {**HookedAttentionBridge.hook_aliases, "hook_v": "v_norm.hook_out"}


class Gemma4Adapter(Gemma4ArchitectureAdapter):
    """TL's Gemma 4 adapter with hooked attention, and three additions:

    - the residual norms (``ln1``, ``ln1_post``, ``ln2``, ``ln2_post``, ``ln_final``) are
      TL's ``RMSNormalizationBridge`` (HF's forward, plus ``hook_scale`` and
      ``hook_normalized``, which direct logit attribution reads) instead of bare
      components; Gemma 4's norms scale by ``w`` (no ``1 + w``), as TL's config says;
    - ``hook_v`` is the value attention reads (:class:`Gemma4AttentionBridge`), and the
      q/k/v norm hook points are kept;
    - ``per_layer_projection_norm`` (E2B/E4B only): the context half of the per-layer
      inputs, ``[batch, pos, layer, d_per_layer]``, computed from the input embeddings
      with the image features in them. It is the second way an image enters the decoder
      (besides the residual stream): patching a whole input patches it too.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        blocks = self.component_mapping["blocks"]
        tl_attn = blocks.submodules["attn"]
        norms = {k: tl_attn.submodules[k] for k in ("q_norm", "k_norm", "v_norm")
                 if k in tl_attn.submodules}
        use_hooked_attention(self)
        # use_hooked_attention keeps q/k/v/o only; keep TL's norm hook points too, and
        # read hook_v after v_norm.
        hooked = blocks.submodules["attn"]
        blocks.submodules["attn"] = Gemma4AttentionBridge(
            name=hooked.name, config=self.cfg, submodules={**hooked.submodules, **norms})
        for key in ("ln1", "ln1_post", "ln2", "ln2_post"):
            blocks.submodules[key] = RMSNormalizationBridge(
                name=blocks.submodules[key].name, config=self.cfg)
        self.component_mapping["ln_final"] = RMSNormalizationBridge(
            name=self.component_mapping["ln_final"].name, config=self.cfg)
        self.component_mapping["per_layer_projection_norm"] = GeneralizedComponent(
            name="model.language_model.per_layer_projection_norm", optional=True)


def soft_cap(model: Any):
    """Gemma 4's final soft-cap, ``tanh(logits / c) * c`` with ``c`` the text config's
    ``final_logit_softcapping`` (identity where it is None)."""
    cap = getattr(model.hf_model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is None:
        return lambda logits: logits
    return lambda logits: torch.tanh(logits / cap) * cap


class Gemma4Layout(ImageLayout):
    """BOI, a ``rows x cols`` run of soft tokens (aspect-ratio dependent), EOI."""

    placeholder = "<|image|>"
    content_token = "<|image|>"
    boi_token = "<|image>"
    eoi_token = "<image|>"
    native = True
    gate_description = "`<image|>` (EOI; test with find_gates)"
    processor_counted = ("image",)
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token",
                        "boi_token": "boi_token", "eoi_token": "eoi_token"}

    def processor_images(self, per_prompt: list[list[Any]]) -> Any:
        """Nested, one list per prompt: Gemma4Processor checks the count per prompt."""
        return [list(imgs) for imgs in per_prompt]

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        """Each image's soft-token grid from its patch positions: the real patches span
        ``(max y + 1) x (max x + 1)`` patches, pooled ``k x k``."""
        if "pixel_values" not in inputs:
            return []
        positions = inputs.get("image_position_ids")
        if positions is None:
            raise LayoutError("Gemma 4 needs the processor's image_position_ids to know each "
                              "image's grid; pass the processor's full output")
        k = int(self.config.vision_config.pooling_kernel_size)
        grids = []
        for n, pos in enumerate(torch.as_tensor(positions)):
            real = pos[(pos >= 0).all(dim=-1)]
            cols, rows = (int(v) + 1 for v in real.max(dim=0).values)
            if rows % k or cols % k or real.shape[0] != rows * cols:
                raise LayoutError(f"image {n}: patch positions of a {rows}x{cols} patch grid "
                                  f"do not pool into {k}x{k} soft tokens")
            grids.append((rows // k, cols // k))
        return grids


# -- an image-only Gemma4Processor where torchvision is missing ------------------------
_building = threading.local()


class _NoVideoProcessor:
    """Stands in for Gemma 4's video processor, which needs torchvision."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError("Gemma 4 video inputs need transformers' video processor, which "
                          "needs torchvision (not installed); tl_vlm handles images only")


def allow_image_only_processor() -> bool:
    """Let ``Gemma4Processor`` be built, saved and loaded without a video processor.

    Its ``__init__`` names all four sub-processors as keywords, so the generic
    positional trick of :mod:`tl_vlm.core.hf_compat` does not apply: while it runs, the
    processor takes a stand-in video processor (its class check skipped: the video
    processor classes cannot even be looked up); afterwards ``get_attributes`` leaves ``video_processor`` out, so
    ``save_pretrained``/``from_pretrained`` neither write nor look for one, and a video
    input raises a clear error. Nothing changes where torchvision is installed. Returns
    whether it applied.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return False
    from transformers import Gemma4Processor

    if getattr(Gemma4Processor, "_tl_vlm_image_only", False):
        return True
    attributes, init = Gemma4Processor.get_attributes.__func__, Gemma4Processor.__init__
    check = Gemma4Processor.check_argument_for_proper_class
    stand_in = _NoVideoProcessor()

    def get_attributes(cls: type) -> list[str]:
        names = attributes(cls)
        return names if getattr(_building, "on", False) else [
            n for n in names if n != "video_processor"]

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument is stand_in:   # the video processor class cannot be looked up
            return type(stand_in)
        return check(self, argument_name, argument)

    @functools.wraps(init)  # keeps the signature, which get_attributes reads
    def __init__(self, *args: Any, video_processor: Any = None, **kwargs: Any) -> None:
        _building.on = True
        try:
            init(self, *args, video_processor=stand_in, **kwargs)
        finally:
            _building.on = False
        self.__dict__.pop("video_processor", None)

    Gemma4Processor.get_attributes = classmethod(get_attributes)
    Gemma4Processor.check_argument_for_proper_class = check_argument_for_proper_class
    Gemma4Processor.__init__ = __init__
    Gemma4Processor.video_processor = stand_in
    Gemma4Processor._tl_vlm_image_only = True
    return True


allow_image_only_processor()

FAMILY = Family(
    name="gemma4",
    title="Gemma 4",
    image_tokens="`<|image>` + rows x cols `<|image|>` (at most 280) + `<image|>`",
    architectures=("Gemma4ForConditionalGeneration",),
    adapter=Gemma4Adapter,
    layout=Gemma4Layout,
    example_ids=("google/gemma-4-E4B-it", "google/gemma-4-E2B-it", "google/gemma-4-31B-it",
                 "google/gemma-4-26B-A4B-it"),
    final_logits=soft_cap,
)
