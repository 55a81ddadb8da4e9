"""Exact LLaVA-NeXT positions (every feature, newlines included, is one ``<image>`` id).

Tiny model: 16 px tiles, 4 px patches -> 4x4 base grid (CLS dropped); pinpoints
[[16, 32], [32, 16]]. Every image is tiled, also in a two-image prompt:

* 20x24 (h x w): pinpoint 16x32 (1x2 tiles -> a 4x8 map), unpadded to 4x4 (int(24 *
  4/20) = 4 cols are the picture, (8 - 4) // 2 = 2 cut each side): 16 base + 4 rows x
  (4 + newline) = 36 tokens;
* 30x18: pinpoint 32x16 (2x1 tiles -> 8x4), unpadded to 6x4 (int(30 * 4/18) = 6 rows,
  1 cut each side): 16 + 6 x 5 = 46 tokens.
"""

import pytest
import torch

from tests.tiny import image
from tl_vlm.core.layout import LayoutError
from tl_vlm.plot import token_boxes

PROMPTS = ["what is this", "<image> a cat <image> describe the image a dog"]
BASE = [(r, c) for r in range(4) for c in range(4)]


def _images():
    return [image(0), [image(1), image(2, (30, 18))]]


def _tiles(start, rows, cols):
    """Tile-map positions and row breaks of rows x cols features from ``start``."""
    content = [start + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
    breaks = [start + r * (cols + 1) + cols for r in range(rows)]
    return content, breaks


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
    return [row.nonzero().flatten().tolist() for row in (seen["embeds"] == newline).all(-1)]


def test_right_padding_every_image_tiled(tiny_zoo):
    model = tiny_zoo.model("llava_next")
    batch = model.prepare(PROMPTS, images=_images())
    pos = batch.positions
    assert batch.padding_side == "right" and batch.input_ids.shape == (2, 89)
    # row 0: base 0-15, 4 tile rows of 4 at 16-19, 21-24, 26-29, 31-34, newlines 20..35
    tiles, breaks = _tiles(16, 4, 4)
    assert pos.image[0].tolist() == list(range(16)) + tiles
    assert pos.row_breaks[0].tolist() == breaks == [20, 25, 30, 35]
    assert pos.grid[0].tolist() == ([[0, r, c] for r, c in BASE]
                                    + [[0, 4 + r, c] for r in range(4) for c in range(4)])
    assert pos.text[0].tolist() == [36, 37, 38]
    assert pos.padding[0].tolist() == list(range(39, 89))
    # row 1: image 0 as row 0 (0-35), "a cat" 36-37, image 1: base 38-53, 6 tile rows of
    # 4 from 54 (newlines 58, 63, ..., 83), text 84-88
    tiles1, breaks1 = _tiles(54, 6, 4)
    assert pos.image[1].tolist() == list(range(16)) + tiles + list(range(38, 54)) + tiles1
    assert pos.row_breaks[1].tolist() == breaks + breaks1
    assert breaks1 == [58, 63, 68, 73, 78, 83]
    assert pos.grid[1].tolist() == ([[0, r, c] for r, c in BASE]
                                    + [[0, 4 + r, c] for r in range(4) for c in range(4)]
                                    + [[1, r, c] for r, c in BASE]
                                    + [[1, 4 + r, c] for r in range(6) for c in range(4)])
    assert pos.text[1].tolist() == [36, 37, 84, 85, 86, 87, 88]
    assert pos.last_image.tolist() == [[34], [34, 82]]
    for name in ("boi", "eoi", "gate", "specials"):
        assert getattr(pos, name).is_empty(), name
    # independent check: HF puts its image_newline vector exactly at the row breaks
    assert _newline_positions(tiny_zoo.reference("llava_next"), batch.inputs) \
        == pos.row_breaks.tolist()


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("llava_next")
    batch = model.prepare(PROMPTS, images=_images(), padding_side="left")
    pos = batch.positions
    assert batch.padding_side == "left"
    assert pos.padding[0].tolist() == list(range(50))
    assert pos.row_breaks[0].tolist() == [70, 75, 80, 85]
    assert pos.image[0].tolist()[:2] == [50, 51] and pos.image[0].tolist()[-1] == 84
    assert pos.text[0].tolist() == [86, 87, 88]
    assert pos.row_breaks[1].tolist() == [20, 25, 30, 35, 58, 63, 68, 73, 78, 83]
    assert pos.last.tolist() == [[88], [88]]
    assert _newline_positions(tiny_zoo.reference("llava_next"), batch.inputs) \
        == pos.row_breaks.tolist()


def test_back_to_back_pair(tiny_zoo):
    model = tiny_zoo.model("llava_next")
    batch = model.prepare(["<image><image> yes"], images=[[image(3, (30, 18)), image(4)]])
    pos = batch.positions
    first, breaks0 = _tiles(16, 6, 4)
    second, breaks1 = _tiles(46 + 16, 4, 4)
    assert pos.image[0].tolist() == list(range(16)) + first + list(range(46, 62)) + second
    assert pos.row_breaks[0].tolist() == breaks0 + breaks1
    assert pos.text[0].tolist() == [82]
    assert _newline_positions(tiny_zoo.reference("llava_next"), batch.inputs) \
        == pos.row_breaks.tolist()


def test_views_on_the_picture(tiny_zoo):
    model = tiny_zoo.model("llava_next")
    batch = model.prepare(["yes"], images=[image(0)])
    [meta] = model.layout.image_grids(batch.inputs)
    base, tiles = model.layout.image_views(8, 4, (20, 24), meta)
    assert (base.name, base.first_row, base.rows, base.cols) == ("base", 0, 4, 4)
    assert base.box == (0.0, 0.0, 24.0, 20.0)
    # the 16x32 canvas holds the picture resized to 16x20 (x0.8, width 19.2 rounded up)
    # pasted at x = 6; the kept cols 2-5 of 8 (4 canvas px each) span canvas x 8-24, i.e.
    # picture x (8 - 6) * 1.2 = 2.4 to (24 - 6) * 1.2 = 21.6
    assert (tiles.name, tiles.first_row, tiles.rows, tiles.cols) == ("tiles", 4, 4, 4)
    assert tiles.box == pytest.approx((2.4, 0.0, 21.6, 20.0))
    boxes = token_boxes(model, batch, images=[image(0)])
    assert boxes[0].tolist() == [0.0, 0.0, 6.0, 5.0]                    # base (0, 0)
    assert boxes[16].tolist() == pytest.approx([2.4, 0.0, 7.2, 5.0])    # tile map (0, 0)
    with pytest.raises(LayoutError, match="processor saw 24x20"):
        model.layout.image_views(8, 4, (30, 18), meta)
    with pytest.raises(LayoutError, match="NextImage record"):
        model.layout.image_views(8, 4, (20, 24))


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("llava_next")
    batch = model.prepare(PROMPTS, images=_images())
    ids, mask, inputs = batch.input_ids, batch.attention_mask, batch.inputs
    sizes = inputs["image_sizes"].clone()
    sizes[0] = torch.tensor([30, 18])        # would be 46 tokens, the ids hold 36
    with pytest.raises(LayoutError, match="gives 46 <image> features but the run has 36"):
        model.layout.locate(ids, mask, dict(inputs, image_sizes=sizes))
    with pytest.raises(LayoutError, match="run has 30 left"):   # truncated inside the image
        model.layout.locate(ids[:1, :30], None, inputs)
    with pytest.raises(LayoutError, match="describes 3 images but the token ids hold 1"):
        model.layout.locate(ids[:1], None, inputs)
    no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(LayoutError, match="need image_sizes"):
        model.layout.locate(ids, mask, no_sizes)
    with pytest.raises(LayoutError, match="pixel_values holds 2 images but image_sizes 3"):
        model.layout.locate(ids, mask, dict(inputs, pixel_values=inputs["pixel_values"][:2]))


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("llava_next")
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["<image> a <image> b"], images=[[image(0)]])
