"""A model split over devices (accelerate: half its layers offloaded to "disk", the rest on
"cpu") gives results ``torch.equal`` to the model in one piece, for every analysis."""

import pytest
import torch

from tl_vlm import analyses as A

MODELS = ["toy-gated", "qwen2_vl", "llava_onevision"]


def _plain(tiny_zoo, toy_models, name):
    return toy_models[name] if name in toy_models else tiny_zoo.model(name)


def _batch(tiny_zoo, model, name, padding_side="right", other=False):
    if name.startswith("toy-"):
        from tl_vlm.toy import make_examples

        return model.prepare(make_examples(4, seed=1 if other else 0).prompts,
                             padding_side=padding_side)
    spec = tiny_zoo.specs[name]
    images = spec.other_images if other else spec.images
    return model.prepare(spec.prompts, images=images, padding_side=padding_side)


def _gate(batch):
    return "last_image" if batch.positions.gate.is_empty() else "gate"


@pytest.fixture(scope="module", params=MODELS)
def pair(request, tiny_zoo, toy_models):
    """(plain model, offloaded model, name)."""
    name = request.param
    return _plain(tiny_zoo, toy_models, name), tiny_zoo.offloaded(name), name


def test_the_split_is_real(pair):
    _, split, _ = pair
    placed = set(split.device_map.values())
    assert placed == {"cpu", "disk"}
    last = split.blocks[-1].original_component
    assert any(p.device.type == "meta" for p in last.parameters()), "the last layer is not offloaded"


@torch.no_grad()
def test_forward_cache_and_hook_edits_are_equal(pair, tiny_zoo):
    plain, split, name = pair
    batch = _batch(tiny_zoo, plain, name)
    assert torch.equal(plain(batch), split(batch))
    logits_a, cache_a = plain.run_with_cache(batch)
    logits_b, cache_b = split.run_with_cache(batch)
    assert torch.equal(logits_a, logits_b)
    assert sorted(cache_a.keys()) == sorted(cache_b.keys())
    unequal = [k for k in cache_a.keys() if not torch.equal(cache_a[k], cache_b[k].to(cache_a[k].device))]
    assert not unequal
    last = plain.cfg.n_layers - 1                           # an offloaded layer
    scale = lambda pattern, hook: pattern * 0.5             # noqa: E731
    hooks = [(f"blocks.{last}.attn.hook_pattern", scale), (f"blocks.{last}.hook_resid_pre",
                                                           lambda r, hook: r.flip(-1))]
    edited = plain.run_with_hooks(batch, fwd_hooks=hooks)
    assert not torch.equal(edited, logits_a)
    assert torch.equal(edited, split.run_with_hooks(batch, fwd_hooks=hooks))


@torch.no_grad()
def test_generate_with_a_knockout_is_equal(pair, tiny_zoo):
    plain, split, name = pair
    batch = _batch(tiny_zoo, plain, name, padding_side="left")
    keys = batch.positions.gate if not batch.positions.gate.is_empty() else batch.positions.image
    out = [m.generate(batch, max_new_tokens=3, fwd_hooks=A.knockout_hooks(m, batch, keys=keys))
           for m in (plain, split)]
    assert torch.equal(out[0].sequences, out[1].sequences)
    assert torch.equal(out[0].logits, out[1].logits)


@torch.no_grad()
def test_run_from_every_layer_is_equal(pair, tiny_zoo):
    plain, split, name = pair
    batch = _batch(tiny_zoo, plain, name)
    _, cache = plain.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for layer in range(plain.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        assert torch.equal(plain.run_from_layer(batch, layer, resid),
                           split.run_from_layer(batch, layer, resid)), f"layer {layer}"


@torch.no_grad()
def test_patching_contribution_and_logit_lens_are_equal(pair, tiny_zoo):
    plain, split, name = pair
    target = _batch(tiny_zoo, plain, name)
    source = _batch(tiny_zoo, plain, name, other=True)
    for stream in ("resid_pre", "attn_in"):
        a, b = (A.patch_gate(m, source, target, stream=stream, positions=_gate(target))
                for m in (plain, split))
        assert torch.equal(a.logits, b.logits), stream
    a, b = (A.cross_modal_contribution(m, target) for m in (plain, split))
    assert torch.equal(a.weight_total, b.weight_total)
    assert torch.equal(a.value_total, b.value_total)
    a, b = (A.logit_lens(m, target, target.positions.last) for m in (plain, split))
    assert torch.equal(a.logits, b.logits)
    a, b = (A.head_logit_attribution(m, target, 3) for m in (plain, split))
    assert torch.equal(a, b)
