"""Where the image is in a batch of token sequences.

:class:`PositionSet` holds, for every example of a batch, a set of positions in the
(padded) sequence. It is stored as a boolean mask, so sets compose with ``|``, ``&``
and ``-`` and stay aligned with left- or right-padded batches. :class:`ImagePositions`
names the sets a Narrow Gate analysis needs (BOI, image content, EOI/gate, row breaks,
text, ...) together with the ``(image, row, col)`` grid of every content token.

Example:
    >>> import torch
    >>> s = PositionSet(torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))
    >>> s[0].tolist(), s[1].tolist()
    ([1, 2], [0])
    >>> (s | PositionSet.at([3, 3], seq_len=4))[0].tolist()
    [1, 2, 3]
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor


class PositionSet:
    """Per-example sets of sequence positions (ragged across the batch).

    Args:
        mask: ``mask[b, p]`` is True when position ``p`` of example ``b`` is in the set.

    Example:
        >>> import torch
        >>> s = PositionSet.from_lists([[0, 2], [1]], seq_len=3)
        >>> s.mask.int().tolist()
        [[1, 0, 1], [0, 1, 0]]
        >>> s.counts.tolist()
        [2, 1]
        >>> (s - PositionSet.at([2, 2], seq_len=3)).tolist()
        [[0], [1]]
        >>> PositionSet.from_lists([[0, 5]], seq_len=3)
        Traceback (most recent call last):
        ...
        IndexError: position 5 of example 0 is outside the sequence (length 3)
        >>> s | PositionSet.empty(1, 3)
        Traceback (most recent call last):
        ...
        ValueError: position sets of different batches: (2, 3) vs (1, 3) [batch, pos]
    """

    __slots__ = ("mask",)

    def __init__(self, mask: Bool[Tensor, "batch pos"]) -> None:
        if mask.dtype != torch.bool or mask.ndim != 2:
            raise ValueError(
                f"PositionSet needs a 2-D boolean mask [batch, pos], got {mask.dtype} "
                f"with shape {tuple(mask.shape)}"
            )
        self.mask = mask

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], seq_len: int) -> "PositionSet":
        """Build from one list of positions per example; positions must lie in the sequence."""
        mask = torch.zeros(len(rows), seq_len, dtype=torch.bool)
        for b, row in enumerate(rows):
            idx = torch.as_tensor(list(row), dtype=torch.long)
            if idx.numel() and (idx.min() < -seq_len or idx.max() >= seq_len):
                raise IndexError(
                    f"position {idx.max().item() if idx.max() >= seq_len else idx.min().item()} "
                    f"of example {b} is outside the sequence (length {seq_len})"
                )
            mask[b, idx] = True
        return cls(mask)

    @classmethod
    def at(cls, positions: Sequence[int], seq_len: int) -> "PositionSet":
        """One position per example (e.g. the last token of each row)."""
        return cls.from_lists([[p] for p in positions], seq_len)

    @classmethod
    def empty(cls, batch: int, seq_len: int) -> "PositionSet":
        return cls(torch.zeros(batch, seq_len, dtype=torch.bool))

    # -- reading ---------------------------------------------------------------
    def __getitem__(self, example: int) -> Int[Tensor, "n"]:
        """Sorted positions of one example."""
        return self.mask[example].nonzero().flatten()

    def __len__(self) -> int:
        return self.mask.shape[0]

    def __iter__(self) -> Iterator[Tensor]:
        return (self[b] for b in range(len(self)))

    @property
    def seq_len(self) -> int:
        return self.mask.shape[1]

    @property
    def counts(self) -> Int[Tensor, "batch"]:
        return self.mask.sum(-1)

    def tolist(self) -> list[list[int]]:
        return [row.tolist() for row in self]

    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    def __repr__(self) -> str:
        shown = ", ".join(str(r) for r in self.tolist()[:4])
        more = ", ..." if len(self) > 4 else ""
        return f"PositionSet([{shown}{more}], seq_len={self.seq_len})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PositionSet) and torch.equal(self.mask, other.mask)

    # -- composing -------------------------------------------------------------
    def _check(self, other: "PositionSet") -> None:
        if not isinstance(other, PositionSet):
            raise TypeError(f"cannot combine a PositionSet with {type(other).__name__}")
        if other.mask.shape != self.mask.shape:
            raise ValueError(
                f"position sets of different batches: {tuple(self.mask.shape)} vs "
                f"{tuple(other.mask.shape)} [batch, pos]"
            )

    def __or__(self, other: "PositionSet") -> "PositionSet":
        self._check(other)
        return PositionSet(self.mask | other.mask.to(self.mask.device))

    def __and__(self, other: "PositionSet") -> "PositionSet":
        self._check(other)
        return PositionSet(self.mask & other.mask.to(self.mask.device))

    def __sub__(self, other: "PositionSet") -> "PositionSet":
        self._check(other)
        return PositionSet(self.mask & ~other.mask.to(self.mask.device))

    def select(self, examples: Union[Sequence[int], slice]) -> "PositionSet":
        """The same sets for a subset of examples."""
        return PositionSet(self.mask[examples] if isinstance(examples, slice)
                           else self.mask[list(examples)])

    def pad_to(self, seq_len: int) -> "PositionSet":
        """Extend with positions past the end (e.g. generated tokens), none of them in the set."""
        if seq_len < self.seq_len:
            raise ValueError(f"cannot shrink a PositionSet from {self.seq_len} to {seq_len}")
        extra = torch.zeros(len(self), seq_len - self.seq_len, dtype=torch.bool,
                            device=self.mask.device)
        return PositionSet(torch.cat([self.mask, extra], dim=1))

    def random(self, k: int, seed: int = 0) -> "PositionSet":
        """``k`` positions drawn without replacement from each example's set.

        Reproducible for a given seed; each example gets its own draw.

        Example:
            >>> s = PositionSet.from_lists([list(range(10))], seq_len=10)
            >>> s.random(3, seed=1) == s.random(3, seed=1)
            True
        """
        gen = torch.Generator().manual_seed(seed)
        out = torch.zeros_like(self.mask)
        for b in range(len(self)):
            pool = self[b].cpu()
            if k > pool.numel():
                raise ValueError(
                    f"asked for {k} random positions but example {b} has only {pool.numel()}"
                )
            out[b, pool[torch.randperm(pool.numel(), generator=gen)[:k]]] = True
        return PositionSet(out)

    def to(self, device: Union[str, torch.device]) -> "PositionSet":
        return PositionSet(self.mask.to(device))


@dataclass(frozen=True)
class ImagePositions:
    """Named position sets of a multimodal batch, all in padded-sequence coordinates.

    Attributes:
        boi: begin-of-image tokens (Chameleon ``<racm3:break>``, Emu3 ``<|image start|>``).
        image: image content tokens (VQ codes or projected patch features).
        eoi: the token right after the image (Chameleon ``<eoss>``, Pixtral ``[IMG_END]``);
            empty for layouts without one (LLaVA-1.5).
        row_breaks: end-of-row tokens inside the image (Emu3 EOL, Pixtral ``[IMG_BREAK]``,
            LLaVA-OneVision newline features).
        specials: other image-side tokens (Emu3's size prefix and EOF, vision start/end
            markers that are not the gate).
        gate: the tokens the Narrow Gate paper ablates as "the gate": EOI, plus EOF for
            Emu3. Empty where the family has no post-image token.
        padding: padding positions.
        grid: per example, ``[n_image_tokens, 3]`` rows ``(image, row, col)`` aligned with
            ``image[b]`` (ascending positions).

    Built by ``model.prepare`` (``batch.positions``); sets of one batch compose with
    ``|``, ``&`` and ``-``.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pos = model.prepare(make_examples(12, seed=0).prompts).positions
        >>> print(pos.describe(0))
               boi:    1  [1]
             image:   36  [2, 3, 4, 5, 6, '...', 33, 34, 35, 36, 37]
               eoi:    1  [38]
              gate:    1  [38]
        row_breaks:    0  []
          specials:    0  []
              text:    5  [0, 39, 40, 41, 42]
              last:    1  [42]
        >>> pos.grid[0][:3].tolist()                      # (image, row, col) of each code
        [[0, 0, 0], [0, 0, 1], [0, 0, 2]]
        >>> pos.after_image[0].tolist(), pos.last_image[0].tolist(), pos.n_images(0)
        ([39, 40, 41, 42], [37], 1)
        >>> pos.first_image[0].tolist()
        [2]
        >>> (pos.image_side - pos.gate).counts[:3].tolist()     # BOI and the 36 codes
        [37, 37, 37]
        >>> pos.select([0, 1]).batch_size, pos.pad_to(50).seq_len
        (2, 50)
    """

    boi: PositionSet
    image: PositionSet
    eoi: PositionSet
    row_breaks: PositionSet
    specials: PositionSet
    gate: PositionSet
    padding: PositionSet
    grid: tuple[Int[Tensor, "n_image_tokens 3"], ...]

    @property
    def image_side(self) -> PositionSet:
        """Every image-side token: BOI, content, row breaks, specials, EOI."""
        return self.boi | self.image | self.eoi | self.row_breaks | self.specials

    @property
    def all(self) -> PositionSet:
        """Every non-padding position."""
        return PositionSet(~self.padding.mask)

    @property
    def text(self) -> PositionSet:
        """Non-padding positions that are not image-side (BOS and chat markup included)."""
        return self.all - self.image_side

    @property
    def last(self) -> PositionSet:
        """The last non-padding token of each example (where the next token is predicted)."""
        mask = self.all.mask
        seq = mask.shape[1]
        last = seq - 1 - mask.flip(-1).int().argmax(-1)
        return PositionSet.at(last.tolist(), seq)

    @property
    def last_image(self) -> PositionSet:
        """The last image content token of each image."""
        return self._image_ends(last=True)

    @property
    def first_image(self) -> PositionSet:
        """The first image content token of each image."""
        return self._image_ends(last=False)

    def _image_ends(self, last: bool) -> PositionSet:
        rows = []
        for b, grid in enumerate(self.grid):
            pos = self.image[b]
            if grid.numel() == 0:
                rows.append([])
                continue
            new_image = grid[1:, 0] != grid[:-1, 0]      # an image changes between neighbours
            end = torch.ones(len(pos), dtype=torch.bool)
            if last:
                end[:-1] = new_image
            else:
                end[1:] = new_image
            rows.append(pos[end.to(pos.device)].tolist())
        return PositionSet.from_lists(rows, self.image.seq_len)

    @property
    def after_image(self) -> PositionSet:
        """Text positions after the last image-side token (the paper's text queries)."""
        side = self.image_side.mask
        seq = side.shape[1]
        idx = torch.arange(seq, device=side.device)
        last_side = torch.where(side, idx, torch.full_like(idx, -1)).max(-1).values
        return PositionSet(self.text.mask & (idx[None] > last_side[:, None]))

    @property
    def batch_size(self) -> int:
        return len(self.image)

    @property
    def seq_len(self) -> int:
        return self.image.seq_len

    def n_images(self, example: int) -> int:
        grid = self.grid[example]
        return int(grid[:, 0].max()) + 1 if grid.numel() else 0

    def select(self, examples: Sequence[int]) -> "ImagePositions":
        """The positions of a subset of examples."""
        kw = {f.name: getattr(self, f.name).select(examples)
              for f in fields(self) if f.name != "grid"}
        return ImagePositions(grid=tuple(self.grid[i] for i in examples), **kw)

    def pad_to(self, seq_len: int) -> "ImagePositions":
        """Positions after generating up to ``seq_len`` tokens: new tokens count as text."""
        kw = {f.name: getattr(self, f.name).pad_to(seq_len)
              for f in fields(self) if f.name not in ("grid",)}
        return ImagePositions(grid=self.grid, **kw)

    def check(self, positions: PositionSet, what: str = "positions",
              nonempty: bool = False) -> PositionSet:
        """``positions`` if it is a PositionSet of this batch, else a clear error.

        With ``nonempty``, a set empty in every example is refused too (usually a token
        the family does not have).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> pos = model.prepare(make_examples(2).prompts).positions
            >>> pos.check(pos.gate, "keys", nonempty=True) is pos.gate
            True
            >>> pos.check(pos.row_breaks, "keys", nonempty=True)
            Traceback (most recent call last):
            ...
            ValueError: keys is empty in every example (does this family have the tokens ...
            >>> pos.check(PositionSet.empty(3, 5), "queries")
            Traceback (most recent call last):
            ...
            ValueError: queries cover (3, 5) [batch, pos] but the batch is (2, 46)
        """
        if not isinstance(positions, PositionSet):
            raise TypeError(f"{what} must be a PositionSet (e.g. batch.positions.gate), got "
                            f"{type(positions).__name__}")
        if positions.mask.shape != self.padding.mask.shape:
            raise ValueError(f"{what} cover {tuple(positions.mask.shape)} [batch, pos] but the "
                             f"batch is {tuple(self.padding.mask.shape)}")
        if nonempty and positions.is_empty():
            raise ValueError(
                f"{what} is empty in every example (does this family have the tokens you "
                f"asked for? e.g. LLaVA has no end-of-image token: use positions.last_image)"
            )
        return positions

    def to(self, device: Union[str, torch.device]) -> "ImagePositions":
        kw = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "grid"}
        return ImagePositions(grid=self.grid, **kw)

    def describe(self, example: int = 0) -> str:
        """A one-line-per-set summary of one example, for notebooks."""
        names = ["boi", "image", "eoi", "gate", "row_breaks", "specials", "text", "last"]
        lines = []
        for n in names:
            p = getattr(self, n)[example].tolist()
            shown = p if len(p) <= 12 else p[:5] + ["..."] + p[-5:]
            lines.append(f"{n:>10}: {len(p):4d}  {shown}")
        return "\n".join(lines)
