"""Every family, one harness: HF-exact logits, full caches, live attention hooks.

Parametrised over ``family`` (all tiny models in tests/tiny) by conftest.py.
"""

from __future__ import annotations

import torch

from tests.reference import logits_with_pattern_edit
from tl_vlm.core.attention_bridge import attention_layers

ATOL = 1e-4


@torch.no_grad()
def test_images_change_the_logits(tiny_zoo, family):
    """Guards every other test: a model that ignores its image proves nothing."""
    model, batch = tiny_zoo.batch(family)
    _, other = tiny_zoo.batch(family, images=tiny_zoo.specs[family].other_images)
    assert torch.equal(batch.input_ids, other.input_ids)
    diff = (model(batch) - model(other)).abs().amax(dim=(1, 2))
    assert (diff > 1e-3).all(), f"image does not reach the logits: {diff}"


@torch.no_grad()
def test_logits_equal_hf_with_padding(tiny_zoo, family):
    model, batch = tiny_zoo.batch(family)
    assert batch.padding_side == "right" and len(batch) == 2
    ref = tiny_zoo.reference(family)
    expected = ref(**batch.inputs).logits
    got = model(batch)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padding_equals_one_by_one(tiny_zoo, family):
    spec = tiny_zoo.specs[family]
    model, batch = tiny_zoo.batch(family, padding_side="left")
    assert batch.padding_side == "left"
    logits = model(batch)
    for b, (prompt, imgs) in enumerate(zip(spec.prompts, spec.images)):
        single = model.prepare([prompt], images=[imgs])
        alone = model(single)[0]
        n = alone.shape[0]
        torch.testing.assert_close(logits[b, -n:], alone, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_holds_every_layer_over_the_full_sequence(tiny_zoo, family):
    model, batch = tiny_zoo.batch(family)
    _, cache = model.run_with_cache(batch)
    b, seq = batch.input_ids.shape
    for i in range(model.cfg.n_layers):
        assert cache[f"blocks.{i}.hook_resid_pre"].shape == (b, seq, model.cfg.d_model)
    for i in attention_layers(model):   # every layer but a hybrid decoder's convolutions
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        assert pattern.shape == (b, model.cfg.n_heads, seq, seq)
        row_sums = pattern.sum(-1).transpose(1, 2)[batch.attention_mask.bool()]  # [n, head]
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=1e-5, rtol=0)


@torch.no_grad()
def test_zeroing_a_key_column_matches_hand_reference(tiny_zoo, family):
    """Pattern edits are live: bridge == HF with the hand-computed change added."""
    model, batch = tiny_zoo.batch(family)
    layer = attention_layers(model)[-1]
    key = int(batch.positions.image[0][1])

    def zero_key(pattern):
        pattern = pattern.clone()
        pattern[..., key] = 0.0
        return pattern

    got = model.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern",
                                                  lambda p, hook: zero_key(p))])
    assert (got - model(batch)).abs().max() > 1e-4, "the edit did not reach the logits"
    expected = logits_with_pattern_edit(model, tiny_zoo.reference(family), batch.inputs,
                                        {layer: zero_key})
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=ATOL, rtol=0)


@torch.no_grad()
def test_generate_keeps_hooks_on_cached_steps(tiny_zoo, family):
    """generate() with a hook == step-by-step full forwards with the same hook."""
    model, batch = tiny_zoo.batch(family, padding_side="left")
    keys = batch.positions.image_side

    def cut(pattern, hook):
        mask = keys.pad_to(pattern.shape[-1]).mask.to(pattern.device)   # [b, k]
        return pattern * (~mask)[:, None, None, :]

    hooks = [(f"blocks.{attention_layers(model)[0]}.attn.hook_pattern", cut)]
    steps = 3
    out = model.generate(batch, max_new_tokens=steps, fwd_hooks=hooks)
    plain = model.generate(batch, max_new_tokens=steps)
    assert (out.logits - plain.logits).abs().max() > 1e-4, "hook had no effect in generate"

    inputs, seq = dict(batch.inputs), batch.input_ids.shape[1]
    on_new = {"attention_mask": 1, **tiny_zoo.specs[family].generated_token_inputs}
    for step in range(steps):
        logits = model.run_with_hooks(inputs, fwd_hooks=hooks)[:, -1]
        torch.testing.assert_close(logits, out.logits[:, step], atol=ATOL, rtol=0)
        nxt = out.new_tokens[:, step : step + 1]
        for name, value in list(inputs.items()):   # grow every per-token input by one
            if torch.is_tensor(value) and value.shape[:2] == (len(batch), seq):
                fill = nxt if name == "input_ids" else torch.full_like(nxt, on_new.get(name, 0))
                inputs[name] = torch.cat([value, fill.to(value.dtype)], dim=1)
        seq += 1


@torch.no_grad()
def test_bfloat16_prepare_forward_generate(tiny_zoo, family):
    """A bf16 model takes its batch as prepared (pixels cast) and generates."""
    from tl_vlm import HookedVLM

    spec = tiny_zoo.specs[family]
    model = HookedVLM.from_pretrained(str(tiny_zoo.path(family)), dtype="bfloat16")
    batch = model.prepare(spec.prompts, images=spec.images, padding_side="left")
    floats = [v.dtype for v in batch.inputs.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and set(floats) == {torch.bfloat16}
    logits = model(batch)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    reference = tiny_zoo.model(family)(tiny_zoo.model(family).prepare(
        spec.prompts, images=spec.images, padding_side="left"))
    last = batch.positions.last.mask
    assert (logits[last].float().softmax(-1) - reference[last].softmax(-1)).abs().max() < 0.05
    out = model.generate(batch, max_new_tokens=3)
    assert out.new_tokens.shape == (len(batch), 3)


@torch.no_grad()
def test_last_logits_compute_only_the_last_position(tiny_zoo, family):
    """`last_logits` (logits_to_keep) equals the full logits at each example's last token."""
    for side in ("left", "right"):
        model, batch = tiny_zoo.batch(family, padding_side=side)
        full = model(batch)[batch.positions.last.mask]
        seen = {}
        hook = ("unembed.hook_out", lambda x, hook: seen.update(shape=tuple(x.shape)))
        last = model.last_logits(batch, fwd_hooks=[hook])
        torch.testing.assert_close(last, full, atol=1e-6, rtol=0)
        assert seen["shape"][1] < batch.input_ids.shape[1], "the unembedding ran on every position"
