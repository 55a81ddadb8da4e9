"""Logit lens and per-head direct logit attribution, against hand computations."""

import pytest
import torch

from tl_vlm.analyses.logit_lens import head_logit_attribution, logit_lens
from tl_vlm.core.positions import PositionSet


def _gain(norm: torch.nn.Module) -> torch.Tensor:
    """The norm's gain, written out per family: Gemma 1-3 scale by (1 + w), the others
    (Gemma 4 too, and the LayerNorms) by w."""
    w = norm.weight.detach().float()
    return 1.0 + w if type(norm).__name__ in ("GemmaRMSNorm", "Gemma2RMSNorm",
                                              "Gemma3RMSNorm") else w


#: LayerNorms (they subtract the mean before scaling): Aya Vision's Cohere2 decoder
CENTRED = {"LayerNorm", "Cohere2LayerNorm"}


def _eps(norm: torch.nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


@torch.no_grad()
def test_lens_of_last_residual_is_the_models_logits(tiny_zoo, family):
    model, batch = tiny_zoo.batch(family)
    pos = batch.positions
    logits = model(batch)
    for chosen in (pos.all, pos.image):
        lens = logit_lens(model, batch, chosen, layers=[-1])
        expected = logits[chosen.mask]
        torch.testing.assert_close(lens.logits[0], expected, atol=1e-5, rtol=0)
        assert lens.layers == [model.cfg.n_layers - 1]
        assert lens.example.tolist() == chosen.mask.nonzero()[:, 0].tolist()
        assert lens.position.tolist() == chosen.mask.nonzero()[:, 1].tolist()
        torch.testing.assert_close(lens.for_example(1)[0], logits[1, chosen[1]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llava", "gemma3"])
@torch.no_grad()
def test_lens_at_an_inner_layer_is_norm_then_unembed_by_hand(tiny_zoo, name):
    model, batch = tiny_zoo.batch(name)
    image = batch.positions.image
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in (
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"))
    norm = model.ln_final.original_component
    w_u = model.unembed.original_component.weight
    for point, name in (("resid_post", "blocks.0.hook_resid_post"), ("resid_pre", "blocks.1.hook_resid_pre")):
        x = cache[name][image.mask]
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(norm)) * _gain(norm)
        expected = normed @ w_u.T + model.unembed.original_component.bias
        lens = logit_lens(model, batch, image, layers=[0 if point == "resid_post" else 1], point=point)
        torch.testing.assert_close(lens.logits[0], expected, atol=1e-5, rtol=1e-5)
    cols = [3, 5]
    sliced = logit_lens(model, batch, image, token_ids=cols)
    full = logit_lens(model, batch, image)
    torch.testing.assert_close(sliced.logits, full.logits[..., cols])
    assert set(sliced.top_k(1)[1].unique().tolist()) <= set(cols)


@torch.no_grad()
def test_chameleon_image_vocabulary_mask_is_the_only_transform(tiny_zoo):
    model, batch = tiny_zoo.batch("chameleon")
    raw = logit_lens(model, batch, batch.positions.image, apply_final_transform=False).logits
    masked = logit_lens(model, batch, batch.positions.image).logits
    image_vocab = model.hf_model.model.vocabulary_mapping.image_tokens
    assert (masked[..., image_vocab] == torch.finfo(masked.dtype).min).all()
    keep = torch.ones(masked.shape[-1], dtype=torch.bool)
    keep[image_vocab] = False
    torch.testing.assert_close(raw[..., keep], masked[..., keep])


def _hand_attribution(model, batch, cache, answer, baseline, layer):
    """Per-head DLA and the layer's whole attention contribution, written out by hand."""
    pos = batch.positions.last.mask
    norm = model.ln_final.original_component
    w_u = model.unembed.original_component.weight.detach()
    direction = w_u[answer] - w_u[baseline]                                       # [b, d]
    direction = direction / cache["ln_final.hook_scale"][pos] * _gain(norm)        # frozen scale
    if type(norm).__name__ in CENTRED:   # d . (c(y) * m) == c(d * m) . y, c centring
        direction = direction - direction.mean(-1, keepdim=True)
    block = model.blocks[layer]
    o = block.attn.o.original_component
    z = cache[f"blocks.{layer}.attn.hook_z"][pos]                                 # [b, h, k]
    n_heads, d_head = z.shape[1], z.shape[2]
    heads = torch.stack([z[:, h] @ o.weight[:, h * d_head:(h + 1) * d_head].T
                         for h in range(n_heads)], dim=1)                          # [b, h, d]
    bias = o.bias.detach() if o.bias is not None else torch.zeros(o.weight.shape[0])
    if hasattr(block, "ln1_post"):  # the post-attention norm, scale frozen at attn output
        post = block.ln1_post.original_component
        mult = _gain(post) / cache[f"blocks.{layer}.ln1_post.hook_scale"][pos]   # [b, d]
        heads = heads * mult[:, None]
        bias = bias * mult
    per_head = torch.einsum("bhd,bd->bh", heads, direction)
    bias_term = (bias * direction).sum(-1)
    if f"blocks.{layer}.hook_resid_mid" in cache.cache_dict:
        added = (cache[f"blocks.{layer}.hook_resid_mid"] - cache[f"blocks.{layer}.hook_resid_pre"])[pos]
    else:   # a parallel block (Cohere: attention and MLP read one norm): its attention output
        added = cache[f"blocks.{layer}.attn.hook_out"][pos]
    whole = (added * direction).sum(-1)
    return per_head, bias_term, whole


@torch.no_grad()
def test_head_attribution_equals_hand_einsum_and_sums_to_the_layer(tiny_zoo, family):
    model, batch = tiny_zoo.batch(family)
    answer, baseline = torch.tensor([5, 7]), torch.tensor([6, 6])
    got = head_logit_attribution(model, batch, answer, baseline_tokens=baseline)
    assert got.shape == (len(batch), model.cfg.n_layers, model.cfg.n_heads)
    _, cache = model.run_with_cache(batch)
    for layer in range(model.cfg.n_layers):
        per_head, bias_term, whole = _hand_attribution(model, batch, cache, answer, baseline, layer)
        torch.testing.assert_close(got[:, layer], per_head, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[:, layer].sum(-1) + bias_term, whole, atol=1e-5, rtol=1e-4)
    one = head_logit_attribution(model, batch, 5, layers=[1])
    torch.testing.assert_close(one, head_logit_attribution(model, batch, [5, 5])[:, [1]])


@pytest.mark.parametrize("name", ["llava", "gemma3"])
@torch.no_grad()
def test_o_projection_bias_is_left_out_of_the_heads(tiny_zoo, name):
    model, batch = tiny_zoo.batch(name)
    o = model.blocks[1].attn.o.original_component
    assert o.bias is None
    o.bias = torch.nn.Parameter(torch.randn(o.weight.shape[0]) * 0.5)
    try:
        got = head_logit_attribution(model, batch, 5, baseline_tokens=6, layers=[1])
        _, cache = model.run_with_cache(batch)
        per_head, bias_term, whole = _hand_attribution(model, batch, cache, torch.tensor([5, 5]),
                                                       torch.tensor([6, 6]), 1)
        assert bias_term.abs().min() > 1e-3
        torch.testing.assert_close(got[:, 0], per_head, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[:, 0].sum(-1) + bias_term, whole, atol=1e-5, rtol=1e-4)
    finally:
        o.bias = None


def test_bad_arguments_raise_clearly(tiny_zoo):
    model, batch = tiny_zoo.batch("llava")
    pos = batch.positions
    with pytest.raises(ValueError, match="empty in every example"):
        logit_lens(model, batch, pos.eoi)
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        logit_lens(model, batch, pos.image, layers=[2])
    with pytest.raises(ValueError, match="batch is"):
        logit_lens(model, batch, PositionSet.at([0], 3))
    with pytest.raises(ValueError, match="padding"):
        logit_lens(model, batch, pos.padding | pos.last)
    with pytest.raises(ValueError, match="'resid_post'"):
        logit_lens(model, batch, pos.last, point="resid_mid")
    with pytest.raises(ValueError, match="exactly one position per example"):
        head_logit_attribution(model, batch, 5, positions=pos.image)
    with pytest.raises(ValueError, match="one per example"):
        head_logit_attribution(model, batch, [5, 6, 7])
    with pytest.raises(IndexError, match="vocabulary"):
        head_logit_attribution(model, batch, 10**6)
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        head_logit_attribution(model, batch, 5, layers=[-3])


def test_an_unknown_final_transform_is_caught(tiny_zoo, monkeypatch):
    import dataclasses

    model, batch = tiny_zoo.batch("chameleon")
    monkeypatch.setattr(model, "family", dataclasses.replace(model.family, final_logits=None))
    with pytest.raises(RuntimeError, match="final_logits"):               # forgot the mask
        logit_lens(model, batch, batch.positions.last)
    logit_lens(model, batch, batch.positions.last, check=False)
