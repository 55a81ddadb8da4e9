"""A processed multimodal batch: the model's inputs and where the image is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.core.positions import ImagePositions


@dataclass
class VLMBatch:
    """Everything one forward pass needs, plus the image positions of every example.

    ``inputs`` is the processor's output (``input_ids``, ``attention_mask``,
    ``pixel_values`` and the family's extra tensors such as ``image_sizes`` or
    ``image_grid_thw``); all of it is passed to the model, so no family runs without
    the metadata it needs.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)   # toy: image as tokens
        >>> len(batch), batch.input_ids.shape, batch.padding_side
        (12, torch.Size([12, 46]), 'right')
        >>> batch.positions.gate[0].tolist(), sorted(batch.model_kwargs)
        ([38], ['attention_mask'])
        >>> sub = batch.select([0, 2])
        >>> len(sub), sub.positions.batch_size
        (2, 2)
        >>> logits = model(batch)                                      # [batch, pos, d_vocab]

    With a real checkpoint (and an image) the batch also carries ``pixel_values``:

        >>> model = HookedVLM.from_pretrained("facebook/chameleon-7b")  # doctest: +SKIP
        >>> batch = model.prepare(["What is this?"], images=[img])      # doctest: +SKIP
        >>> sorted(batch.model_kwargs)                                  # doctest: +SKIP
        ['attention_mask', 'pixel_values']
    """

    inputs: dict[str, Any]
    positions: ImagePositions
    prompts: Optional[list[str]] = field(default=None, repr=False)

    @property
    def input_ids(self) -> Int[Tensor, "batch pos"]:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> Int[Tensor, "batch pos"]:
        mask = self.inputs.get("attention_mask")
        return torch.ones_like(self.input_ids) if mask is None else mask

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """The inputs other than ``input_ids`` (masks, pixels, image metadata)."""
        return {k: v for k, v in self.inputs.items() if k != "input_ids"}

    def __repr__(self) -> str:
        images = sum(self.positions.n_images(b) for b in range(len(self)))
        shape = tuple(self.input_ids.shape)
        return (f"VLMBatch({shape[0]} examples x {shape[1]} tokens, padding {self.padding_side}, "
                f"{images} images; inputs: {', '.join(self.inputs)}; .positions)")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def padding_side(self) -> str:
        """'left', 'right' or 'none' (no padding in the batch)."""
        mask = self.attention_mask.bool()
        if bool(mask.all()):
            return "none"
        return "left" if bool((~mask[:, 0]).any()) else "right"

    @property
    def logits_to_keep(self) -> Union[int, Tensor]:
        """The forward argument that makes the model compute logits only at each
        example's last position (``1`` with left padding; else those positions).

        ``model(batch, logits_to_keep=batch.logits_to_keep)`` then returns
        ``[batch, n_kept, vocab]`` instead of ``[batch, pos, vocab]``; :meth:`last_of`
        picks each example's row. At a 262k vocabulary and 16k tokens the full logits
        alone would be 16 GiB per example in float32.
        """
        last = self.positions.last.mask.nonzero()[:, 1]
        if bool((last == self.input_ids.shape[1] - 1).all()):
            return 1
        return last.unique()

    def last_of(self, logits: Float[Tensor, "batch kept vocab"]) -> Float[Tensor, "batch vocab"]:
        """Each example's last-position row of logits computed with :attr:`logits_to_keep`
        (or of full ``[batch, pos, vocab]`` logits)."""
        last = self.positions.last.mask.nonzero()[:, 1].to(logits.device)
        rows = torch.arange(len(self), device=logits.device)
        if logits.shape[1] == self.input_ids.shape[1]:
            return logits[rows, last]
        keep = self.logits_to_keep
        if isinstance(keep, int):
            return logits[:, -1]
        return logits[rows, torch.searchsorted(keep.to(logits.device), last)]

    def to(self, device: Union[str, torch.device, None] = None,
           dtype: Optional[torch.dtype] = None) -> "VLMBatch":
        """The batch on ``device``, its floating tensors (pixels) cast to ``dtype``.

        Token ids, masks and integer metadata keep their dtype.
        """
        def move(v: Any) -> Any:
            if not isinstance(v, Tensor):
                return v
            cast = dtype if dtype is not None and v.is_floating_point() else None
            return v.to(device=device, dtype=cast)

        return VLMBatch({k: move(v) for k, v in self.inputs.items()}, self.positions, self.prompts)

    def select(self, examples: Sequence[int]) -> "VLMBatch":
        """A sub-batch. Only for families whose image tensors are one row per example."""
        raise_if_mixed = [k for k, v in self.inputs.items()
                          if isinstance(v, Tensor) and v.shape[0] != len(self)]
        if raise_if_mixed:
            raise ValueError(
                f"cannot split this batch by example: {raise_if_mixed} are not one row per "
                f"example; call model.prepare() on the sub-list of prompts instead"
            )
        idx = list(examples)
        picked = {k: v[idx] if isinstance(v, Tensor) else v for k, v in self.inputs.items()}
        prompts = [self.prompts[i] for i in idx] if self.prompts else None
        return VLMBatch(picked, self.positions.select(idx), prompts)
