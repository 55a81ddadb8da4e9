"""Image-side attention sinks: none in unedited models, a planted one found where it is."""

import pytest
import torch

from tl_vlm import HookedVLM
from tl_vlm.analyses.knockout import knockout_hooks
from tl_vlm.analyses.sinks import attention_sinks, sink_knockout
from tl_vlm.core.positions import PositionSet


@torch.no_grad()
def plant_massive_activation(model, batch, token: int, layer: int, marker: int = 0,
                             massive: int = 1, size: float = 1000.0) -> None:
    """Edit the weights (no hooks) so that, from the output of block ``layer`` on, every
    position holding ``token`` carries a massive value in residual dimension ``massive``,
    and no other position changes in that dimension.

    Dimension ``marker`` of the embedding is zeroed for every token but ``token`` (which
    gets an ordinary-sized value there), and no attention or MLP before ``layer`` (nor
    ``layer``'s attention) writes into it, so it is exactly zero at every other position.
    Neuron 0 of block ``layer``'s gated MLP reads only that dimension (gate and up), so
    it fires at ``token``'s positions only (silu(0) * 0 = 0 elsewhere), and writes
    ``size`` x the residual's RMS into dimension ``massive``: a massive activation, made
    by the model's own weights, as in LLMs (Sun et al. 2024).
    """
    embed = model.embed.original_component.weight
    embed[:, marker] = 0
    embed[token, marker] = embed.pow(2).mean().sqrt()
    for l in range(layer + 1):
        model.blocks[l].attn.o.original_component.weight[marker] = 0
    for l in range(layer):
        model.blocks[l].mlp.original_component.down_proj.weight[marker] = 0
    at = embedded_ids(model, batch) == token
    names = (f"blocks.{layer}.ln2.hook_out", f"blocks.{layer}.hook_resid_mid")
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
    read = cache[names[0]][..., marker]
    assert (read[~at] == 0).all() and (read[at] != 0).all()
    s = read[at].mean()
    rms = cache[names[1]].pow(2).mean().sqrt()
    mlp = model.blocks[layer].mlp.original_component
    mlp.gate_proj.weight[0] = 0
    mlp.up_proj.weight[0] = 0
    mlp.gate_proj.weight[0, marker] = 10.0 / s
    mlp.up_proj.weight[0, marker] = 1.0 / s
    mlp.down_proj.weight[:, 0] = 0
    mlp.down_proj.weight[massive, 0] = size * rms / 10.0


@torch.no_grad()
def embedded_ids(model, batch) -> torch.Tensor:
    """The token id whose embedding row each position reads: the prompt's ids, with the
    VQ codes of a native model's pictures (Chameleon embeds them in a separate call, then
    scatters them over the image placeholders in order)."""
    calls = []
    model.run_with_hooks(batch, fwd_hooks=[("embed.hook_in", lambda x, hook: calls.append(x))])
    ids = batch.input_ids.clone()
    codes = [c.flatten() for c in calls if c.shape != ids.shape]
    if codes:
        ids[batch.positions.image.mask] = torch.cat(codes).to(ids.dtype)
    return ids


def _most_common_image_token(model, batch) -> int:
    return int(embedded_ids(model, batch)[batch.positions.image.mask].mode().values)


def _hand_share(model, batch, sinks_at: torch.Tensor, layer: int) -> float:
    """Mean over examples of the attention text queries (after the image) put on the sinks,
    from the full cached pattern."""
    _, cache = model.run_with_cache(batch, names_filter=f"blocks.{layer}.attn.hook_pattern")
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]          # [batch, head, q, k]
    queries = batch.positions.after_image.mask
    per_example = [pattern[b][:, queries[b]][:, :, sinks_at[b]].sum(-1).mean().item()
                   for b in range(len(batch))]
    return sum(per_example) / len(per_example)


@pytest.fixture(scope="module")
def planted_toy():
    """A fresh toy-gated (4 layers) with a massive activation planted at block 1's output."""
    from tl_vlm.toy import make_examples

    model = HookedVLM.from_pretrained("toy-gated")
    batch = model.prepare(make_examples(12, seed=0).prompts)
    token = _most_common_image_token(model, batch)
    plant_massive_activation(model, batch, token, layer=1, massive=5)
    return model, batch, token


@pytest.mark.parametrize("rule", ["norm", "dims"])
def test_a_planted_massive_activation_is_found_at_its_positions_and_layers(planted_toy, rule):
    model, batch, token = planted_toy
    pos = batch.positions
    sinks = attention_sinks(model, batch, rule=rule)
    expected = (batch.input_ids == token) & pos.image_side.mask
    assert expected.any(1).float().mean() >= 0.5
    assert sinks.verdict == "sinks found" and sinks.sink_layers == [2, 3]
    for i, layer in enumerate(sinks.layers):
        want = expected if layer >= 2 else torch.zeros_like(expected)
        assert torch.equal(sinks.mask[0][i], want), layer
    assert sinks.positions(0) == PositionSet(expected)
    assert sinks.dims() == {5: 2 * int(expected.sum())}
    assert sinks.kinds == {"image": int(expected.sum())}
    assert sinks.n_sinks.tolist() == [0, 0, int(expected.sum()), int(expected.sum())]
    for i, layer in enumerate(sinks.layers):
        sink_at = sinks.mask[0][i]
        assert sinks.share[i].item() == pytest.approx(_hand_share(model, batch, sink_at, layer), abs=1e-5)
        side = _hand_share(model, batch, pos.image_side.mask, layer)
        assert sinks.image_share[i].item() == pytest.approx(side, abs=1e-5)
    text = repr(sinks)
    assert text.startswith("AttentionSinks(sinks found at layers [2, 3]") and "top dims [5]" in text


def test_a_planted_sink_in_a_tiny_model(tiny_zoo):
    """The tiny Chameleon (image tokens are VQ codes, from pixels): planted at block 0."""
    model = HookedVLM.from_pretrained(str(tiny_zoo.path("chameleon")))     # an own copy: edited
    batch = model.prepare(tiny_zoo.specs["chameleon"].prompts, images=tiny_zoo.specs["chameleon"].images)
    token = _most_common_image_token(model, batch)
    plant_massive_activation(model, batch, token, layer=0, massive=3)
    sinks = attention_sinks(model, batch)
    expected = (embedded_ids(model, batch) == token) & batch.positions.image_side.mask
    assert sinks.sink_layers == [1]
    assert not sinks.mask[0][0].any() and torch.equal(sinks.mask[0][1], expected)
    assert sinks.dims(1) == {3: int(expected.sum())}


def test_no_sinks_in_unedited_tiny_models(tiny_zoo, family):
    """Among the image content tokens, no random tiny model has an outlier. Over the whole
    image side, the VQ-native families (one embedding matrix for every token) have none
    either; in the others the markers (BOI, EOI, row breaks: text embeddings, or
    LLaVA-OneVision's image_newline drawn from N(0, 1)) can live on another scale than
    the randomly projected patches, and the rule rightly flags them, but only them."""
    model, batch = tiny_zoo.batch(family)
    pos = batch.positions
    for rule in ("norm", "dims"):
        content = attention_sinks(model, batch, rule=rule, candidates=lambda p: p.image)
        assert content.verdict == "none", (rule, content)
        assert content.n_sinks.sum() == 0 and content.positions(0).is_empty()
        side = attention_sinks(model, batch, rule=rule)
        assert all(not (m & pos.image.mask).any() for m in side.mask[0]), (rule, side)
        if family in ("chameleon", "emu3"):
            assert side.verdict == "none", (rule, side)
    for layer, share in zip(side.layers, side.image_share.tolist()):
        if f"blocks.{layer}.attn.hook_pattern" in model.hook_dict:
            assert 0 <= share <= 1 + 1e-6
        else:                        # a block without attention (LFM2's convolutions)
            assert share != share
    torch.testing.assert_close(side.image_share, content.image_share, equal_nan=True)


def test_no_sinks_in_the_toy_models(toy_models):
    from tl_vlm.toy import make_examples

    batches = [m.prepare(make_examples(24, seed=1).prompts) for m in toy_models.values()]
    for (name, model), batch in zip(toy_models.items(), batches):
        sinks = attention_sinks(model, [batch, batch.select(list(range(12)))])
        assert sinks.verdict == "none", (name, sinks)
        assert sinks.n_examples == 36 and len(sinks.mask) == 2
        assert repr(sinks).startswith("AttentionSinks(none:")


@torch.no_grad()
def test_sink_knockout_is_knockout_hooks_on_the_sinks(planted_toy):
    model, batch, token = planted_toy
    sinks = attention_sinks(model, batch)
    clean = model(batch)
    for method in ("zero", "mask"):
        hooks = sink_knockout(model, batch, sinks, method=method)
        cut = model.run_with_hooks(batch, fwd_hooks=hooks)
        reference = knockout_hooks(model, batch, keys=sinks.positions(0), method=method)
        assert torch.equal(cut, model.run_with_hooks(batch, fwd_hooks=reference))
        assert not torch.allclose(cut, clean)
    as_set = sink_knockout(model, batch, sinks.positions(0), layers=[3])
    assert [n for n, _ in as_set] == ["blocks.3.attn.hook_pattern"]
    only_3 = sink_knockout(model, batch, sinks, sink_layers=[3], layers=[3],
                           queries=batch.positions.after_image)
    out = model.run_with_hooks(batch, fwd_hooks=only_3)
    ref = knockout_hooks(model, batch, keys=sinks.positions(0, layers=[3]), layers=[3],
                         queries=batch.positions.after_image)
    assert torch.equal(out, model.run_with_hooks(batch, fwd_hooks=ref))


def test_bad_input_is_refused(toy_models, planted_toy):
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    batch = model.prepare(make_examples(2).prompts)
    with pytest.raises(ValueError, match="rule must be"):
        attention_sinks(model, batch, rule="mad")
    with pytest.raises(ValueError, match="threshold must be positive"):
        attention_sinks(model, batch, threshold=0)
    with pytest.raises(ValueError, match="min_ratio"):
        attention_sinks(model, batch, min_ratio=0.5)
    with pytest.raises(ValueError, match="min_examples"):
        attention_sinks(model, batch, min_examples=2)
    with pytest.raises(IndexError, match="outside the model's 4 layers"):
        attention_sinks(model, batch, layers=[4])
    with pytest.raises(ValueError, match="no batches"):
        attention_sinks(model, [])
    with pytest.raises(TypeError, match="VLMBatch"):
        attention_sinks(model, [batch.input_ids])
    none = attention_sinks(model, batch)
    with pytest.raises(ValueError, match="no sinks to knock out"):
        sink_knockout(model, batch, none)
    planted_model, planted_batch, _ = planted_toy
    found = attention_sinks(planted_model, planted_batch)
    with pytest.raises(ValueError, match="was not analysed"):
        sink_knockout(model, batch, found)
    with pytest.raises(ValueError, match="were not measured"):
        found.positions(0, layers=[7])
    with pytest.raises(IndexError, match="outside the 1 analysed"):
        found.positions(1)
    with pytest.raises(TypeError, match="AttentionSinks or a PositionSet"):
        sink_knockout(model, batch, [38, 38])


def test_the_docs_example_runs():
    from tests.test_image_lens import docs_block

    namespace: dict = {}
    code = docs_block("<!-- tests/test_sinks.py runs the next block -->")
    exec(compile(code, "docs/analyses.md", "exec"), namespace)
    assert namespace["lax"].found and namespace["logits"].shape[0] == 12
