"""InternVL 3 / 3.5 as converted to transformers (``InternVLForConditionalGeneration``).

HF classes (``transformers.models.internvl.modeling_internvl``):
``InternVLForConditionalGeneration`` -> ``model.vision_tower`` (``InternVLVisionModel``, an
InternViT with layer scale), ``model.multi_modal_projector`` (LayerNorm + 2 linears over
the pixel-shuffled features), ``model.language_model`` (``Qwen2Model`` for InternVL3,
``Qwen3Model`` for InternVL3.5, ``LlamaModel`` for a few sizes), ``lm_head``. TL 4.3
has no InternVL adapter; the module paths are LLaVA's, so tl_vlm starts from TL's
``LlavaArchitectureAdapter`` (whose optional q/k-norm entries cover Qwen3 towers), keeps
the InternViT tower whole (no TL bridge fits it) and routes text attention through the
hooked attention function.

Processor (``InternVLProcessor`` with ``GotOcr2ImageProcessor``): without torchvision it
is made image-only by :mod:`tl_vlm.core.hf_compat`. Each image is cut into tiles of
``size`` px (448): the tile grid ``cols x rows`` is the arrangement of at most
``max_patches`` (12) tiles whose aspect ratio is closest to the picture's (ties go to
more tiles while the picture's area exceeds half of theirs); the picture is resized to
exactly ``cols * 448 x rows * 448`` and cut row-major. When there is more than one tile, a
thumbnail (the whole picture resized to 448 x 448) is appended. Each tile goes through
the tower separately: ``(448 / 14)^2`` patches, the CLS feature dropped, pixel shuffle
0.5 -> ``16 x 16 = 256`` features, row-major. ``InternVLProcessor`` pops ``num_patches``,
so the processed batch does not say how many tiles each image has; the ids do.

Layout (token ids): the prompt writes the processor's ``image_token`` (``<IMG_CONTEXT>``)
once per image; the processor expands it to ``<img>`` (BOI), ``<IMG_CONTEXT>`` x
``256 * n_tiles``, ``</img>`` (EOI). No row breaks. The processor marks all three kinds
(``mm_token_type_ids``: ``image_token_ids`` = context, start, end).

Grid convention ``(image, row, col)``: tiles are stacked top to bottom in token order,
each a ``16 x 16`` block: tile ``k`` (row-major over the tile grid) has rows
``16k..16k+15`` and cols ``0..15``; the thumbnail, when there is one, is the last block.
:meth:`InternVLLayout.image_views` places each block on the picture (tile ``k`` covers
cell ``(k // cols, k % cols)`` of the picture cut into ``rows x cols``, the thumbnail the
whole picture).

Gate candidate: ``</img>``, the EOI right after the last (thumbnail) block; recorded as
``gate``. InternVL is not a native multimodal model, so whether it gates is for
:func:`~tl_vlm.analyses.gates.find_gates` to say.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.supported_architectures.llava import (
    LlavaArchitectureAdapter,
)

from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.family import Family
from tl_vlm.core.layout import GridQueue, ImageLayout, ImageView, LayoutError, RowLayout, runs


class InternVLAdapter(LlavaArchitectureAdapter):
    """TL's LLaVA adapter with the InternViT tower kept whole and hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        # TL's CLIP/SigLIP bridges do not fit InternViT (layer scale, its own module
        # names): wrap the tower whole (hook_in / hook_out), as pixtral.py does.
        self.component_mapping["vision_encoder"] = GeneralizedComponent(name="model.vision_tower")
        tl_attn = self.component_mapping["blocks"].submodules["attn"]
        norms = {k: tl_attn.submodules[k] for k in ("q_norm", "k_norm") if k in tl_attn.submodules}
        use_hooked_attention(self)
        # use_hooked_attention keeps q/k/v/o; keep the (optional) Qwen3 q/k norms too.
        self.component_mapping["blocks"].submodules["attn"].submodules.update(norms)


def tile_arrangement(height: int, width: int, tile: tuple[int, int], min_tiles: int,
                     max_tiles: int) -> tuple[int, int]:
    """``(cols, rows)`` of the tile grid GotOcr2's processor cuts a picture into.

    The arrangements of ``min_tiles..max_tiles`` tiles, fewest tiles first; the one whose
    aspect ratio (cols / rows) is closest to the picture's wins; on a tie the later one
    (more tiles) wins while the picture's area exceeds half of the tiles' area.

    Example:
        >>> tile_arrangement(480, 640, (448, 448), 1, 12)      # 4:3 exactly
        (4, 3)
        >>> tile_arrangement(1080, 1920, (448, 448), 1, 12)    # 2:1 twice; 8 tiles are kept
        (4, 2)
    """
    candidates = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                         if min_tiles <= c * r <= max_tiles), key=lambda cr: cr[0] * cr[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * cols * rows:
            best = (cols, rows)
    return best


class InternVLLayout(ImageLayout):
    """``<img>``, ``256 x <IMG_CONTEXT>`` per tile (tiles, then the thumbnail), ``</img>``.

    The default run-based locator reads each image (a run of ``<IMG_CONTEXT>`` between
    ``<img>`` and ``</img>``); :meth:`locate_row` only lays the run out as stacked
    ``side x side`` tile blocks (module docstring), refusing a run that is not a whole
    number of tiles. :meth:`locate` checks the tiles of the batch against
    ``pixel_values`` (one row per tile).
    """

    placeholder = "<IMG_CONTEXT>"
    content_token = "<IMG_CONTEXT>"
    boi_token = "<img>"
    eoi_token = "</img>"
    native = False
    gate_description = "`</img>` (EOI, after the thumbnail; non-native: test with find_gates)"
    processor_counted = ("boi", "image", "eoi")
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token",
                        "boi_token": "start_image_token", "eoi_token": "end_image_token"}

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        vision = config.vision_config
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        #: rows (= cols) of one tile's features after the pixel shuffle
        self.side = int(size // patch * config.downsample_ratio)
        # InternVLProcessor pads left unless the tokenizer was created with a padding
        # side; record the tokenizer's own, so that HookedVLM.prepare(padding_side=...)
        # (which sets tokenizer.padding_side) is what the processor uses.
        self.tokenizer.init_kwargs.setdefault("padding_side", self.tokenizer.padding_side)

    @property
    def tile_tokens(self) -> int:
        """Features (``<IMG_CONTEXT>`` tokens) per tile."""
        return self.side * self.side

    def locate(self, input_ids: Any, attention_mask: Any, inputs: Mapping[str, Any]) -> Any:
        positions = super().locate(input_ids, attention_mask, inputs)
        pixels = inputs.get("pixel_values")
        if pixels is not None:
            tiles = int(positions.image.counts.sum()) // self.tile_tokens
            if tiles != int(pixels.shape[0]):
                raise LayoutError(
                    f"the token ids hold {tiles} tile(s) of {self.tile_tokens} <IMG_CONTEXT> "
                    f"tokens but pixel_values has {int(pixels.shape[0])}; were prompts "
                    f"truncated, or the processor's image_seq_length changed?")
        return positions

    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        out = super().locate_row(ids, grids)
        content = self.token_id(self.content_token)
        n = self.tile_tokens
        for n_img, (start, end) in enumerate(runs(ids, {content})):
            if (end - start) % n:
                raise LayoutError(
                    f"image {n_img} at position {start}: {end - start} <IMG_CONTEXT> tokens "
                    f"are not a whole number of {n}-token tiles ({self.side}x{self.side} "
                    f"features each); was the image cut, or image_seq_length changed?")
        side = self.side
        out.grid = [(img, k // side, k % side) for img, count in _counts(out.grid)
                    for k in range(count)]
        return out

    def image_views(self, rows: int, cols: int, image_size: Optional[tuple[int, int]] = None,
                    meta: Any = None) -> list[ImageView]:
        """One view per tile block (``"tile r,c"``) and the ``"thumbnail"``.

        With a picture, the tile grid is worked out from its size with the image
        processor's ``min_patches``/``max_patches``/``size`` (:func:`tile_arrangement`)
        and must give the number of blocks the tokens hold. Without one, each block is
        drawn in token units (``"tile k"``), its arrangement unknown.
        """
        side = self.side
        if cols != side or rows % side:
            raise LayoutError(f"an InternVL image is a stack of {side}x{side} tile blocks; "
                              f"got a {rows}x{cols} grid")
        n_blocks = rows // side
        unit = (0.0, 0.0, float(side), float(side))
        if n_blocks == 1:
            box = unit if image_size is None else (0.0, 0.0, float(image_size[1]),
                                                   float(image_size[0]))
            return [ImageView("image", 0, side, side, box)]
        if image_size is None:
            return [ImageView(f"tile {k}", k * side, side, side, unit) for k in range(n_blocks - 1)] \
                + [ImageView("thumbnail", (n_blocks - 1) * side, side, side, unit)]
        height, width = image_size
        ip = self.processor.image_processor
        size = ip.size
        tile = (int(size["height"] if isinstance(size, Mapping) else size.height),
                int(size["width"] if isinstance(size, Mapping) else size.width))
        n_cols, n_rows = tile_arrangement(height, width, tile, int(ip.min_patches),
                                          int(ip.max_patches))
        if n_cols * n_rows + 1 != n_blocks:
            raise LayoutError(
                f"a {width}x{height} (width x height) picture is cut into {n_cols}x{n_rows} "
                f"tiles + a thumbnail = {n_cols * n_rows + 1} blocks by this processor, but "
                f"the tokens hold {n_blocks}; pass the example's own pictures, in prompt order")
        w, h = width / n_cols, height / n_rows
        views = [ImageView(f"tile {k // n_cols},{k % n_cols}", k * side, side, side,
                           ((k % n_cols) * w, (k // n_cols) * h,
                            (k % n_cols + 1) * w, (k // n_cols + 1) * h))
                 for k in range(n_cols * n_rows)]
        return views + [ImageView("thumbnail", n_cols * n_rows * side, side, side,
                                  (0.0, 0.0, float(width), float(height)))]


def _counts(grid: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """``(image, number of grid cells)`` per image, in order."""
    out: list[tuple[int, int]] = []
    for img, _, _ in grid:
        if out and out[-1][0] == img:
            out[-1] = (img, out[-1][1] + 1)
        else:
            out.append((img, 1))
    return out


FAMILY = Family(
    name="internvl",
    title="InternVL 3 / 3.5",
    image_tokens="`<img>` + 256 x `<IMG_CONTEXT>` per 448 px tile (tiles, then a thumbnail) "
                 "+ `</img>`",
    architectures=("InternVLForConditionalGeneration",),
    adapter=InternVLAdapter,
    layout=InternVLLayout,
    example_ids=("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-8B-hf",
                 "OpenGVLab/InternVL3_5-1B-HF"),
)
