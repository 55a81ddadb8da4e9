"""Knockout hooks on every family, against a hand-computed reference on the HF model."""

import pytest
import torch

from tests.reference import logits_with_pattern_edit
from tl_vlm import analyses as A
from tl_vlm.core.attention_bridge import attention_layers
from tl_vlm.core.positions import PositionSet

ATOL = 1e-4


def _edges(batch, keys, queries):
    """[b, 1, q, k] cut edges, from the position sets directly."""
    return (queries.mask[:, :, None] & keys.mask[:, None, :])[:, None]


@pytest.mark.parametrize("method", ["zero", "mask"])
@torch.no_grad()
def test_knockout_equals_hand_reference(tiny_zoo, family, method):
    model, batch = tiny_zoo.batch(family)
    ref = tiny_zoo.reference(family)
    pos = batch.positions
    keys = pos.image.random(2, seed=0) | pos.gate
    queries = pos.after_image
    hooks = A.knockout_hooks(model, batch, keys=keys, queries=queries, layers="all", method=method)
    got = model.run_with_hooks(batch, fwd_hooks=hooks)
    assert (got - model(batch)).abs().max() > 1e-4, "knockout did not reach the logits"

    cut = _edges(batch, keys, queries)

    def zero(p):
        return p.masked_fill(cut, 0.0)

    def renormalise(p):
        kept = p.masked_fill(cut, 0.0)
        return kept / kept.sum(-1, keepdim=True)

    edit = zero if method == "zero" else renormalise
    expected = logits_with_pattern_edit(model, ref, batch.inputs,
                                        {l: edit for l in attention_layers(model)})
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=ATOL, rtol=0)


@torch.no_grad()
def test_zero_and_mask_semantics_differ_as_they_should(tiny_zoo):
    model, batch = tiny_zoo.batch("llava")
    pos = batch.positions
    keys = pos.image.random(3, seed=1)
    seen = {}
    for method in ("zero", "mask"):
        hooks = A.knockout_hooks(model, batch, keys=keys, layers=[0], method=method)
        out = {}
        def grab(p, hook):
            out["p"] = p
        model.run_with_hooks(batch, fwd_hooks=hooks + [("blocks.0.attn.hook_pattern", grab)])
        seen[method] = out["p"]
    rows = pos.all.mask[:, None, :].expand(-1, model.cfg.n_heads, -1)   # [b, h, q]
    zero_sums, mask_sums = seen["zero"].sum(-1)[rows], seen["mask"].sum(-1)[rows]
    torch.testing.assert_close(mask_sums, torch.ones_like(mask_sums), atol=1e-5, rtol=0)
    assert (zero_sums < 1 - 1e-6).any(), "post-softmax zeroing must not renormalise"
    cut = _edges(batch, keys, pos.all).expand_as(seen["zero"])
    assert (seen["zero"][cut] == 0).all() and (seen["mask"][cut] == 0).all()


def test_presets_pick_the_papers_sets(tiny_zoo):
    model, batch = tiny_zoo.batch("llava")
    assert [n for n, _ in A.random_image_knockout(model, batch, k=3, layers=A.last_layers(model, 1))] \
        == [f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"]
    with pytest.raises(ValueError, match="no end-of-image token"):
        A.gate_knockout(model, batch)            # LLaVA-1.5 has no gate


def test_bad_arguments_raise_clearly(tiny_zoo):
    model, batch = tiny_zoo.batch("llava")
    pos = batch.positions
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        A.knockout_hooks(model, batch, keys=pos.image, layers=[5])
    with pytest.raises(IndexError, match="heads"):
        A.knockout_hooks(model, batch, keys=pos.image, heads=[7])
    with pytest.raises(ValueError, match="batch is"):
        A.knockout_hooks(model, batch, keys=PositionSet.empty(1, 3) | PositionSet.at([0], 3))
    with pytest.raises(ValueError, match="'zero'"):
        A.knockout_hooks(model, batch, keys=pos.image, method="renorm")
    with pytest.raises(ValueError, match="'all'"):
        A.resolve_layers(model, "every")


def test_layer_selections_take_integer_scalars_and_refuse_the_rest(tiny_zoo):
    import numpy as np

    model = tiny_zoo.model("llava")                       # 2 layers
    assert A.resolve_layers(model, np.arange(2)) == [0, 1]
    assert A.resolve_layers(model, torch.tensor(-1)) == [1]
    for bad, error in ((True, TypeError), ([0.5], TypeError), ("first", ValueError),
                       ([], ValueError), ([2], IndexError)):
        with pytest.raises(error):
            A.resolve_layers(model, bad)
