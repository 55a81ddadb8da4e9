"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``).

HF classes (``transformers.models.llava_next.modeling_llava_next``):
``LlavaNextForConditionalGeneration`` -> ``model.vision_tower`` (CLIP ViT-L/14 at 336 px),
``model.multi_modal_projector``, ``model.image_newline`` (a learned vector),
``model.language_model`` (Mistral, Vicuna/Llama, ...), ``lm_head``. TL 4.3's
``LlavaNextArchitectureAdapter`` (TL's LLaVA mapping) maps these; tl_vlm keeps its
mapping and routes text attention through the hooked attention function.

Processor (``LlavaNextProcessor`` + ``LlavaNextImageProcessor``): every image, also in a
prompt with several, becomes a base image (the whole picture resized to ``tile_px`` x
``tile_px``) and the "anyres" tiles of the pinpoint resolution that fits the picture best
(:mod:`tl_vlm.core.anyres`); ``image_sizes`` records each picture's size.

Layout (token ids): every image feature is the same ``<image>`` id; there is no BOI, EOI
or row-break id. Per image, as ``pack_image_features`` builds it: first the base image,
``n_base`` features (``s x s``, ``s = vision image_size // patch_size``, the CLS feature
dropped by the "default" strategy), row-major with no newline; then the tiles stitched
into one ``(tiles_h * s) x (tiles_w * s)`` map, unpadded back to the picture's aspect
ratio, written row by row with one ``image_newline`` feature after every row. The
processor marks all of them (``mm_token_type_ids``).

Grid convention ``(image, row, col)``: base features are rows ``0..s-1``, cols ``0..s-1``;
tile-map features continue below the base, rows ``s..s+H-1``, cols ``0..W-1`` (``H x W``
the unpadded tile map). Newline features are ``row_breaks``; they are not in ``image``
and have no grid entry. All of it is derived from ``image_sizes`` and
``image_grid_pinpoints``, and each run of ``<image>`` ids must hold exactly those many
tokens (else :class:`LayoutError`).

Gate candidate: none (no end-of-image token). The last tile row's newline feature ends
every image; whether anything gathers there is for
:func:`~tl_vlm.analyses.gates.find_gates` to say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from transformer_lens.model_bridge.supported_architectures.llava_next import (
    LlavaNextArchitectureAdapter,
)

from tl_vlm.core.anyres import tile_map_box, unpadded_tile_map
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.family import Family
from tl_vlm.core.layout import GridQueue, ImageLayout, ImageView, LayoutError, RowLayout, runs


class LlavaNextAdapter(LlavaNextArchitectureAdapter):
    """TL's LLaVA-NeXT adapter with hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        use_hooked_attention(self)


@dataclass(frozen=True)
class NextImage:
    """How one image's features are packed (what ``pack_image_features`` builds).

    Attributes:
        side: columns of the base grid (``vision image_size // patch_size``).
        n_base: base features (``side * side`` for a CLIP tower with its CLS dropped).
        tile_rows, tile_cols: the unpadded tile map.
        image_size: the picture's ``(height, width)`` (the processor's ``image_sizes``).
    """

    side: int
    n_base: int
    tile_rows: int
    tile_cols: int
    image_size: Optional[tuple[int, int]] = None

    @property
    def base_rows(self) -> int:
        return -(-self.n_base // self.side)

    @property
    def length(self) -> int:
        """Number of ``<image>`` tokens of this image (base, tile rows, newlines)."""
        return self.n_base + self.tile_rows * (self.tile_cols + 1)

    def place(self, start: int, n_img: int, out: RowLayout) -> None:
        """Write this image's positions, starting at ``start``, into ``out``."""
        for k in range(self.n_base):
            out.image.append(start + k)
            out.grid.append((n_img, k // self.side, k % self.side))
        p = start + self.n_base
        for r in range(self.tile_rows):
            for c in range(self.tile_cols):
                out.image.append(p)
                out.grid.append((n_img, self.base_rows + r, c))
                p += 1
            out.row_breaks.append(p)   # the image_newline feature ending the row
            p += 1


class LlavaNextLayout(ImageLayout):
    """``<image>`` features: base grid, then tile rows each ended by a newline feature.

    See the module docstring for the packing and the grid convention. ``image_grids``
    returns one :class:`NextImage` per image (the feature map is not a rectangle);
    newline features are ``row_breaks``.
    """

    placeholder = "<image>"
    content_token = "<image>"
    native = False
    gate_description = "none (no end-of-image token; use find_gates)"
    processor_counted = ("image", "row_breaks")  # features and newlines
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token"}

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[NextImage]]:
        sizes = inputs.get("image_sizes")
        pixels = inputs.get("pixel_values")
        if sizes is None:
            if pixels is not None:
                raise LayoutError("LLaVA-NeXT inputs with pixel_values need image_sizes")
            return None
        sizes = [tuple(int(v) for v in hw) for hw in torch.as_tensor(sizes).tolist()]
        if pixels is not None and int(pixels.shape[0]) != len(sizes):
            raise LayoutError(f"pixel_values holds {int(pixels.shape[0])} images but "
                              f"image_sizes {len(sizes)}")
        cfg, vision = self.config, self.config.vision_config
        side = vision.image_size // vision.patch_size
        tower = side * side + int(getattr(self.processor, "num_additional_image_tokens", 0) or 0)
        n_base = tower - int(cfg.vision_feature_select_strategy == "default")
        out = []
        for h, w in sizes:
            *_, rows, cols = unpadded_tile_map(h, w, cfg.image_grid_pinpoints, vision.image_size,
                                               side)
            out.append(NextImage(side, n_base, rows, cols, (h, w)))
        return out

    def image_views(self, rows: int, cols: int, image_size: Optional[tuple[int, int]] = None,
                    meta: Any = None) -> list[ImageView]:
        """The base grid (the whole picture, resized to a square) and the tile map (the
        picture as the model unpads it, :func:`~tl_vlm.core.anyres.tile_map_box`).
        ``meta`` is the image's :class:`NextImage` (from :meth:`image_grids`)."""
        if not isinstance(meta, NextImage):
            raise LayoutError(
                "LLaVA-NeXT needs the image's NextImage record (layout.image_grids("
                "batch.inputs)) to split its tokens into the base grid and the tiles")
        if image_size is not None and meta.image_size is not None \
                and tuple(image_size) != tuple(meta.image_size):
            raise LayoutError(
                f"the picture is {image_size[1]}x{image_size[0]} (width x height) but the "
                f"processor saw {meta.image_size[1]}x{meta.image_size[0]}; pass the "
                f"example's own pictures, in prompt order")
        base_rows = meta.base_rows
        if image_size is None:  # token units: the tiles drawn as their own map
            return [ImageView("base", 0, base_rows, meta.side,
                              (0.0, 0.0, float(meta.side), float(base_rows))),
                    ImageView("tiles", base_rows, meta.tile_rows, meta.tile_cols,
                              (0.0, 0.0, float(meta.tile_cols), float(meta.tile_rows)))]
        height, width = image_size
        vision = self.config.vision_config
        tiles = tile_map_box(height, width, self.config.image_grid_pinpoints, vision.image_size,
                             meta.side)
        return [ImageView("base", 0, base_rows, meta.side, (0.0, 0.0, float(width), float(height))),
                ImageView("tiles", base_rows, meta.tile_rows, meta.tile_cols, tiles)]

    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        """Split each run of ``<image>`` ids into images by their metadata lengths."""
        content = self.token_id(self.content_token)
        out = RowLayout()
        n_img = 0
        for start, end in runs(ids, {content}):
            p = start
            while p < end:  # back-to-back placeholders make one run of several images
                plan = grids.pop()
                if plan is None:
                    raise LayoutError(
                        "LLaVA-NeXT positions need the processor's image_sizes; pass the "
                        "processor's full output")
                if p + plan.length > end:
                    raise LayoutError(
                        f"image {n_img} at position {p}: the metadata gives {plan.length} "
                        f"<image> features but the run has {end - p} left; were the ids "
                        f"truncated or image_sizes changed?")
                plan.place(p, n_img, out)
                p += plan.length
                n_img += 1
        return out


FAMILY = Family(
    name="llava_next",
    title="LLaVA-NeXT (1.6)",
    image_tokens="`<image>` features: base + anyres tiles, a newline feature per tile row",
    architectures=("LlavaNextForConditionalGeneration",),
    adapter=LlavaNextAdapter,
    layout=LlavaNextLayout,
    example_ids=("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf",
                 "llava-hf/llama3-llava-next-8b-hf"),
)
