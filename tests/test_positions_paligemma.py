"""Exact PaliGemma positions, its prefix-LM mask, and the PaliGemma 2 decoder.

Tiny model: 16px images, 4px patches -> 16 ``<image>`` tokens (a 4x4 grid) per image; the
processor writes the images first, ``<bos>`` after the last one, the prompt, ``"\\n"``.
Token ids: <bos>=1, <eos>=2, <pad>=3, <image>=4, "\\n"=32. The batch used throughout:
  row 0  "what is this" + 1 image            -> IMG*16 bos what is this \\n          (21)
  row 1  "<image><image>describe the image a cat a dog" + 2 images
         -> IMG*16 IMG*16 bos describe the image a cat a dog \\n                     (41)
"""

import pytest
import torch

from tests.reference import logits_with_pattern_edit
from tests.tiny import image
from tl_vlm.core.attention import record_paths
from tl_vlm.core.layout import LayoutError

PROMPTS = ["what is this", "<image><image>describe the image a cat a dog"]
IMAGES = [image(0), [image(1), image(2, (30, 18))]]
GRID = [[0, r, c] for r in range(4) for c in range(4)]


def _batch(model, **kw):
    return model.prepare(PROMPTS, images=IMAGES, **kw)


def test_right_padding_and_two_adjacent_images(tiny_zoo):
    model = tiny_zoo.model("paligemma")
    batch = _batch(model)
    pos = batch.positions
    assert batch.input_ids.shape == (2, 41)
    assert batch.input_ids[0, :21].tolist() == [4] * 16 + [1, 5, 6, 7, 32]
    assert pos.image.tolist() == [list(range(16)), list(range(32))]
    # the two images of row 1 are one run of 32 <image>: split by the 4x4 grid
    assert pos.grid[0].tolist() == GRID
    assert pos.grid[1].tolist() == GRID + [[1, r, c] for _, r, c in GRID]
    assert pos.text.tolist() == [list(range(16, 21)), list(range(32, 41))]
    assert pos.padding.tolist() == [list(range(21, 41)), []]
    assert pos.last.tolist() == [[20], [40]]
    assert pos.last_image.tolist() == [[15], [15, 31]]
    for name in ("boi", "eoi", "gate", "row_breaks", "specials"):
        assert getattr(pos, name).is_empty(), name
    # the whole prompt is the prefix; the processor's training labels are not in the batch
    assert sorted(batch.inputs) == ["attention_mask", "input_ids", "pixel_values", "token_type_ids"]
    assert not batch.inputs["token_type_ids"].any()


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("paligemma")
    pos = _batch(model, padding_side="left").positions
    assert pos.padding.tolist() == [list(range(20)), []]
    assert pos.image.tolist() == [list(range(20, 36)), list(range(32))]
    assert pos.text.tolist() == [list(range(36, 41)), list(range(32, 41))]
    assert pos.after_image.tolist() == [list(range(36, 41)), list(range(32, 41))]
    assert pos.last.tolist() == [[40], [40]]
    assert pos.grid[0].tolist() == GRID


def test_placeholders_between_words(tiny_zoo):
    """The processor puts <bos> after the last placeholder only."""
    model = tiny_zoo.model("paligemma")
    batch = model.prepare(["<image> a cat <image> describe"], images=[[image(1), image(2)]])
    ids, pos = batch.input_ids[0].tolist(), batch.positions
    assert ids[16:18] == [11, 12] and ids[34:] == [1, 8, 32]
    assert pos.image[0].tolist() == list(range(16)) + list(range(18, 34))
    assert pos.text[0].tolist() == [16, 17, 34, 35, 36]


@torch.no_grad()
def test_prefix_is_bidirectional_and_suffix_causal(tiny_zoo):
    """token_type_ids reach HF's mask: the prefix (images, <bos>, prompt, "\\n") attends
    both ways; a suffix (token_type_ids 1) is causal and unseen by the prefix."""
    model = tiny_zoo.model("paligemma")
    batch = model.prepare(["what is this"], images=[image(0)], suffix=["a cat"])
    ids = batch.input_ids[0].tolist()
    assert ids == [4] * 16 + [1, 5, 6, 7, 32, 11, 12, 2]            # suffix + <eos>
    assert batch.inputs["token_type_ids"][0].tolist() == [0] * 21 + [1] * 3
    assert "labels" not in batch.inputs
    pos = batch.positions
    assert pos.text[0].tolist() == list(range(16, 24)) and pos.last[0].tolist() == [23]
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"][0]             # [head, q, k]
        assert (p[:, 0, 20] > 0).all() and (p[:, 17, 19] > 0).all()   # prefix: both ways
        assert (p[:, :21, 21:] == 0).all()                            # prefix never sees suffix
        assert (p[:, 21, 22:] == 0).all() and (p[:, 22, 23] == 0).all()  # suffix: causal
        assert (p[:, 23, :] > 0).all()
    ref = tiny_zoo.reference("paligemma")
    torch.testing.assert_close(model(batch), ref(**batch.inputs).logits, atol=1e-5, rtol=0)
    # Without token_type_ids the prefix would be causal: the logits change.
    causal = model.prepare(["what is this"], images=[image(0)])
    causal.inputs["token_type_ids"] = torch.ones_like(causal.inputs["token_type_ids"])
    assert (model(causal) - model(batch)[:, :21]).abs().max() > 1e-3


def test_every_prompt_needs_an_image(tiny_zoo):
    model = tiny_zoo.model("paligemma")
    with pytest.raises(LayoutError, match="at least one image per prompt"):
        model.prepare(["what is this", "a cat"], images=[None, image(1)])
    with pytest.raises(LayoutError, match="1 image placeholder.*2 image"):
        model.prepare(["<image> what is this"], images=[[image(0), image(1)]])
    with pytest.raises(ValueError, match="one entry per prompt"):
        model.prepare(["a", "b"], images=[image(0)])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("paligemma")
    batch = model.prepare(["what is this"], images=[image(0)])
    ids = batch.input_ids
    with pytest.raises(LayoutError, match="4x4 grid .16 tokens. but the run of image tokens "
                                          "holds only 13"):
        model.layout.locate(ids[:, 3:], None, batch.inputs)
    two_images = dict(batch.inputs, pixel_values=batch.inputs["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(LayoutError, match="describes 2 images but the token ids hold 1"):
        model.layout.locate(ids, None, two_images)
    doubled = torch.cat([ids[:, :16], ids], dim=1)                # 32 <image>, pixels of one
    with pytest.raises(LayoutError, match="more images than the processor metadata"):
        model.layout.locate(doubled, None, batch.inputs)


def test_paligemma1_maps_gemma_norms(tiny_zoo):
    block = tiny_zoo.model("paligemma").blocks[0]
    assert [block.ln1.name, block.ln2.name] == ["input_layernorm", "post_attention_layernorm"]
    assert not hasattr(block, "ln1_post") and not hasattr(block, "ln2_post")


def test_processor_and_tower_must_agree(tiny_zoo):
    model = tiny_zoo.model("paligemma")
    config = model.hf_model.config
    processor = model.processor
    saved = processor.image_seq_length
    try:
        processor.image_seq_length = 256
        with pytest.raises(LayoutError, match="image_seq_length=256 is not the tower's 4x4"):
            type(model.layout)(processor, config)
    finally:
        processor.image_seq_length = saved


# -- PaliGemma 2: Gemma 2 decoder (post-norms, sliding window, soft-capping) -------------
@pytest.fixture(scope="module")
def paligemma2(tiny_zoo):
    import transformers

    path = tiny_zoo.variant_path("paligemma", "v2", version=2)
    model = tiny_zoo.variant("paligemma", "v2", version=2)
    # transformers refuses SDPA for Gemma 2 (soft-capping): eager is the only reference.
    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        str(path), attn_implementation="eager").eval()
    return model, ref


@torch.no_grad()
def test_paligemma2_maps_gemma2_norms_and_equals_hf_eager(paligemma2):
    model, ref = paligemma2
    assert model.hf_model.config.text_config.model_type == "gemma2"
    block = model.blocks[0]
    assert [block.ln1.name, block.ln1_post.name, block.ln2.name, block.ln2_post.name] == [
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
        "post_feedforward_layernorm"]
    for side in ("right", "left"):
        batch = _batch(model, padding_side=side)
        mask = batch.attention_mask.bool()
        with record_paths() as paths:
            plain = model(batch)
        assert set(paths) == {"eager"}          # soft-capped scores: never SDPA
        expected = ref(**batch.inputs).logits
        torch.testing.assert_close(plain[mask], expected[mask], atol=1e-5, rtol=0)
        hooked = model.run_with_hooks(batch, fwd_hooks=[
            (f"blocks.{l}.attn.hook_pattern", lambda p, hook: p) for l in range(2)])
        torch.testing.assert_close(hooked[mask], expected[mask], atol=1e-5, rtol=0)
    for b in range(2):                           # left padding == one by one
        alone = model(model.prepare([PROMPTS[b]], images=[IMAGES[b]]))[0]
        torch.testing.assert_close(plain[b, -alone.shape[0]:], alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_paligemma2_pattern_edit_lens_and_generate(paligemma2):
    from tl_vlm.analyses.logit_lens import logit_lens

    model, ref = paligemma2
    batch = _batch(model)
    mask = batch.attention_mask.bool()
    key = int(batch.positions.image[0][1])

    def zero_key(pattern):
        pattern = pattern.clone()
        pattern[..., key] = 0.0
        return pattern

    got = model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_pattern",
                                                  lambda p, hook: zero_key(p))])
    assert (got - model(batch)).abs().max() > 1e-4
    expected = logits_with_pattern_edit(model, ref, batch.inputs, {1: zero_key})
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    # The final soft-cap is declared: the lens of the last layer is the model's logits.
    lens = logit_lens(model, batch, batch.positions.all, layers=[-1])
    torch.testing.assert_close(lens.logits[0], model(batch)[batch.positions.all.mask],
                               atol=1e-5, rtol=0)
    left = _batch(model, padding_side="left")
    out = model.generate(left, max_new_tokens=3)
    hf = ref.generate(**left.inputs, max_new_tokens=3, do_sample=False,
                      pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(out.sequences, hf)
