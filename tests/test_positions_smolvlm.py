"""Exact SmolVLM2 positions: 24 px crops (6x6 patches pixel-shuffled by 3: 2x2 features),
longest edge 48 px; the layout is Idefics3's (tests/test_positions_idefics3.py).

A 20x24 (h x w) picture -> 48x48 px -> 2x2 crops; 12x30 -> 24x48 px -> 1x2 crops;
30x18 -> 48x48 px -> 2x2 crops. A 1x2-crop image is 21 tokens:

    0 FAKE  1 <row_1_col_1>  2-5 <image>  6 FAKE  7 <row_1_col_2>  8-11 <image>
    12 "\\n"  13 "\\n"  14 FAKE  15 <global-img>  16-19 <image>  20 FAKE
"""

import torch

from tests.tiny import image
from tl_vlm.adapters.idefics3 import SplitImage

PROMPTS = ["what is this", "<image> a cat <image> describe the image a dog"]


def _images():
    return [image(0), [image(1, (12, 30)), image(2, (30, 18))]]


def test_family_reuses_the_idefics3_adapter_and_layout(tiny_zoo):
    model = tiny_zoo.model("smolvlm")
    assert model.family.name == "smolvlm"
    assert type(model.adapter).__name__ == "Idefics3Adapter"
    assert type(model.hf_model).__name__ == "SmolVLMForConditionalGeneration"
    assert model.layout.global_token == "<global-img>" and model.layout.side == 2


def test_right_and_left_padding(tiny_zoo):
    model = tiny_zoo.model("smolvlm")
    batch = model.prepare(PROMPTS, images=_images(), return_mm_token_type_ids=True)
    pos = batch.positions
    assert batch.input_ids.shape == (2, 62)
    assert model.layout.image_grids(batch.inputs) == [
        SplitImage(2, 2, 2), SplitImage(1, 2, 2), SplitImage(2, 2, 2)]
    # row 1: the 1x2-crop image at 0-20, "a cat" 21-22, a 2x2-crop image at 23-56
    assert pos.boi[1].tolist() == [0, 23] and pos.eoi[1].tolist() == [20, 56]
    assert pos.gate[1].tolist() == [20, 56]
    assert pos.image[1].tolist()[:12] == [2, 3, 4, 5, 8, 9, 10, 11, 16, 17, 18, 19]
    assert pos.specials[1].tolist()[:5] == [1, 6, 7, 14, 15]
    assert pos.row_breaks[1].tolist() == [12, 13, 35, 48, 49]
    assert pos.text[1].tolist() == [21, 22, 57, 58, 59, 60, 61]
    assert pos.text[0].tolist() == [34, 35, 36, 37] and pos.eoi[0].tolist() == [33]
    # SmolVLMProcessor marks only the <image> tokens
    assert torch.equal(pos.image.mask, batch.inputs["mm_token_type_ids"].bool())
    left = model.prepare(PROMPTS, images=_images(), padding_side="left").positions
    assert left.padding[0].tolist() == list(range(24))
    assert left.boi[0].tolist() == [24] and left.eoi[0].tolist() == [57]
    assert left.eoi[1].tolist() == [20, 56]
