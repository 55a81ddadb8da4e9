"""Exact InternVL positions: ``<img>``, 16 ``<IMG_CONTEXT>`` per tile, ``</img>``.

Tiny model: 16 px tiles, 4x4 features each; at most 4 tiles + a thumbnail. A 20x24
(h x w) image is one tile: 1 + 16 + 1 = 18 tokens. A 16x40 image is cut 3x1 (2.5 is as
close to 2 as to 3; 3 tiles win the tie as 640 px^2 > 0.5 * 3 * 256), plus a thumbnail:
4 tiles = 64 features, 66 tokens. A prompt without a placeholder gets
``<IMG_CONTEXT>\\n`` in front.
"""

import pytest
import torch

from tests.tiny import image
from tl_vlm.adapters.internvl import tile_arrangement
from tl_vlm.core.layout import LayoutError

PROMPTS = ["what is this", "<IMG_CONTEXT> a cat <IMG_CONTEXT> describe the image a dog"]
TILE = [(r, c) for r in range(4) for c in range(4)]


def _images():
    return [image(0), [image(1), image(2, (16, 40))]]


def _processor_marks(model, batch, side):
    """The positions InternVLProcessor itself marks as image tokens (mm_token_type_ids)."""
    texts = [model.layout.with_placeholders(p, len(i) if isinstance(i, list) else 1)
             for p, i in zip(PROMPTS, _images())]
    flat = [image(0), image(1), image(2, (16, 40))]
    out = model.processor(text=texts, images=flat, padding=True, padding_side=side,
                          return_tensors="pt", return_mm_token_type_ids=True)
    assert torch.equal(out["input_ids"], batch.input_ids)
    return [row.nonzero().flatten().tolist() for row in torch.as_tensor(out["mm_token_type_ids"])]


def test_right_padding_one_tile_and_a_tiled_image(tiny_zoo):
    model = tiny_zoo.model("internvl")
    batch = model.prepare(PROMPTS, images=_images())
    pos = batch.positions
    assert batch.padding_side == "right" and batch.input_ids.shape == (2, 91)
    # row 0: <img> 0, 16 features 1-16, </img> 17, "what is this" 18-20, padding 21-90
    assert pos.boi[0].tolist() == [0]
    assert pos.image[0].tolist() == list(range(1, 17))
    assert pos.eoi[0].tolist() == [17] and pos.gate[0].tolist() == [17]
    assert pos.text[0].tolist() == [18, 19, 20]
    assert pos.padding[0].tolist() == list(range(21, 91))
    assert pos.grid[0].tolist() == [[0, r, c] for r, c in TILE]
    # row 1: image 0 at 0-17, "a cat" 18-19, image 1: <img> 20, 64 features 21-84
    # (tiles (0,0), (0,1), (0,2), thumbnail: grid rows 0-3, 4-7, 8-11, 12-15), </img> 85
    assert pos.boi[1].tolist() == [0, 20]
    assert pos.image[1].tolist() == list(range(1, 17)) + list(range(21, 85))
    assert pos.eoi[1].tolist() == [17, 85] and pos.gate[1].tolist() == [17, 85]
    assert pos.text[1].tolist() == [18, 19, 86, 87, 88, 89, 90]
    assert pos.grid[1].tolist() == ([[0, r, c] for r, c in TILE]
                                    + [[1, 4 * t + r, c] for t in range(4) for r, c in TILE])
    assert pos.row_breaks.is_empty() and pos.specials.is_empty()
    assert pos.last.tolist() == [[20], [90]]
    assert pos.last_image.tolist() == [[16], [16, 84]]
    marked = _processor_marks(model, batch, "right")
    assert marked == [sorted(pos.boi[b].tolist() + pos.image[b].tolist() + pos.eoi[b].tolist())
                      for b in range(2)]


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("internvl")
    batch = model.prepare(PROMPTS, images=_images(), padding_side="left")
    pos = batch.positions
    assert batch.padding_side == "left"
    assert pos.padding[0].tolist() == list(range(70))
    assert pos.boi[0].tolist() == [70] and pos.eoi[0].tolist() == [87]
    assert pos.image[0].tolist() == list(range(71, 87))
    assert pos.text[0].tolist() == [88, 89, 90]
    assert pos.boi[1].tolist() == [0, 20] and pos.eoi[1].tolist() == [17, 85]
    assert pos.last.tolist() == [[90], [90]]
    marked = _processor_marks(model, batch, "left")
    assert marked == [sorted(pos.boi[b].tolist() + pos.image[b].tolist() + pos.eoi[b].tolist())
                      for b in range(2)]


def test_back_to_back_images(tiny_zoo):
    model = tiny_zoo.model("internvl")
    batch = model.prepare(["<IMG_CONTEXT><IMG_CONTEXT> yes"], images=[[image(1), image(2)]])
    pos = batch.positions
    assert pos.boi[0].tolist() == [0, 18] and pos.eoi[0].tolist() == [17, 35]
    assert pos.image[0].tolist() == list(range(1, 17)) + list(range(19, 35))
    assert pos.text[0].tolist() == [36]


def test_tile_arrangement_and_views(tiny_zoo):
    model = tiny_zoo.model("internvl")
    assert tile_arrangement(16, 40, (16, 16), 1, 4) == (3, 1)
    assert tile_arrangement(20, 24, (16, 16), 1, 4) == (1, 1)
    assert tile_arrangement(40, 16, (16, 16), 1, 4) == (1, 3)
    views = model.layout.image_views(16, 4, (16, 40))
    assert [v.name for v in views] == ["tile 0,0", "tile 0,1", "tile 0,2", "thumbnail"]
    assert [v.first_row for v in views] == [0, 4, 8, 12]
    assert views[1].box == pytest.approx((40 / 3, 0.0, 80 / 3, 16.0))
    assert views[3].box == (0.0, 0.0, 40.0, 16.0)
    [one] = model.layout.image_views(4, 4, (20, 24))
    assert one.name == "image" and one.box == (0.0, 0.0, 24.0, 20.0)
    assert [v.name for v in model.layout.image_views(16, 4)] == ["tile 0", "tile 1", "tile 2",
                                                                 "thumbnail"]
    with pytest.raises(LayoutError, match="1x1 tiles \\+ a thumbnail = 2 blocks.*hold 4"):
        model.layout.image_views(16, 4, (20, 24))
    with pytest.raises(LayoutError, match="stack of 4x4 tile blocks"):
        model.layout.image_views(6, 4, (20, 24))


def test_ids_that_disagree_with_the_tiles_are_refused(tiny_zoo):
    model = tiny_zoo.model("internvl")
    batch = model.prepare(PROMPTS, images=_images())
    ids, mask, inputs = batch.input_ids, batch.attention_mask, batch.inputs
    # one feature fewer in image 0 of row 0: 15 is not a whole number of 16-token tiles
    cut = torch.cat([ids[:, :1], ids[:, 2:]], dim=1)
    with pytest.raises(LayoutError, match="15 <IMG_CONTEXT> tokens are not a whole number"):
        model.layout.locate(cut[:1], None, {})
    # pixel_values of one tile fewer than the ids hold (1 + 1 + 4 = 6 tiles)
    with pytest.raises(LayoutError, match="hold 6 tile\\(s\\).*pixel_values has 5"):
        model.layout.locate(ids, mask, dict(inputs, pixel_values=inputs["pixel_values"][:5]))
    with pytest.raises(LayoutError, match="expected EOI"):   # truncated inside the image
        model.layout.locate(ids[:1, :10], None, {})


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("internvl")
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["<IMG_CONTEXT> a <IMG_CONTEXT> b"], images=[[image(0)]])


@pytest.mark.parametrize("max_tiles", [4, 12])
def test_tile_arrangement_is_the_processors(max_tiles):
    """tile_arrangement (used to place the tiles on the picture) agrees with GotOcr2's own
    rule, and the processor's tile count follows from it, over many picture sizes."""
    from transformers import GotOcr2ImageProcessorPil
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas)

    ip = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                  max_patches=max_tiles)
    for h in (40, 300, 448, 480, 700, 896, 1080, 1920, 3000):
        for w in (40, 300, 448, 640, 896, 1080, 1920, 4000):
            cols, rows = tile_arrangement(h, w, (448, 448), 1, max_tiles)
            assert (cols, rows) == get_optimal_tiled_canvas((h, w), (448, 448), 1, max_tiles)
            blocks = 1 if cols * rows == 1 else cols * rows + 1
            assert ip.get_number_of_image_patches(h, w, {"crop_to_patches": True}) == blocks


@torch.no_grad()
def test_internvl3_5_text_tower_with_qk_norms(tiny_zoo):
    """InternVL3.5's Qwen3 decoder (per-head q/k RMSNorm): logits equal HF's, and the
    norms keep their hook points."""
    import transformers

    model = tiny_zoo.variant("internvl", "qwen3", text_model="qwen3")
    batch = model.prepare(PROMPTS, images=_images())
    ref = transformers.InternVLForConditionalGeneration.from_pretrained(
        str(tiny_zoo.variant_path("internvl", "qwen3", text_model="qwen3")),
        attn_implementation="sdpa").eval()
    assert type(ref.model.language_model).__name__ == "Qwen3Model"
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(model(batch)[mask], ref(**batch.inputs).logits[mask],
                               atol=1e-5, rtol=0)
    _, cache = model.run_with_cache(batch, names_filter=lambda n: "q_norm" in n)
    assert any(name.startswith("blocks.1.attn.q_norm") for name in cache.keys())
