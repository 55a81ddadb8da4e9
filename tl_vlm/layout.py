"""Image-token layouts: from token ids and processor metadata to :class:`ImagePositions`.

Each family's adapter module defines an :class:`ImageLayout` subclass. Most layouts
are "optional BOI, a run of content tokens (rows optionally ended by a break token),
optional EOI" and only set class attributes; layouts that differ (Emu3's size prefix,
LLaVA-OneVision's tiles) override :meth:`ImageLayout.locate_row`.

Positions come from token ids, never from decoded strings, and grids from the
processor's metadata (``image_grid_thw``, ``image_sizes``, ...) or from the break
tokens themselves. Any disagreement between the two raises :class:`LayoutError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_vlm.positions import ImagePositions, PositionSet


class LayoutError(ValueError):
    """Token ids, images and processor metadata disagree."""


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
    #: the position sets that make up the processor's own token count per image (and that
    #: it marks in ``mm_token_type_ids``), for checking positions against the processor
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
