"""Qwen3-VL-MoE on its tiny model: the sparse and the dense MLP are bridged, and routing
edits are live.

Positions, layout errors and DeepStack are checked for this family in
``tests/test_positions_qwen3_vl.py`` (parametrised over both Qwen3-VL families: same
tokenizer, processor, tower and layout; row 0 holds a 2x3 image, row 1 a 2x2 and a 3x2).
"""

import torch

from tests.test_positions_qwen3_vl import PROMPTS, _images

FAMILY = "qwen3_vl_moe"


@torch.no_grad()
def test_sparse_layer_0_and_dense_layer_1(tiny_zoo):
    model = tiny_zoo.model(FAMILY)
    batch = model.prepare(PROMPTS, images=_images())
    _, cache = model.run_with_cache(batch)
    b, seq = batch.input_ids.shape
    k = model.hf_model.config.text_config.num_experts_per_tok
    # layer 0: the router picks 2 of 4 experts per token, weights summing to 1
    indices = cache["blocks.0.mlp.gate.hook_expert_indices"]
    weights = cache["blocks.0.mlp.gate.hook_expert_weights"]
    assert indices.shape == (b * seq, k) and int(indices.max()) < 4
    torch.testing.assert_close(weights.sum(-1), torch.ones(b * seq), atol=1e-5, rtol=0)
    # layer 1 (mlp_only_layers): the dense gated MLP's projections
    assert cache["blocks.1.mlp.dense_in.hook_out"].shape == (b, seq, 64)
    assert not any(name.startswith("blocks.1.mlp.gate.") for name in cache)
    # either way the block is resid_pre + attention + MLP + DeepStack
    for i in range(2):
        parts = (cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.attn.hook_out"]
                 + cache[f"blocks.{i}.mlp.hook_out"] + cache[f"blocks.{i}.deepstack.hook_out"])
        torch.testing.assert_close(parts, cache[f"blocks.{i}.hook_resid_post"],
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_zeroing_the_moe_output_matches_hf(tiny_zoo):
    """An MLP-output edit in the sparse layer == HF with its MoE block's output zeroed."""
    model = tiny_zoo.model(FAMILY)
    batch = model.prepare(PROMPTS, images=_images())
    got = model.run_with_hooks(
        batch, fwd_hooks=[("blocks.0.mlp.hook_out", lambda x, hook: torch.zeros_like(x))])
    ref = tiny_zoo.reference(FAMILY)
    moe = ref.model.language_model.layers[0].mlp
    assert type(moe).__name__ == "Qwen3VLMoeTextSparseMoeBlock"
    handle = moe.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        expected = ref(**batch.inputs).logits
    finally:
        handle.remove()
    mask = batch.attention_mask.bool()
    assert (got - model(batch))[mask].abs().max() > 1e-4
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=0)
