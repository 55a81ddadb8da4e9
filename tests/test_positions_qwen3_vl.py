"""Exact Qwen3-VL / Qwen3-VL-MoE positions on the tiny batch (both tiny models share
tokenizer, processor, tower and layout), and DeepStack kept inside the blocks.

Layout: <|vision_start|> (BOI) + rows x cols <|image_pad|> + <|vision_end|> (EOI = gate
slot), no row breaks. 4 px patches merged 2x2, so an image (h x w) gives an
(h/8) x (w/8) grid: 16x24 -> 2x3, 16x16 -> 2x2, 24x16 -> 3x2.

DeepStack (tiny model: taps after vision blocks 0 and 1, so decoder layers 0 and 1 each
get one level): the residual stream the hooks see is the one HF's decoder loop carries.
"""

import pytest
import torch

from tests.tiny import image
from tl_vlm.core.layout import LayoutError

FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]
FULL = "<|vision_start|><|image_pad|><|vision_end|>"
# Prompt 1 writes one full placeholder and one bare <|image_pad|> (wrapped by the layout).
PROMPTS = ["what is this", f"{FULL} a cat <|image_pad|> describe the image"]


def _images():
    return [image(0, (16, 24)), [image(1, (16, 16)), image(2, (24, 16))]]


def _grid(n, rows, cols):
    return [[n, r, c] for r in range(rows) for c in range(cols)]


def _ids(model, tokens):
    return model.layout.tokenizer.convert_tokens_to_ids(tokens)


def _expected_ids(model):
    """Both prompts as the processor must expand them, written out token by token."""
    boi, pad, eoi = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
    row0 = [boi] + [pad] * 6 + [eoi] + ["what", "is", "this"]
    row1 = ([boi] + [pad] * 4 + [eoi] + ["a", "cat"] + [boi] + [pad] * 6 + [eoi]
            + ["describe", "the", "image"])
    return _ids(model, row0), _ids(model, row1)


@pytest.fixture(params=FAMILIES)
def qwen(request):
    return request.param


@pytest.fixture
def model(qwen, tiny_zoo):
    return tiny_zoo.model(qwen)


def test_family_and_layout(qwen, model):
    assert model.family.name == qwen
    assert type(model.adapter).__name__ == {"qwen3_vl": "Qwen3VLAdapter",
                                            "qwen3_vl_moe": "Qwen3VLMoeAdapter"}[qwen]
    layout = model.layout
    assert (layout.boi_token, layout.content_token, layout.eoi_token) == (
        "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    assert layout.row_break_token is None
    assert not layout.native and layout.gate_description.startswith("none (non-native")
    assert layout.count_placeholders(f"{FULL} x <|image_pad|>") == 2
    assert layout.with_placeholders("what", 2) == f"{FULL}{FULL}\nwhat"
    assert layout.with_placeholders("a <|image_pad|> b", 1) == f"a {FULL} b"
    assert layout.with_placeholders(f"a {FULL} b", 1) == f"a {FULL} b"


def test_right_padding_and_two_images(model):
    batch = model.prepare(PROMPTS, images=_images())
    row0, row1 = _expected_ids(model)
    assert batch.input_ids.shape == (2, 19)
    assert batch.input_ids[0, :11].tolist() == row0
    assert batch.input_ids[1].tolist() == row1
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4], [1, 6, 4]]
    pos = batch.positions
    # row 0: BOI 0, 2x3 pads 1-6, EOI 7, "what is this" 8-10, padding 11-18
    assert pos.boi[0].tolist() == [0]
    assert pos.image[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert pos.eoi[0].tolist() == [7] and pos.gate[0].tolist() == [7]
    assert pos.text[0].tolist() == [8, 9, 10]
    assert pos.last[0].tolist() == [10]
    assert pos.padding[0].tolist() == list(range(11, 19))
    assert pos.grid[0].tolist() == _grid(0, 2, 3)
    # row 1: BOI 0, 2x2 pads 1-4, EOI 5, "a cat" 6-7, BOI 8, 3x2 pads 9-14, EOI 15,
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
    # the processor marks exactly the pads (mm_token_type_ids 1)
    marked = batch.inputs["mm_token_type_ids"] == 1
    assert torch.equal(marked, pos.image.mask)


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


def test_placeholder_count_must_match_images(model):
    with pytest.raises(LayoutError, match="placeholder"):
        model.prepare([f"{FULL} a {FULL} b"], images=[[image(0, (16, 16))]])


def _locate(model, inputs):
    return model.layout.locate(inputs["input_ids"], inputs["attention_mask"], inputs)


def test_tampered_metadata_and_truncated_ids_raise(model):
    batch = model.prepare(PROMPTS, images=_images())
    inputs = dict(batch.inputs)
    inputs["image_grid_thw"] = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 6, 4]])
    with pytest.raises(LayoutError, match="2x2"):
        _locate(model, inputs)
    inputs["image_grid_thw"] = torch.tensor([[1, 3, 8], [1, 4, 4], [1, 6, 4]])
    with pytest.raises(LayoutError, match="spatial_merge_size"):
        _locate(model, inputs)
    inputs["image_grid_thw"] = torch.tensor([[1, 4, 6], [1, 4, 4], [1, 6, 4], [1, 4, 4]])
    with pytest.raises(LayoutError, match="describes 4 images"):
        _locate(model, inputs)
    inputs = dict(batch.inputs)
    inputs["input_ids"] = batch.input_ids[:, :4]
    inputs["attention_mask"] = batch.attention_mask[:, :4]
    with pytest.raises(LayoutError, match=r"expected EOI"):
        _locate(model, inputs)
    inputs["input_ids"] = batch.input_ids[:, 1:]
    inputs["attention_mask"] = batch.attention_mask[:, 1:]
    with pytest.raises(LayoutError, match=r"expected BOI"):
        _locate(model, inputs)


# -- DeepStack ---------------------------------------------------------------------------
def _hf_stream(ref, inputs, edit_level=None):
    """HF's own residual stream: the input of every decoder layer and of the final norm
    (what HF's loop carries, DeepStack included); ``edit_level`` zeroes that DeepStack
    merger's output in HF."""
    text = ref.model.language_model
    seen, handles = [], []
    for module in [*text.layers, text.norm]:
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(
                (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True))
    if edit_level is not None:
        merger = ref.model.visual.deepstack_merger_list[edit_level]
        handles.append(merger.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    try:
        with torch.no_grad():
            logits = ref(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def _sdpa_reference(tiny_zoo, qwen):
    """HF with its SDPA attention: what tl_vlm's unhooked attention computes, bit for bit."""
    import transformers

    cls = getattr(transformers, tiny_zoo.specs[qwen].hf_class)
    return cls.from_pretrained(str(tiny_zoo.path(qwen)), attn_implementation="sdpa").eval()


@torch.no_grad()
def test_hooks_see_hf_residual_stream_with_deepstack(tiny_zoo, qwen, model):
    batch = model.prepare(PROMPTS, images=_images())
    seen, _ = _hf_stream(_sdpa_reference(tiny_zoo, qwen), batch.inputs)
    _, cache = model.run_with_cache(batch)
    mask = batch.attention_mask.bool()
    n = model.cfg.n_layers
    for i in range(n):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_pre"][mask], seen[i][mask],
                                   atol=1e-5, rtol=0)
        # resid_post of block i is the input of block i + 1 (of the final norm for the last)
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"][mask], seen[i + 1][mask],
                                   atol=1e-5, rtol=0)
        # the DeepStack term: that level's features on the image positions, zero elsewhere
        term = cache[f"blocks.{i}.deepstack.hook_out"]
        image = batch.positions.image.mask
        assert term[~image].abs().max() == 0 and term[image].abs().min() > 0
        torch.testing.assert_close(term[image], cache[f"blocks.{i}.deepstack.hook_in"])
        level = cache[f"vision_encoder.deepstack_mergers.{i}.hook_out"]
        torch.testing.assert_close(cache[f"blocks.{i}.deepstack.hook_in"], level)
        # resid_post = resid_pre + attention + MLP + DeepStack
        parts = (cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.attn.hook_out"]
                 + cache[f"blocks.{i}.mlp.hook_out"] + term)
        torch.testing.assert_close(parts, cache[f"blocks.{i}.hook_resid_post"],
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_deepstack_hook_edits_are_live(tiny_zoo, qwen, model):
    """Zeroing blocks.0.deepstack.hook_out == HF with the level-0 merger's output zeroed."""
    batch = model.prepare(PROMPTS, images=_images())
    got = model.run_with_hooks(
        batch, fwd_hooks=[("blocks.0.deepstack.hook_out", lambda t, hook: torch.zeros_like(t))])
    _, expected = _hf_stream(tiny_zoo.reference(qwen), batch.inputs, edit_level=0)
    mask = batch.attention_mask.bool()
    assert (got - model(batch))[mask].abs().max() > 1e-4
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=0)


@torch.no_grad()
def test_text_only_forward_adds_no_deepstack(tiny_zoo, qwen, model):
    batch = model.prepare(["what is this"])
    assert batch.positions.image_side.is_empty()
    fired = []
    hooks = [(f"blocks.{i}.deepstack.hook_out", lambda t, hook: fired.append(hook.name))
             for i in range(model.cfg.n_layers)]
    logits = model.run_with_hooks(batch, fwd_hooks=hooks)
    assert fired == []
    expected = tiny_zoo.reference(qwen)(**batch.inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_run_from_layer_one_keeps_deepstack_of_layer_one(model):
    """Skipping block 0: its DeepStack is in the given residual, block 1 adds its own."""
    from tl_vlm.core.prefix import run_from_layer

    batch = model.prepare(PROMPTS, images=_images())
    _, cache = model.run_with_cache(batch, names_filter="blocks.1.hook_resid_pre")
    logits = run_from_layer(model, batch, 1, cache["blocks.1.hook_resid_pre"])
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(logits[mask], model(batch)[mask], atol=1e-5, rtol=0)
