"""Exact Gemma 3 positions: <bos>, then per image <start_of_image>, 4 soft tokens (a 2x2
grid: 16px images, 4px patches = 4x4, avg-pooled 2x2), <end_of_image>.

The tiny tokenizer drops the processor's "\\n\\n" around each image (whitespace), so
the ids of the batch used throughout are (BOI=4, IMG=5, EOI=6):
  row 0  "<start_of_image>\\nwhat is this"      -> bos BOI IMG*4 EOI what is this      (10)
  row 1  "<start_of_image> a cat <start_of_image> describe the image a dog"
         -> bos BOI IMG*4 EOI a cat BOI IMG*4 EOI describe the image a dog          (20)
"""

import pytest
import torch

from tests.tiny import image
from tl_vlm.core.layout import LayoutError

PROMPTS = ["what is this", "<start_of_image> a cat <start_of_image> describe the image a dog"]
IMAGES = [image(0), [image(1), image(2, (30, 18))]]
GRID = [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def _batch(tiny_zoo, **kw):
    model = tiny_zoo.model("gemma3")
    return model, model.prepare(PROMPTS, images=IMAGES, **kw)


def test_right_padding_and_two_images(tiny_zoo):
    model, batch = _batch(tiny_zoo)
    pos = batch.positions
    assert batch.input_ids.shape == (2, 20)
    assert pos.boi.tolist() == [[1], [1, 9]]
    assert pos.image.tolist() == [[2, 3, 4, 5], [2, 3, 4, 5, 10, 11, 12, 13]]
    assert pos.eoi.tolist() == [[6], [6, 14]]
    assert pos.gate.tolist() == [[6], [6, 14]]
    assert pos.row_breaks.is_empty() and pos.specials.is_empty()
    assert pos.text.tolist() == [[0, 7, 8, 9], [0, 7, 8, 15, 16, 17, 18, 19]]
    assert pos.padding.tolist() == [list(range(10, 20)), []]
    assert pos.last.tolist() == [[9], [19]]
    assert pos.last_image.tolist() == [[5], [5, 13]]
    assert pos.after_image.tolist() == [[7, 8, 9], [15, 16, 17, 18, 19]]
    assert pos.grid[0].tolist() == GRID
    assert pos.grid[1].tolist() == GRID + [[1, r, c] for _, r, c in GRID]
    # token_type_ids (the bidirectional-mask input) mark exactly the content tokens.
    assert torch.equal(batch.inputs["token_type_ids"].bool().cpu(), pos.image.mask)


def test_left_padding_shifts_everything(tiny_zoo):
    model, batch = _batch(tiny_zoo, padding_side="left")
    pos = batch.positions
    assert pos.padding.tolist() == [list(range(10)), []]
    assert pos.boi.tolist() == [[11], [1, 9]]
    assert pos.image.tolist() == [[12, 13, 14, 15], [2, 3, 4, 5, 10, 11, 12, 13]]
    assert pos.gate.tolist() == [[16], [6, 14]]
    assert pos.text.tolist() == [[10, 17, 18, 19], [0, 7, 8, 15, 16, 17, 18, 19]]
    assert pos.last.tolist() == [[19], [19]]
    assert pos.grid[0].tolist() == GRID
    assert torch.equal(batch.inputs["token_type_ids"].bool().cpu(), pos.image.mask)


def test_prompt_without_image_in_a_batch_with_images(tiny_zoo):
    model = tiny_zoo.model("gemma3")
    batch = model.prepare(["what is this", "a cat"], images=[None, image(1)])
    pos = batch.positions
    assert pos.image.tolist() == [[], [2, 3, 4, 5]]
    assert pos.boi.tolist() == [[], [1]] and pos.gate.tolist() == [[], [6]]
    assert pos.text.tolist() == [[0, 1, 2, 3], [0, 7, 8]]
    assert pos.grid[0].shape == (0, 3) and pos.grid[1].tolist() == GRID


@torch.no_grad()
def test_image_spans_attend_bidirectionally_and_windows_hold(tiny_zoo):
    """token_type_ids reach HF's mask: image tokens see later tokens of their own image."""
    model, batch = _batch(tiny_zoo)
    _, cache = model.run_with_cache(batch)
    sliding = cache["blocks.0.attn.hook_pattern"][1]   # [head, q, k], window 4
    full = cache["blocks.1.attn.hook_pattern"][1]
    # First soft token of image 0 (pos 2) sees the last one (5) on both layer types...
    assert (full[:, 2, 5] > 0).all() and (sliding[:, 2, 5] > 0).all()
    # ...but not EOI (6), nor the next image (10), and text stays causal.
    assert (full[:, 2, 6] == 0).all() and (full[:, 2, 10] == 0).all()
    assert (full[:, 7, 8] == 0).all()
    # Image 1's tokens see image 0 (causally earlier) on the full layer.
    assert (full[:, 10, 3] > 0).all()
    # The sliding layer keeps only keys less than 4 positions back.
    assert (sliding[:, 19, 15] == 0).all() and (sliding[:, 19, 16] > 0).all()
    # Without token_type_ids the model is plain causal and the logits change.
    plain = {k: v for k, v in batch.inputs.items() if k != "token_type_ids"}
    assert (model(plain) - model(batch)).abs().max() > 1e-3


@torch.no_grad()
def test_cached_generation_keys_line_up_with_positions(tiny_zoo):
    """On cached steps the sliding layer's keys are the whole sequence, not a window."""
    model, batch = _batch(tiny_zoo, padding_side="left")
    shapes = []

    def record(pattern, hook):
        shapes.append(tuple(pattern.shape))
        return pattern

    model.generate(batch, max_new_tokens=3, fwd_hooks=[("blocks.0.attn.hook_pattern", record)])
    assert shapes == [(2, 4, 20, 20), (2, 4, 1, 21), (2, 4, 1, 22)]


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("gemma3")
    with pytest.raises(LayoutError, match="1 image placeholder.*2 image"):
        model.prepare(["<start_of_image> what is this"], images=[[image(0), image(1)]])
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["<start_of_image> a <start_of_image>"], images=[image(0)])
    with pytest.raises(ValueError, match="one entry per prompt"):
        model.prepare(["a", "b"], images=[image(0)])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("gemma3")
    batch = model.prepare(["what is this"], images=[image(0)])
    ids = batch.input_ids
    one_token_short = torch.cat([ids[:, :2], ids[:, 3:]], dim=1)   # BOI + 3 soft tokens
    with pytest.raises(LayoutError, match="2x2 grid .4 tokens. but the ids hold 3"):
        model.layout.locate(one_token_short, None, batch.inputs)
    with pytest.raises(LayoutError, match=r"expected EOI .* right after its image tokens.*but found"):
        model.layout.locate(ids[:, :5], None, batch.inputs)        # cut inside the image
    with pytest.raises(LayoutError, match=r"expected BOI .* right before its image tokens.*but found"):
        model.layout.locate(ids[:, 2:], None, batch.inputs)        # BOI cut off
    two_images = dict(batch.inputs, pixel_values=batch.inputs["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(LayoutError, match="describes 2 images"):
        model.layout.locate(ids, None, two_images)
    # Pan-and-scan adds one span per crop (a 16x48 image: 3 crops + the original).
    with pytest.raises(LayoutError, match="given 1 image.*hold 4"):
        model.prepare(["what is this"], images=[image(0, (16, 48))], do_pan_and_scan=True,
                      pan_and_scan_min_crop_size=4)
