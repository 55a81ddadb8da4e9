"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``).

HF classes: ``LlavaOnevisionForConditionalGeneration`` -> ``model.vision_tower``
(SigLIP), ``model.multi_modal_projector``, ``model.image_newline`` (a learned vector),
``model.language_model`` (Qwen2), ``lm_head``. TL 4.3's
``LlavaOnevisionArchitectureAdapter`` maps these (SigLIP bridge for the tower); tl_vlm
keeps its mapping and routes text attention through the hooked attention function.

Processor: without torchvision, ``LlavaOnevisionProcessor`` is made image-only by
:mod:`tl_vlm.core.hf_compat`.

Layout: every image feature is the same ``<image>`` id; there is no BOI, EOI or gate.
What the run holds depends on how many images its prompt has (``batch_num_images``):

* a prompt's only image is split into anyres tiles: first the base image, ``s x s``
  features (``s = vision image_size // patch_size``) row-major with no newline; then
  the tiles stitched into one ``(tiles_h * s) x (tiles_w * s)`` map, unpadded back to
  the image's aspect ratio (and shrunk by bilinear interpolation when larger than
  ``anyres_max_N`` tiles allow), written row by row with one ``image_newline`` feature
  after every row;
* in a prompt with several images each image is its base ``s x s`` features followed
  by a single newline feature.

Grid convention ``(image, row, col)``: base features are rows ``0..s-1``, cols
``0..s-1``; tile-map features continue below the base, rows ``s..s+H-1``, cols
``0..W-1`` (``H x W`` the unpadded, possibly shrunk, tile map). Newline features are
``row_breaks``; they are not in ``image`` and have no grid entry. All of it is derived
from ``image_sizes``, ``batch_num_images``, ``image_grid_pinpoints`` and
``vision_aspect_ratio`` exactly as ``pack_image_features`` builds the features, and the
ids must hold exactly those many ``<image>`` tokens (else :class:`LayoutError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from transformer_lens.model_bridge.supported_architectures.llava_onevision import (
    LlavaOnevisionArchitectureAdapter,
)

from tl_vlm.core.anyres import tile_map_box, unpadded_tile_map
from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import GridQueue, ImageLayout, LayoutError, RowLayout, runs
from tl_vlm.core.layout import ImageView, padded_square_box


class LlavaOnevisionAdapter(LlavaOnevisionArchitectureAdapter):
    """TL's LLaVA-OneVision adapter with hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        use_hooked_attention(self)


@dataclass(frozen=True)
class OnevisionImage:
    """How one image's features are packed (what ``pack_image_features`` builds).

    Attributes:
        side: columns of the base grid (``vision image_size // patch_size``).
        n_base: base features (``side * side`` for the towers OneVision ships with).
        tile_rows, tile_cols: the unpadded tile map (0 x 0 in multi-image prompts).
        images_in_prompt: the prompt's ``batch_num_images`` entry.
        image_size: the picture's ``(height, width)`` (the processor's ``image_sizes``).
    """

    side: int
    n_base: int
    tile_rows: int
    tile_cols: int
    images_in_prompt: int
    image_size: Optional[tuple[int, int]] = None

    @property
    def tiled(self) -> bool:
        return self.images_in_prompt == 1

    @property
    def length(self) -> int:
        """Number of ``<image>`` tokens of this image."""
        if self.tiled:
            return self.n_base + self.tile_rows * (self.tile_cols + 1)
        return self.n_base + 1

    def place(self, start: int, n_img: int, out: RowLayout) -> None:
        """Write this image's positions, starting at ``start``, into ``out``."""
        for k in range(self.n_base):
            out.image.append(start + k)
            out.grid.append((n_img, k // self.side, k % self.side))
        p = start + self.n_base
        if not self.tiled:  # one newline after the base features
            out.row_breaks.append(p)
            return
        base_rows = -(-self.n_base // self.side)
        for r in range(self.tile_rows):
            for c in range(self.tile_cols):
                out.image.append(p)
                out.grid.append((n_img, base_rows + r, c))
                p += 1
            out.row_breaks.append(p)
            p += 1


def _tile_map(height: int, width: int, pinpoints: list, tile_px: int, side: int,
              aspect: str) -> tuple[int, int]:
    """(rows, cols) of the unpadded (and possibly shrunk) tile feature map of an image."""
    _, _, _, cur_h, cur_w = unpadded_tile_map(height, width, pinpoints, tile_px, side)
    max_tiles = int(aspect.strip("anyres_max_"))
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
    if ratio > 1.1:  # the model shrinks the map by bilinear interpolation
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return cur_h, cur_w


class LlavaOnevisionLayout(ImageLayout):
    """``<image>`` features: base grid, then tile rows each ended by a newline feature.

    See the module docstring for the packing and the grid convention. ``image_grids``
    returns one :class:`OnevisionImage` per image (not a plain (rows, cols): the
    feature map is not a rectangle); newline features are ``row_breaks``.
    """

    placeholder = "<image>"
    content_token = "<image>"
    native = False
    gate_description = "none (no end-of-image token)"
    processor_counted = ("image", "row_breaks")  # features and newlines
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token"}

    def processor_images(self, per_prompt: list[list[Any]]) -> Any:
        # Nested, so the processor counts images per prompt (``batch_num_images``):
        # that count decides between anyres tiles (1 image) and base-only (several).
        return [list(imgs) for imgs in per_prompt]

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[OnevisionImage]]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            if inputs.get("pixel_values") is not None:
                raise LayoutError("LLaVA-OneVision inputs with pixel_values need image_sizes")
            return None
        sizes = [tuple(int(v) for v in hw) for hw in torch.as_tensor(sizes).tolist()]
        counts = inputs.get("batch_num_images")
        # Without batch_num_images the model tiles every image; mirror that.
        per_image = ([1] * len(sizes) if counts is None
                     else [int(n) for n in torch.as_tensor(counts).tolist() for _ in range(int(n))])
        if len(per_image) != len(sizes):
            raise LayoutError(
                f"batch_num_images counts {len(per_image)} images but image_sizes has {len(sizes)}"
            )
        cfg, vision = self.config, self.config.vision_config
        side = vision.image_size // vision.patch_size
        tower_tokens = getattr(self.processor, "num_image_tokens", None) or side * side
        n_base = tower_tokens - int(cfg.vision_feature_select_strategy == "default")
        aspect = getattr(cfg, "vision_aspect_ratio", None) or "anyres_max_9"
        out = []
        for (h, w), n in zip(sizes, per_image):
            rows = cols = 0
            if n == 1:
                rows, cols = _tile_map(h, w, cfg.image_grid_pinpoints, vision.image_size,
                                       side, aspect)
            out.append(OnevisionImage(side, n_base, rows, cols, n, (h, w)))
        return out

    def image_views(self, rows: int, cols: int, image_size: Optional[tuple[int, int]] = None,
                    meta: Any = None) -> list[ImageView]:
        """The base grid and, for a prompt's only image, the anyres tile map.

        The base grid covers the whole picture when the image is tiled (the processor
        resizes it to ``image_size x image_size``) and the picture padded to a centred
        square in a multi-image prompt. The tile map covers the picture as the model
        unpads it (see :func:`~tl_vlm.core.anyres.tile_map_box`), below the base rows in
        ``positions.grid``.
        ``meta`` is the image's :class:`OnevisionImage` (from :meth:`image_grids`).
        """
        if not isinstance(meta, OnevisionImage):
            raise LayoutError(
                "LLaVA-OneVision needs the image's OnevisionImage record (layout.image_grids("
                "batch.inputs)) to split its tokens into the base grid and the tiles")
        if image_size is not None and meta.image_size is not None \
                and tuple(image_size) != tuple(meta.image_size):
            raise LayoutError(
                f"the picture is {image_size[1]}x{image_size[0]} (width x height) but the "
                f"processor saw {meta.image_size[1]}x{meta.image_size[0]}; pass the "
                f"example's own pictures, in prompt order")
        base_rows = -(-meta.n_base // meta.side)
        if image_size is None:  # token units: the tiles drawn as their own map
            return [ImageView("base", 0, base_rows, meta.side,
                              (0.0, 0.0, float(meta.side), float(base_rows))),
                    *([ImageView("tiles", base_rows, meta.tile_rows, meta.tile_cols,
                                 (0.0, 0.0, float(meta.tile_cols), float(meta.tile_rows)))]
                      if meta.tiled else [])]
        height, width = image_size
        if not meta.tiled:
            return [ImageView("base", 0, base_rows, meta.side, padded_square_box(height, width))]
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
        plans: list[OnevisionImage] = []
        for start, end in runs(ids, {content}):
            p = start
            while p < end:  # back-to-back placeholders make one run of several images
                plan = grids.pop()
                if plan is None:
                    raise LayoutError(
                        "LLaVA-OneVision positions need the processor's image_sizes; pass "
                        "the processor's full output"
                    )
                if p + plan.length > end:
                    raise LayoutError(
                        f"image {n_img} at position {p}: the metadata gives {plan.length} "
                        f"<image> features but the run has {end - p} left; were the ids "
                        f"truncated or image_sizes/batch_num_images changed?"
                    )
                plan.place(p, n_img, out)
                plans.append(plan)
                p += plan.length
                n_img += 1
        for plan in plans:
            if plan.images_in_prompt != len(plans):
                raise LayoutError(
                    f"batch_num_images says {plan.images_in_prompt} image(s) for a prompt "
                    f"whose ids hold {len(plans)}"
                )
        return out


FAMILY = Family(
    name="llava_onevision",
    title="LLaVA-OneVision",
    image_tokens="`<image>` features: base + anyres tiles, a newline feature per row",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    adapter=LlavaOnevisionAdapter,
    layout=LlavaOnevisionLayout,
    example_ids=("llava-hf/llava-onevision-qwen2-0.5b-ov-hf",),
)
