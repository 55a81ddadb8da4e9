"""Emu3 image positions on sequences laid out by hand from ``Emu3Processor``.

The processor writes ``<s>`` then, per ``<image>``: ``<|image start|>``, the size
prefix "H*W" (one token per digit and one for ``*``), ``<|image token|>``,
``H * (W + 1)`` ``<image>`` slots (the model puts W codes then EOL in each row),
``<|extra_201|>`` (EOF) and ``<|image end|>``. Tiny model: a 20x24 image is a 2x3 code
grid, a 30x18 image a 4x2 one (see tests/tiny/emu3.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny import image
from tl_vlm import LayoutError

BOI, EOI, WRAP, IMG, EOF = "<|image start|>", "<|image end|>", "<|image token|>", "<image>", "<|extra_201|>"
PROMPTS = ["what is this", "<image> a cat <image> describe the image a dog"]
IMAGES = [image(0), [image(1), image(2, (30, 18))]]


def _image_tokens(rows, cols):
    return [BOI, str(rows), "*", str(cols), WRAP] + [IMG] * (rows * (cols + 1)) + [EOF, EOI]


# Example 0: one 2x3 image placed before the text.
TOKENS_0 = ["<s>"] + _image_tokens(2, 3) + "what is this".split()
# Example 1: a 2x3 image, "a cat", a 4x2 image, then text.
TOKENS_1 = (["<s>"] + _image_tokens(2, 3) + ["a", "cat"] + _image_tokens(4, 2)
            + "describe the image a dog".split())

EXPECTED = {  # unpadded positions, worked out from the token lists above
    0: dict(boi=[1], specials=[2, 3, 4, 5, 14], image=[6, 7, 8, 10, 11, 12],
            row_breaks=[9, 13], eoi=[15], gate=[14, 15], text=[0, 16, 17, 18], last=[18],
            grid=[(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2)]),
    1: dict(boi=[1, 18], specials=[2, 3, 4, 5, 14, 19, 20, 21, 22, 35],
            image=[6, 7, 8, 10, 11, 12, 23, 24, 26, 27, 29, 30, 32, 33],
            row_breaks=[9, 13, 25, 28, 31, 34], eoi=[15, 36], gate=[14, 15, 35, 36],
            text=[0, 16, 17, 37, 38, 39, 40, 41], last=[41],
            grid=[(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2),
                  (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1), (1, 2, 0), (1, 2, 1),
                  (1, 3, 0), (1, 3, 1)]),
}
LENGTHS = {0: len(TOKENS_0), 1: len(TOKENS_1)}


def _check(pos, b, offset):
    exp = EXPECTED[b]
    for name in ("boi", "specials", "image", "row_breaks", "eoi", "gate", "text", "last"):
        assert pos.__getattribute__(name)[b].tolist() == [p + offset for p in exp[name]], name
    assert [tuple(r) for r in pos.grid[b].tolist()] == exp["grid"]


def test_token_sequences_are_the_hand_built_ones(tiny_zoo):
    model = tiny_zoo.model("emu3")
    batch = model.prepare(PROMPTS, images=IMAGES, padding_side="right")
    tok = model.processor.tokenizer
    assert LENGTHS == {0: 19, 1: 42}
    assert batch.input_ids[0, :19].tolist() == tok.convert_tokens_to_ids(TOKENS_0)
    assert batch.input_ids[1].tolist() == tok.convert_tokens_to_ids(TOKENS_1)
    assert batch.inputs["image_sizes"].tolist() == [[16, 24], [16, 24], [32, 16]]


def test_right_padding(tiny_zoo):
    batch = tiny_zoo.model("emu3").prepare(PROMPTS, images=IMAGES, padding_side="right")
    pos = batch.positions
    assert batch.input_ids.shape == (2, 42)
    _check(pos, 0, 0)
    _check(pos, 1, 0)
    assert pos.padding[0].tolist() == list(range(19, 42)) and pos.padding[1].numel() == 0
    assert pos.after_image[0].tolist() == [16, 17, 18]
    assert pos.last_image[1].tolist() == [12, 33]


def test_left_padding(tiny_zoo):
    batch = tiny_zoo.model("emu3").prepare(PROMPTS, images=IMAGES, padding_side="left")
    pos = batch.positions
    _check(pos, 0, 42 - 19)
    _check(pos, 1, 0)
    assert pos.padding[0].tolist() == list(range(0, 23))


def test_gate_is_eof_and_eoi(tiny_zoo):
    model = tiny_zoo.model("emu3")
    batch = model.prepare(PROMPTS, images=IMAGES)
    tok = model.processor.tokenizer
    gate_ids = batch.input_ids[1, batch.positions.gate[1]].tolist()
    assert gate_ids == tok.convert_tokens_to_ids([EOF, EOI, EOF, EOI])
    assert model.layout.native


def test_codes_and_eols_in_the_ids_are_accepted(tiny_zoo):
    """Ids that already hold VQ codes and EOL (e.g. generated images) give the same positions."""
    model = tiny_zoo.model("emu3")
    batch = model.prepare(PROMPTS[:1], images=IMAGES[:1])
    tok = model.processor.tokenizer
    ids = batch.input_ids.clone()
    code = tok.convert_tokens_to_ids("<|visual token 000003|>")
    ids[0, [6, 7, 8, 10, 11, 12]] = code
    ids[0, [9, 13]] = tok.convert_tokens_to_ids("<|extra_200|>")
    pos = model.layout.locate(ids, batch.attention_mask, batch.inputs)
    _check(pos, 0, 0)
    ids[0, 7] = tok.convert_tokens_to_ids("<|extra_200|>")  # EOL in the middle of a row
    with pytest.raises(LayoutError, match="inside row"):
        model.layout.locate(ids, batch.attention_mask, batch.inputs)


def test_placeholder_count_mismatch_raises(tiny_zoo):
    model = tiny_zoo.model("emu3")
    with pytest.raises(LayoutError, match="placeholder"):
        model.prepare(["<image> one <image> two"], images=[[image(0)]])


def test_tampered_image_sizes_raise(tiny_zoo):
    model = tiny_zoo.model("emu3")
    batch = model.prepare(PROMPTS, images=IMAGES)
    inputs = dict(batch.inputs)
    inputs["image_sizes"] = torch.tensor([[16, 24], [16, 24], [16, 32]])  # 2x4, ids say 4x2
    with pytest.raises(LayoutError, match="image_sizes"):
        model.layout.locate(batch.input_ids, batch.attention_mask, inputs)
    inputs["image_sizes"] = batch.inputs["image_sizes"][:2]  # one image too few
    with pytest.raises(LayoutError, match="more images"):
        model.layout.locate(batch.input_ids, batch.attention_mask, inputs)


def test_truncated_ids_raise(tiny_zoo):
    model = tiny_zoo.model("emu3")
    batch = model.prepare(PROMPTS[:1], images=IMAGES[:1])
    for cut in (10, 15):  # inside the image body; just before EOI
        ids = batch.input_ids[:, :cut]
        with pytest.raises(LayoutError):
            model.layout.locate(ids, batch.attention_mask[:, :cut], batch.inputs)
    ids = batch.input_ids.clone()
    ids[0, 3] = model.processor.tokenizer.convert_tokens_to_ids("what")  # broken size prefix
    with pytest.raises(LayoutError, match="size prefix"):
        model.layout.locate(ids, batch.attention_mask, batch.inputs)
    ids = torch.cat([batch.input_ids[:, :1], batch.input_ids[:, 2:]], dim=1)  # BOI removed
    with pytest.raises(LayoutError, match="outside"):
        model.layout.locate(ids, batch.attention_mask[:, 1:], batch.inputs)
