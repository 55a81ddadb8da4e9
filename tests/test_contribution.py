"""Cross-modal contribution on every family, against a direct computation from the cache."""

import pytest
import torch

from tl_vlm import analyses as A
from tl_vlm.analyses import contribution as C
from tl_vlm.core.positions import PositionSet

ATOL = 1e-5
GROUPS = ("boi", "image", "last_image", "eoi", "row_breaks", "specials")


def _group_sets(pos):
    """The default partition, written out from the position sets."""
    return [pos.boi, pos.image - pos.last_image, pos.last_image, pos.eoi, pos.row_breaks,
            pos.specials]


def _value_norms(model, v, layer, b):
    """||W_O^h v_j|| for every head h and position j, by running o_proj on one head's slot."""
    w = model.blocks[layer].attn.o.original_component.weight
    n_heads, d_head = model.cfg.n_heads, v.shape[-1]
    out = torch.zeros(n_heads, v.shape[1])
    for h in range(n_heads):
        z = torch.zeros(v.shape[1], n_heads * d_head)
        z[:, h * d_head:(h + 1) * d_head] = v[b, :, h // (n_heads // v.shape[2])]
        out[h] = torch.nn.functional.linear(z, w).norm(dim=-1)
    return out


def _direct(model, batches, map_layers=None):
    """Totals [layer, head, group] for both variants, and per-cell token sums, from the cache."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    map_layers = list(range(n_layers)) if map_layers is None else map_layers
    totals = {"weight": torch.zeros(n_layers, n_heads, len(GROUPS), dtype=torch.float64),
              "value": torch.zeros(n_layers, n_heads, len(GROUPS), dtype=torch.float64)}
    maps, counts, n = {"weight": {}, "value": {}}, {}, 0
    for batch in batches:
        _, cache = model.run_with_cache(batch)
        pos = batch.positions
        for b in range(len(batch)):
            n += 1
            q = pos.after_image[b]
            for layer in range(n_layers):
                pattern = cache[f"blocks.{layer}.attn.hook_pattern"][b].double()
                norms = _value_norms(model, cache[f"blocks.{layer}.attn.hook_v"], layer, b)
                per_key = {"weight": pattern[:, q].sum(1), "value": pattern[:, q].sum(1) * norms}
                for kind, s in per_key.items():
                    for g, keys in enumerate(_group_sets(pos)):
                        totals[kind][layer, :, g] += s[:, keys[b]].sum(-1)
                    if layer not in map_layers:
                        continue
                    for (img, row, col), p in zip(pos.grid[b].tolist(), pos.image[b].tolist()):
                        key = (b, n, img, row, col)
                        maps[kind][key] = maps[kind].get(key, 0.0) + s[:, p].mean().item()
    return totals, maps, n


@torch.no_grad()
def test_equals_direct_computation_over_two_batches(tiny_zoo, family):
    """Two batches (other images, the second left-padded) check the dataset averaging."""
    spec = tiny_zoo.specs[family]
    model, first = tiny_zoo.batch(family)
    _, second = tiny_zoo.batch(family, images=spec.other_images, padding_side="left")
    got = C.cross_modal_contribution(model, [first, second])
    totals, _, n = _direct(model, [first, second])

    assert got.groups == GROUPS and got.layers == tuple(range(model.cfg.n_layers))
    assert got.n_examples == n == 4
    assert got.n_queries == int(first.positions.after_image.counts.sum()
                                + second.positions.after_image.counts.sum())
    for kind in ("weight", "value"):
        mean = totals[kind] / n
        torch.testing.assert_close(getattr(got, f"mean_{kind}"), mean, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(getattr(got, kind), mean / mean.sum(-1, keepdim=True),
                                   atol=ATOL, rtol=0)
        f = mean.mean(1)
        torch.testing.assert_close(got.per_layer(kind == "value"), f / f.sum(-1, keepdim=True),
                                   atol=ATOL, rtol=0)
    eoi = GROUPS.index("eoi")
    torch.testing.assert_close(got.share("eoi"), got.per_layer()[:, eoi])
    # Groups absent from a family hold no keys and get exactly zero.
    for g, name in enumerate(GROUPS):
        if got.n_keys[g] == 0:
            assert (got.weight_total[..., g] == 0).all(), name


@torch.no_grad()
def test_token_map_on_a_known_grid(tiny_zoo):
    model, first = tiny_zoo.batch("chameleon")        # every image is 4 x 4 VQ codes
    _, second = tiny_zoo.batch("chameleon", images=tiny_zoo.specs["chameleon"].other_images)
    got = C.cross_modal_contribution(model, [first, second], map_layers=[1])
    totals, maps, n = _direct(model, [first, second], map_layers=[1])
    assert got.grids == [(4, 4)]
    for kind in ("weight", "value"):
        cells = torch.zeros(4, 4, dtype=torch.float64)
        n_images = torch.zeros(4, 4)
        for (_, _, _, row, col), value in maps[kind].items():
            cells[row, col] += value
            n_images[row, col] += 1
        side = totals[kind][1].sum(-1).mean() / n       # layer 1, mean over heads, per example
        expected = cells / n_images / side
        torch.testing.assert_close(got.token_map(kind == "value"), expected, atol=ATOL, rtol=0)
    assert (got.map_counts[(4, 4)] == 6).all()          # 1 + 2 images per batch, two batches


def test_token_maps_are_kept_per_grid(tiny_zoo):
    model, batch = tiny_zoo.batch("pixtral")          # three images of three grids
    got = C.cross_modal_contribution(model, batch, value_weighted=False)
    assert got.grids == [(2, 4), (3, 3), (4, 3)]
    with pytest.raises(ValueError, match="3 grids"):
        got.token_map(value_weighted=False)
    assert got.token_map(value_weighted=False, grid=(3, 3)).shape == (3, 3)
    with pytest.raises(ValueError, match="value_weighted=False"):
        got.value


@torch.no_grad()
def test_hooks_edit_nothing_and_combine_with_knockout(tiny_zoo):
    model, batch = tiny_zoo.batch("chameleon")
    acc = C.ContributionAccumulator(model)
    hooks = C.contribution_hooks(model, batch, acc)
    assert torch.equal(model.run_with_hooks(batch, fwd_hooks=hooks), model(batch))
    assert acc.result().n_examples == 2

    # Measured after a gate knockout in the same pass: text no longer reaches EOI.
    knocked = C.cross_modal_contribution(model, batch, fwd_hooks=A.gate_knockout(model, batch))
    assert (knocked.weight_total[..., GROUPS.index("eoi")] == 0).all()
    assert (knocked.per_layer()[:, GROUPS.index("eoi")] == 0).all()


def test_bad_input_raises_clearly(tiny_zoo):
    model, batch = tiny_zoo.batch("chameleon")
    no_image = model.prepare(["what is this"])
    with pytest.raises(ValueError, match="no image-side tokens"):
        C.cross_modal_contribution(model, no_image)
    with pytest.raises(ValueError, match="query set is empty"):
        C.cross_modal_contribution(model, batch,
                                   queries=PositionSet.empty(2, batch.positions.seq_len))
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        C.cross_modal_contribution(model, batch, layers=[2])
    with pytest.raises(ValueError, match="not among the measured layers"):
        C.ContributionAccumulator(model, layers=[0], map_layers=[1])
    with pytest.raises(ValueError, match="overlap"):
        C.ContributionAccumulator(model, groups={"a": lambda p: p.image_side,
                                                 "b": lambda p: p.eoi}).hooks(batch)
    with pytest.raises(ValueError, match="cover exactly"):
        C.ContributionAccumulator(model, groups={"eoi": lambda p: p.eoi}).hooks(batch)
    with pytest.raises(TypeError, match="VLMBatch"):
        C.cross_modal_contribution(model, [batch.inputs])
    with pytest.raises(ValueError, match="nothing accumulated"):
        C.ContributionAccumulator(model).result()


def test_custom_groups_measure_emus_gate_as_one(tiny_zoo):
    model, batch = tiny_zoo.batch("emu3")            # gate = EOI + EOF
    groups = dict(C.DEFAULT_GROUPS, eoi=lambda p: p.gate, specials=lambda p: p.specials - p.gate)
    gate = C.cross_modal_contribution(model, batch, groups=groups, value_weighted=False)
    plain = C.cross_modal_contribution(model, batch, value_weighted=False)
    assert gate.n_keys[GROUPS.index("eoi")] == 2 * plain.n_keys[GROUPS.index("eoi")]
    torch.testing.assert_close(gate.weight_total.sum(-1), plain.weight_total.sum(-1))


@torch.no_grad()
def test_many_queries_and_a_query_function(tiny_zoo):
    model, batch = tiny_zoo.batch("chameleon")       # 44 positions: several query chunks
    got = C.cross_modal_contribution(model, batch, queries=lambda p: p.all, value_weighted=False)
    _, cache = model.run_with_cache(batch)
    pos = batch.positions
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()
        expected = torch.stack([
            sum(pattern[b][:, pos.all[b]][:, :, keys[b]].sum((1, 2)) for b in range(len(batch)))
            for keys in _group_sets(pos)], dim=-1)
        torch.testing.assert_close(got.weight_total[layer], expected, atol=ATOL, rtol=1e-5)
    assert got.n_queries == int(pos.all.counts.sum())
