"""Aya Vision (``AyaVisionForConditionalGeneration``: aya-vision-8b / 32b).

HF classes: ``AyaVisionForConditionalGeneration`` -> ``model.vision_tower`` (SigLIP),
``model.multi_modal_projector`` (pixel shuffle by ``downsample_factor``, LayerNorm,
SwiGLU), ``model.language_model`` (``Cohere2Model``: parallel attention + MLP after one
LayerNorm, sliding-window layers with RoPE and full layers without) and ``lm_head``.
The HF forward multiplies ``lm_head``'s output by ``text_config.logit_scale``;
:data:`FAMILY` declares it (``final_logits``) for the logit lens. TL 4.3 has no Aya
Vision adapter; :class:`AyaVisionAdapter` is its Cohere2 mapping moved under
``model.language_model`` plus the tower and projector, with text attention through the
hooked attention function (HF's attention module still chooses RoPE or NoPE per layer
and HF builds the sliding-window masks).

Layout (``AyaVisionProcessor`` with ``GotOcr2ImageProcessor``, ``crop_to_patches``): the
picture is resized to the ``cols x rows`` grid of ``img_size`` tiles whose aspect ratio
is closest to its own (``min_patches``..``max_patches`` tiles) and cut row-major; with
more than one tile, a thumbnail of the whole picture follows. Each ``<image>`` of the
prompt becomes, in token ids: ``<|START_OF_IMG|>`` (BOI); per tile the label text
``"TILE_k"`` (k from 1) and ``(img_size / patch_size)^2`` x ``<|IMG_PATCH|>``; the label
``"TILE_GLOBAL"`` and the thumbnail's ``<|IMG_PATCH|>`` run; ``<|END_OF_IMG|>`` (EOI).
A picture that fits one tile has only the ``TILE_GLOBAL`` part (the whole picture).
``<|IMG_LINE_BREAK|>`` is never written. The labels are however many tokens the
tokenizer makes of them (``TILE`` and ``TILE_GLOBAL`` may be single tokens, the tile
number is text), all in ``specials``; no token is a row break. Grid convention
``(image, row, col)``: tile ``k`` (0-based) holds rows ``k*side .. k*side+side-1``, the
thumbnail the ``side`` rows after the last tile, so the grid follows the token order.

The processor drops its ``num_patches`` output: the tiles are counted from the
``<|IMG_PATCH|>`` runs of the ids and checked against the frames in ``pixel_values``
(one per tile and thumbnail, the whole batch's frames stacked) and against
``(img_size / patch_size)^2`` tokens per run (:class:`LayoutError` otherwise).

Gate candidate: ``<|END_OF_IMG|>`` (EOI); the model is not native (a SigLIP tower
feeds a text LM), so it is recorded as a non-native comparison, as for Gemma 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from transformer_lens.model_bridge.generalized_components import (
    SiglipVisionEncoderBridge,
    VisionProjectionBridge,
)
from transformer_lens.model_bridge.supported_architectures.cohere import (
    Cohere2ArchitectureAdapter,
)

from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import GridQueue, ImageLayout, ImageView, LayoutError, RowLayout

AYA_VISION = "AyaVisionForConditionalGeneration"


class AyaVisionAdapter(Cohere2ArchitectureAdapter):
    """TL's Cohere2 mapping under ``model.language_model``, SigLIP tower, projector,
    hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_multimodal = True
        vision = cfg.vision_config      # the tower's sizes, for its attention hooks
        self.cfg.vision_hidden_size = vision.hidden_size
        self.cfg.vision_num_layers = vision.num_hidden_layers
        self.cfg.vision_num_heads = vision.num_attention_heads
        self._reprefix_components("model.", "model.language_model.")
        self.component_mapping = {
            "vision_encoder": SiglipVisionEncoderBridge(name="model.vision_tower", config=self.cfg),
            "vision_projector": VisionProjectionBridge(name="model.multi_modal_projector"),
            **self.component_mapping,
        }
        use_hooked_attention(self)


def logit_scale(model: Any):
    """Aya Vision's ``logits * text_config.logit_scale`` after ``lm_head``."""
    scale = float(model.hf_model.config.get_text_config().logit_scale)
    return lambda logits: logits * scale


@dataclass(frozen=True)
class TiledImage:
    """How one image was tiled (read from its ``<|IMG_PATCH|>`` runs).

    Attributes:
        n_tiles: tiles before the thumbnail (0 when the picture fit one tile: then the
            only run is the ``TILE_GLOBAL`` one, the whole picture).
        side: features per tile side (``img_size / patch_size``).
    """

    n_tiles: int
    side: int

    @property
    def frames(self) -> int:
        """Frames the vision tower sees: the tiles and the thumbnail (or the one tile)."""
        return self.n_tiles + 1


class AyaVisionLayout(ImageLayout):
    """``<|START_OF_IMG|>``, labelled tiles of ``<|IMG_PATCH|>``, thumbnail, ``<|END_OF_IMG|>``.

    See the module docstring for the token layout and the grid. ``image_grids`` returns
    one :class:`TiledImage` per image.
    """

    placeholder = "<image>"
    content_token = "<|IMG_PATCH|>"
    boi_token = "<|START_OF_IMG|>"
    eoi_token = "<|END_OF_IMG|>"
    native = False
    gate_description = "none (non-native); candidate: `<|END_OF_IMG|>`"
    # image_token_ids: patches, TILE, TILE_GLOBAL, START and END (not the tile numbers)
    processor_counted = ("boi", "image", "specials", "eoi")
    processor_tokens = {"placeholder": "image_token", "content_token": "img_patch_token",
                        "boi_token": "start_of_img_token", "eoi_token": "end_of_img_token"}

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        img_size, patch = int(processor.img_size), int(processor.patch_size)
        self.side = img_size // patch
        vision = config.vision_config
        tower = vision.image_size // vision.patch_size
        if tower % config.downsample_factor or tower // config.downsample_factor != self.side:
            raise LayoutError(
                f"the processor writes ({img_size} // {patch})^2 <|IMG_PATCH|> per tile but the "
                f"model makes ({tower} / {config.downsample_factor})^2 features; processor and "
                f"model come from different checkpoints?")
        # AyaVisionProcessor pads on the left unless the tokenizer was created with a
        # padding_side; record the tokenizer's own so HookedVLM.prepare(padding_side=...)
        # (which sets tokenizer.padding_side) is what the processor uses.
        self.tokenizer.init_kwargs.setdefault("padding_side", self.tokenizer.padding_side)

    def processor_images(self, per_prompt: list[list[Any]]) -> Any:
        return [list(imgs) for imgs in per_prompt]

    # -- parsing -------------------------------------------------------------------
    def parse(self, ids: list[int]) -> list[tuple[int, list[int], list[int], int]]:
        """``(boi, run starts, label positions, eoi)`` per image of one unpadded sequence."""
        start, end = self.token_id(self.boi_token), self.token_id(self.eoi_token)
        patch, seq = self.token_id(self.content_token), self.side * self.side
        images, i, n = [], 0, len(ids)
        while i < n:
            if ids[i] in (patch, end):
                raise LayoutError(
                    f"position {i}: {self._name(ids[i])} outside an image block; write each "
                    f"image as the placeholder {self.placeholder!r} and let the processor "
                    f"expand it")
            if ids[i] != start:
                i += 1
                continue
            n_img, boi, runs, labels, p = len(images), i, [], [], i + 1
            while True:
                label = p
                while p < n and ids[p] not in (patch, start, end):
                    p += 1
                if p >= n or ids[p] == start:
                    raise LayoutError(f"image {n_img}: no {self.eoi_token!r} after the "
                                      f"{self.boi_token!r} at position {boi}; was it truncated?")
                if ids[p] == end:
                    if p != label or not runs:
                        raise LayoutError(f"image {n_img}: {self.eoi_token!r} at position {p} "
                                          f"must follow a run of {self.content_token!r}")
                    break
                if p == label:
                    raise LayoutError(f"image {n_img}: the {self.content_token!r} run at "
                                      f"position {p} has no tile label before it")
                q = p
                while q < n and ids[q] == patch:
                    q += 1
                if q - p != seq:
                    raise LayoutError(
                        f"image {n_img}: {q - p} {self.content_token!r} at position {p}, but "
                        f"every tile has ({self.processor.img_size} // "
                        f"{self.processor.patch_size})^2 = {seq}")
                labels.extend(range(label, p))
                runs.append(p)
                p = q
            images.append((boi, runs, labels, p))
            i = p + 1
        return images

    def _name(self, tid: int) -> str:
        return f"{self.tokenizer.convert_ids_to_tokens(tid)!r} (id {tid})"

    # -- metadata ------------------------------------------------------------------
    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[TiledImage]]:
        """One :class:`TiledImage` per image, in batch order: the tiles counted from the
        ids, checked against the frames of ``pixel_values``."""
        ids = inputs.get("input_ids")
        if ids is None:
            return None
        ids = torch.as_tensor(ids)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        out = [TiledImage(len(runs) - 1, self.side)
               for b in range(len(ids)) for _, runs, _, _ in self.parse(ids[b, mask[b].bool()].tolist())]
        pixels = inputs.get("pixel_values")
        frames = 0 if pixels is None else int(torch.as_tensor(pixels).shape[0])
        if sum(t.frames for t in out) != frames:
            raise LayoutError(
                f"the token ids hold {len(out)} image(s) of {sum(t.frames for t in out)} tiles "
                f"and thumbnails but pixel_values holds {frames}; pass the processor's full "
                f"output")
        return out

    # -- locating ------------------------------------------------------------------
    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        out, side = RowLayout(), self.side
        for n_img, (boi, runs, labels, eoi) in enumerate(self.parse(ids)):
            meta = grids.pop()
            if meta is not None and meta.n_tiles != len(runs) - 1:
                raise LayoutError(f"image {n_img}: {len(runs) - 1} tiles in the ids, "
                                  f"{meta.n_tiles} in the metadata")
            out.boi.append(boi)
            out.eoi.append(eoi)
            out.gate.append(eoi)
            out.specials.extend(labels)
            for k, start in enumerate(runs):
                for j in range(side * side):
                    out.image.append(start + j)
                    out.grid.append((n_img, k * side + j // side, j % side))
        return out

    # -- geometry ------------------------------------------------------------------
    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of tiles the image processor cuts a picture into (1 x 1: no
        thumbnail), by its own rule (``get_optimal_tiled_canvas``)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            get_optimal_tiled_canvas,
        )

        ip, tile = self.processor.image_processor, int(self.processor.img_size)
        cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile),
                                              int(ip.min_patches), int(ip.max_patches))
        return rows, cols

    def image_views(self, rows: int, cols: int, image_size: Optional[tuple[int, int]] = None,
                    meta: Any = None) -> list[ImageView]:
        """One view per tile (``"tile k"``, 1-based as the labels) and the ``"global"``
        thumbnail. The picture is stretched to whole tiles, so tile ``k`` covers an equal
        share of it in the processor's ``rows x cols`` arrangement; the thumbnail (or the
        only tile) covers all of it. In token units (no picture) tiles are drawn side by
        side. ``meta`` is the image's :class:`TiledImage` (from :meth:`image_grids`).
        """
        if not isinstance(meta, TiledImage):
            raise LayoutError(
                "an Aya Vision image needs its TiledImage record (layout.image_grids("
                "batch.inputs)) to cut its tokens into tiles and the thumbnail")
        side, views = meta.side, []
        if image_size is not None and meta.n_tiles:
            h, w = image_size
            t_rows, t_cols = self.tile_grid(h, w)
            if t_rows * t_cols != meta.n_tiles:
                raise LayoutError(
                    f"a {w}x{h} (width x height) picture is cut into {t_rows}x{t_cols} tiles "
                    f"but the image has {meta.n_tiles}; pass the example's own pictures")
        for k in range(meta.n_tiles):
            if image_size is None:
                box = (float(k * side), 0.0, float((k + 1) * side), float(side))
            else:
                r, c = divmod(k, t_cols)
                box = (c * w / t_cols, r * h / t_rows, (c + 1) * w / t_cols, (r + 1) * h / t_rows)
            views.append(ImageView(f"tile {k + 1}", k * side, side, side,
                                   tuple(float(v) for v in box)))
        whole = ((0.0, 0.0, float(side), float(side)) if image_size is None
                 else (0.0, 0.0, float(image_size[1]), float(image_size[0])))
        views.append(ImageView("global", meta.n_tiles * side, side, side, whole))
        return views


FAMILY = Family(
    name="aya_vision",
    title="Aya Vision",
    image_tokens=("`<|START_OF_IMG|>` + per tile `TILE_k` + 169 x `<|IMG_PATCH|>`, then "
                  "`TILE_GLOBAL` + 169 x `<|IMG_PATCH|>` + `<|END_OF_IMG|>`"),
    architectures=(AYA_VISION,),
    adapter=AyaVisionAdapter,
    layout=AyaVisionLayout,
    example_ids=("CohereLabs/aya-vision-8b", "CohereLabs/aya-vision-32b"),
    final_logits=logit_scale,
)
