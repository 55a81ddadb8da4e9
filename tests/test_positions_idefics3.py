"""Exact Idefics3 positions: 16 px crops of 2x2 ``<image>`` features, longest edge 32 px.

A 20x24 (h x w) picture -> 32x32 px -> 2x2 crops; 12x30 -> 16x32 px -> 1x2 crops;
30x18 -> 32x32 px -> 2x2 crops. One image of 2x2 crops is 34 tokens:

    0 FAKE  1 <row_1_col_1>  2-5 <image>  6 FAKE  7 <row_1_col_2>  8-11 <image>  12 "\\n"
    13 FAKE 14 <row_2_col_1> 15-18 <image> 19 FAKE 20 <row_2_col_2> 21-24 <image> 25 "\\n"
    26 "\\n" 27 FAKE 28 <global-img> 29-32 <image> 33 FAKE

(FAKE = ``<fake_token_around_image>``): BOI 0, EOI 33, row breaks 12, 25, 26, specials
the other wrappers and markers.
"""

import pytest
import torch

from tests.tiny import image
from tl_vlm.adapters.idefics3 import SplitImage
from tl_vlm.core.layout import LayoutError

PROMPTS = ["what is this", "<image> a cat <image> describe the image a dog"]
CONTENT_2X2 = [2, 3, 4, 5, 8, 9, 10, 11, 15, 16, 17, 18, 21, 22, 23, 24, 29, 30, 31, 32]
SPECIALS_2X2 = [1, 6, 7, 13, 14, 19, 20, 27, 28]
BREAKS_2X2 = [12, 25, 26]


def _images():
    return [image(0), [image(1, (12, 30)), image(2, (30, 18))]]


def _grid(n, blocks):
    """(image, row, col) of ``blocks`` stacked 2x2 feature blocks (crops, then global)."""
    return [[n, 2 * k + r, c] for k in range(blocks) for r in range(2) for c in range(2)]


def _shift(positions, offset):
    return [p + offset for p in positions]


def test_family_and_tower(tiny_zoo):
    model = tiny_zoo.model("idefics3")
    assert model.family.name == "idefics3"
    layout = model.layout
    assert (layout.boi_token, layout.eoi_token, layout.global_token) == (
        "<fake_token_around_image>", "<fake_token_around_image>", "<global-img>")
    assert layout.side == 2 and not layout.native
    # TL's SigLIP bridge is pointed at the tower's own parts
    assert type(model.vision_encoder.original_component).__name__ == "Idefics3VisionTransformer"
    assert type(model.vision_encoder.embeddings.original_component).__name__ == \
        "Idefics3VisionEmbeddings"


def test_right_padding_crops_and_two_images(tiny_zoo):
    model = tiny_zoo.model("idefics3")
    batch = model.prepare(PROMPTS, images=_images(), return_mm_token_type_ids=True)
    pos = batch.positions
    assert batch.input_ids.shape == (2, 62)
    # row 0: one 2x2-crop image (0-33), "\n" 34, "what is this" 35-37, padding
    assert pos.boi[0].tolist() == [0] and pos.eoi[0].tolist() == [33] == pos.gate[0].tolist()
    assert pos.image[0].tolist() == CONTENT_2X2
    assert pos.specials[0].tolist() == SPECIALS_2X2
    assert pos.row_breaks[0].tolist() == BREAKS_2X2
    assert pos.grid[0].tolist() == _grid(0, 5)
    assert pos.text[0].tolist() == [34, 35, 36, 37]
    assert pos.padding[0].tolist() == list(range(38, 62))
    # row 1: a 1x2-crop image (0-20), "a cat" 21-22, a 2x2-crop image (23-56), 5 words
    assert pos.boi[1].tolist() == [0, 23] and pos.eoi[1].tolist() == [20, 56]
    assert pos.image[1].tolist() == ([2, 3, 4, 5, 8, 9, 10, 11, 16, 17, 18, 19]
                                     + _shift(CONTENT_2X2, 23))
    assert pos.specials[1].tolist() == [1, 6, 7, 14, 15] + _shift(SPECIALS_2X2, 23)
    assert pos.row_breaks[1].tolist() == [12, 13] + _shift(BREAKS_2X2, 23)
    assert pos.grid[1].tolist() == _grid(0, 3) + _grid(1, 5)
    assert pos.text[1].tolist() == [21, 22, 57, 58, 59, 60, 61]
    assert pos.last_image.tolist() == [[32], [19, 55]]
    # independent checks: the model fills exactly the <image> ids, and the processor
    # marks every token of each image's replacement
    ids = batch.input_ids
    assert torch.equal(pos.image.mask, ids == model.hf_model.config.image_token_id)
    assert torch.equal(pos.image_side.mask, batch.inputs["mm_token_type_ids"].bool())


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("idefics3")
    batch = model.prepare(PROMPTS, images=_images(), padding_side="left")
    pos = batch.positions
    assert pos.padding[0].tolist() == list(range(24))
    assert pos.boi[0].tolist() == [24] and pos.eoi[0].tolist() == [57]
    assert pos.image[0].tolist() == _shift(CONTENT_2X2, 24)
    assert pos.row_breaks[0].tolist() == _shift(BREAKS_2X2, 24)
    assert pos.text[0].tolist() == [58, 59, 60, 61]
    assert pos.eoi[1].tolist() == [20, 56]
    assert pos.last.tolist() == [[61], [61]]


def test_metadata_and_views(tiny_zoo):
    model = tiny_zoo.model("idefics3")
    batch = model.prepare(PROMPTS, images=_images())
    metas = model.layout.image_grids(batch.inputs)
    assert metas == [SplitImage(2, 2, 2), SplitImage(1, 2, 2), SplitImage(2, 2, 2)]
    views = model.layout.image_views(10, 2, (20, 24), metas[0])
    assert [(v.name, v.first_row) for v in views] == [
        ("crop 1,1", 0), ("crop 1,2", 2), ("crop 2,1", 4), ("crop 2,2", 6), ("global", 8)]
    assert views[1].box == (12.0, 0.0, 24.0, 10.0)      # top right quarter of a 20x24 picture
    assert views[4].box == (0.0, 0.0, 24.0, 20.0)       # the global view: all of it
    with pytest.raises(LayoutError, match="SplitImage record"):
        model.layout.image_views(10, 2, (20, 24))


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("idefics3")
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["<image> a <image> b"], images=[[image(0)]])


def test_ids_that_disagree_with_the_layout_are_refused(tiny_zoo):
    model = tiny_zoo.model("idefics3")
    batch = model.prepare(["what is this"], images=[image(0)])
    ids, layout = batch.input_ids, model.layout
    short = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)       # one <image> of crop (1,1) lost
    with pytest.raises(LayoutError, match="3 '<image>' tokens at position 2.*image_seq_len = 4"):
        layout.locate(short, None, {"input_ids": short})
    no_marker = torch.cat([ids[:, :1], ids[:, 2:]], dim=1)   # <row_1_col_1> lost
    with pytest.raises(LayoutError, match="followed by '<image>'"):
        layout.locate(no_marker, None, {"input_ids": no_marker})
    swapped = ids.clone()                                    # crops out of order
    swapped[0, [1, 7]] = swapped[0, [7, 1]]
    with pytest.raises(LayoutError, match="crop markers out of order"):
        layout.locate(swapped, None, {"input_ids": swapped})
    stray = ids.clone()
    stray[0, -1] = model.hf_model.config.image_token_id     # an <image> id in the text
    with pytest.raises(LayoutError, match="outside an image block"):
        layout.locate(stray, None, {"input_ids": stray})
    pixels = batch.inputs["pixel_values"].clone()
    pixels[0, 1] = 0                                         # one crop dropped as padding
    with pytest.raises(LayoutError, match="5 frames .* pixel_values holds 4"):
        layout.locate(ids, None, dict(batch.inputs, pixel_values=pixels))
