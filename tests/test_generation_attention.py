"""Attention over generation: equal to a hand-written loop over generation steps, shares
add up to one, a planted route shows."""

import pytest
import torch

from tl_vlm import analyses as A
from tl_vlm.toy import make_examples


def test_equals_a_hand_loop_over_steps(toy_models):
    model = toy_models["toy-gated"]
    batch = model.prepare(make_examples(3).prompts, padding_side="left")
    attn = A.attention_over_generation(model, batch, max_new_tokens=3, layers=[1, 3])
    out = model.generate(batch, max_new_tokens=3)
    steps = attn.shares.shape[1]              # one forward per new token (all may stop early)
    assert attn.shares.shape == (3, steps, 2, 5) and steps == out.new_tokens.shape[1]
    # by hand: run the growing sequence in full each step and read the last query's row
    pos = batch.positions
    for step in range(steps):
        ids = out.sequences[:, :batch.input_ids.shape[1] + step]
        inputs = dict(batch.inputs, input_ids=ids,
                      attention_mask=torch.cat([batch.attention_mask,
                                                torch.ones(3, step, dtype=torch.long)], 1))
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern"))
        for li, layer in enumerate([1, 3]):
            row = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, -1, :].mean(1)
            n = pos.seq_len
            image = row[:, :n][pos.image.mask].reshape(3, -1).sum(-1)
            gate = row[:, :n][pos.gate.mask].reshape(3, -1).sum(-1)
            generated = row[:, n:].sum(-1)
            assert attn.shares[:, step, li, 0] == pytest.approx(image, abs=1e-5)
            assert attn.shares[:, step, li, 1] == pytest.approx(gate, abs=1e-5)
            assert attn.shares[:, step, li, 3] == pytest.approx(generated, abs=1e-5)
    finite = attn.shares.sum(-1)[~attn.shares.sum(-1).isnan()]
    assert torch.allclose(finite, torch.ones_like(finite), atol=1e-5)


def test_the_gated_toy_reads_the_gate_not_the_image(toy_models):
    gated = toy_models["toy-gated"]
    batch = gated.prepare(make_examples(8).prompts, padding_side="left")
    mean = A.attention_over_generation(gated, batch, max_new_tokens=1).mean()[0]   # [layer, group]
    assert mean[-1, 1] > mean[-1, 0]              # last layer: gate over all image tokens


def test_bad_input_is_refused(toy_models):
    model = toy_models["toy-gated"]
    batch = model.prepare(make_examples(2).prompts, padding_side="left")
    with pytest.raises(ValueError, match="overlap"):
        A.attention_over_generation(model, batch, groups={"a": "image", "b": "image_side"})
    with pytest.raises(ValueError, match="max_new_tokens"):
        A.attention_over_generation(model, batch, max_new_tokens=0)
    with pytest.raises(TypeError, match="VLMBatch"):
        A.attention_over_generation(model, ["what colour"])
