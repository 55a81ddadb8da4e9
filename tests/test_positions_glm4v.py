"""Exact GLM-4.1V positions on the tiny batch.

Layout: <|begin_of_image|> (BOI) + rows x cols <|image|> + <|end_of_image|> (EOI = gate
slot), no row breaks. 4 px patches merged 2x2, so an image (h x w) gives an
(h/8) x (w/8) grid: 16x24 -> 2x3, 16x16 -> 2x2, 24x16 -> 3x2.
"""

import pytest
import torch

from tests.tiny import image
from tl_vlm.core.layout import LayoutError

FAMILY = "glm4v"
FULL = "<|begin_of_image|><|image|><|end_of_image|>"
# Prompt 1 writes one full placeholder and one bare <|image|> (wrapped by the layout).
PROMPTS = ["what is this", f"{FULL} a cat <|image|> describe the image"]


def _images():
    return [image(0, (16, 24)), [image(1, (16, 16)), image(2, (24, 16))]]


def _grid(n, rows, cols):
    return [[n, r, c] for r in range(rows) for c in range(cols)]


def _ids(model, tokens):
    return model.layout.tokenizer.convert_tokens_to_ids(tokens)


def _expected_ids(model):
    """Both prompts as the processor must expand them, written out token by token."""
    boi, pad, eoi = "<|begin_of_image|>", "<|image|>", "<|end_of_image|>"
    row0 = [boi] + [pad] * 6 + [eoi] + ["what", "is", "this"]
    row1 = ([boi] + [pad] * 4 + [eoi] + ["a", "cat"] + [boi] + [pad] * 6 + [eoi]
            + ["describe", "the", "image"])
    return _ids(model, row0), _ids(model, row1)


@pytest.fixture
def model(tiny_zoo):
    return tiny_zoo.model(FAMILY)


def test_family_and_layout(model):
    assert model.family.name == FAMILY
    assert type(model.adapter).__name__ == "Glm4vAdapter"
    layout = model.layout
    assert (layout.boi_token, layout.content_token, layout.eoi_token) == (
        "<|begin_of_image|>", "<|image|>", "<|end_of_image|>")
    assert layout.row_break_token is None
    assert not layout.native and layout.gate_description.startswith("none (non-native")
    assert layout.count_placeholders(f"{FULL} x <|image|>") == 2
    assert layout.with_placeholders("what", 2) == f"{FULL}{FULL}\nwhat"
    assert layout.with_placeholders("a <|image|> b", 1) == f"a {FULL} b"
    assert layout.with_placeholders(f"a {FULL} b", 1) == f"a {FULL} b"


def test_right_padding_and_two_images(model):
    batch = model.prepare(PROMPTS, images=_images())
    row0, row1 = _expected_ids(model)
    assert batch.input_ids.shape == (2, 19)
    assert batch.input_ids[0, :11].tolist() == row0
    assert batch.input_ids[1].tolist() == row1
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4], [1, 6, 4]]
    pos = batch.positions
    # row 0: BOI 0, 2x3 image tokens 1-6, EOI 7, "what is this" 8-10, padding 11-18
    assert pos.boi[0].tolist() == [0]
    assert pos.image[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert pos.eoi[0].tolist() == [7] and pos.gate[0].tolist() == [7]
    assert pos.text[0].tolist() == [8, 9, 10]
    assert pos.last[0].tolist() == [10]
    assert pos.padding[0].tolist() == list(range(11, 19))
    assert pos.grid[0].tolist() == _grid(0, 2, 3)
    # row 1: BOI 0, 2x2 tokens 1-4, EOI 5, "a cat" 6-7, BOI 8, 3x2 tokens 9-14, EOI 15,
    # "describe the image" 16-18
    assert pos.boi[1].tolist() == [0, 8]
    assert pos.image[1].tolist() == [1, 2, 3, 4, 9, 10, 11, 12, 13, 14]
    assert pos.eoi[1].tolist() == [5, 15] and pos.gate[1].tolist() == [5, 15]
    assert pos.text[1].tolist() == [6, 7, 16, 17, 18]
    assert pos.last[1].tolist() == [18]
    assert pos.padding[1].tolist() == []
    assert pos.grid[1].tolist() == _grid(0, 2, 2) + _grid(1, 3, 2)
    assert pos.last_image.tolist() == [[6], [4, 14]]
    assert pos.image_side[1].tolist() == list(range(0, 6)) + list(range(8, 16))
    assert pos.row_breaks.is_empty() and pos.specials.is_empty()
    # the processor marks exactly the <|image|> tokens (mm_token_type_ids 1)
    assert torch.equal(batch.inputs["mm_token_type_ids"] == 1, pos.image.mask)


def test_left_padding_shifts_everything(model):
    batch = model.prepare(PROMPTS, images=_images(), padding_side="left")
    pos = batch.positions
    row0, row1 = _expected_ids(model)
    assert batch.input_ids[0, 8:].tolist() == row0
    assert batch.input_ids[1].tolist() == row1
    assert pos.padding[0].tolist() == list(range(8))
    assert pos.boi[0].tolist() == [8]
    assert pos.image[0].tolist() == [9, 10, 11, 12, 13, 14]
    assert pos.eoi[0].tolist() == [15] and pos.gate[0].tolist() == [15]
    assert pos.text[0].tolist() == [16, 17, 18]
    assert pos.last.tolist() == [[18], [18]]
    assert pos.grid[0].tolist() == _grid(0, 2, 3)
    assert pos.boi[1].tolist() == [0, 8]
    assert pos.gate[1].tolist() == [5, 15]
    assert pos.grid[1].tolist() == _grid(0, 2, 2) + _grid(1, 3, 2)


def test_text_only_prompt_has_no_image_positions(model):
    pos = model.prepare(["what is this"]).positions
    assert pos.image_side.is_empty()
    assert pos.text[0].tolist() == [0, 1, 2]


def test_placeholder_count_must_match_images(model):
    with pytest.raises(LayoutError, match="placeholder"):
        model.prepare([f"{FULL} a {FULL} b"], images=[[image(0, (16, 16))]])
    with pytest.raises(LayoutError, match="placeholder"):
        model.prepare(["a <|image|> b"], images=[[image(0, (16, 16)), image(1, (16, 16))]])


def _locate(model, inputs):
    return model.layout.locate(inputs["input_ids"], inputs["attention_mask"], inputs)


def test_tampered_grid_metadata_raises(model):
    batch = model.prepare(PROMPTS, images=_images())
    inputs = dict(batch.inputs)
    # image 0 claimed 4x4 patches (2x2 = 4 tokens) but the ids hold 6
    inputs["image_grid_thw"] = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 6, 4]])
    with pytest.raises(LayoutError, match="2x2"):
        _locate(model, inputs)
    inputs["image_grid_thw"] = torch.tensor([[1, 3, 8], [1, 4, 4], [1, 6, 4]])
    with pytest.raises(LayoutError, match="spatial_merge_size"):
        _locate(model, inputs)
    inputs["image_grid_thw"] = torch.tensor([[1, 4, 6], [1, 4, 4], [1, 6, 4], [1, 4, 4]])
    with pytest.raises(LayoutError, match="describes 4 images"):
        _locate(model, inputs)
    inputs["image_grid_thw"] = torch.tensor([[1, 4, 6], [1, 4, 4]])
    with pytest.raises(LayoutError, match="more images"):
        _locate(model, inputs)


def test_truncated_ids_raise(model):
    batch = model.prepare(PROMPTS, images=_images())
    inputs = dict(batch.inputs)
    inputs["input_ids"] = batch.input_ids[:, :4]
    inputs["attention_mask"] = batch.attention_mask[:, :4]
    with pytest.raises(LayoutError, match=r"expected EOI .* right after its image tokens"):
        _locate(model, inputs)
    inputs["input_ids"] = batch.input_ids[:, 1:]
    inputs["attention_mask"] = batch.attention_mask[:, 1:]
    with pytest.raises(LayoutError, match=r"expected BOI .* right before its image tokens"):
        _locate(model, inputs)


@torch.no_grad()
def test_sandwich_norm_hooks_decompose_the_block(model):
    """resid_post = resid_pre + post-attention-norm output + post-MLP-norm output."""
    batch = model.prepare(PROMPTS, images=_images())
    _, cache = model.run_with_cache(batch)
    for i in range(model.cfg.n_layers):
        mid = cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.ln1_post.hook_out"]
        torch.testing.assert_close(mid + cache[f"blocks.{i}.ln2_post.hook_out"],
                                   cache[f"blocks.{i}.hook_resid_post"], atol=1e-5, rtol=1e-5)
