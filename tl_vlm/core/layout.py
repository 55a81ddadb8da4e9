"""Image-token layouts: from token ids and processor metadata to :class:`ImagePositions`.

Each family's adapter module defines an :class:`ImageLayout` subclass. Most layouts
are "optional BOI, a run of content tokens (rows optionally ended by a break token),
optional EOI" and only set class attributes; layouts that differ (Emu3's size prefix,
LLaVA-OneVision's tiles) override :meth:`ImageLayout.locate_row`.

Positions come from token ids, never from decoded strings, and grids from the
processor's metadata (``image_grid_thw``, ``image_sizes``, ...) or from the break
tokens themselves. Any disagreement between the two raises :class:`LayoutError`.

Each layout also knows where its tokens lie on the picture (:meth:`ImageLayout.image_views`:
a centre crop for Chameleon and CLIP towers, a padded square for Janus, the whole
picture for Qwen2-VL, Pixtral, Emu3 and Gemma 3, a base grid and a tile map for
LLaVA-OneVision); :mod:`tl_vlm.plot` draws per-token scores with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_vlm.core.positions import ImagePositions, PositionSet


class LayoutError(ValueError):
    """Token ids, images and processor metadata disagree."""


Box = tuple[float, float, float, float]
"""``(left, top, right, bottom)`` in a picture's pixels (x to the right, y down)."""


@dataclass(frozen=True)
class ImageView:
    """A block of one image's content tokens and the part of the picture it covers.

    Most layouts have one view per image; LLaVA-OneVision has two for a prompt's only
    image (its ``base`` grid of the whole picture and its anyres ``tiles`` map).

    Attributes:
        name: ``"image"``, or OneVision's ``"base"`` / ``"tiles"``.
        first_row: the block's first row in ``positions.grid`` (OneVision numbers its
            tile rows after the base rows).
        rows, cols: the block's size in tokens; cells are equal, row-major.
        box: the block's extent in the picture's pixels. It may reach outside the
            picture (Janus pads the picture to a square) or stay inside it (a centre
            crop keeps the middle of a long picture). In token units
            ``(0, 0, cols, rows)`` when no picture size is known.

    Example:
        >>> view = ImageView("image", first_row=0, rows=2, cols=4, box=(0, 0, 40, 10))
        >>> view.cell(1, 2)                     # (left, top, right, bottom) of row 1, col 2
        (20.0, 5.0, 30.0, 10.0)
        >>> view.cell_size
        (5.0, 10.0)
    """

    name: str
    first_row: int
    rows: int
    cols: int
    box: Box

    @property
    def cell_size(self) -> tuple[float, float]:
        """(height, width) of one token's cell in picture pixels."""
        left, top, right, bottom = self.box
        return (bottom - top) / self.rows, (right - left) / self.cols

    def cell(self, row: int, col: int) -> Box:
        """The box of the token at ``row`` (counted inside this view) and ``col``."""
        h, w = self.cell_size
        left, top = self.box[0] + col * w, self.box[1] + row * h
        return (float(left), float(top), float(left + w), float(top + h))


def _size_of(size: Any, key: str) -> Optional[int]:
    """``size[key]`` of a processor size (a dict or transformers' ``SizeDict``), or None."""
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return None if value is None else int(value)


def padded_square_box(height: int, width: int) -> Box:
    """The square a processor pads a picture to (centred, as ``pad_to_square`` does).

    Example:
        >>> padded_square_box(600, 512)        # a portrait: padded left and right
        (-44.0, 0.0, 556.0, 600.0)
    """
    side = max(height, width)
    left, top = -((side - width) // 2), -((side - height) // 2)
    return (float(left), float(top), float(left + side), float(top + side))


def resize_crop_box(height: int, width: int, image_processor: Any) -> Box:
    """The part of a picture a CLIP-style image processor keeps, in the picture's pixels.

    Follows the processor's own flags: ``do_pad`` (pad to a square first, as LLaVA's
    processor can), ``do_resize`` with ``size`` (``shortest_edge``, or ``height`` and
    ``width``), then ``do_center_crop`` to ``crop_size``. Exact up to the processor's
    rounding of the resized size (under one resized pixel).

    Example (Chameleon's processor: shortest edge to 512, centre crop 512x512):
        >>> from types import SimpleNamespace
        >>> ip = SimpleNamespace(do_resize=True, size={"shortest_edge": 512},
        ...                      do_center_crop=True, crop_size={"height": 512, "width": 512})
        >>> resize_crop_box(600, 512, ip)      # the middle 512 rows of a 512x600 portrait
        (0.0, 44.0, 512.0, 556.0)
    """
    left, top, right, bottom = ((padded_square_box(height, width)
                                 if getattr(image_processor, "do_pad", False)
                                 else (0.0, 0.0, float(width), float(height))))
    h, w = bottom - top, right - left
    size = getattr(image_processor, "size", None) or {}
    short = _size_of(size, "shortest_edge")
    if not getattr(image_processor, "do_resize", True) or size == {}:
        rh, rw = h, w
    elif short is not None:
        rh, rw = h * short / min(h, w), w * short / min(h, w)
    else:
        rh, rw = _size_of(size, "height") or h, _size_of(size, "width") or w
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop:
        sy, sx = h / rh, w / rw                 # picture pixels per resized pixel
        ch, cw = _size_of(crop, "height"), _size_of(crop, "width")
        top, left = top + (rh - ch) / 2 * sy, left + (rw - cw) / 2 * sx
        bottom, right = top + ch * sy, left + cw * sx
    return (float(left), float(top), float(right), float(bottom))


@dataclass
class RowLayout:
    """Image-side positions of one (unpadded) example; ``grid`` rows are (image, row, col)."""

    boi: list[int] = field(default_factory=list)
    image: list[int] = field(default_factory=list)
    eoi: list[int] = field(default_factory=list)
    row_breaks: list[int] = field(default_factory=list)
    specials: list[int] = field(default_factory=list)
    gate: list[int] = field(default_factory=list)
    grid: list[tuple[int, int, int]] = field(default_factory=list)

    def shifted(self, offset: int) -> "RowLayout":
        names = ("boi", "image", "eoi", "row_breaks", "specials", "gate")
        moved = {n: [p + offset for p in getattr(self, n)] for n in names}
        return RowLayout(grid=list(self.grid), **moved)


class GridQueue:
    """The (rows, cols) of each image of a batch, handed out in order."""

    def __init__(self, grids: Optional[Sequence[tuple[int, int]]]) -> None:
        self._grids = None if grids is None else list(grids)
        self._next = 0

    def pop(self) -> Optional[tuple[int, int]]:
        if self._grids is None:
            return None
        if self._next >= len(self._grids):
            raise LayoutError(
                f"the token ids hold more images than the processor metadata describes "
                f"({len(self._grids)}); pass the processor's full output for these prompts"
            )
        self._next += 1
        return self._grids[self._next - 1]

    def check_exhausted(self) -> None:
        if self._grids is not None and self._next != len(self._grids):
            raise LayoutError(
                f"the processor metadata describes {len(self._grids)} images but the token "
                f"ids hold {self._next}; were prompts truncated or placeholders removed?"
            )


def runs(ids: Sequence[int], members: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of consecutive ids that belong to ``members``."""
    members = set(members)
    out, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        inside = t in members
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            out.append((start, i))
            start = None
    return out


class ImageLayout:
    """Where a family puts image tokens. Subclasses set the token strings below.

    Attributes:
        placeholder: what a prompt writes for one image before the processor expands it.
        content_token: the token id repeated once per image feature / VQ code.
        boi_token, eoi_token: tokens right before / after the image (None if absent).
        row_break_token: token ending each row (None if rows are not marked).
        native: whether the family is a native multimodal model (trained on image tokens).
        gate_description: the gate, for the supported-model table.
        processor_tokens: layout attribute -> processor attribute to read it from, so a
            checkpoint whose processor renames its image tokens is still located right
            (e.g. ``{"content_token": "image_token"}``).
    """

    placeholder: str = "<image>"
    content_token: str = "<image>"
    boi_token: Optional[str] = None
    eoi_token: Optional[str] = None
    row_break_token: Optional[str] = None
    native: bool = False
    gate_description: str = "none"
    processor_tokens: dict[str, str] = {}
    #: the position sets the processor marks as an image's tokens in its output
    #: (``mm_token_type_ids``), for checking positions against the processor
    processor_counted: tuple[str, ...] = ("image",)
    #: processor outputs that carry the images; a call holding none of them has no pixels
    image_input_names: tuple[str, ...] = ("pixel_values",)

    def __init__(self, processor: Any, config: Any) -> None:
        self.processor = processor
        self.config = config
        self.tokenizer = getattr(processor, "tokenizer", processor)
        for attr, source in self.processor_tokens.items():
            token = getattr(processor, source, None)
            if token is not None:
                setattr(self, attr, token)

    # -- token ids -------------------------------------------------------------
    def token_id(self, token: Optional[str]) -> Optional[int]:
        """The id of a special token, or a clear error if the tokenizer lacks it."""
        if token is None:
            return None
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise LayoutError(
                f"{type(self).__name__}: the tokenizer has no token {token!r}; is this "
                f"processor from the right checkpoint?"
            )
        return int(tid)

    def holds_placeholders(self, input_ids: Int[Tensor, "batch pos"]) -> bool:
        """Whether the ids hold content placeholders, which the model fills from pixels."""
        return bool((input_ids == self.token_id(self.content_token)).any())

    # -- metadata --------------------------------------------------------------
    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[Any]]:
        """Per-image grid metadata in batch order, handed to ``locate_row`` one by one.

        (rows, cols) of content tokens for the default locator; layouts that override
        ``locate_row`` may return their own per-image records. None when the grid is
        read from break tokens instead.
        """
        return None

    def count_placeholders(self, prompt: str) -> int:
        return prompt.count(self.placeholder)

    def pretokenised_images(self, prompt: str) -> int:
        """Images written into the prompt as tokens already (no pixels to process).

        Zero for families whose images always come as pixels; a native family whose
        images are token ids (Chameleon's VQ codes) overrides this.
        """
        return 0

    def with_placeholders(self, prompt: str, n_images: int) -> str:
        """The prompt with one placeholder per image (images first if it has none)."""
        found = self.count_placeholders(prompt)
        if found == 0 and n_images:
            return self.placeholder * n_images + "\n" + prompt
        if found != n_images:
            raise LayoutError(
                f"the prompt has {found} image placeholder(s) {self.placeholder!r} but "
                f"{n_images} image(s) were given for it: {prompt[:80]!r}"
            )
        return prompt

    def processor_images(self, per_prompt: list[list[Any]]) -> Any:
        """Images in the form the family's processor takes (flat by default)."""
        return [im for imgs in per_prompt for im in imgs]

    # -- geometry ----------------------------------------------------------------
    def picture_box(self, height: int, width: int) -> Box:
        """The part of a ``height x width`` picture that an image's token grid covers.

        All of it by default (the processor resizes the whole picture: Qwen2-VL,
        Pixtral, Emu3, Gemma 3); layouts whose processor crops or pads override this.
        """
        return (0.0, 0.0, float(width), float(height))

    def image_views(self, rows: int, cols: int, image_size: Optional[tuple[int, int]] = None,
                    meta: Any = None) -> list[ImageView]:
        """Where one image's content tokens lie on its picture.

        Args:
            rows, cols: the extent of the image's grid in ``positions.grid``.
            image_size: ``(height, width)`` of the picture given to ``prepare``; None
                for boxes in token units.
            meta: the image's entry of :meth:`image_grids` (used by layouts whose
                tokens form several blocks, such as LLaVA-OneVision's).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> model = HookedVLM.from_pretrained("toy-gated")       # Chameleon, 6x6 codes
            >>> model.layout.image_views(6, 6)                       # no picture: token units
            [ImageView(name='image', first_row=0, rows=6, cols=6, box=(0.0, 0.0, 6.0, 6.0))]
        """
        box = (self.picture_box(*image_size) if image_size is not None
               else (0.0, 0.0, float(cols), float(rows)))
        return [ImageView("image", 0, rows, cols, box)]

    # -- locating ----------------------------------------------------------------
    def locate(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Optional[Int[Tensor, "batch pos"]],
        inputs: Mapping[str, Any],
    ) -> ImagePositions:
        """Image positions of a processed batch (left or right padded)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, seq = input_ids.shape
        grids = GridQueue(self.image_grids(inputs))
        names = ("boi", "image", "eoi", "row_breaks", "specials", "gate")
        rows: dict[str, list[list[int]]] = {n: [] for n in names}
        grid_rows = []
        for b in range(batch):
            keep = attention_mask[b].bool().cpu()
            idx = keep.nonzero().flatten()
            if idx.numel() and not torch.equal(idx, torch.arange(idx[0], idx[-1] + 1)):
                raise LayoutError(f"example {b}: padding inside the sequence is not supported")
            offset = int(idx[0]) if idx.numel() else 0
            ids = input_ids[b, keep].tolist()
            row = self.locate_row(ids, grids).shifted(offset)
            for n in names:
                rows[n].append(getattr(row, n))
            grid_rows.append(torch.tensor(row.grid, dtype=torch.long).reshape(-1, 3))
        grids.check_exhausted()
        sets = {n: PositionSet.from_lists(rows[n], seq) for n in names}
        padding = PositionSet(~attention_mask.bool().cpu())
        return ImagePositions(padding=padding, grid=tuple(grid_rows), **sets)

    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        """Image-side positions of one unpadded example (the default layout).

        An image is a maximal run of content (and row-break) tokens, with BOI right
        before it and EOI right after it when the layout has them.
        """
        content = self.token_id(self.content_token)
        brk = self.token_id(self.row_break_token)
        boi, eoi = self.token_id(self.boi_token), self.token_id(self.eoi_token)
        members = {content} | ({brk} if brk is not None else set())
        out = RowLayout()
        for n_img, (start, end) in enumerate(runs(ids, members)):
            if boi is not None:
                self.expect_token(ids, start - 1, "boi", n_img)
                out.boi.append(start - 1)
            if eoi is not None:
                self.expect_token(ids, end, "eoi", n_img)
                out.eoi.append(end)
                out.gate.append(end)
            span = list(range(start, end))
            self._grid_span(ids, span, n_img, content, brk, grids.pop(), out)
        return out

    def expect_token(self, ids: list[int], position: int, which: str, n_img: int) -> None:
        """Raise a LayoutError unless ``ids[position]`` is the layout's ``which`` token
        (``"boi"``/``"eoi"``), naming what was expected, what was found and what to do."""
        token = getattr(self, f"{which}_token")
        expected = self.token_id(token)
        if 0 <= position < len(ids) and ids[position] == expected:
            return
        found = ("nothing (the sequence ends there)" if position >= len(ids) else
                 "nothing (the sequence starts there)" if position < 0 else
                 f"{self.tokenizer.convert_ids_to_tokens(ids[position])!r} (id {ids[position]})")
        side = "before" if which == "boi" else "after"
        raise LayoutError(
            f"image {n_img}: expected {which.upper()} {token!r} (id {expected}) right {side} its "
            f"image tokens, at position {position}, but found {found}. Write each image as the "
            f"placeholder {self.placeholder!r} and let the processor expand it "
            f"(model.prepare(prompts, images=...)), or write the whole block "
            f"(BOI, image tokens, EOI) yourself; was the prompt truncated?")

    def _grid_span(self, ids: list[int], span: list[int], n_img: int, content: int,
                   brk: Optional[int], grid: Optional[tuple[int, int]], out: RowLayout) -> None:
        """Fill content positions, row breaks and grid for one image span."""
        r = c = 0
        cols_seen: list[int] = []
        for p in span:
            if ids[p] == brk:
                out.row_breaks.append(p)
                cols_seen.append(c)
                r, c = r + 1, 0
            else:
                out.image.append(p)
                out.grid.append((n_img, r, c))
                c += 1
        if c:
            cols_seen.append(c)
        n = sum(cols_seen)
        if grid is not None:
            rows, cols = grid
            if rows * cols != n:
                raise LayoutError(
                    f"image {n_img}: the processor metadata says a {rows}x{cols} grid "
                    f"({rows * cols} tokens) but the ids hold {n} image tokens"
                )
            if brk is None:  # rows are not marked in the ids: lay the run out row-major
                base = len(out.grid) - n
                for k in range(n):
                    out.grid[base + k] = (n_img, k // cols, k % cols)
            elif len(set(cols_seen)) > 1 or cols_seen[0] != cols:
                raise LayoutError(f"image {n_img}: row breaks disagree with the {rows}x{cols} grid")
