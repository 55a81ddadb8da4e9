"""Exact Aya Vision positions: 16 px tiles of 2x2 ``<|IMG_PATCH|>``, 1 to 4 tiles.

A 16x32 (h x w) picture -> 1x2 tiles + thumbnail; 20x24 -> one tile (only its
``TILE_GLOBAL`` part); 30x18 -> 2x1 tiles + thumbnail. A two-tile image is 19 tokens:

    0 <|START_OF_IMG|>  1 TILE  2 _1  3-6 patches  7 TILE  8 _2  9-12 patches
    13 TILE_GLOBAL  14-17 patches  18 <|END_OF_IMG|>
"""

import re

import pytest
import torch

from tests.tiny import image
from tl_vlm.adapters.aya_vision import TiledImage
from tl_vlm.core.layout import LayoutError

PROMPTS = ["what is this", "<image> a cat <image> describe the image a dog"]
TWO_TILES = [3, 4, 5, 6, 9, 10, 11, 12, 14, 15, 16, 17]


def _images():
    return [image(0, (16, 32)), [image(1), image(2, (30, 18))]]


def _grid(n, blocks):
    return [[n, 2 * k + r, c] for k in range(blocks) for r in range(2) for c in range(2)]


def test_right_padding_tiles_and_two_images(tiny_zoo):
    model = tiny_zoo.model("aya_vision")
    batch = model.prepare(PROMPTS, images=_images(), return_mm_token_type_ids=True)
    pos = batch.positions
    assert batch.input_ids.shape == (2, 33)
    assert batch.inputs["pixel_values"].shape[0] == 3 + 1 + 3      # tiles and thumbnails
    # row 0: a two-tile image (0-18), "what is this" 19-21
    assert pos.boi[0].tolist() == [0] and pos.eoi[0].tolist() == [18] == pos.gate[0].tolist()
    assert pos.image[0].tolist() == TWO_TILES
    assert pos.specials[0].tolist() == [1, 2, 7, 8, 13]
    assert pos.grid[0].tolist() == _grid(0, 3)
    assert pos.text[0].tolist() == [19, 20, 21]
    assert pos.padding[0].tolist() == list(range(22, 33))
    # row 1: a one-tile image (0-6), "a cat" 7-8, a two-tile image (9-27), 5 words
    assert pos.boi[1].tolist() == [0, 9] and pos.eoi[1].tolist() == [6, 27]
    assert pos.image[1].tolist() == [2, 3, 4, 5] + [p + 9 for p in TWO_TILES]
    assert pos.specials[1].tolist() == [1, 10, 11, 16, 17, 22]
    assert pos.grid[1].tolist() == _grid(0, 1) + _grid(1, 3)
    assert pos.text[1].tolist() == [7, 8, 28, 29, 30, 31, 32]
    assert pos.row_breaks.is_empty()
    # the model fills exactly the patch ids; the processor marks everything but the
    # tile numbers (the "_1", "_2" text after TILE)
    ids = batch.input_ids
    assert torch.equal(pos.image.mask, ids == model.hf_model.config.image_token_id)
    numbers = torch.zeros_like(pos.image.mask)
    numbers[0, [2, 8]] = numbers[1, [11, 17]] = True
    assert torch.equal(pos.image_side.mask & ~numbers, batch.inputs["mm_token_type_ids"].bool())


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("aya_vision")
    batch = model.prepare(PROMPTS, images=_images(), padding_side="left")
    pos = batch.positions
    assert pos.padding[0].tolist() == list(range(11))
    assert pos.boi[0].tolist() == [11] and pos.eoi[0].tolist() == [29]
    assert pos.image[0].tolist() == [p + 11 for p in TWO_TILES]
    assert pos.text[0].tolist() == [30, 31, 32]
    assert pos.eoi[1].tolist() == [6, 27]


def test_metadata_views_and_logit_scale(tiny_zoo):
    model = tiny_zoo.model("aya_vision")
    batch = model.prepare(PROMPTS, images=_images())
    metas = model.layout.image_grids(batch.inputs)
    assert metas == [TiledImage(2, 2), TiledImage(0, 2), TiledImage(2, 2)]
    assert model.layout.tile_grid(16, 32) == (1, 2) and model.layout.tile_grid(30, 18) == (2, 1)
    views = model.layout.image_views(6, 2, (30, 18), metas[2])
    assert [(v.name, v.first_row, v.box) for v in views] == [
        ("tile 1", 0, (0.0, 0.0, 18.0, 15.0)), ("tile 2", 2, (0.0, 15.0, 18.0, 30.0)),
        ("global", 4, (0.0, 0.0, 18.0, 30.0))]
    with pytest.raises(LayoutError, match="cut into 1x1 tiles but the image has 2"):
        model.layout.image_views(6, 2, (20, 24), metas[2])
    # final_logits: what the HF forward does after lm_head
    scale = model.family.final_logits(model)
    assert scale(torch.ones(2)).tolist() == [0.25, 0.25]


def test_ids_that_disagree_with_the_layout_are_refused(tiny_zoo):
    model = tiny_zoo.model("aya_vision")
    batch = model.prepare(["what is this"], images=[image(0, (16, 32))])
    ids, layout = batch.input_ids, model.layout
    short = torch.cat([ids[:, :4], ids[:, 5:]], dim=1)       # one patch of tile 1 lost
    with pytest.raises(LayoutError, match=re.escape("3 '<|IMG_PATCH|>' at position 3, but every tile has (16 // 8)^2 = 4")):
        layout.locate(short, None, {"input_ids": short})
    unlabelled = torch.cat([ids[:, :13], ids[:, 14:]], dim=1)  # TILE_GLOBAL lost: runs merge
    with pytest.raises(LayoutError, match=re.escape("8 '<|IMG_PATCH|>' at position 9")):
        layout.locate(unlabelled, None, {"input_ids": unlabelled})
    open_image = ids[:, :18]                                  # <|END_OF_IMG|> cut off
    with pytest.raises(LayoutError, match=re.escape("no '<|END_OF_IMG|>'")):
        layout.locate(open_image, None, {"input_ids": open_image})
    one_frame_less = dict(batch.inputs, pixel_values=batch.inputs["pixel_values"][1:])
    with pytest.raises(LayoutError, match="3 tiles and thumbnails but pixel_values holds 2"):
        layout.locate(ids, None, one_frame_less)
