"""Emu3 (``Emu3ForConditionalGeneration``): one decoder over text and VQ image tokens.

HF classes: ``Emu3ForConditionalGeneration`` -> ``model.text_model`` (a Llama-shaped
``Emu3TextModel``: ``embed_tokens``, ``layers.{i}`` with ``self_attn.{q,k,v,o}_proj``,
``norm``, ``rotary_emb``), ``model.vqmodel`` (``Emu3VQVAE``, encode/decode only, not
mapped: reach it as ``bridge.hf_model.model.vqmodel``) and ``lm_head``. TL 4.3's
``Emu3ArchitectureAdapter`` (Llama mapping re-prefixed to ``model.text_model.``) fits
this class; tl_vlm keeps it and routes attention through the hooked attention function.

Layout. The processor expands each ``<image>`` of the prompt into::

    <|image start|> H * W <|image token|> <image> x H*(W+1) <|extra_201|> <|image end|>

where ``H, W`` = ``image_sizes // 8`` is the code grid and the size prefix "H*W" is
ordinary text (one token per digit and one for ``*`` with Emu3's tokenizer). In the
forward, the model replaces the ``H*(W+1)`` placeholders by the VQ codes in row-major
order, each row followed by EOL (``<|extra_200|>``): so the last slot of every row is a
row break, not a code. Positions:

* ``boi``: ``<|image start|>``;
* ``specials``: the size-prefix tokens, ``<|image token|>`` and EOF ``<|extra_201|>``;
* ``image``: the ``H*W`` code slots, grid ``(image, row, col)``;
* ``row_breaks``: the ``H`` EOL slots;
* ``eoi``: ``<|image end|>``; ``gate``: EOF + EOI (the Narrow Gate paper ablates both).

The grid comes from ``image_sizes`` and is cross-checked against the size prefix, the
length of the placeholder run and, where the ids already hold codes and EOLs (e.g.
image tokens the model generated), against the EOL positions.

Caveat (HF behaviour): the processor pads every image of a batch to the largest one
and the VQ encoder (convolutions and a global attention block) sees that padding, so
an image's codes, and hence the logits, can depend on the other images of its batch.
Batch same-size images, or run prompts one at a time, when that matters.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from transformer_lens.model_bridge.supported_architectures.emu3 import (
    Emu3ArchitectureAdapter,
)

from tl_vlm.core.family import Family
from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.layout import GridQueue, ImageLayout, LayoutError, RowLayout


class Emu3Adapter(Emu3ArchitectureAdapter):
    """TL's Emu3 adapter (``model.text_model`` decoder, ``lm_head``) with hooked attention."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        use_hooked_attention(self)


class Emu3Layout(ImageLayout):
    """BOI, "H*W" size prefix, wrapper, H rows of (W codes + EOL), EOF, EOI."""

    placeholder = "<image>"
    content_token = "<image>"
    boi_token = "<|image start|>"
    eoi_token = "<|image end|>"
    row_break_token = "<|extra_200|>"
    wrapper_token = "<|image token|>"
    eof_token = "<|extra_201|>"
    native = True
    gate_description = "EOF <|extra_201|> + EOI <|image end|>"
    processor_counted = ("image", "row_breaks")  # H*(W+1) slots, end-of-row slots included

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        # Read the marker strings from the checkpoint's processor where it names them.
        for attr, proc_attr in (("placeholder", "image_token"), ("content_token", "image_token"),
                                ("boi_token", "image_start_token"),
                                ("eoi_token", "image_end_token"),
                                ("wrapper_token", "fake_token_around_image"),
                                ("eof_token", "eof_token")):
            value = getattr(processor, proc_attr, None)
            if value:
                setattr(self, attr, value)
        self.downsample = int(getattr(processor, "downsample_ratio", 8))
        vocab = getattr(config, "vocabulary_map", None) or {}
        self.visual_ids = {v for k, v in vocab.items() if k.startswith("<|visual token")}

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        sizes = inputs.get("image_sizes")
        if sizes is None or "pixel_values" not in inputs:
            return None
        return [(int(h) // self.downsample, int(w) // self.downsample) for h, w in sizes.tolist()]

    def _size_prefix(self, ids: list[int], start: int, wrapper: int, n_img: int) -> tuple[int, int, int]:
        """Parse "H*W" after BOI at ``start``; returns (H, W, position of the wrapper)."""
        try:
            end = ids.index(wrapper, start)
        except ValueError:
            raise LayoutError(f"image {n_img}: no {self.wrapper_token!r} after BOI at {start}") from None
        text = "".join(self.tokenizer.convert_ids_to_tokens(ids[start:end]))
        match = re.fullmatch(r"\s*(\d+)\s*\*\s*(\d+)\s*", text)
        if match is None:
            raise LayoutError(
                f"image {n_img}: expected a size prefix 'H*W' between BOI and "
                f"{self.wrapper_token!r}, found {text!r}"
            )
        return int(match.group(1)), int(match.group(2)), end

    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        boi, eoi = self.token_id(self.boi_token), self.token_id(self.eoi_token)
        wrapper, eof = self.token_id(self.wrapper_token), self.token_id(self.eof_token)
        content, eol = self.token_id(self.content_token), self.token_id(self.row_break_token)
        # Slots of the image body: placeholders, or codes/EOL once the ids hold them.
        body_ids = {content, eol} | self.visual_ids
        out = RowLayout()
        starts = [i for i, t in enumerate(ids) if t == boi]
        stray = [i for i, t in enumerate(ids) if t in (content, eof, eoi)]
        for n_img, start in enumerate(starts):
            rows, cols, wrap = self._size_prefix(ids, start + 1, wrapper, n_img)
            grid = grids.pop()
            if grid is not None and grid != (rows, cols):
                raise LayoutError(
                    f"image {n_img}: the processor's image_sizes give a {grid[0]}x{grid[1]} code "
                    f"grid but the size prefix in the ids says {rows}x{cols}"
                )
            body = wrap + 1
            n_body = rows * (cols + 1)
            tail = body + n_body
            if (tail + 1 >= len(ids) or any(t not in body_ids for t in ids[body:tail])
                    or ids[tail] != eof or ids[tail + 1] != eoi):
                raise LayoutError(
                    f"image {n_img}: expected {n_body} image slots ({rows}x({cols}+1)) then EOF "
                    f"and EOI after position {wrap}; the ids disagree (truncated or edited?)"
                )
            out.boi.append(start)
            out.specials.extend(range(start + 1, body))  # size prefix and wrapper
            for r in range(rows):
                for c in range(cols + 1):
                    p = body + r * (cols + 1) + c
                    if c == cols:
                        out.row_breaks.append(p)
                    elif ids[p] == eol:
                        raise LayoutError(f"image {n_img}: EOL at {p} inside row {r} (col {c})")
                    else:
                        out.image.append(p)
                        out.grid.append((n_img, r, c))
            out.specials.append(tail)
            out.gate.extend([tail, tail + 1])
            out.eoi.append(tail + 1)
            stray = [p for p in stray if not start < p <= tail + 1]
        if stray:
            raise LayoutError(
                f"image tokens at positions {stray[:8]} lie outside any <|image start|> ... "
                f"<|image end|> block (truncated prompt?)"
            )
        return out


FAMILY = Family(
    name="emu3",
    title="Emu3",
    image_tokens="`<|image start|>`, size prefix, rows + EOL, EOF, `<|image end|>`",
    architectures=("Emu3ForConditionalGeneration",),
    adapter=Emu3Adapter,
    layout=Emu3Layout,
    example_ids=("BAAI/Emu3-Chat-hf",),
)
