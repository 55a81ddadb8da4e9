"""Idefics3 (``Idefics3ForConditionalGeneration``: Idefics3-8B-Llama3, SmolVLM v1,
granite-docling), and the split-image layout SmolVLM2 shares (:mod:`tl_vlm.adapters.smolvlm`).

HF classes: ``Idefics3ForConditionalGeneration`` -> ``model.vision_model``
(``Idefics3VisionTransformer``, SigLIP-like: ``embeddings``, ``encoder.layers.{i}``,
``post_layernorm``), ``model.connector`` (pixel shuffle by ``scale_factor``, then
``modality_projection``), ``model.text_model`` (Llama) and ``lm_head``. TL 4.3's
``Idefics3ArchitectureAdapter`` maps these (its SigLIP bridge names the tower's parts as
in ``SiglipVisionModel``, one level deeper, so :class:`Idefics3Adapter` renames them);
tl_vlm keeps its mapping and routes text attention through the hooked attention function.

Layout (``Idefics3Processor``; SmolVLM's processor writes the same). The processor
resizes a picture so its longest edge is ``size["longest_edge"]``, rounds each side up
to a multiple of ``max_image_size["longest_edge"]`` (the crop side) and cuts it into
``R x C`` crops, row-major; a global view (the whole picture resized to one crop) comes
last. Each ``<image>`` of the prompt becomes, in token ids:

* per crop ``(r, c)``, 1-based: ``<fake_token_around_image>``, ``<row_r_col_c>``, then
  ``image_seq_len`` x ``<image>`` (the crop's pixel-shuffled features, a square
  ``side x side`` grid, row-major); after the last crop of each crop row the text
  ``"\\n"``;
* then ``"\\n"``, ``<fake_token_around_image>``, ``<global-img>``, ``image_seq_len`` x
  ``<image>`` (the global view) and a closing ``<fake_token_around_image>``.

An image the processor does not split (``R = C = 0``) is only the global part, without
its ``"\\n"``. Position sets: the first ``<fake_token_around_image>`` of an image is its
BOI and the closing one its EOI (and gate); the other ``<fake_token_around_image>``,
the ``<row_r_col_c>`` tokens and ``<global-img>`` are ``specials``; the ``"\\n"`` text
after each crop row is ``row_breaks`` (as many tokens as the tokenizer makes of it: a
BPE tokenizer may merge the last row's ``"\\n"`` with the global view's into one
``"\\n\\n"`` token; the layout takes whatever non-marker tokens it finds there). Grid convention ``(image, row, col)``: crop ``k`` (row-major, 0-based)
holds rows ``k*side .. k*side+side-1``, cols ``0..side-1``; the global view holds the
``side`` rows after the last crop, so the grid follows the token order.

The processor drops its ``rows``/``cols`` outputs, so the crop grid is read from the
``<row_r_col_c>`` tokens, and checked against the crops in ``pixel_values`` (frames that
are all zero are padding, as the model itself decides) and against ``image_seq_len``
``<image>`` tokens per crop (:class:`LayoutError` otherwise).

Gate candidate: the closing ``<fake_token_around_image>`` after the global view (EOI);
the model is not native (a SigLIP tower feeds a text LM), so it is recorded as a
non-native comparison, as for Gemma 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from transformer_lens.model_bridge.supported_architectures.idefics3 import (
    Idefics3ArchitectureAdapter,
)

from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import Box, GridQueue, ImageLayout, ImageView, LayoutError, RowLayout

IDEFICS3 = "Idefics3ForConditionalGeneration"
#: the crop markers the processors know (``<row_1_col_1>`` .. ``<row_6_col_6>``)
MAX_CROPS_PER_SIDE = 6


class Idefics3Adapter(Idefics3ArchitectureAdapter):
    """TL's Idefics3 adapter, its tower's parts renamed, with hooked attention.

    ``Idefics3VisionTransformer`` holds ``embeddings``, ``encoder.layers`` and
    ``post_layernorm`` directly (TL's SigLIP bridge looks one ``vision_model.`` deeper).
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        vision = self.component_mapping["vision_encoder"]
        for key, name in (("embeddings", "embeddings"), ("encoder_layers", "encoder.layers"),
                          ("post_layernorm", "post_layernorm")):
            vision.submodules[key].name = name
        use_hooked_attention(self)


@dataclass(frozen=True)
class SplitImage:
    """How one image was split (read from its ``<row_r_col_c>`` tokens).

    Attributes:
        crop_rows, crop_cols: the crop grid (0 x 0 when the image was not split).
        side: features per crop side (``sqrt(image_seq_len)``).
    """

    crop_rows: int
    crop_cols: int
    side: int

    @property
    def n_crops(self) -> int:
        """Crops, without the global view."""
        return self.crop_rows * self.crop_cols

    @property
    def frames(self) -> int:
        """Frames the vision tower sees for this image: the crops and the global view."""
        return self.n_crops + 1


@dataclass
class _Block:
    """One image's positions in an unpadded sequence (see :meth:`SplitImageLayout.parse`)."""

    boi: int
    eoi: int = -1
    crops: list = field(default_factory=list)   # (row, col, first content position), 1-based
    global_start: int = -1
    specials: list = field(default_factory=list)
    row_breaks: list = field(default_factory=list)


class SplitImageLayout(ImageLayout):
    """Crops wrapped in ``<fake_token_around_image><row_r_col_c>``, then a global view.

    See the module docstring for the token layout, the position sets and the grid.
    ``image_grids`` returns one :class:`SplitImage` per image.
    """

    placeholder = "<image>"
    content_token = "<image>"
    boi_token = "<fake_token_around_image>"
    eoi_token = "<fake_token_around_image>"
    global_token = "<global-img>"
    native = False
    gate_description = ("none (non-native); candidate: the closing "
                        "`<fake_token_around_image>` after the global view")
    # Idefics3Processor marks the whole replacement, from the first wrapper to the last.
    processor_counted = ("boi", "image", "row_breaks", "specials", "eoi")
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token",
                        "boi_token": "fake_image_token", "eoi_token": "fake_image_token",
                        "global_token": "global_image_tag"}

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        vision = config.vision_config
        per_side = vision.image_size // vision.patch_size
        scale = int(config.scale_factor)
        if per_side % scale:
            raise LayoutError(f"{per_side} patches per side do not pixel-shuffle by {scale}")
        self.side = per_side // scale
        seq = getattr(processor, "image_seq_len", None)
        if seq is not None and int(seq) != self.side * self.side:
            raise LayoutError(
                f"the processor writes image_seq_len={seq} <image> tokens per crop but the "
                f"model makes {self.side}x{self.side} features; processor and model come from "
                f"different checkpoints?")
        self._crop_ids: Optional[dict[int, tuple[int, int]]] = None

    def processor_images(self, per_prompt: list[list[Any]]) -> Any:
        """Nested, one list per prompt (SmolVLM's processor needs it; Idefics3's takes it)."""
        return [list(imgs) for imgs in per_prompt]

    # -- token ids -----------------------------------------------------------------
    def crop_token_ids(self) -> dict[int, tuple[int, int]]:
        """id of ``<row_r_col_c>`` -> ``(r, c)`` (1-based), for the markers the tokenizer has."""
        if self._crop_ids is None:
            tok, out = self.tokenizer, {}
            for r in range(1, MAX_CROPS_PER_SIDE + 1):
                for c in range(1, MAX_CROPS_PER_SIDE + 1):
                    tid = tok.convert_tokens_to_ids(f"<row_{r}_col_{c}>")
                    if tid is not None and tid != tok.unk_token_id:
                        out[int(tid)] = (r, c)
            self._crop_ids = out
        return self._crop_ids

    # -- parsing -------------------------------------------------------------------
    def parse(self, ids: list[int]) -> list[_Block]:
        """The image blocks of one unpadded sequence, checked token by token."""
        fake, content = self.token_id(self.boi_token), self.token_id(self.content_token)
        glob, crops = self.token_id(self.global_token), self.crop_token_ids()
        seq, n = self.side * self.side, len(ids)
        markers = {fake, content, glob, *crops}
        blocks: list[_Block] = []
        i = 0
        while i < n:
            if ids[i] != fake:
                if ids[i] in markers:
                    raise LayoutError(
                        f"position {i}: image token {self._name(ids[i])} outside an image block; "
                        f"write each image as the placeholder {self.placeholder!r} and let the "
                        f"processor expand it")
                i += 1
                continue
            block = _Block(boi=i)
            p = i
            while True:
                nxt = ids[p + 1] if p + 1 < n else None
                if p != i:
                    block.specials.append(p)     # a wrapper inside the image
                if nxt in crops:
                    block.specials.append(p + 1)
                    block.crops.append((*crops[nxt], p + 2))
                    q = self._content_run(ids, p + 2, content, seq, len(blocks))
                    while q < n and ids[q] not in markers:    # the "\n" after a crop row
                        block.row_breaks.append(q)
                        q += 1
                    if q >= n or ids[q] != fake:
                        raise LayoutError(
                            f"image {len(blocks)}: the crop at position {p} is not followed by "
                            f"{self.boi_token!r}; was the prompt truncated?")
                    p = q
                elif nxt == glob:
                    block.specials.append(p + 1)
                    block.global_start = p + 2
                    q = self._content_run(ids, p + 2, content, seq, len(blocks))
                    self.expect_token(ids, q, "eoi", len(blocks))
                    block.eoi = q
                    break
                else:
                    found = "nothing" if nxt is None else self._name(nxt)
                    raise LayoutError(
                        f"image {len(blocks)}: {self.boi_token!r} at position {p} is followed by "
                        f"{found}, not a crop marker <row_r_col_c> or {self.global_token!r}")
            self._check_crops(block, len(blocks))
            blocks.append(block)
            i = block.eoi + 1
        return blocks

    def _name(self, tid: int) -> str:
        return f"{self.tokenizer.convert_ids_to_tokens(tid)!r} (id {tid})"

    def _content_run(self, ids: list[int], start: int, content: int, seq: int, n_img: int) -> int:
        q = start
        while q < len(ids) and ids[q] == content:
            q += 1
        if q - start != seq:
            raise LayoutError(
                f"image {n_img}: {q - start} {self.content_token!r} tokens at position {start}, "
                f"but each crop and the global view have image_seq_len = {seq}")
        return q

    def _check_crops(self, block: _Block, n_img: int) -> None:
        """Crops must be (1,1), (1,2), .., (R,C) in order, "\\n" only after each crop row."""
        cells = [(r, c) for r, c, _ in block.crops]
        rows = max((r for r, _ in cells), default=0)
        cols = max((c for _, c in cells), default=0)
        if cells != [(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)]:
            raise LayoutError(f"image {n_img}: crop markers out of order or missing: {cells}")
        # Every crop row ends in "\n" text (BPE tokenizers may merge it with the global view's).
        breaks = set(block.row_breaks)
        for r, c, start in block.crops:
            after = start + self.side * self.side
            if (c == cols) != (after in breaks):
                raise LayoutError(
                    f"image {n_img}: the text after crop ({r},{c}) at position {after} should be "
                    f"{'a' if c == cols else 'no'} row break")

    # -- metadata ------------------------------------------------------------------
    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[SplitImage]]:
        """One :class:`SplitImage` per image, in batch order: the crop grid from the
        ``<row_r_col_c>`` tokens, checked against the frames of ``pixel_values``."""
        ids = inputs.get("input_ids")
        if ids is None:
            return None
        mask = inputs.get("attention_mask")
        ids = torch.as_tensor(ids)
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        frames = self._frames_per_example(inputs.get("pixel_values"), len(ids))
        out = []
        for b in range(len(ids)):
            row = ids[b, mask[b].bool()].tolist()
            found = []
            for block in self.parse(row):
                rows = block.crops[-1][0] if block.crops else 0
                cols = block.crops[-1][1] if block.crops else 0
                found.append(SplitImage(rows, cols, self.side))
            if frames is not None and sum(s.frames for s in found) != frames[b]:
                raise LayoutError(
                    f"example {b}: the token ids hold {len(found)} image(s) of "
                    f"{sum(s.frames for s in found)} frames (crops + global views) but "
                    f"pixel_values holds {frames[b]}; pass the processor's full output")
            out.extend(found)
        return out

    @staticmethod
    def _frames_per_example(pixels: Any, batch: int) -> Optional[list[int]]:
        """Real frames per example of ``pixel_values`` [batch, frames, 3, h, w] (all-zero
        frames are padding, as the model decides), or None without pixels."""
        if pixels is None:
            return None
        pixels = torch.as_tensor(pixels)
        if pixels.ndim != 5 or pixels.shape[0] != batch:
            raise LayoutError(f"pixel_values of shape {tuple(pixels.shape)}: expected "
                              f"[{batch}, frames, channels, height, width]")
        real = (pixels != 0).flatten(2).any(-1)
        return real.sum(-1).tolist()

    # -- locating ------------------------------------------------------------------
    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        out = RowLayout()
        side = self.side
        for n_img, block in enumerate(self.parse(ids)):
            meta = grids.pop()
            rows = block.crops[-1][0] if block.crops else 0
            cols = block.crops[-1][1] if block.crops else 0
            if meta is not None and (meta.crop_rows, meta.crop_cols) != (rows, cols):
                raise LayoutError(f"image {n_img}: {rows}x{cols} crops in the ids, "
                                  f"{meta.crop_rows}x{meta.crop_cols} in the metadata")
            out.boi.append(block.boi)
            out.eoi.append(block.eoi)
            out.gate.append(block.eoi)
            out.specials.extend(block.specials)
            out.row_breaks.extend(block.row_breaks)
            starts = [start for _, _, start in block.crops] + [block.global_start]
            for k, start in enumerate(starts):
                for j in range(side * side):
                    out.image.append(start + j)
                    out.grid.append((n_img, k * side + j // side, j % side))
        out.specials.sort()
        return out

    # -- geometry ------------------------------------------------------------------
    def image_views(self, rows: int, cols: int, image_size: Optional[tuple[int, int]] = None,
                    meta: Any = None) -> list[ImageView]:
        """One view per crop (``"crop r,c"``, 1-based) and the ``"global"`` view.

        The processor stretches the picture to ``R x C`` whole crops, so crop ``(r, c)``
        covers the picture's ``r``-th of ``R`` rows and ``c``-th of ``C`` columns; the
        global view is the whole picture resized to one crop. In token units (no picture)
        the crops are drawn stitched in their grid and the global view on its own.
        ``meta`` is the image's :class:`SplitImage` (from :meth:`image_grids`).
        """
        if not isinstance(meta, SplitImage):
            raise LayoutError(
                "a split image needs its SplitImage record (layout.image_grids(batch.inputs)) "
                "to cut its tokens into crops and the global view")
        side, views = meta.side, []
        h, w = (None, None) if image_size is None else image_size
        for k in range(meta.n_crops):
            r, c = divmod(k, meta.crop_cols)
            if image_size is None:
                box = (float(c * side), float(r * side), float((c + 1) * side), float((r + 1) * side))
            else:
                box = (c * w / meta.crop_cols, r * h / meta.crop_rows,
                       (c + 1) * w / meta.crop_cols, (r + 1) * h / meta.crop_rows)
            views.append(ImageView(f"crop {r + 1},{c + 1}", k * side, side, side,
                                   tuple(float(v) for v in box)))
        whole = (0.0, 0.0, float(side), float(side)) if image_size is None else \
            (0.0, 0.0, float(w), float(h))
        views.append(ImageView("global", meta.n_crops * side, side, side, whole))
        return views

    def picture_box(self, height: int, width: int) -> Box:
        """The whole picture (every crop and the global view come from all of it)."""
        return (0.0, 0.0, float(width), float(height))


class Idefics3Layout(SplitImageLayout):
    """Idefics3's processor (``global_image_tag``; it marks every token of an image)."""


FAMILY = Family(
    name="idefics3",
    title="Idefics3, SmolVLM (v1)",
    image_tokens=("per crop `<fake_token_around_image>` `<row_r_col_c>` + 169 x `<image>`, "
                  "`\\n` after each crop row; `\\n<fake_token_around_image><global-img>` + "
                  "169 x `<image>` + `<fake_token_around_image>`"),
    architectures=(IDEFICS3,),
    adapter=Idefics3Adapter,
    layout=Idefics3Layout,
    example_ids=("HuggingFaceM4/Idefics3-8B-Llama3", "HuggingFaceTB/SmolVLM-Instruct",
                 "ibm-granite/granite-docling-258M"),
)
