"""Exact Mistral 3 positions: one [IMG] per merged 2x2 patch (8 px per token in the tiny
model: 4 px patches x merge 2), rows ended by [IMG_BREAK], the last by [IMG_END].

Images (h x w) -> grid: 32x24 -> 4x3, 16x32 -> 2x4, 24x24 -> 3x3 (longest edge <= 32).
"""

import pytest
import torch

from tests.tiny import image
from tl_vlm.core.layout import LayoutError

PROMPTS = ["what is this", "[IMG] a cat [IMG] describe the image a dog"]


def _images():
    return [image(0, (32, 24)), [image(1, (16, 32)), image(2, (24, 24))]]


def _grid(n, rows, cols):
    return [[n, r, c] for r in range(rows) for c in range(cols)]


def test_family_tower_and_merger(tiny_zoo):
    model = tiny_zoo.model("mistral3")
    assert model.family.name == "mistral3"
    hf = model.hf_model
    # the Pixtral tower is wrapped whole; the projector (with its patch merger) is TL's
    # vision projection bridge
    assert type(hf.model.vision_tower).__name__ == "GeneralizedComponent"
    assert type(hf.model.vision_tower.original_component).__name__ == "PixtralVisionModel"
    projector = hf.model.multi_modal_projector.original_component
    assert type(projector).__name__ == "Mistral3MultiModalProjector"
    assert projector.patch_merger.spatial_merge_size == 2
    layout = model.layout
    assert (layout.placeholder, layout.row_break_token, layout.eoi_token) == (
        "[IMG]", "[IMG_BREAK]", "[IMG_END]")
    assert layout.boi_token is None and not layout.native
    assert layout.token_px == 8


def test_pixels_per_token(tiny_zoo):
    model = tiny_zoo.model("mistral3")
    batch = model.prepare(PROMPTS, images=_images())
    # image_sizes are the resized sizes, multiples of 8 px; the tower sees 4 px patches
    assert batch.inputs["image_sizes"].tolist() == [[32, 24], [16, 32], [24, 24]]
    assert batch.inputs["pixel_values"].shape == (3, 3, 32, 32)  # padded to the largest


def test_right_padding_and_two_images(tiny_zoo):
    model = tiny_zoo.model("mistral3")
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
    tok = model.layout.tokenizer
    ids = batch.input_ids[1]
    assert set(tok.convert_ids_to_tokens(ids[pos.image[1]].tolist())) == {"[IMG]"}
    assert set(tok.convert_ids_to_tokens(ids[pos.row_breaks[1]].tolist())) == {"[IMG_BREAK]"}
    assert set(tok.convert_ids_to_tokens(ids[pos.eoi[1]].tolist())) == {"[IMG_END]"}


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("mistral3")
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
    model = tiny_zoo.model("mistral3")
    batch = model.prepare(["[IMG][IMG] yes"], images=[[image(1, (16, 32)), image(2, (24, 24))]])
    pos = batch.positions
    assert pos.image[0].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 14, 15, 16, 18, 19, 20]
    assert pos.row_breaks[0].tolist() == [4, 13, 17]
    assert pos.gate[0].tolist() == [9, 21]
    assert pos.text[0].tolist() == [22]
    assert pos.grid[0].tolist() == _grid(0, 2, 4) + _grid(1, 3, 3)


def test_one_row_image_has_no_break(tiny_zoo):
    model = tiny_zoo.model("mistral3")
    # 8x32 px -> 1 row of 4 tokens: [IMG] x4 then [IMG_END], no [IMG_BREAK]
    batch = model.prepare(["[IMG] yes"], images=[image(3, (8, 32))])
    pos = batch.positions
    assert pos.image[0].tolist() == [0, 1, 2, 3]
    assert pos.row_breaks[0].tolist() == []
    assert pos.gate[0].tolist() == [4]
    assert pos.grid[0].tolist() == _grid(0, 1, 4)


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("mistral3")
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["[IMG] a [IMG] b"], images=[[image(0, (32, 24))]])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("mistral3")
    batch = model.prepare(PROMPTS, images=_images())
    ids, mask = batch.input_ids, batch.attention_mask
    # image 0 of prompt 0 claimed to be 24x32 (3x4) while its breaks say 4x3
    sizes = batch.inputs["image_sizes"].clone()
    sizes[0] = torch.tensor([24, 32])
    with pytest.raises(LayoutError, match="3x4 grid"):
        model.layout.locate(ids, mask, dict(batch.inputs, image_sizes=sizes))
    # same token count (12), other shape: 2x6 has 12 tokens but rows of 3
    sizes[0] = torch.tensor([16, 48])
    with pytest.raises(LayoutError, match="row breaks disagree"):
        model.layout.locate(ids, mask, dict(batch.inputs, image_sizes=sizes))
    # the tower's patch size instead of patch x merge: 8x6 would need 48 tokens
    sizes[0] = torch.tensor([32, 24]) * 2
    with pytest.raises(LayoutError):
        model.layout.locate(ids, mask, dict(batch.inputs, image_sizes=sizes))
    # truncated: prompt 0 cut inside its image, so its [IMG_END] is gone
    with pytest.raises(LayoutError, match=r"expected EOI .* right after its image tokens.*but found"):
        model.layout.locate(ids[:1, :10], None, batch.inputs)
    # metadata for one image fewer than the ids hold
    with pytest.raises(LayoutError, match="more images"):
        model.layout.locate(ids, mask, dict(batch.inputs, image_sizes=batch.inputs["image_sizes"][:2]))
    # pixels without image_sizes
    inputs = {k: v for k, v in batch.inputs.items() if k != "image_sizes"}
    with pytest.raises(LayoutError, match="image_sizes"):
        model.layout.locate(ids, mask, inputs)


def test_processor_and_model_merge_must_agree(tiny_zoo):
    model = tiny_zoo.model("mistral3")
    layout_cls = type(model.layout)
    processor = model.layout.processor
    config = model.hf_model.config
    merge = processor.spatial_merge_size
    try:
        processor.spatial_merge_size = 1
        with pytest.raises(LayoutError, match="disagree"):
            layout_cls(processor, config)
    finally:
        processor.spatial_merge_size = merge
