"""Exact LLaVA-OneVision positions (every feature is one ``<image>`` id).

Tiny model: 16px tiles, 4px patches -> 4x4 base grid; pinpoints [[16,16],[16,32],[32,16]].
A prompt's only image is tiled: a 20x24 (h x w) image takes the 16x32 pinpoint (1x2
tiles -> a 4x8 map), unpadded to 4x4 (round(24 * 4/20) = 4 cols kept of 8), so
16 base + 4 rows x (4 + newline) = 36 tokens. In a two-image prompt each image is
16 base + 1 newline = 17 tokens.
"""

import pytest
import torch

from tests.tiny import image
from tests.tiny.llava_onevision import build
from tl_vlm import HookedVLM
from tl_vlm.core.layout import LayoutError

PROMPTS = ["what is this", "<image> a cat <image> describe the image a dog"]
BASE = [[0, r, c] for r in range(4) for c in range(4)]


def _images():
    return [image(0), [image(1), image(2, (30, 18))]]


def _newline_positions(hf_model, inputs):
    """Where the language model's input embeddings are ``image_newline`` (HF's own packing)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = hf_model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        hf_model(**inputs)
    handle.remove()
    newline = hf_model.model.image_newline
    return [row.nonzero().flatten().tolist()
            for row in (seen["embeds"] == newline).all(-1)]


def test_right_padding_tiles_and_two_images(tiny_zoo):
    model = tiny_zoo.model("llava_onevision")
    batch = model.prepare(PROMPTS, images=_images())
    pos = batch.positions
    assert batch.inputs["batch_num_images"].tolist() == [1, 2]
    assert batch.input_ids.shape == (2, 41)
    # row 0: base 0-15, tile rows at 16-19, 21-24, 26-29, 31-34, newlines 20,25,30,35
    assert pos.image[0].tolist() == (list(range(16)) + [16, 17, 18, 19, 21, 22, 23, 24,
                                                         26, 27, 28, 29, 31, 32, 33, 34])
    assert pos.row_breaks[0].tolist() == [20, 25, 30, 35]
    assert pos.grid[0].tolist() == BASE + [[0, 4 + r, c] for r in range(4) for c in range(4)]
    assert pos.text[0].tolist() == [36, 37, 38]
    assert pos.padding[0].tolist() == [39, 40]
    assert pos.last[0].tolist() == [38]
    # row 1: image 0 base 0-15 + newline 16, "a cat" 17-18, image 1 base 19-34 + newline 35
    assert pos.image[1].tolist() == list(range(16)) + list(range(19, 35))
    assert pos.row_breaks[1].tolist() == [16, 35]
    assert pos.grid[1].tolist() == BASE + [[1, r, c] for _, r, c in BASE]
    assert pos.text[1].tolist() == [17, 18, 36, 37, 38, 39, 40]
    assert pos.last_image.tolist() == [[34], [15, 34]]
    for name in ("boi", "eoi", "gate", "specials"):
        assert getattr(pos, name).is_empty(), name
    # independent check: HF puts its image_newline vector exactly at the row breaks
    ref = tiny_zoo.reference("llava_onevision")
    assert _newline_positions(ref, batch.inputs) == pos.row_breaks.tolist()


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("llava_onevision")
    batch = model.prepare(PROMPTS, images=_images(), padding_side="left")
    pos = batch.positions
    assert pos.padding[0].tolist() == [0, 1]
    assert pos.row_breaks[0].tolist() == [22, 27, 32, 37]
    assert pos.image[0].tolist()[:3] == [2, 3, 4] and pos.image[0].tolist()[-1] == 36
    assert pos.text[0].tolist() == [38, 39, 40]
    assert pos.row_breaks[1].tolist() == [16, 35]
    assert pos.last.tolist() == [[40], [40]]
    ref = tiny_zoo.reference("llava_onevision")
    assert _newline_positions(ref, batch.inputs) == pos.row_breaks.tolist()


def test_tall_image_and_back_to_back_pair(tiny_zoo):
    model = tiny_zoo.model("llava_onevision")
    # 30x18 alone: pinpoint 32x16 (2x1 tiles -> 8x4 map), rows kept round(30 * 4/18) = 6
    batch = model.prepare(["<image><image> yes", "<image> no"],
                          images=[[image(1), image(2)], [image(3, (30, 18))]])
    pos = batch.positions
    assert pos.image[0].tolist() == list(range(16)) + list(range(17, 33))
    assert pos.row_breaks[0].tolist() == [16, 33]
    assert pos.text[0].tolist() == [34]
    tiles = [16 + 5 * r + c for r in range(6) for c in range(4)]
    assert pos.image[1].tolist() == list(range(16)) + tiles
    assert pos.row_breaks[1].tolist() == [20, 25, 30, 35, 40, 45]
    assert pos.grid[1].tolist() == BASE + [[0, 4 + r, c] for r in range(6) for c in range(4)]
    assert pos.text[1].tolist() == [46]
    ref = tiny_zoo.reference("llava_onevision")
    assert _newline_positions(ref, batch.inputs) == pos.row_breaks.tolist()


def test_shrunk_tile_map(tmp_path):
    """anyres_max_1: a 16x40 image's 4x8 map (ratio sqrt(2) > 1.1) is shrunk to 2x5."""
    torch.manual_seed(0)
    build(tmp_path, vision_aspect_ratio="anyres_max_1")
    model = HookedVLM.from_pretrained(str(tmp_path))
    batch = model.prepare(["yes"], images=[image(4, (16, 40))])
    pos = batch.positions
    assert pos.image[0].tolist() == list(range(16)) + [16, 17, 18, 19, 20, 22, 23, 24, 25, 26]
    assert pos.row_breaks[0].tolist() == [21, 27]
    assert pos.grid[0].tolist() == BASE + [[0, 4 + r, c] for r in range(2) for c in range(5)]
    assert pos.text[0].tolist() == [28]
    assert _newline_positions(model.hf_model, batch.inputs) == [[21, 27]]


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("llava_onevision")
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["<image> a <image> b"], images=[[image(0)]])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("llava_onevision")
    batch = model.prepare(PROMPTS, images=_images())
    ids, mask, inputs = batch.input_ids, batch.attention_mask, batch.inputs
    sizes = inputs["image_sizes"].clone()
    sizes[0] = torch.tensor([30, 18])        # would be 46 tokens, the ids hold 36
    with pytest.raises(LayoutError, match="gives 46 <image> features but the run has 36"):
        model.layout.locate(ids, mask, dict(inputs, image_sizes=sizes))
    counts = torch.tensor([1, 1, 1])           # would tile the pair's images too
    with pytest.raises(LayoutError, match="gives 36 <image> features but the run has 17"):
        model.layout.locate(ids, mask, dict(inputs, batch_num_images=counts))
    with pytest.raises(LayoutError, match="batch_num_images counts 4 images"):
        model.layout.locate(ids, mask, dict(inputs, batch_num_images=torch.tensor([2, 2])))
    with pytest.raises(LayoutError, match="run has 30 left"):   # truncated inside the image
        model.layout.locate(ids[:1, :30], None, inputs)
    no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(LayoutError, match="need image_sizes"):
        model.layout.locate(ids, mask, no_sizes)
