"""Exact LLaVA-1.5 positions: 16x16 images, 4px patches -> 16 tokens (4x4 grid), no BOI/EOI."""

import pytest
import torch

from tests.tiny import image
from tl_vlm.core.layout import LayoutError

GRID = [(0, r, c) for r in range(4) for c in range(4)]


def test_right_padding_and_two_images(tiny_zoo):
    model = tiny_zoo.model("llava")
    batch = model.prepare(["what is this", "<image> a cat <image> describe the image a dog"],
                          images=[image(0), [image(1), image(2)]])
    pos = batch.positions
    # row 0: "<image>\nwhat is this" -> 16 image tokens, 3 words, 17 pads (row 1 is 39 long)
    assert batch.input_ids.shape == (2, 39)
    assert pos.image[0].tolist() == list(range(16))
    assert pos.text[0].tolist() == [16, 17, 18]
    assert pos.padding[0].tolist() == list(range(19, 39))
    assert pos.last[0].tolist() == [18]
    # row 1: image 0 at 0..15, "a cat" 16-17, image 1 at 18..33, 5 words 34..38
    assert pos.image[1].tolist() == list(range(16)) + list(range(18, 34))
    assert pos.text[1].tolist() == [16, 17, 34, 35, 36, 37, 38]
    assert pos.grid[1].tolist() == [list(g) for g in GRID] + [[1, r, c] for _, r, c in GRID]
    assert pos.last_image.tolist() == [[15], [15, 33]]
    for name in ("boi", "eoi", "gate", "row_breaks", "specials"):
        assert getattr(pos, name).is_empty(), name


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("llava")
    batch = model.prepare(["what is this", "<image> a cat <image> describe the image a dog"],
                          images=[image(0), [image(1), image(2)]], padding_side="left")
    pos = batch.positions
    assert pos.padding[0].tolist() == list(range(20))
    assert pos.image[0].tolist() == list(range(20, 36))
    assert pos.text[0].tolist() == [36, 37, 38]
    assert pos.after_image[0].tolist() == [36, 37, 38]
    assert pos.image[1].tolist() == list(range(16)) + list(range(18, 34))


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("llava")
    with pytest.raises(LayoutError, match="1 image placeholder.*2 image"):
        model.prepare(["<image> what is this"], images=[[image(0), image(1)]])
    with pytest.raises(ValueError, match="one entry per prompt"):
        model.prepare(["a", "b"], images=[image(0)])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("llava")
    batch = model.prepare(["what is this"], images=[image(0)])
    truncated = batch.input_ids[:, 3:]   # drop 3 of the 16 image tokens
    with pytest.raises(LayoutError, match="16 tokens.*13 image tokens"):
        model.layout.locate(truncated, None, batch.inputs)
    two_images = dict(batch.inputs, pixel_values=batch.inputs["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(LayoutError, match="describes 2 images"):
        model.layout.locate(batch.input_ids, None, two_images)
