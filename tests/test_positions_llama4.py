"""Exact Llama 4 positions: tiles with x/y separators, then <|image|> + the global view.

Tiny processor: 16 px tiles of 4 px patches, pixel-shuffled to 2x2 = 4 features per tile,
at most 4 tiles. A 12x12 picture fits one tile (no global view), a 20x24 one a 2x2 canvas
(min(32/20, 32/24) = 1.33, the smallest up-scaling), a 16x40 one 1x3 (scale 1, the
smallest canvas among 1x3 and 1x4). Ids: bos=1, BOI=4, EOI=5, <|image|>=6, <|patch|>=7,
x-sep=8, y-sep=9 (P = 4 patch tokens):
  row 0  "<|image|>\\nwhat is this"
         -> bos BOI <|image|> P EOI what is this                                      (11)
  row 1  "<|image|> a cat <|image|> describe the image a dog"
         -> bos BOI P x P y P x P y <|image|> P EOI a cat
                BOI P x P x P y <|image|> P EOI describe the image a dog              (57)
"""

import pytest
import torch

from tests.tiny import image
from tests.tiny.llama4 import SPEC
from tl_vlm.adapters.llama4 import Llama4Image
from tl_vlm.core.layout import LayoutError

PROMPTS, IMAGES = SPEC.prompts, SPEC.images


def _blocks(n_img, n_blocks):
    """grid rows of n_blocks stacked 2x2 blocks of image n_img"""
    return [[n_img, 2 * b + r, c] for b in range(n_blocks) for r in range(2) for c in range(2)]


def _batch(tiny_zoo, **kw):
    model = tiny_zoo.model("llama4")
    return model, model.prepare(PROMPTS, images=IMAGES, **kw)


def test_right_padding_and_two_images(tiny_zoo):
    model, batch = _batch(tiny_zoo)
    pos = batch.positions
    assert batch.input_ids.shape == (2, 57)
    assert batch.input_ids[0, :11].tolist()[:8] == [1, 4, 6, 7, 7, 7, 7, 5]
    assert pos.boi.tolist() == [[1], [1, 30]]
    assert pos.eoi.tolist() == [[7], [27, 51]] and pos.gate.tolist() == [[7], [27, 51]]
    assert pos.image.tolist() == [
        [3, 4, 5, 6],
        [2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 19, 20, 23, 24, 25, 26,
         31, 32, 33, 34, 36, 37, 38, 39, 41, 42, 43, 44, 47, 48, 49, 50]]
    assert pos.row_breaks.tolist() == [[], [11, 21, 45]]
    assert pos.specials.tolist() == [[2], [6, 16, 22, 35, 40, 46]]
    assert pos.text.tolist() == [[0, 8, 9, 10], [0, 28, 29, 52, 53, 54, 55, 56]]
    assert pos.padding.tolist() == [list(range(11, 57)), []]
    assert pos.last.tolist() == [[10], [56]]
    assert pos.grid[0].tolist() == _blocks(0, 1)                      # the one tile
    assert pos.grid[1].tolist() == _blocks(0, 5) + _blocks(1, 4)      # 4 tiles + global; 3 + global
    # The patch tokens are exactly where HF puts the image features.
    assert torch.equal(batch.input_ids == model.hf_model.config.image_token_id, pos.image.mask)


def test_left_padding_shifts_everything(tiny_zoo):
    model, batch = _batch(tiny_zoo, padding_side="left")
    pos = batch.positions
    assert pos.padding.tolist() == [list(range(46)), []]
    assert pos.boi.tolist() == [[47], [1, 30]]
    assert pos.image.tolist()[0] == [49, 50, 51, 52]
    assert pos.specials.tolist()[0] == [48] and pos.gate.tolist() == [[53], [27, 51]]
    assert pos.text.tolist() == [[46, 54, 55, 56], [0, 28, 29, 52, 53, 54, 55, 56]]
    assert pos.grid[0].tolist() == _blocks(0, 1)


def test_prompt_without_image_in_a_batch_with_images(tiny_zoo):
    model = tiny_zoo.model("llama4")
    batch = model.prepare(["what is this", "a cat"], images=[None, image(1)])
    pos = batch.positions
    assert pos.boi.tolist() == [[], [1]] and pos.row_breaks.tolist() == [[], [11, 21]]
    assert pos.image.counts.tolist() == [0, 20]
    assert pos.grid[0].shape == (0, 3) and pos.grid[1].tolist() == _blocks(0, 5)


@torch.no_grad()
def test_chunked_layer_attends_within_chunks_counted_from_the_first_token(tiny_zoo):
    """Layer 0 (RoPE) attends inside chunks of 8 tokens, counted from each example's first
    real token (so left padding does not move them); layer 1 (NoPE) over the whole past."""
    model, batch = _batch(tiny_zoo, padding_side="left")
    _, cache = model.run_with_cache(batch)
    chunked, full = cache["blocks.0.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"]
    # row 0 starts at 46: chunks 46..53, 54..61
    assert (chunked[0, :, 54, 53] == 0).all() and (chunked[0, :, 54, 54] > 0).all()
    assert (chunked[0, :, 53, 46] > 0).all() and (full[0, :, 54, 46] > 0).all()
    # row 1 starts at 0: chunks 0..7, 8..15
    assert (chunked[1, :, 9, 7] == 0).all() and (chunked[1, :, 9, 8] > 0).all()
    assert (full[1, :, 9, 7] > 0).all()


@torch.no_grad()
def test_temperature_tuning_equals_hf(tiny_zoo):
    """floor_scale 4: the NoPE layer scales its queries by 1 + 0.1 log1p(floor((i + 1) / 4)),
    i the index in the padded sequence; tl_vlm's hook_rot_q is after it, and the logits
    are HF's on either padding side."""
    import transformers

    model = tiny_zoo.variant("llama4", "temperature", floor_scale=4)
    path = str(tiny_zoo.variant_path("llama4", "temperature", floor_scale=4))
    plain = tiny_zoo.model("llama4")
    for side in ("right", "left"):
        batch = model.prepare(PROMPTS, images=IMAGES, padding_side=side)
        mask = batch.attention_mask.bool()
        got = model(batch)
        for impl in ("eager", "sdpa"):
            ref = transformers.Llama4ForConditionalGeneration.from_pretrained(
                path, attn_implementation=impl).eval()
            torch.testing.assert_close(got[mask], ref(**batch.inputs).logits[mask],
                                       atol=1e-4, rtol=0)
        # same weights, temperature off (floor 8192): only the NoPE layer's queries differ
        assert (plain(batch)[mask] - got[mask]).abs().max() > 1e-4
    _, cache = model.run_with_cache(batch, names_filter=lambda n: "hook_rot_q" in n or
                                    n == "blocks.1.attn.q.hook_out")
    q = cache["blocks.1.attn.q.hook_out"]                           # [b, pos, head, d], no RoPE
    scale = 1 + 0.1 * torch.log1p(torch.floor((torch.arange(57.0) + 1) / 4))
    torch.testing.assert_close(cache["blocks.1.attn.hook_rot_q"], q * scale[None, :, None, None])


def test_image_views_place_tiles_and_global_view(tiny_zoo):
    model, batch = _batch(tiny_zoo)
    layout = model.layout
    grids = layout.image_grids(batch.inputs)
    assert grids == [Llama4Image(1, 1, 2), Llama4Image(2, 2, 2), Llama4Image(1, 3, 2)]
    one = layout.image_views(2, 2, (12, 12), grids[0])               # fitted to 16x16, x4/3
    assert [(v.name, v.first_row, v.box) for v in one] == [("global", 0, (0.0, 0.0, 12.0, 12.0))]
    four = layout.image_views(10, 2, (20, 24), grids[1])             # 20x24 kept, canvas 32x32
    assert [(v.name, v.first_row) for v in four] == [
        ("tile 0,0", 0), ("tile 0,1", 2), ("tile 1,0", 4), ("tile 1,1", 6), ("global", 8)]
    assert four[3].box == (16.0, 16.0, 32.0, 32.0) and four[4].box == (0.0, 0.0, 24.0, 20.0)
    three = layout.image_views(8, 2, (16, 40), grids[2])             # canvas 16x48: padded
    assert [v.box for v in three] == [(0.0, 0.0, 16.0, 16.0), (16.0, 0.0, 32.0, 16.0),
                                      (32.0, 0.0, 48.0, 16.0), (0.0, 0.0, 40.0, 16.0)]
    assert [v.name for v in layout.image_views(8, 2, None, grids[2])][-1] == "global"


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("llama4")
    with pytest.raises(LayoutError, match="1 image placeholder.*2 image"):
        model.prepare(["<|image|> what is this"], images=[[image(0), image(1)]])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("llama4")
    batch = model.prepare(["what is this"], images=[image(1)])      # 2x2 tiles + global
    ids, inputs = batch.input_ids, batch.inputs
    assert inputs["pixel_values"].shape[0] == 5
    with pytest.raises(LayoutError, match="pixel_values hold 4 tiles but .* need 5"):
        model.layout.locate(ids, None, dict(inputs, pixel_values=inputs["pixel_values"][:4]))
    one_short = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)            # a patch of tile 0 gone
    with pytest.raises(LayoutError, match=r"expected '<\|patch\|>' at position 5 for a 2x2"):
        model.layout.locate(one_short, None, inputs)
    # cut inside the image: its separators then describe 1x3 tiles, not the pixels' 2x2
    with pytest.raises(LayoutError, match=r"hold 5 tiles but the ids' 1 image\(s\) need 4"):
        model.layout.locate(ids[:, :20], None, inputs)
    with pytest.raises(LayoutError, match="position 27 .* found nothing .the sequence ends"):
        model.layout.locate(ids[:, :27], None, inputs)                # EOI cut off
    no_x = torch.cat([ids[:, :6], ids[:, 7:]], dim=1)                # an x-separator gone
    with pytest.raises(LayoutError, match="1 tile separators do not make 2 equal rows"):
        model.layout.locate(no_x, None, inputs)
    ratios = dict(inputs, aspect_ratios=torch.tensor([[1, 4]]))
    with pytest.raises(LayoutError, match="aspect_ratios .* disagree"):
        model.layout.locate(ids, None, ratios)
    stray = torch.cat([ids, ids[:, 2:3]], dim=1)                       # a patch after EOI
    with pytest.raises(LayoutError, match="outside any"):
        model.layout.locate(stray, None, inputs)
