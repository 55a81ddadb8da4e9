"""Which attention computation runs (SDPA, fused edits, eager), and that each gives the
right numbers: unhooked = HF sdpa, hooked = HF eager, fused knockout/contribution = the
eager implementations, with no full pattern built."""

import pytest
import torch

from tl_vlm import analyses as A
from tl_vlm.core.attention import record_paths
from tl_vlm.core.attention_bridge import attention_layers
from tl_vlm.core.compat import torch_dispatch_mode

TorchDispatchMode = torch_dispatch_mode()

ATOL = 1e-5


def _identity_hooks(model):
    """A plain (non-fusable) hook on every layer's pattern: forces the eager computation."""
    return [(f"blocks.{l}.attn.hook_pattern", lambda p, hook: p) for l in attention_layers(model)]


def _sdpa_reference(tiny_zoo, family):
    import transformers

    spec = tiny_zoo.specs[family]
    return getattr(transformers, spec.hf_class).from_pretrained(
        str(tiny_zoo.path(family)), attn_implementation="sdpa").eval()


@torch.no_grad()
def test_unhooked_is_hf_sdpa_and_hooked_is_hf_eager(tiny_zoo, family):
    model, batch = tiny_zoo.batch(family)
    mask = batch.attention_mask.bool()
    with record_paths() as paths:
        plain = model(batch)
    assert set(paths) == {"sdpa"} and len(paths) == len(attention_layers(model))
    sdpa = _sdpa_reference(tiny_zoo, family)(**batch.inputs).logits
    torch.testing.assert_close(plain[mask], sdpa[mask], atol=ATOL, rtol=0)
    with record_paths() as paths:
        hooked = model.run_with_hooks(batch, fwd_hooks=_identity_hooks(model))
    assert set(paths) == {"eager"}
    eager = tiny_zoo.reference(family)(**batch.inputs).logits
    torch.testing.assert_close(hooked[mask], eager[mask], atol=ATOL, rtol=0)


@torch.no_grad()
def test_the_choice_is_per_layer(tiny_zoo):
    model, batch = tiny_zoo.batch("qwen2_vl")
    with record_paths() as paths:
        model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_attn_scores", lambda s, hook: s)])
    assert paths == ["sdpa", "eager"]
    with record_paths() as paths:
        model.run_with_hooks(batch, fwd_hooks=[("blocks.0.attn.hook_rot_q", lambda q, hook: q * 1.1)])
    assert paths == ["sdpa", "sdpa"], "rotated-query hooks fire on the SDPA path too"
    with record_paths() as paths:
        model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_resid_pre"))
    assert paths == ["sdpa", "sdpa"]


@pytest.mark.parametrize("method", ["zero", "mask"])
@torch.no_grad()
def test_fused_knockout_equals_eager_in_forward_and_generation(tiny_zoo, family, method):
    model, batch = tiny_zoo.batch(family, padding_side="left")
    pos = batch.positions
    keys = pos.gate if not pos.gate.is_empty() else pos.image.random(2, seed=0)
    knock = (A.knockout_hooks(model, batch, keys=keys, method=method)
             + A.knockout_hooks(model, batch, keys=pos.boi | pos.row_breaks | pos.last_image,
                                queries=pos.after_image, heads=[0, 2], method=method)
             if not (pos.boi | pos.row_breaks | pos.last_image).is_empty()
             else A.knockout_hooks(model, batch, keys=keys, method=method))
    with record_paths() as paths:
        fused = model.run_with_hooks(batch, fwd_hooks=knock)
    assert set(paths) == {"fused"}
    eager = model.run_with_hooks(batch, fwd_hooks=knock + _identity_hooks(model))
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(fused[mask], eager[mask], atol=ATOL, rtol=0)
    assert (fused[mask] - model(batch)[mask]).abs().max() > 1e-4, "the knockout did nothing"
    gen_fused = model.generate(batch, max_new_tokens=3, fwd_hooks=knock)
    gen_eager = model.generate(batch, max_new_tokens=3, fwd_hooks=knock + _identity_hooks(model))
    assert torch.equal(gen_fused.sequences, gen_eager.sequences)
    torch.testing.assert_close(gen_fused.logits, gen_eager.logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_fused_contribution_equals_eager(tiny_zoo, family):
    model, batch = tiny_zoo.batch(family)
    with record_paths() as paths:
        fused = A.cross_modal_contribution(model, batch)
    assert set(paths) == {"fused"}
    eager = A.cross_modal_contribution(model, batch, fwd_hooks=_identity_hooks(model))
    for name in ("weight_total", "value_total"):
        a, b = getattr(fused, name), getattr(eager, name)
        torch.testing.assert_close(a, b, atol=ATOL * float(b.abs().max()), rtol=0)
    for grid in eager.map_totals:
        torch.testing.assert_close(fused.map_totals[grid], eager.map_totals[grid],
                                   atol=ATOL * float(eager.map_totals[grid].abs().max()), rtol=0)
    # under a knockout listed first, both read the cut pattern
    knock = A.knockout_hooks(model, batch, keys=batch.positions.image_side)
    cut = A.cross_modal_contribution(model, batch, fwd_hooks=knock, value_weighted=False)
    assert float(cut.weight_total.abs().max()) == 0.0


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@torch.no_grad()
def test_a_knockout_on_2k_tokens_never_builds_a_query_by_key_tensor(toy_models):
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    prompt = make_examples(1).prompts[0] + " what colour is the object ?" * 340
    batch = model.prepare([prompt])
    seq, heads = batch.input_ids.shape[1], model.cfg.n_heads
    assert seq > 2000
    full = heads * seq * seq
    knock = A.gate_knockout(model, batch)
    with _LargestTensor() as fused:
        model.run_with_hooks(batch, fwd_hooks=knock)
    with _LargestTensor() as eager:
        model.run_with_hooks(batch, fwd_hooks=knock + _identity_hooks(model))
    assert eager.largest >= full, "the guard must see the eager pattern"
    assert fused.largest < seq * seq, (fused.largest, seq * seq)


@torch.no_grad()
def test_a_cut_of_every_query_computes_no_pattern_row(toy_models, monkeypatch):
    """The paper's knockout (every position stops attending to the keys) is SDPA on
    zeroed values: not one pattern row is computed; a cut of some queries needs theirs."""
    import tl_vlm.core.attention_edits as edits
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    batch = model.prepare(make_examples(3).prompts, padding_side="left")
    rows = []
    real = edits.pattern_rows
    monkeypatch.setattr(edits, "pattern_rows", lambda q, *a, **k: rows.append(len(a[1])) or real(q, *a, **k))
    model.run_with_hooks(batch, fwd_hooks=A.gate_knockout(model, batch))
    assert rows == []
    model.run_with_hooks(batch, fwd_hooks=A.gate_knockout(model, batch, heads=[0]))
    assert rows, "a cut of some heads subtracts what the cut rows carried"


@pytest.mark.parametrize("name", ["chameleon", "qwen2_vl", "gemma3", "llava_onevision"])
def test_key_scale_equals_the_eager_pattern_edit_and_its_gradient(tiny_zoo, name):
    """A KeyScale on the values (fused) gives the outputs and the gradients with respect
    to the scale that the same edit on the eager pattern gives."""
    from tl_vlm.core.attention_edits import KeyScale

    model, batch = tiny_zoo.batch(name, padding_side="left")
    pos = batch.positions
    mask = batch.attention_mask.bool()
    gen = torch.Generator().manual_seed(0)
    for queries in (None, pos.text.mask):
        results = []
        for eager in (False, True):
            scales = [torch.rand(pos.all.mask.shape, generator=gen.manual_seed(l)).requires_grad_(True)
                      for l in range(model.cfg.n_layers)]
            hooks = [(f"blocks.{l}.attn.hook_pattern",
                      KeyScale(s, query_mask=queries, padding=pos.padding.mask))
                     for l, s in enumerate(scales)]
            with record_paths() as paths:
                logits = model.run_with_hooks(batch, fwd_hooks=hooks + (_identity_hooks(model) if eager else []))
            assert set(paths) == {"eager" if eager else "fused"}
            grads = torch.autograd.grad(logits[mask].float().pow(2).mean(), scales)
            results.append((logits[mask].detach(), torch.stack(grads) * mask))   # padding aside
        (fused, g_fused), (ref, g_ref) = results
        torch.testing.assert_close(fused, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5 * float(g_ref.abs().max()), rtol=1e-4)
        assert float(g_ref.abs().max()) > 0
