"""transformer_lens.patching helpers on VLM batches, against a hand-written patching loop."""

import pandas as pd
import pytest
import torch
from transformer_lens import patching

from tl_vlm.analyses.tl_patching import batch_inputs, run_patching

FAMILY = "qwen2_vl"  # M-RoPE: its image_grid_thw must arrive too, not only the pixels


def _setup(tiny_zoo):
    spec, model = tiny_zoo.specs[FAMILY], tiny_zoo.model(FAMILY)
    clean = model.prepare(spec.prompts, images=spec.images)
    corrupted = model.prepare(spec.prompts, images=spec.other_images)
    last = corrupted.positions.last.mask

    def metric(logits):
        return logits[last][:, 5].sum()

    return model, clean, corrupted, metric


@torch.no_grad()
def _hand_patch(model, corrupted, clean_cache, metric, cells):
    """For each (layer, pos): run the corrupted batch with resid_pre[:, pos] from the clean run."""
    out = []
    for layer, pos in cells:
        name = f"blocks.{layer}.hook_resid_pre"

        def patch(act, hook, pos=pos, name=name):
            act = act.clone()
            act[:, pos] = clean_cache[name][:, pos]
            return act

        out.append(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))
    return torch.stack(out)


def test_tl_resid_pre_patching_equals_hand_loop_and_needs_the_images(tiny_zoo):
    model, clean, corrupted, metric = _setup(tiny_zoo)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    with batch_inputs(model, corrupted):
        got = patching.get_act_patch_resid_pre(model, corrupted.input_ids, clean_cache, metric)
    assert "forward" not in model.__dict__, "the wrapper must be removed on exit"
    n_layers, seq = model.cfg.n_layers, corrupted.input_ids.shape[1]
    assert got.shape == (n_layers, seq)
    cells = [(l, p) for l in range(n_layers) for p in range(seq)]
    expected = _hand_patch(model, corrupted, clean_cache, metric, cells).view(n_layers, seq)
    torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-6, rtol=0)
    image = corrupted.positions.image.mask.any(0)
    assert (got[0, image] - metric(model(corrupted))).abs().max() > 1e-4, "image patches moved nothing"

    # Without the wrapper TL would run the token ids alone (no pixels): refused, with a hint.
    df = pd.DataFrame({"layer": [0, 0, 1, 1], "pos": [1, int(image.nonzero()[0]), 2, seq - 1]})
    kw = dict(patch_setter=patching.layer_pos_patch_setter, activation_name="resid_pre",
              index_df=df)
    with pytest.raises(ValueError, match="no pixels.*batch_inputs"):
        patching.generic_activation_patch(model, corrupted.input_ids, clean_cache, metric, **kw)
    via_helper = run_patching(patching.generic_activation_patch, model, corrupted, clean, metric, **kw)
    torch.testing.assert_close(via_helper, got[df.layer, df.pos], atol=1e-6, rtol=0)


@torch.no_grad()
def test_binding_rules(tiny_zoo):
    model, clean, corrupted, _ = _setup(tiny_zoo)
    with batch_inputs(model, corrupted):
        torch.testing.assert_close(model(corrupted.input_ids.clone()), model(corrupted))
        with pytest.raises(ValueError, match="match none of the bound batches"):
            model(corrupted.input_ids[:1])
        with batch_inputs(model, clean):                                  # nesting restores
            torch.testing.assert_close(model(clean.input_ids), model(clean))
        torch.testing.assert_close(model(corrupted.input_ids), model(corrupted))
    assert "forward" not in model.__dict__
    with batch_inputs(model, clean, corrupted):   # same ids, different images
        torch.testing.assert_close(model(clean.input_ids), model(clean))      # identity decides
        with pytest.raises(ValueError, match="several bound batches"):
            model(clean.input_ids.clone())
    text = model.prepare(["what is this"])                                # no image at all
    with batch_inputs(model, corrupted, strict=False):
        model(text.input_ids)                                             # unbound, allowed
        with pytest.raises(ValueError, match="image placeholders"):      # never text-only
            model(corrupted.input_ids[:1])
    with pytest.raises(TypeError, match="VLMBatch"):
        with batch_inputs(model, corrupted.input_ids):
            pass
    with pytest.raises(ValueError, match="at least one"):
        with batch_inputs(model):
            pass
    other = model.prepare(["what"], images=[tiny_zoo.specs[FAMILY].images[0]])
    with pytest.raises(ValueError, match="differ in shape"):
        run_patching(patching.get_act_patch_resid_pre, model, corrupted, other, lambda x: x.sum())
    assert "forward" not in model.__dict__
