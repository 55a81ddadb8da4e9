"""Hook functions follow the device of the activation they are given.

On a split model, layer l's activations live on cuda:1 while the batch's masks were
built on the CPU; mixing them is an error there. ``meta`` behaves the same way on a CPU
machine ("Tensor on device cpu is not on the expected device meta!"), so every hook that
returns a tensor is called here on meta activations of the right shape: it must not
raise and must return a meta tensor (scale spec, section 4.3, invariant 2). Hooks that
only read (contribution, geometry, logit lens) copy their sums to the CPU, which a meta
tensor cannot do; the offload tests cover them on a model with layers on "disk".
"""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tl_vlm import analyses as A
from tl_vlm.core.attention_edits import EdgeCut, KeyScale, fused_attention

META = torch.device("meta")


def test_meta_mixing_fails_like_two_gpus():
    with pytest.raises(RuntimeError, match="expected device meta"):
        torch.ones(2, device=META) + torch.ones(2)
    with pytest.raises(RuntimeError):
        torch.ones(2, 2, device=META).masked_fill(torch.ones(2, 2, dtype=torch.bool), 0.0)


@pytest.fixture(scope="module")
def toy(toy_models):
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    return model, model.prepare(make_examples(3, seed=1).prompts, padding_side="left")


def _pattern(model, batch):
    b, seq = batch.input_ids.shape
    return torch.rand(b, model.cfg.n_heads, seq, seq, device=META)


@pytest.mark.parametrize("method", ["zero", "mask"])
def test_knockout_hooks_on_meta(toy, method):
    model, batch = toy
    pos = batch.positions
    for hooks in (A.gate_knockout(model, batch, method=method),
                  A.knockout_hooks(model, batch, keys=pos.image, queries=pos.after_image,
                                   heads=[1], method=method)):
        for _, fn in hooks:
            out = fn(_pattern(model, batch), None)
            assert out.device == META and out.shape == _pattern(model, batch).shape


def test_key_scales_on_meta(toy):
    model, batch = toy
    pos = batch.positions
    for scale in (KeyScale(torch.rand(pos.all.mask.shape)),
                  KeyScale(torch.rand(pos.all.mask.shape), query_mask=pos.text.mask,
                           padding=pos.padding.mask)):
        assert scale(_pattern(model, batch), None).device == META


def test_fused_attention_on_meta(toy):
    """SDPA on values scaled by edits built on the CPU, and the rows path, on meta q/k/v."""
    model, batch = toy
    pos = batch.positions
    b, seq = batch.input_ids.shape
    h, d = model.cfg.n_heads, model.cfg.d_head
    q, k, v = (torch.rand(b, h, seq, d, device=META) for _ in range(3))
    module = torch.nn.Module()
    every_query = EdgeCut(pos.all.mask, pos.gate.mask, padding=pos.padding.mask)
    some_heads = EdgeCut(pos.all.mask, pos.boi.mask, heads=[0])
    some_queries = KeyScale(torch.rand(b, seq), query_mask=pos.after_image.mask)
    masked = EdgeCut(pos.text.mask, pos.image.mask, semantics="mask")
    for scores, edits in (([], [every_query]), ([], [some_heads, some_queries]),
                          ([masked], [KeyScale(torch.rand(b, seq)), every_query])):
        out = fused_attention(sdpa_attention_forward, module, q, k, v, None, d ** -0.5, scores, edits)
        assert out.device == META and out.shape == (b, seq, h, d)


def test_patch_hooks_on_meta(toy):
    """Source activations cached on one device, patched into a layer on another."""
    model, batch = toy
    pos = batch.positions
    b, seq = batch.input_ids.shape
    source = {"blocks.2.hook_resid_pre": torch.rand(b, seq, model.cfg.d_model)}
    (_, hook), = A.patch_hooks(model, "blocks.2.hook_resid_pre", source, pos.gate, pos.gate)
    out = hook(torch.rand(b, seq, model.cfg.d_model, device=META), None)
    assert out.device == META and out.shape == (b, seq, model.cfg.d_model)
