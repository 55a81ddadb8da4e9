"""Exact Gemma 4 positions: per image <|image> (BOI), rows x cols <|image|>, <image|> (EOI).

Tiny processor: 4 px patches pooled 3x3, at most 70 soft tokens; a 20x24 picture is
resized to 84x108 px = 21x27 patches = a 7x9 grid (63 tokens), a 30x18 one to 120x72 px =
30x18 patches = 10x6 (60). The tokenizer adds no BOS (as the released one), so with
(BOI=4, IMG=5, EOI=6) the batch used throughout is:
  row 0  "<|image|>\\nwhat is this"   -> BOI IMG*63 EOI what is this                    (68)
  row 1  "<|image|> a cat <|image|> describe the image a dog"
         -> BOI IMG*63 EOI a cat BOI IMG*60 EOI describe the image a dog              (134)
"""

import pytest
import torch

from tests.tiny import image
from tests.tiny.gemma4 import SPEC
from tl_vlm.core.layout import LayoutError

PROMPTS, IMAGES = SPEC.prompts, SPEC.images
GRID_7x9 = [[0, r, c] for r in range(7) for c in range(9)]
GRID_10x6 = [[1, r, c] for r in range(10) for c in range(6)]


def _batch(tiny_zoo, **kw):
    model = tiny_zoo.model("gemma4")
    return model, model.prepare(PROMPTS, images=IMAGES, **kw)


def test_right_padding_and_two_images(tiny_zoo):
    model, batch = _batch(tiny_zoo)
    pos = batch.positions
    assert batch.input_ids.shape == (2, 134)
    assert batch.input_ids[1, :2].tolist() == [4, 5] and batch.input_ids[1, 64].item() == 6
    assert pos.boi.tolist() == [[0], [0, 67]]
    assert pos.image.tolist() == [list(range(1, 64)), list(range(1, 64)) + list(range(68, 128))]
    assert pos.eoi.tolist() == [[64], [64, 128]]
    assert pos.gate.tolist() == [[64], [64, 128]]
    assert pos.row_breaks.is_empty() and pos.specials.is_empty()
    assert pos.text.tolist() == [[65, 66, 67], [65, 66, 129, 130, 131, 132, 133]]
    assert pos.padding.tolist() == [list(range(68, 134)), []]
    assert pos.last.tolist() == [[67], [133]]
    assert pos.last_image.tolist() == [[63], [63, 127]]
    assert pos.grid[0].tolist() == GRID_7x9
    assert pos.grid[1].tolist() == GRID_7x9 + GRID_10x6
    # mm_token_type_ids (the bidirectional-mask input) mark exactly the content tokens.
    assert torch.equal(batch.inputs["mm_token_type_ids"].bool().cpu(), pos.image.mask)


def test_left_padding_shifts_everything(tiny_zoo):
    model, batch = _batch(tiny_zoo, padding_side="left")
    pos = batch.positions
    assert pos.padding.tolist() == [list(range(66)), []]
    assert pos.boi.tolist() == [[66], [0, 67]]
    assert pos.image.tolist()[0] == list(range(67, 130))
    assert pos.gate.tolist() == [[130], [64, 128]]
    assert pos.text.tolist() == [[131, 132, 133], [65, 66, 129, 130, 131, 132, 133]]
    assert pos.last.tolist() == [[133], [133]]
    assert pos.grid[0].tolist() == GRID_7x9
    assert torch.equal(batch.inputs["mm_token_type_ids"].bool().cpu(), pos.image.mask)


def test_prompt_without_image_in_a_batch_with_images(tiny_zoo):
    model = tiny_zoo.model("gemma4")
    batch = model.prepare(["what is this", "a cat"], images=[None, image(1)])
    pos = batch.positions
    assert pos.image.tolist() == [[], list(range(1, 64))]
    assert pos.boi.tolist() == [[], [0]] and pos.gate.tolist() == [[], [64]]
    assert pos.text.tolist() == [[0, 1, 2], [65, 66]]
    assert pos.grid[0].shape == (0, 3) and pos.grid[1].tolist() == GRID_7x9


@torch.no_grad()
def test_images_attend_bidirectionally_on_sliding_layers_only(tiny_zoo):
    """use_bidirectional_attention="vision": on the sliding layer (window 8) an image token
    sees the later tokens of its own image; the full layer stays causal."""
    model, batch = _batch(tiny_zoo)
    _, cache = model.run_with_cache(batch)
    sliding = cache["blocks.0.attn.hook_pattern"][1]   # [head, q, k]
    full = cache["blocks.1.attn.hook_pattern"][1]
    assert (sliding[:, 1, 63] > 0).all() and (sliding[:, 1, 30] > 0).all()
    assert (full[:, 1, 2] == 0).all() and (full[:, 63, 1] > 0).all()
    # not EOI, nor the next image, and text stays causal and windowed
    assert (sliding[:, 1, 64] == 0).all() and (sliding[:, 1, 68] == 0).all()
    assert (sliding[:, 65, 66] == 0).all()
    assert (sliding[:, 133, 125] == 0).all() and (sliding[:, 133, 126] > 0).all()
    # Without mm_token_type_ids the model is plain causal and the logits change.
    plain = {k: v for k, v in batch.inputs.items() if k != "mm_token_type_ids"}
    assert (model(plain) - model(batch)).abs().max() > 1e-4


@torch.no_grad()
def test_full_layer_has_its_own_head_size_and_values(tiny_zoo):
    """The full layer: 16-dim heads, one kv head, values = v_norm(k_proj(x)) (no v_proj)."""
    model, batch = _batch(tiny_zoo)
    _, cache = model.run_with_cache(batch)
    assert cache["blocks.0.attn.hook_rot_q"].shape == (2, 134, 4, 8)   # [b, pos, head, d]
    assert cache["blocks.1.attn.hook_rot_q"].shape == (2, 134, 4, 16)
    assert cache["blocks.1.attn.hook_rot_k"].shape == (2, 134, 1, 16)
    assert cache["blocks.0.attn.hook_v"].shape == (2, 134, 2, 8)
    assert cache["blocks.1.attn.hook_v"].shape == (2, 134, 1, 16)
    attn = model.blocks[1].attn.original_component
    assert attn.v_proj is None
    x = cache["blocks.1.ln1.hook_out"]
    values = attn.v_norm(attn.k_proj(x).view(2, 134, 1, 16))
    torch.testing.assert_close(cache["blocks.1.attn.hook_v"], values)


@torch.no_grad()
def test_logit_lens_of_the_last_residual_soft_caps(tiny_zoo):
    from tl_vlm.analyses.logit_lens import final_logit_transform

    model, batch = _batch(tiny_zoo)
    cap = model.hf_model.config.get_text_config().final_logit_softcapping
    assert cap == 30.0
    big = torch.tensor([[100.0, -100.0, 1.0]])
    torch.testing.assert_close(final_logit_transform(model)(big), torch.tanh(big / cap) * cap)


def _kv_shared(tiny_zoo):
    return tiny_zoo.variant("gemma4", "kv_shared", kv_shared=True)


@torch.no_grad()
def test_kv_shared_layer_equals_hf_and_borrows_keys(tiny_zoo):
    """Layers sliding, full, full; the last reuses layer 1's keys and values."""
    import transformers

    model = _kv_shared(tiny_zoo)
    batch = model.prepare(PROMPTS, images=IMAGES)
    attn = model.blocks[2].attn.original_component
    assert attn.is_kv_shared_layer and not hasattr(attn, "k_proj")
    path = str(tiny_zoo.variant_path("gemma4", "kv_shared", kv_shared=True))
    mask = batch.attention_mask.bool()
    got, cache = model.run_with_cache(batch)
    for impl in ("eager", "sdpa"):
        ref = transformers.Gemma4ForConditionalGeneration.from_pretrained(
            path, attn_implementation=impl).eval()
        torch.testing.assert_close(got[mask], ref(**batch.inputs).logits[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(cache["blocks.2.attn.hook_rot_k"], cache["blocks.1.attn.hook_rot_k"])
    assert "blocks.2.attn.hook_v" not in cache and "blocks.1.attn.hook_v" in cache
    # HF stores the producer's keys before its attention runs: an edit of the producer's
    # hook_rot_k stays in the producer; one of its k_norm output (before RoPE, which is
    # linear) reaches the consumer.
    seen = {}
    keep = ("blocks.2.attn.hook_rot_k", lambda k, hook: seen.update(k=k))
    producer = cache["blocks.1.attn.hook_rot_k"][mask]      # (padding rows are path-dependent)
    model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_rot_k", lambda k, hook: k * 2.0),
                                           keep])
    torch.testing.assert_close(seen["k"][mask], producer)
    model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.k_norm.hook_out",
                                            lambda k, hook: k * 2.0), keep])
    torch.testing.assert_close(seen["k"][mask], producer * 2.0)


@torch.no_grad()
def test_kv_shared_generate_and_run_from_layer(tiny_zoo):
    model = _kv_shared(tiny_zoo)
    batch = model.prepare(PROMPTS, images=IMAGES, padding_side="left")
    shapes = []

    def record(pattern, hook):
        shapes.append(tuple(pattern.shape))
        return pattern

    out = model.generate(batch, max_new_tokens=2, fwd_hooks=[("blocks.2.attn.hook_pattern", record)])
    # HF runs the KV-shared layers on the last prompt position only (they read no
    # earlier hidden state), so their prompt-pass pattern has one query row.
    assert shapes == [(2, 4, 1, 134), (2, 4, 1, 135)]
    step = model(batch)[:, -1]
    torch.testing.assert_close(out.logits[:, 0], step, atol=1e-4, rtol=0)
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_resid_pre"))
    full = model(batch)
    for layer in (0, 1):   # a start at or before the keys' producer works
        torch.testing.assert_close(
            model.run_from_layer(batch, layer, cache[f"blocks.{layer}.hook_resid_pre"]),
            full, atol=1e-5, rtol=0)
    # Past it, the shared keys are never computed: HF fails (here on the skipped blocks'
    # pass-through value, which it slices before the shared layers).
    with pytest.raises((KeyError, AttributeError)):
        model.run_from_layer(batch, 2, cache["blocks.2.hook_resid_pre"])


def test_placeholder_count_must_match_images(tiny_zoo):
    model = tiny_zoo.model("gemma4")
    with pytest.raises(LayoutError, match="1 image placeholder.*2 image"):
        model.prepare(["<|image|> what is this"], images=[[image(0), image(1)]])
    with pytest.raises(LayoutError, match="2 image placeholder.*1 image"):
        model.prepare(["<|image|> a <|image|>"], images=[image(0)])


def test_metadata_that_disagrees_with_ids_is_refused(tiny_zoo):
    model = tiny_zoo.model("gemma4")
    batch = model.prepare(["what is this"], images=[image(0)])
    ids, inputs = batch.input_ids, batch.inputs
    one_token_short = torch.cat([ids[:, :2], ids[:, 3:]], dim=1)   # BOI + 62 soft tokens
    with pytest.raises(LayoutError, match="7x9 grid .63 tokens. but the ids hold 62"):
        model.layout.locate(one_token_short, None, inputs)
    with pytest.raises(LayoutError, match=r"expected EOI .* right after its image tokens"):
        model.layout.locate(ids[:, :10], None, inputs)             # cut inside the image
    with pytest.raises(LayoutError, match=r"expected BOI .* right before its image tokens"):
        model.layout.locate(ids[:, 1:], None, inputs)              # BOI cut off
    two = dict(inputs, image_position_ids=inputs["image_position_ids"].repeat(2, 1, 1))
    with pytest.raises(LayoutError, match="describes 2 images"):
        model.layout.locate(ids, None, two)
    without = {k: v for k, v in inputs.items() if k != "image_position_ids"}
    with pytest.raises(LayoutError, match="image_position_ids"):
        model.layout.locate(ids, None, without)
    bad = inputs["image_position_ids"].clone()
    bad[0, 0] = torch.tensor([-1, -1])                             # a real patch dropped
    with pytest.raises(LayoutError, match="do not pool"):
        model.layout.locate(ids, None, dict(inputs, image_position_ids=bad))
