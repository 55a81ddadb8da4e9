"""Activation patching and running from a layer, on every family's tiny model."""


import pytest
import torch

from tl_vlm.analyses.patching import (
    PatchingResult,
    first_token_ids,
    patch_gate,
    patch_hooks,
    patch_positions,
)
from tl_vlm.core.positions import PositionSet
from tl_vlm.core.prefix import start_at_layer

ATOL = 1e-5
STREAMS = ["resid_pre", "attn_in"]


def _positions_name(batch):
    """The gate where the family has one, else the last image token."""
    return "last_image" if batch.positions.gate.is_empty() else "gate"


def _pair(tiny_zoo, family, **prepare_kwargs):
    """(model, source, target): the spec's prompts with other images vs its own."""
    model, target = tiny_zoo.batch(family, **prepare_kwargs)
    _, source = tiny_zoo.batch(family, images=tiny_zoo.specs[family].other_images, **prepare_kwargs)
    return model, source, target


def _counted_hooks():
    """A hook on every block hook point recording its name, and the record."""
    fired = []
    return [(lambda name: name.startswith("blocks."), lambda x, hook: fired.append(hook.name))], fired


def _count_layer_calls(model):
    """Forward pre-hooks counting calls of each HF decoder layer; returns (counts, handles)."""
    counts = [0] * len(model.blocks)
    handles = []
    for i, block in enumerate(model.blocks):
        def pre(mod, args, kwargs, i=i):
            counts[i] += 1
        handles.append(block.original_component.register_forward_pre_hook(pre, with_kwargs=True))
    return counts, handles


# -- running from a layer ------------------------------------------------------------
def _check_run_from_layer(model, batch):
    n = model.cfg.n_layers
    full, cache = model.run_with_cache(batch, names_filter=lambda name: name.endswith("hook_resid_pre"))
    mask = batch.attention_mask.bool()
    for layer in range(n):
        hooks, fired = _counted_hooks()
        counts, handles = _count_layer_calls(model)
        try:
            out = model.run_from_layer(batch, layer, cache[f"blocks.{layer}.hook_resid_pre"],
                                       fwd_hooks=hooks)
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(out[mask], full[mask], atol=ATOL, rtol=0)
        assert counts == [0] * layer + [1] * (n - layer), f"layer calls {counts} from {layer}"
        ran = {int(name.split(".")[1]) for name in fired}
        assert ran == set(range(layer, n)), f"hooks of blocks {sorted(ran)} fired from {layer}"
        assert f"blocks.{layer}.hook_in" in fired
    assert all("forward" not in b.__dict__ for b in model.blocks), "a block stayed overridden"


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_run_from_layer_equals_full_forward(tiny_zoo, family, side):
    model, batch = tiny_zoo.batch(family, padding_side=side)
    _check_run_from_layer(model, batch)


@pytest.mark.parametrize("deep_family", ["chameleon", "llava"])
@torch.no_grad()
def test_run_from_layer_skips_several_blocks(tiny_zoo, deep_family):
    """A tuple-returning decoder loop (Chameleon) and a tensor-returning one (LLaVA)."""
    model = tiny_zoo.deeper(deep_family, n_layers=4)
    spec = tiny_zoo.specs[deep_family]
    batch = model.prepare(spec.prompts, images=spec.images)
    assert model.cfg.n_layers == 4
    _check_run_from_layer(model, batch)


@torch.no_grad()
def test_start_at_layer_restores_blocks_after_an_error(tiny_zoo):
    model, batch = tiny_zoo.batch("llava")
    _, cache = model.run_with_cache(batch, names_filter="blocks.1.hook_resid_pre")

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with start_at_layer(model, 1, cache["blocks.1.hook_resid_pre"], batch=batch):
            model.run_with_hooks(batch, fwd_hooks=[("blocks.1.hook_resid_post", boom)])
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert all("forward" not in b.original_component.__dict__ for b in model.blocks)
    torch.testing.assert_close(model(batch), model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")[0],
                               atol=0, rtol=0)


# -- the hook factory ----------------------------------------------------------------
@pytest.mark.parametrize("stream", STREAMS)
@torch.no_grad()
def test_patching_own_activations_changes_nothing(tiny_zoo, family, stream):
    model, batch = tiny_zoo.batch(family)
    clean = model(batch)
    template = {"resid_pre": "blocks.{layer}.hook_resid_pre", "attn_in": "blocks.{layer}.attn.hook_in"}[stream]
    names = [template.format(layer=l) for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(batch, names_filter=names)
    pos = batch.positions.all
    hooks = patch_hooks(model, names, cache, pos, pos)
    assert torch.equal(model.run_with_hooks(batch, fwd_hooks=hooks), clean)
    assert all(fn.calls == 1 for _, fn in hooks)
    # and through the sweep, with and without prefix reuse
    for reuse in (True, False):
        res = patch_positions(model, batch, batch, positions="all", stream=stream, reuse_prefix=reuse)
        for row in res.logits:
            assert torch.equal(row, res.clean_logits)
        assert torch.equal(res.source_logits, res.clean_logits)


@torch.no_grad()
def test_patching_every_position_at_layer_0_reproduces_the_source(tiny_zoo, family):
    model, source, target = _pair(tiny_zoo, family)
    assert source.input_ids.shape == target.input_ids.shape
    assert source.positions.image == target.positions.image, "same layout expected"
    mask = target.attention_mask.bool()
    clean, want = model(target), model(source)
    assert (clean[mask] - want[mask]).abs().max() > 1e-4, "the two images must differ"
    # (and where the image also enters later, as DeepStack does, those terms too)
    names = ["blocks.0.hook_resid_pre", *tiny_zoo.specs[family].image_entry_hooks]
    _, cache = model.run_with_cache(source, names_filter=names)
    got = model.run_with_hooks(target, fwd_hooks=patch_hooks(
        model, names, cache, source.positions.all, target.positions.all))
    torch.testing.assert_close(got[mask], want[mask], atol=ATOL, rtol=0)


@torch.no_grad()
def test_patch_between_different_layouts_and_padding(tiny_zoo):
    """Source right-padded, target left-padded with the prompts swapped: per example the
    k-th source position goes to the k-th target position, nothing else changes."""
    model, _ = tiny_zoo.batch("pixtral")
    spec = tiny_zoo.specs["pixtral"]
    source = model.prepare(spec.prompts, images=spec.other_images, padding_side="right")
    target = model.prepare(spec.prompts[::-1], images=spec.images[::-1], padding_side="left")
    src_pos = source.positions.text.random(3, seed=0)
    tgt_pos = target.positions.image.random(3, seed=1)
    name = "blocks.1.hook_resid_pre"
    _, src_cache = model.run_with_cache(source, names_filter=[name])
    _, clean_cache = model.run_with_cache(target, names_filter=[name])
    written = {}

    def grab(x, hook):
        written["x"] = x

    hooks = patch_hooks(model, [name], src_cache, src_pos, tgt_pos)
    model.run_with_hooks(target, fwd_hooks=hooks + [(name, grab)])
    got, src, clean = written["x"], src_cache[name], clean_cache[name]
    for b in range(len(target)):
        assert torch.equal(got[b, tgt_pos[b]], src[b, src_pos[b]])
    untouched = ~tgt_pos.mask
    assert torch.equal(got[untouched], clean[untouched])


# -- sweeps --------------------------------------------------------------------------
@pytest.mark.parametrize("stream", STREAMS)
@torch.no_grad()
def test_prefix_reuse_sweep_equals_naive_sweep(tiny_zoo, family, stream):
    model, source, target = _pair(tiny_zoo, family)
    where = _positions_name(target)
    fast = patch_positions(model, source, target, positions=where, stream=stream)
    slow = patch_positions(model, source, target, positions=where, stream=stream, reuse_prefix=False)
    torch.testing.assert_close(fast.logits, slow.logits, atol=ATOL, rtol=0)
    assert torch.equal(fast.clean_logits, slow.clean_logits)
    assert fast.layers == list(range(model.cfg.n_layers))
    span = range(1) if stream == "resid_pre" else range(model.cfg.n_layers)
    assert fast.hook_names[0] == [
        ("blocks.{l}.hook_resid_pre" if stream == "resid_pre" else "blocks.{l}.attn.hook_in").format(l=l)
        for l in span]


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_equals_examples_one_by_one(tiny_zoo, family, side):
    model, source, target = _pair(tiny_zoo, family, padding_side=side)
    assert target.padding_side == side, "the spec's prompts should have different lengths"
    spec = tiny_zoo.specs[family]
    where = _positions_name(target)
    batched = patch_positions(model, source, target, positions=where, stream="attn_in")
    for b in range(len(target)):
        one_t = model.prepare([spec.prompts[b]], images=[spec.images[b]])
        one_s = model.prepare([spec.prompts[b]], images=[spec.other_images[b]])
        if getattr(one_t.positions, where).is_empty():
            continue
        alone = patch_positions(model, one_s, one_t, positions=where, stream="attn_in")
        torch.testing.assert_close(batched.logits[:, b], alone.logits[:, 0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched.clean_logits[b], alone.clean_logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched.source_logits[b], alone.source_logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("stream", STREAMS)
@torch.no_grad()
def test_gate_patch_is_live_and_matches_a_plain_hook(tiny_zoo, family, stream):
    model, source, target = _pair(tiny_zoo, family)
    where = _positions_name(target)
    res = patch_gate(model, source, target, layers=[1], stream=stream, positions=where)
    assert (res.logits[0] - res.clean_logits).abs().max() > 1e-4, "the patch did not reach the logits"

    # by hand: write the source's activation in with a plain hook
    name = "blocks.1.hook_resid_pre" if stream == "resid_pre" else "blocks.1.attn.hook_in"
    _, cache = model.run_with_cache(source, names_filter=[name])
    src_act = cache[name]
    src_pos, tgt_pos = getattr(source.positions, where), getattr(target.positions, where)

    def write(act, hook):
        act = act.clone()
        for b in range(act.shape[0]):
            act[b, tgt_pos[b]] = src_act[b, src_pos[b]]
        return act

    logits = model.run_with_hooks(target, fwd_hooks=[(name, write)])
    expected = logits[target.positions.last.mask]
    torch.testing.assert_close(res.logits[0], expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_flip_rate_and_overlap_equal_direct_computation(tiny_zoo):
    model, source, target = _pair(tiny_zoo, "chameleon")
    clean = model(target)[target.positions.last.mask]
    src = model(source)[source.positions.last.mask]
    # A: the source's top token; B: a token the clean target prefers to A
    a = src.argmax(-1)
    order = clean.argsort(-1, descending=True)
    b = torch.stack([next(t for t in order[i] if t != a[i]) for i in range(len(a))])
    res = patch_gate(model, source, target, answers=(a, b), stream="attn_in")
    probs = res.logits.softmax(-1)
    p_src = src.softmax(-1)
    want_overlap = torch.stack([torch.minimum(probs[l], p_src).sum(-1) for l in range(len(res.layers))])
    torch.testing.assert_close(res.overlap, want_overlap, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.clean_overlap, torch.minimum(clean.softmax(-1), p_src).sum(-1),
                               atol=1e-6, rtol=0)
    rows = torch.arange(len(a))
    d_clean = clean[rows, b] - clean[rows, a]
    d_patched = res.logits[:, rows, b] - res.logits[:, rows, a]
    want_flipped = torch.sign(d_patched) != torch.sign(d_clean)
    assert torch.equal(res.flipped, want_flipped)
    torch.testing.assert_close(res.flip_rate, want_flipped.float().mean(-1))
    assert "clean overlap" in res.table()

    # names resolve to their first token, pairs per example
    tok = model.layout.tokenizer
    names = [("cat", "dog"), ("red dog", "blue")]
    res2 = patch_gate(model, source, target, layers=[0], answers=names)
    first = lambda s: tok(s, add_special_tokens=False)["input_ids"][0]
    assert res2.source_answer.tolist() == [first("cat"), first("red")]
    assert res2.target_answer.tolist() == [first("dog"), first("blue")]
    assert first_token_ids(model, [5, "dog"]).tolist() == [5, first("dog")]


@torch.no_grad()
def test_patch_hooks_during_generation(tiny_zoo):
    model, source, target = _pair(tiny_zoo, "llava", padding_side="left")
    names = ["blocks.1.hook_resid_pre"]
    _, cache = model.run_with_cache(source, names_filter=names)
    hooks = patch_hooks(model, names, cache, source.positions.last_image, target.positions.last_image)
    out = model.generate(target, max_new_tokens=3, fwd_hooks=hooks)
    patched = model.run_with_hooks(target, fwd_hooks=hooks)[:, -1]
    torch.testing.assert_close(out.logits[:, 0], patched, atol=ATOL, rtol=0)
    assert hooks[0][1].calls == 2   # the prompt pass of generate, then run_with_hooks
    _, clean_cache = model.run_with_cache(target, names_filter=names)
    with pytest.raises(ValueError, match="not cached generation steps"):
        with start_at_layer(model, 1, clean_cache[names[0]], batch=target):
            model.generate(target, max_new_tokens=2)
    assert all("forward" not in b.__dict__ for b in model.blocks)


# -- errors --------------------------------------------------------------------------
@torch.no_grad()
def test_clear_errors(tiny_zoo):
    model, source, target = _pair(tiny_zoo, "chameleon")
    names = ["blocks.1.hook_resid_pre"]
    _, cache = model.run_with_cache(source, names_filter=names)
    seq_s, seq_t = source.input_ids.shape[1], target.input_ids.shape[1]
    with pytest.raises(ValueError, match="example 1: 2 source position"):
        patch_hooks(model, names, cache, PositionSet.from_lists([[1], [2, 3]], seq_s),
                    PositionSet.from_lists([[1], [2]], seq_t))
    gate = target.positions.gate
    one_gate = PositionSet.from_lists([gate[0].tolist(), gate[1].tolist()[:1]], seq_t)
    with pytest.raises(ValueError, match="example 1: 2 source"):
        patch_gate(model, source, target, positions=(source.positions.gate, one_gate))
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        patch_gate(model, source, target, layers=[5])
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        model.run_from_layer(target, 2, cache["blocks.1.hook_resid_pre"])
    with pytest.raises(ValueError, match="unknown stream"):
        patch_gate(model, source, target, stream="residual")
    with pytest.raises(KeyError, match="unknown hook name"):
        patch_gate(model, source, target, stream="blocks.{layer}.hook_nope")
    with pytest.raises(KeyError, match="unknown hook name"):
        patch_hooks(model, ["blocks.9.hook_resid_pre"], cache, source.positions.gate, target.positions.gate)
    with pytest.raises(KeyError, match="source_acts has no"):
        patch_hooks(model, ["blocks.0.hook_resid_pre"], cache, source.positions.gate, target.positions.gate)
    with pytest.raises(ValueError, match="unknown position set"):
        patch_gate(model, source, target, positions="gates")
    with pytest.raises(ValueError, match="same token"):
        patch_gate(model, source, target, answers=[("cat", "dog"), ("dog", "dog")])
    with pytest.raises(ValueError, match="batch is"):
        model.run_from_layer(target, 1, cache["blocks.1.hook_resid_pre"][:1])
    with pytest.raises(ValueError, match="sizes must match"):
        spec = tiny_zoo.specs["chameleon"]
        patch_gate(model, source, model.prepare(spec.prompts[:1], images=spec.images[:1]))
    with pytest.raises(RuntimeError, match="never fired"):
        patch_gate(model, source, target, stream="blocks.{layer}.hook_mlp_in")
    _, llava_batch = tiny_zoo.batch("llava")
    with pytest.raises(ValueError, match="no end-of-image token"):
        patch_gate(model, llava_batch, llava_batch)
    longer = target.positions.gate.pad_to(seq_t + 3)     # hooks built for another batch
    hooks = patch_hooks(model, names, cache, source.positions.gate, longer)
    with pytest.raises(ValueError, match="positions but the target batch has"):
        model.run_with_hooks(target, fwd_hooks=hooks)
    assert isinstance(patch_gate(model, source, target, layers=[1]), PatchingResult)
