"""Exact Pixtral positions: 4px patches, rows of [IMG] ended by [IMG_BREAK], last by [IMG_END].

Images (h x w) -> grid: 16x12 -> 4x3, 8x16 -> 2x4, 12x12 -> 3x3 (longest edge <= 16).
"""

import pytest
import torch

from tests.tiny import image
from tl_vlm.core.layout import LayoutError

PROMPTS = ["what is this", "[IMG] a cat [IMG] describe the image a dog"]


def _images():
    return [image(0, (16, 12)), [image(1, (8, 16)), image(2, (12, 12))]]


def _grid(n, rows, cols):
    return [[n, r, c] for r in range(rows) for c in range(cols)]


def test_family_and_tower(tiny_zoo):
    model = tiny_zoo.model("pixtral")
    assert model.family.name == "pixtral"
    # the tower is wrapped whole, not by TL's CLIP bridge
    tower = model.hf_model.model.vision_tower
    assert type(tower).__name__ == "GeneralizedComponent"
    assert type(tower.original_component).__name__ == "PixtralVisionModel"
    layout = model.layout
    assert (layout.placeholder, layout.row_break_token, layout.eoi_token) == (
        "[IMG]", "[IMG_BREAK]", "[IMG_END]")
    assert not layout.native


def test_right_padding_and_two_images(tiny_zoo):
    model = tiny_zoo.model("pixtral")
    batch = model.prepare(PROMPTS, images=_images())
    pos = batch.positions
    # row 0: "[IMG]\nwhat is this": 4 rows of 3 -> content 0-2,4-6,8-10,12-14,
    # breaks 3,7,11, END 15, words 16-18; row 1 is 29 long.
    assert batch.input_ids.shape == (2, 29)
    assert pos.image[0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]
    assert pos.row_breaks[0].tolist() == [3, 7, 11]
    assert pos.eoi[0].tolist() == [15] and pos.gate[0].tolist() == [15]
    assert pos.text[0].tolist() == [16, 17, 18]
    assert pos.padding[0].tolist() == list(range(19, 29))
    assert pos.last[0].tolist() == [18]
    assert pos.grid[0].tolist() == _grid(0, 4, 3)
    # row 1: image 0 (2x4) content 0-3,5-8, break 4, END 9; "a cat" 10-11;
    # image 1 (3x3) content 12-14,16-18,20-22, breaks 15,19, END 23; words 24-28.
    assert pos.image[1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 12, 13, 14, 16, 17, 18, 20, 21, 22]
    assert pos.row_breaks[1].tolist() == [4, 15, 19]
    assert pos.eoi[1].tolist() == [9, 23] and pos.gate[1].tolist() == [9, 23]
    assert pos.text[1].tolist() == [10, 11, 24, 25, 26, 27, 28]
    assert pos.grid[1].tolist() == _grid(0, 2, 4) + _grid(1, 3, 3)
    assert pos.last_image.tolist() == [[14], [8, 22]]
    assert pos.after_image[1].tolist() == [24, 25, 26, 27, 28]
    assert pos.boi.is_empty() and pos.specials.is_empty()
    # the ids agree: content is [IMG], breaks [IMG_BREAK], EOI [IMG_END]
    tok = model.layout.tokenizer
    ids = batch.input_ids[1]
    assert set(tok.convert_ids_to_tokens(ids[pos.image[1]].tolist())) == {"[IMG]"}
    assert set(tok.convert_ids_to_tokens(ids[pos.row_breaks[1]].tolist())) == {"[IMG_BREAK]"}


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("pixtral")
    batch = model.prepare(PROMPTS, images=_images(), padding_side="left")
    pos = batch.positions
    assert pos.padding[0].tolist() == list(range(10))
    assert pos.image[0].tolist() == [p + 10 for p in [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]]
    assert pos.row_breaks[0].tolist() == [13, 17, 21]
    assert pos.gate[0].tolist() == [25]
    assert pos.text[0].tolist() == [26, 27, 28]
    assert pos.last.tolist() == [[28], [28]]
    assert pos.grid[0].tolist() == _grid(0, 4, 3)
    assert pos.gate[1].tolist() == [9, 23]
    assert pos.row_breaks[1].tolist() == [4, 15, 19]


def test_back_to_back_images_stay_apart(tiny_zoo):
    model = tiny_zoo.model("pixtral")
    batch = model.prepare(["[IMG][IMG] yes"], images=[[image(1, (8, 16)), image(2, (12, 12))]])
    pos = batch.positions
    assert pos.image[0].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 14, 15, 16, 18, 19, 20]
    assert pos.row_breaks[0].tolist() == [4, 13, 17]
    assert pos.gate[0].tolist() == [9, 21]
    assert pos.text[0].tolist() == [22]
    assert pos.grid[0].tolist() == _grid(0, 2, 4) + _grid(1, 3, 3)


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("pixtral")
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["[IMG] a [IMG] b"], images=[[image(0, (16, 12))]])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("pixtral")
    batch = model.prepare(PROMPTS, images=_images())
    ids, mask = batch.input_ids, batch.attention_mask
    # image 0 of prompt 0 claimed to be 12x16 (3x4) while its breaks say 4x3
    sizes = batch.inputs["image_sizes"].clone()
    sizes[0] = torch.tensor([12, 16])
    with pytest.raises(LayoutError, match="3x4 grid"):
        model.layout.locate(ids, mask, dict(batch.inputs, image_sizes=sizes))
    # same token count (12), other shape: 2x6 has 12 tokens but rows of 3
    sizes[0] = torch.tensor([8, 24])
    with pytest.raises(LayoutError, match="row breaks disagree"):
        model.layout.locate(ids, mask, dict(batch.inputs, image_sizes=sizes))
    # truncated: prompt 0 cut inside its image, so its [IMG_END] is gone
    with pytest.raises(LayoutError, match=r"expected EOI .* right after its image tokens.*but found"):
        model.layout.locate(ids[:1, :10], None, batch.inputs)
    # metadata for one image fewer than the ids hold
    with pytest.raises(LayoutError, match="more images"):
        model.layout.locate(ids, mask, dict(batch.inputs, image_sizes=batch.inputs["image_sizes"][:2]))
