"""Llama 4 (``Llama4ForConditionalGeneration``: Llama 4 Scout and Maverick).

HF classes (``transformers.models.llama4.modeling_llama4``):
``Llama4ForConditionalGeneration`` -> ``vision_model`` (``Llama4VisionModel``: a ViT per
tile with a CLS token, then pixel shuffle (ratio 0.5: 2x2 patches per feature) and an
MLP), ``multi_modal_projector``, ``language_model`` (``Llama4ForCausalLM``:
``language_model.model`` is the ``Llama4TextModel``, then ``language_model.lm_head``).
TL 4.3's ``Llama4MultimodalArchitectureAdapter`` maps these; tl_vlm keeps its mapping and
routes attention through the hooked attention function. The HF attention module keeps
doing what is particular to Llama 4, before the attention function is called:

- **chunked attention + NoPE layers**: every 4th layer (``no_rope_layers[i] == 0``) uses
  no RoPE and attends over the whole past (``full_attention``); the others apply the
  interleaved complex RoPE, then a weightless L2 q/k norm (``use_qk_norm``: Scout, not
  Maverick), and attend only inside their chunk of ``attention_chunk_size`` (8192)
  tokens (``chunked_attention``). HF builds both masks; they reach the attention
  function as ``attention_mask``, so ``hook_pattern`` shows the chunks.
- **temperature tuning** on NoPE layers: queries are scaled by
  ``1 + attn_scale * log1p(floor((i + 1) / floor_scale))`` with ``i`` the index in the
  padded sequence (``floor_scale`` 8192: no change before 8192 tokens). ``hook_rot_q``
  is after the scaling (and after RoPE and the q/k norm); with left padding beyond 8192
  tokens the scale counts the pad tokens, as in HF.
- **MoE interleaved with dense layers**: ``moe_layers`` (Scout: every layer; Maverick:
  every second one) hold a routed expert block plus a shared expert, the others a dense
  gated MLP under the same name (TL's ``mlp`` with ``router``, ``shared_expert`` and
  ``dense_*`` hook points).

Layout (``Llama4Processor._prompt_split_image``, from token ids): each ``<|image|>`` in
the prompt becomes ``<|image_start|>`` (BOI), then, when the picture is cut into more than
one tile, for each tile row: the row's tiles, each ``n`` x ``<|patch|>`` (``n = (336 /
14)^2 / 4 = 144``, a 12x12 grid) separated by ``<|tile_x_separator|>``, the row ended by
``<|tile_y_separator|>``; then ``<|image|>`` and the global view (the whole picture
resized to one tile, ``n`` x ``<|patch|>``), and ``<|image_end|>`` (EOI). A picture that
fits one tile has only ``<|image|>`` + ``n`` patches. The tile grid ``(rows, cols)`` is
the processor's ``aspect_ratios``: the canvas of at most ``max_patches`` (16) 336 px
tiles that needs the least up-scaling (or least down-scaling), the smallest such.

In ``positions``: ``image`` are the ``<|patch|>`` tokens; ``grid`` stacks the blocks top
to bottom: tile ``t`` (row-major over the tile grid) on rows ``t*12 .. t*12+11``, the
global view below the tiles (a one-tile picture has the global view only);
``row_breaks`` are the ``<|tile_y_separator|>`` tokens; ``specials`` the
``<|tile_x_separator|>`` tokens and the ``<|image|>`` before the global view;
``boi``/``eoi`` the start/end tokens, and ``gate`` is ``<|image_end|>``, the natural gate
candidate (Llama 4 is natively multimodal, early fusion; ``find_gates`` tests it).
:meth:`Llama4Layout.image_views` puts each tile and the global view on the picture.

Without torchvision transformers has no Llama 4 image processor (it exists only as a
torchvision one): :class:`Llama4ImageProcessorPil` is registered for Llama 4 checkpoints
there. It follows the torchvision processor step by step; its layout (tile grid, aspect
ratios, token counts) is the same, its pixels differ slightly (PIL's bilinear resize).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch
from transformer_lens.model_bridge.supported_architectures.llama4_multimodal import (
    Llama4MultimodalArchitectureAdapter,
)
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs

from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.family import Family
from tl_vlm.core.layout import GridQueue, ImageLayout, ImageView, LayoutError, RowLayout


class Llama4Adapter(Llama4MultimodalArchitectureAdapter):
    """TL's Llama 4 multimodal adapter with hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        use_hooked_attention(self)


# -- the tile grid, as the processor chooses it -------------------------------------------
def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every ``(height, width)`` canvas of at most ``max_tiles`` square tiles, in the
    order transformers' ``find_supported_resolutions`` lists them."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [(r * tile, c * tile) for pairs in by_ratio.values() for r, c in pairs]


def best_canvas(height: int, width: int, canvases: list[tuple[int, int]],
                resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas a ``height x width`` picture is fitted into (``get_best_fit``): the
    smallest up-scaling (the largest with ``resize_to_max_canvas``), else the least
    down-scaling; among equal scales the smallest canvas."""
    scales = [min(h / height, w / width) for h, w in canvases]
    up = [s for s in scales if s >= 1]
    chosen = (max(up) if resize_to_max_canvas else min(up)) if up else max(scales)
    fits = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(fits, key=lambda c: c[0] * c[1])


def resized_size(height: int, width: int, canvas: tuple[int, int], tile: int,
                 resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The picture's size inside its canvas (aspect ratio kept, never up-scaled past one
    tile unless ``resize_to_max_canvas``); the canvas is padded right and below."""
    target_h, target_w = canvas
    if not resize_to_max_canvas:
        target_h = min(max(height, tile), target_h)
        target_w = min(max(width, tile), target_w)
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


class Llama4ImageProcessorKwargs(ImagesKwargs, total=False):
    """The torchvision processor's two own options (its module needs torchvision)."""

    max_patches: int
    resize_to_max_canvas: bool


class Llama4ImageProcessorPil(PilBackend):
    """``Llama4ImageProcessor`` on PIL/NumPy: fit the picture into the best canvas of
    ``max_patches`` tiles (pad right/below), cut it into tiles, add the picture resized
    to one tile as a global view when there are several tiles; rescale and normalise
    in bfloat16 as the original. Outputs ``pixel_values`` ``[tiles, 3, 336, 336]``
    (all images' tiles in order) and ``aspect_ratios`` ``[images, 2]``."""

    model_input_names = ["pixel_values"]
    valid_kwargs = Llama4ImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 336, "width": 336}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_patches = 16
    resize_to_max_canvas = False

    def _normalise(self, image: np.ndarray, do_rescale: bool, rescale_factor: float,
                   do_normalize: bool, mean: Any, std: Any) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image))
        if do_rescale:
            x = x.to(torch.bfloat16) * rescale_factor if do_normalize else x.float() * rescale_factor
        if do_normalize:
            shape = (-1, 1, 1)
            x = (x - torch.tensor(mean, dtype=x.dtype).view(shape)) / torch.tensor(
                std, dtype=x.dtype).view(shape)
        return x

    def _preprocess(self, images: list, do_resize: bool, size: Any, resample: Any,
                    do_rescale: bool, rescale_factor: float, do_normalize: bool,
                    image_mean: Any, image_std: Any, return_tensors: Any = None,
                    max_patches: int = 16, resize_to_max_canvas: bool = False,
                    **kwargs: Any) -> BatchFeature:
        if not do_resize:
            raise ValueError("Llama 4 always resizes images to one of its canvases")
        if size.height != size.width:
            raise ValueError("`size` must be square.")
        tile = size.height
        canvases = supported_canvases(max_patches, tile)
        tiles, ratios = [], []
        for image in images:
            height, width = image.shape[-2:]
            canvas = best_canvas(height, width, canvases, resize_to_max_canvas)
            new_h, new_w = resized_size(height, width, canvas, tile, resize_to_max_canvas)
            resized = self.resize(image, SizeDict(height=new_h, width=new_w), resample=resample)
            padded = np.zeros((resized.shape[0], *canvas), dtype=resized.dtype)
            padded[:, :new_h, :new_w] = resized
            x = self._normalise(padded, do_rescale, rescale_factor, do_normalize,
                                image_mean, image_std)
            rows, cols = canvas[0] // tile, canvas[1] // tile
            x = x.view(x.shape[0], rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
            tiles.extend(x.reshape(rows * cols, x.shape[2], tile, tile))
            if rows * cols > 1:
                glob = self.resize(image, SizeDict(height=tile, width=tile), resample=resample)
                tiles.append(self._normalise(glob, do_rescale, rescale_factor,
                                             do_normalize, image_mean, image_std))
            ratios.append([rows, cols])
        data = {"pixel_values": torch.stack(tiles), "aspect_ratios": torch.tensor(ratios)}
        return BatchFeature(data=data, tensor_type=return_tensors)


def allow_pil_image_processor() -> Optional[type]:
    """Where torchvision is missing, register :class:`Llama4ImageProcessorPil` as the
    Llama 4 image processor (saved and loaded as ``Llama4ImageProcessor``, the name in
    the released ``preprocessor_config.json``; legacy ``...Fast`` names resolve to it
    too). Returns the class, or None where torchvision is installed."""
    if importlib.util.find_spec("torchvision") is not None:
        return None
    global _REGISTERED
    if not _REGISTERED:
        from transformers import Llama4Config
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

        IMAGE_PROCESSOR_MAPPING.register(
            Llama4Config, {"torchvision": "Llama4ImageProcessor", "pil": Llama4ImageProcessorPil},
            exist_ok=True)
        _REGISTERED = True
    return Llama4ImageProcessorPil


_REGISTERED = False


allow_pil_image_processor()


# -- the layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Llama4Image:
    """One image's token geometry: its tile grid (``aspect_ratios``) and the side of each
    tile's (and the global view's) square of features."""

    tile_rows: int
    tile_cols: int
    side: int

    @property
    def n_tiles(self) -> int:
        """Tiles before the global view (0 when the picture fits one tile)."""
        n = self.tile_rows * self.tile_cols
        return n if n > 1 else 0


class Llama4Layout(ImageLayout):
    """BOI, tiles (x/y separators), ``<|image|>`` + global view, EOI."""

    placeholder = "<|image|>"
    content_token = "<|patch|>"
    boi_token = "<|image_start|>"
    eoi_token = "<|image_end|>"
    row_break_token = "<|tile_y_separator|>"
    tile_separator_token = "<|tile_x_separator|>"
    global_token = "<|image|>"
    native = True
    gate_description = "`<|image_end|>` (EOI; test with find_gates)"
    processor_counted = ("image",)
    processor_tokens = {"placeholder": "fake_image_token", "content_token": "img_patch_token",
                        "boi_token": "start_of_img_token", "eoi_token": "end_of_img_token",
                        "row_break_token": "tile_global_token",
                        "tile_separator_token": "tile_token", "global_token": "image_token"}

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[Llama4Image]]:
        """Each image's :class:`Llama4Image`, in batch order.

        ``Llama4Processor`` drops the image processor's ``aspect_ratios`` from its output,
        so the tile grid of each image is read from its separators in the ids (rows: the
        ``<|tile_y_separator|>`` tokens; columns: one more than the
        ``<|tile_x_separator|>`` tokens per row) and checked against what the processor
        did return: ``pixel_values`` must hold exactly those tiles (plus one global view
        per tiled image), each of the tile size the tower reads. Where ``aspect_ratios``
        is given (the image processor's own output), it must agree too.
        """
        if "pixel_values" not in inputs:
            return []
        pixels = inputs["pixel_values"]
        vision = self.config.vision_config
        tile = int(pixels.shape[-1])
        side = int(tile // vision.patch_size * vision.pixel_shuffle_ratio)
        tok = {k: self.token_id(getattr(self, f"{k}_token"))
               for k in ("boi", "eoi", "row_break", "tile_separator")}
        grids = []
        for row in torch.as_tensor(inputs["input_ids"]).tolist():
            for start in (i for i, t in enumerate(row) if t == tok["boi"]):
                stop = next((i for i in range(start, len(row)) if row[i] == tok["eoi"]), len(row))
                span = row[start:stop]
                rows, xs = span.count(tok["row_break"]), span.count(tok["tile_separator"])
                if (rows == 0 and xs) or (rows and xs % rows):
                    raise LayoutError(f"image {len(grids)}: {xs} tile separators do not make "
                                      f"{rows} equal rows of tiles")
                grids.append(Llama4Image(max(rows, 1), xs // rows + 1 if rows else 1, side))
        ratios = inputs.get("aspect_ratios")
        if ratios is not None and torch.as_tensor(ratios).tolist() != [
                [g.tile_rows, g.tile_cols] for g in grids]:
            raise LayoutError(f"aspect_ratios {torch.as_tensor(ratios).tolist()} disagree with "
                              f"the tile grids in the ids")
        tiles = sum(g.n_tiles + 1 for g in grids)
        if tiles != pixels.shape[0]:
            raise LayoutError(f"pixel_values hold {pixels.shape[0]} tiles but the ids' "
                              f"{len(grids)} image(s) need {tiles} (tiles plus global views); "
                              f"pass the processor's full output for these prompts")
        return grids

    def locate(self, input_ids: Any, attention_mask: Any, inputs: Mapping[str, Any]) -> Any:
        """As :meth:`ImageLayout.locate`; the tile grids are read from these ``input_ids``
        (not from ``inputs["input_ids"]``, which may be other ids)."""
        return super().locate(input_ids, attention_mask, {**inputs, "input_ids": input_ids})

    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        """Each BOI starts an image; its tokens must be exactly what the processor writes
        for the image's tile grid."""
        tok = {k: self.token_id(getattr(self, f"{k}_token")) for k in
               ("content", "boi", "eoi", "row_break", "tile_separator", "global")}
        out = RowLayout()
        starts = [i for i, t in enumerate(ids) if t == tok["boi"]]
        for n_img, start in enumerate(starts):
            meta = grids.pop()
            if meta is None:
                raise LayoutError("Llama 4 images need the processor's metadata (aspect_ratios)")
            p = start + 1
            out.boi.append(start)

            def take(kind: str, what: str) -> int:
                nonlocal p
                if p >= len(ids) or ids[p] != tok[kind]:
                    found = ("nothing (the sequence ends there)" if p >= len(ids) else
                             f"{self.tokenizer.convert_ids_to_tokens(ids[p])!r} (id {ids[p]})")
                    raise LayoutError(
                        f"image {n_img}: expected {what} at position {p} for a "
                        f"{meta.tile_rows}x{meta.tile_cols} tile grid of {meta.side}x"
                        f"{meta.side} features, but found {found}; was the prompt truncated, "
                        f"or the processor output of other images passed?")
                p += 1
                return p - 1

            def block(first_row: int) -> None:
                for k in range(meta.side * meta.side):
                    out.image.append(take("content", f"{self.content_token!r}"))
                    out.grid.append((n_img, first_row + k // meta.side, k % meta.side))

            if meta.n_tiles:
                for ty in range(meta.tile_rows):
                    for tx in range(meta.tile_cols):
                        block((ty * meta.tile_cols + tx) * meta.side)
                        if tx < meta.tile_cols - 1:
                            out.specials.append(take("tile_separator",
                                                     f"{self.tile_separator_token!r}"))
                    out.row_breaks.append(take("row_break", f"{self.row_break_token!r}"))
            out.specials.append(take("global", f"{self.global_token!r}"))
            block(meta.n_tiles * meta.side)
            out.eoi.append(take("eoi", f"EOI {self.eoi_token!r}"))
            out.gate.append(out.eoi[-1])
        strays = [i for i, t in enumerate(ids) if t == tok["content"]]
        if len(strays) != len(out.image):
            raise LayoutError(f"{len(strays) - len(out.image)} {self.content_token!r} token(s) "
                              f"outside any <|image_start|> ... <|image_end|> block")
        return out

    def image_views(self, rows: int, cols: int, image_size: Optional[tuple[int, int]] = None,
                    meta: Any = None) -> list[ImageView]:
        """One view per tile (its part of the picture as fitted into the canvas; tiles
        that reach into the padding extend past the picture) and the global view (the
        whole picture). ``meta`` is the image's :class:`Llama4Image`."""
        if not isinstance(meta, Llama4Image):
            raise LayoutError("Llama 4 needs the image's Llama4Image record "
                              "(layout.image_grids(batch.inputs)) to place its tiles")
        side, views = meta.side, []
        if image_size is None:
            for t in range(meta.n_tiles):
                ty, tx = divmod(t, meta.tile_cols)
                views.append(ImageView(f"tile {ty},{tx}", t * side, side, side,
                                       (float(tx * side), float(ty * side),
                                        float((tx + 1) * side), float((ty + 1) * side))))
            box = (0.0, 0.0, float(side), float(side))
            return views + [ImageView("global", meta.n_tiles * side, side, side, box)]
        height, width = image_size
        ip = self.processor.image_processor
        tile = int(ip.size["height"] if isinstance(ip.size, Mapping) else ip.size.height)
        canvas = (meta.tile_rows * tile, meta.tile_cols * tile)
        new_h, new_w = resized_size(height, width, canvas, tile,
                                    bool(getattr(ip, "resize_to_max_canvas", False)))
        sy, sx = height / new_h, width / new_w        # picture pixels per canvas pixel
        for t in range(meta.n_tiles):
            ty, tx = divmod(t, meta.tile_cols)
            views.append(ImageView(f"tile {ty},{tx}", t * side, side, side,
                                   (tx * tile * sx, ty * tile * sy,
                                    (tx + 1) * tile * sx, (ty + 1) * tile * sy)))
        if not meta.n_tiles:   # one tile: the picture fitted into it, padded right/below
            return [ImageView("global", 0, side, side, (0.0, 0.0, tile * sx, tile * sy))]
        return views + [ImageView("global", meta.n_tiles * side, side, side,
                                  (0.0, 0.0, float(width), float(height)))]


FAMILY = Family(
    name="llama4",
    title="Llama 4",
    image_tokens=("`<|image_start|>` + per tile 144 x `<|patch|>` (`<|tile_x_separator|>` "
                  "between tiles, `<|tile_y_separator|>` after each tile row) + `<|image|>` "
                  "+ 144 x `<|patch|>` (global view) + `<|image_end|>`"),
    architectures=("Llama4ForConditionalGeneration",),
    adapter=Llama4Adapter,
    layout=Llama4Layout,
    example_ids=("meta-llama/Llama-4-Scout-17B-16E-Instruct",
                 "meta-llama/Llama-4-Maverick-17B-128E-Instruct"),
)
