"""Exact Chameleon positions, and the 30B/34B (swin_norm) layout.

Tiny model: 16px images -> 4x4 VQ codes, so one image is
``<racm3:break>`` + 16 x ``<image>`` + ``<eoss>``; the processor appends the separator
``<reserved08706>`` to every prompt and the tokenizer adds no BOS.
"""

import pytest
import torch

from tests.tiny import chameleon as tiny_chameleon
from tests.tiny import image
from tl_vlm.core.layout import LayoutError

GRID = [[r, c] for r in range(4) for c in range(4)]
PROMPTS = ["what is this", "<image> a cat <image> describe the image a dog"]
IMAGES = [image(0), [image(1), image(2, (30, 18))]]


def _grid(*images):
    return [[i, r, c] for i in images for r, c in GRID]


def test_right_padding_and_two_images(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    batch = model.prepare(PROMPTS, images=IMAGES)
    pos = batch.positions
    # row 0: BOI 0, codes 1-16, EOI 17, "what is this" 18-20, sep 21, pads 22-43
    # row 1: BOI 0, codes 1-16, EOI 17, "a cat" 18-19, BOI 20, codes 21-36, EOI 37,
    #        "describe the image a dog" 38-42, sep 43
    assert batch.input_ids.shape == (2, 44)
    assert pos.boi.tolist() == [[0], [0, 20]]
    assert pos.image.tolist() == [list(range(1, 17)), list(range(1, 17)) + list(range(21, 37))]
    assert pos.eoi.tolist() == [[17], [17, 37]]
    assert pos.gate.tolist() == [[17], [17, 37]]
    assert pos.text.tolist() == [[18, 19, 20, 21], [18, 19] + list(range(38, 44))]
    assert pos.padding.tolist() == [list(range(22, 44)), []]
    assert pos.last.tolist() == [[21], [43]]
    assert pos.last_image.tolist() == [[16], [16, 36]]
    assert pos.after_image.tolist() == [[18, 19, 20, 21], list(range(38, 44))]
    assert pos.grid[0].tolist() == _grid(0)
    assert pos.grid[1].tolist() == _grid(0, 1)
    assert pos.row_breaks.is_empty() and pos.specials.is_empty()
    # The ids at those positions are the layout's tokens.
    tok = model.layout.tokenizer
    ids = batch.input_ids[1]
    assert tok.convert_ids_to_tokens(ids[[0, 20]].tolist()) == ["<racm3:break>"] * 2
    assert set(tok.convert_ids_to_tokens(ids[1:17].tolist())) == {"<image>"}
    assert tok.convert_ids_to_tokens(ids[[17, 37, 43]].tolist()) == [
        "<eoss>", "<eoss>", "<reserved08706>"]


def test_left_padding_shifts_everything(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    batch = model.prepare(PROMPTS, images=IMAGES, padding_side="left")
    pos = batch.positions
    assert pos.padding[0].tolist() == list(range(22))
    assert pos.boi[0].tolist() == [22]
    assert pos.image[0].tolist() == list(range(23, 39))
    assert pos.gate[0].tolist() == [39]
    assert pos.text[0].tolist() == [40, 41, 42, 43]
    assert pos.last.tolist() == [[43], [43]]
    assert pos.grid[0].tolist() == _grid(0)
    # row 1 is the longest: unchanged
    assert pos.boi[1].tolist() == [0, 20]
    assert pos.gate[1].tolist() == [17, 37]


def test_adjacent_images_and_a_prompt_without_image(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    batch = model.prepare(["<image><image> two", "no image here"],
                          images=[[image(3), image(4)], None])
    pos = batch.positions
    # row 0: BOI 0, codes 1-16, EOI 17, BOI 18, codes 19-34, EOI 35, "two" 36, sep 37
    assert pos.boi[0].tolist() == [0, 18]
    assert pos.image[0].tolist() == list(range(1, 17)) + list(range(19, 35))
    assert pos.gate[0].tolist() == [17, 35]
    assert pos.text[0].tolist() == [36, 37]
    assert pos.grid[0].tolist() == _grid(0, 1)
    # row 1 ("no image here" is 3 unknown-word tokens + sep): text only
    assert pos.image_side[1].tolist() == []
    assert pos.text[1].tolist() == [0, 1, 2, 3]
    assert pos.grid[1].shape == (0, 3)
    assert batch.inputs["pixel_values"].shape[0] == 2


def test_real_checkpoint_geometry(tiny_zoo):
    """chameleon-7b/30b: 512px, 4 VQ downsamplings -> 32x32 = 1024 codes per image."""
    from transformers import ChameleonConfig

    from tl_vlm.adapters.chameleon import ChameleonLayout

    layout = ChameleonLayout(tiny_zoo.model("chameleon").processor, ChameleonConfig())
    grids = layout.image_grids({"pixel_values": torch.zeros(2, 3, 512, 512)})
    assert grids == [(32, 32), (32, 32)]
    assert ChameleonLayout.native and layout.eoi_token == "<eoss>"
    assert layout.boi_token == "<racm3:break>" and layout.content_token == "<image>"


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    with pytest.raises(LayoutError, match="1 image placeholder.*2 image"):
        model.prepare(["<image> what is this"], images=[[image(0), image(1)]])
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["<image> a <image> b"], images=[image(0)])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    batch = model.prepare(["what is this"], images=[image(0)])
    ids = batch.input_ids
    # 3 of the 16 codes removed: BOI, 13 codes, EOI
    truncated = torch.cat([ids[:, :1], ids[:, 4:]], dim=1)
    with pytest.raises(LayoutError, match="4x4 grid.*16 tokens.*13 image tokens"):
        model.layout.locate(truncated, None, batch.inputs)
    no_eoi = torch.cat([ids[:, :17], ids[:, 18:]], dim=1)
    with pytest.raises(LayoutError, match=r"expected EOI .* right after its image tokens.*but found"):
        model.layout.locate(no_eoi, None, batch.inputs)
    no_boi = ids[:, 1:]
    with pytest.raises(LayoutError, match=r"expected BOI .* right before its image tokens.*but found"):
        model.layout.locate(no_boi, None, batch.inputs)
    two_images = dict(batch.inputs, pixel_values=batch.inputs["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(LayoutError, match="describes 2 images"):
        model.layout.locate(ids, None, two_images)
    no_pixels = {k: v for k, v in batch.inputs.items() if k != "pixel_values"}
    with pytest.raises(LayoutError, match="more images than the processor metadata"):
        model.layout.locate(ids, None, no_pixels)
    # 32px pixels would give an 8x8 code grid, not the 16 codes in the ids
    big = dict(batch.inputs, pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(LayoutError, match="8x8 grid"):
        model.layout.locate(ids, None, big)


# -- the 30B/34B layout: swin_norm=True ----------------------------------------------


@pytest.fixture(scope="session")
def swin(tmp_path_factory):
    """(HookedVLM, path) of a tiny swin_norm Chameleon built by the same builder."""
    from tl_vlm import HookedVLM

    path = tmp_path_factory.mktemp("chameleon_swin")
    torch.manual_seed(0)
    tiny_chameleon.build(path, swin_norm=True)
    return HookedVLM.from_pretrained(str(path)), path


def _reference(path):
    from transformers import ChameleonForConditionalGeneration

    return ChameleonForConditionalGeneration.from_pretrained(str(path),
                                                             attn_implementation="eager").eval()


def test_swin_blocks_map_post_norms(swin):
    from transformers.models.chameleon.modeling_chameleon import ChameleonSwinDecoderLayer

    model, _ = swin
    for block in model.blocks:
        layer = block.original_component   # its norms are now the bridges themselves
        assert isinstance(layer, ChameleonSwinDecoderLayer)
        assert "ln1" not in dict(block.named_children()) and "ln2" not in dict(block.named_children())
        assert layer.input_layernorm is block.ln1_post           # normalises attn output
        assert layer.post_attention_layernorm is block.ln2_post  # normalises mlp output
    assert model.adapter.supports_fold_ln is False


def test_pre_norm_blocks_map_ln1_ln2(tiny_zoo):
    from transformers.models.chameleon.modeling_chameleon import ChameleonDecoderLayer

    model = tiny_zoo.model("chameleon")
    for block in model.blocks:
        layer = block.original_component
        assert type(layer) is ChameleonDecoderLayer
        assert layer.input_layernorm is block.ln1
        assert layer.post_attention_layernorm is block.ln2
        assert "ln1_post" not in dict(block.named_children())


@torch.no_grad()
def test_swin_logits_equal_hf_with_padding(swin):
    model, path = swin
    batch = model.prepare(PROMPTS, images=IMAGES)
    assert batch.padding_side == "right"
    expected = _reference(path)(**batch.inputs).logits
    got = model(batch)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["pre_norm", "swin"])
def test_residual_writes_are_the_hooked_sublayer_outputs(tiny_zoo, swin, layout):
    """hook_attn_out / hook_mlp_out are what is added to the residual (post-norm
    outputs on swin layers)."""
    model = swin[0] if layout == "swin" else tiny_zoo.model("chameleon")
    batch = model.prepare(PROMPTS, images=IMAGES)
    _, cache = model.run_with_cache(batch)
    for i in range(model.cfg.n_layers):
        pre, mid, post = (cache[f"blocks.{i}.hook_resid_{s}"] for s in ("pre", "mid", "post"))
        torch.testing.assert_close(mid - pre, cache[f"blocks.{i}.hook_attn_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(post - mid, cache[f"blocks.{i}.hook_mlp_out"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_swin_pattern_edit_is_live_and_matches_hand_reference(swin):
    model, path = swin
    batch = model.prepare(PROMPTS, images=IMAGES)
    layer = 0
    key = int(batch.positions.gate[1][0])   # the first EOI of the two-image prompt

    def zero_key(pattern, hook):
        pattern = pattern.clone()
        pattern[..., key] = 0.0
        return pattern

    got = model.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", zero_key)])
    clean = model(batch)
    mask = batch.attention_mask.bool()
    assert (got - clean)[mask].abs().max() > 1e-3, "the edit did not reach the logits"

    # Reference: HF eager attention plus the hand-computed change of its output
    # (before the swin post-norm, which then normalises it like any attention output).
    ref = _reference(path)
    attn = ref.model.layers[layer].self_attn
    seen = {}
    handle = attn.v_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o))
    pattern = ref(**batch.inputs, output_attentions=True).attentions[layer]   # [b, h, q, k]
    handle.remove()
    b, h, q, k = pattern.shape
    v = seen["v"].view(b, k, -1, attn.head_dim).transpose(1, 2)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    removed = torch.zeros_like(pattern)
    removed[..., key] = -pattern[..., key]
    delta = attn.o_proj((removed @ v).transpose(1, 2).reshape(b, q, h * attn.head_dim))
    handle = attn.register_forward_hook(lambda m, a, out: (out[0] + delta,) + tuple(out[1:]))
    expected = ref(**batch.inputs).logits
    handle.remove()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=0)


@torch.no_grad()
def test_plain_boot_transformers_switches_to_swin(swin):
    """TL's own loader (no HookedVLM) picks the post-norm mapping from the config."""
    from transformer_lens.model_bridge import TransformerBridge

    _, path = swin
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    assert type(bridge.adapter).__name__ == "ChameleonAdapter"
    children = dict(bridge.blocks[0].named_children())
    assert "ln1_post" in children and "ln1" not in children
    ids = torch.tensor([[1, 8, 9, 10, 11]])   # BOS "what is this describe"
    expected = _reference(path)(ids).logits
    torch.testing.assert_close(bridge(ids), expected, atol=1e-4, rtol=0)


# -- pre-tokenised images: VQ code tokens written into the prompt, no pixels ----------


def _codes(n=16, start=0):
    return " ".join(tiny_chameleon.code_token((start + i) % tiny_chameleon.N_CODES)
                    for i in range(n))


def _pretokenised(n=16, start=0):
    return f"<racm3:break> {_codes(n, start)} <eoss>"


def test_pretokenised_image_without_pixels(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    batch = model.prepare([f"{_pretokenised()} what is this", "a cat"])
    pos = batch.positions
    # row 0: BOI 0, codes 1-16, EOI 17, "what is this" 18-20, sep 21
    # row 1: "a cat" 0-1, sep 2, pads 3-21
    assert "pixel_values" not in batch.inputs
    assert pos.boi.tolist() == [[0], []]
    assert pos.image.tolist() == [list(range(1, 17)), []]
    assert pos.eoi.tolist() == [[17], []] and pos.gate.tolist() == [[17], []]
    assert pos.text.tolist() == [[18, 19, 20, 21], [0, 1, 2]]
    assert pos.after_image[0].tolist() == [18, 19, 20, 21]
    assert pos.grid[0].tolist() == _grid(0)
    assert pos.grid[1].shape == (0, 3)
    # the content ids are the code tokens themselves, in prompt order
    tok = model.layout.tokenizer
    assert tok.convert_ids_to_tokens(batch.input_ids[0, 1:17].tolist()) == _codes().split()
    assert sorted(model.layout.code_token_ids) == sorted(
        tok.convert_tokens_to_ids(_codes().split()))
    with torch.no_grad():
        assert torch.isfinite(model(batch)).all()


def test_pretokenised_and_pixel_images_in_one_batch(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    prompts = [f"{_pretokenised(start=3)} what is this",
               f"<image> a cat {_pretokenised()} {_pretokenised(start=5)} describe"]
    batch = model.prepare(prompts, images=[None, image(0)], padding_side="left")
    pos = batch.positions
    # row 1 (longest): BOI 0, placeholders 1-16, EOI 17, "a cat" 18-19, BOI 20,
    #   codes 21-36, EOI 37, BOI 38, codes 39-54, EOI 55, "describe" 56, sep 57
    # row 0: 22 tokens, left-padded by 36
    assert batch.input_ids.shape == (2, 58)
    assert pos.boi.tolist() == [[36], [0, 20, 38]]
    assert pos.gate.tolist() == [[53], [17, 37, 55]]
    assert pos.image[0].tolist() == list(range(37, 53))
    assert pos.image[1].tolist() == (list(range(1, 17)) + list(range(21, 37))
                                     + list(range(39, 55)))
    assert pos.grid[0].tolist() == _grid(0)
    assert pos.grid[1].tolist() == _grid(0, 1, 2)
    assert pos.text.tolist() == [[54, 55, 56, 57], [18, 19, 56, 57]]
    assert batch.inputs["pixel_values"].shape[0] == 1
    tok = model.layout.tokenizer
    assert set(tok.convert_ids_to_tokens(batch.input_ids[1, 1:17].tolist())) == {"<image>"}


def test_pretokenised_images_are_counted_from_the_prompt(tiny_zoo):
    layout = tiny_zoo.model("chameleon").layout
    assert layout.pretokenised_images("what is this") == 0
    assert layout.pretokenised_images("<image> what is this") == 0
    assert layout.pretokenised_images(f"{_pretokenised()} a {_pretokenised(9)} b") == 2


def test_pretokenised_image_needs_a_square_grid(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    with pytest.raises(LayoutError, match="holds 15 VQ code tokens.*not a square"):
        model.prepare([f"{_pretokenised(15)} what"])
    assert model.prepare([f"{_pretokenised(9)} what"]).positions.grid[0].tolist() == [
        [0, r, c] for r in range(3) for c in range(3)]


def test_pretokenised_image_needs_boi_and_eoi_and_no_mixing(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    with pytest.raises(LayoutError, match=r"expected BOI .* right before its image tokens.*but found"):
        model.prepare([f"{_codes()} <eoss> what"])
    with pytest.raises(LayoutError, match=r"expected EOI .* right after its image tokens.*but found"):
        model.prepare([f"<racm3:break> {_codes()} what"])
    batch = model.prepare([f"{_pretokenised()} what"])
    ids = batch.input_ids.clone()
    ids[0, 5] = model.layout.token_id("<image>")
    with pytest.raises(LayoutError, match="mixes 1 <image> placeholders with 15 VQ code"):
        model.layout.locate(ids, None, batch.inputs)


def test_real_config_code_tokens():
    """A config without a vocabulary map (or with one) gives the code-token id set."""
    from transformers import ChameleonConfig

    from tl_vlm.adapters.chameleon import ChameleonLayout

    tok = tiny_chameleon.make_chameleon_tokenizer()
    assert ChameleonLayout(tok, ChameleonConfig()).code_token_ids == frozenset()
    cfg = ChameleonConfig(vocabulary_map={"IMGIMGBAZ": 7, "IMGIMGAZ": 3, "<image>": 1, "a": 2})
    assert ChameleonLayout(tok, cfg).code_token_ids == frozenset({3, 7})
