"""The logit lens over the image tokens and project_away, against hand computations."""

import pytest
import torch

from tl_vlm import HookedVLM
from tl_vlm.analyses.image_lens import image_logit_lens, project_away, tokens_in_box
from tl_vlm.analyses.logit_lens import final_logit_transform
from tl_vlm.core.answers import AnswerTokenError
from tl_vlm.core.positions import PositionSet
from tl_vlm.plot import token_boxes


#: RMSNorms that scale by (1 + w); the others (Gemma 4's included) scale by w
ONE_PLUS_W = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}
#: LayerNorms (they subtract the mean first): Aya Vision's Cohere2 decoder
CENTRED = {"LayerNorm", "Cohere2LayerNorm"}


def _gain(norm: torch.nn.Module) -> torch.Tensor:
    """The RMSNorm gain, written out per family."""
    w = norm.weight.detach().float()
    return 1.0 + w if type(norm).__name__ in ONE_PLUS_W else w


def _eps(norm: torch.nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def _hand_lens(model, resid: torch.Tensor) -> torch.Tensor:
    """Final norm (written out), W_U and bias, the family's final transform: [n, vocab]."""
    norm = model.ln_final.original_component
    unembed = model.unembed.original_component
    x = resid.float()
    if type(norm).__name__ in CENTRED:
        x = x - x.mean(-1, keepdim=True)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(norm)) * _gain(norm)
    if getattr(norm, "bias", None) is not None:
        normed = normed + norm.bias.detach().float()
    logits = normed @ unembed.weight.detach().float().T
    if unembed.bias is not None:
        logits = logits + unembed.bias.detach().float()
    return final_logit_transform(model)(logits)


def _per_slot(lens, b: int, layer_index: int, metric: str) -> torch.Tensor:
    n = int((lens.position[b] >= 0).sum())
    return getattr(lens, metric)[b, layer_index, :n]


@torch.no_grad()
def test_image_lens_equals_a_hand_computation(tiny_zoo, family):
    model, batch = tiny_zoo.batch(family)
    pos = batch.positions
    words = ["cat", 5, "dog"]
    ids = torch.tensor([int(model.answer_tokens("cat")), 5, int(model.answer_tokens("dog"))])
    lens = image_logit_lens(model, batch, words)
    side = pos.image_side
    width = int(side.counts.max())
    assert lens.prob.shape == (len(batch), model.cfg.n_layers, width, 3)
    assert lens.token_ids == ids.tolist() and lens.words[0] == "cat"
    logits, cache = model.run_with_cache(batch)
    for b in range(len(batch)):
        where = side[b]
        n = len(where)
        assert lens.position[b, :n].tolist() == where.tolist()
        assert (lens.position[b, n:] == -1).all() and lens.prob[b, :, n:].isnan().all()
        for slot, p in enumerate(where.tolist()):
            expected = next(k for k, s in (("image", pos.image), ("boi", pos.boi), ("eoi", pos.eoi),
                                           ("row_break", pos.row_breaks), ("special", pos.specials))
                            if s.mask[b, p])
            assert lens.kind[b][slot] == expected
        image_slots = lens.image_index[b, :n]
        assert image_slots[image_slots >= 0].tolist() == list(range(len(pos.image[b])))
        for layer in range(model.cfg.n_layers):
            hand = _hand_lens(model, cache[f"blocks.{layer}.hook_resid_post"][b, where])
            word = hand[:, ids]
            prob = hand.softmax(-1)[:, ids]
            rank = torch.stack([(hand > word[:, i:i + 1]).sum(-1) for i in range(3)], -1).float()
            torch.testing.assert_close(_per_slot(lens, b, layer, "prob"), prob, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(_per_slot(lens, b, layer, "logit"), word, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(_per_slot(lens, b, layer, "rank"), rank, atol=0, rtol=0)
        # the last layer's lens is the model's own next-token distribution
        model_prob = logits[b, where].float().softmax(-1)[:, ids]
        torch.testing.assert_close(_per_slot(lens, b, -1, "prob"), model_prob, atol=1e-6, rtol=1e-4)
    pre = image_logit_lens(model, batch, words, layers=[0], point="resid_pre")
    hand = _hand_lens(model, cache["blocks.0.hook_resid_pre"][0, side[0]])
    torch.testing.assert_close(_per_slot(pre, 0, 0, "prob"), hand.softmax(-1)[:, ids],
                               atol=1e-6, rtol=1e-4)
    assert sum(lens.kinds.values()) == int(side.counts.sum())


@torch.no_grad()
def test_scores_localisation_and_boxes(toy_models):
    model = toy_models["toy-gated"]
    from tl_vlm.toy import make_examples

    batch = model.prepare(make_examples(6, seed=3).prompts)
    pos = batch.positions
    lens = image_logit_lens(model, batch, ["red", "blue"], layers=[1, 3])
    for b in range(6):
        slots = lens.image_index[b] >= 0
        scores = lens.scores(b, layer=1, word="blue")
        assert scores.shape == (36,)
        torch.testing.assert_close(scores, lens.prob[b, 0, slots, 1])
        torch.testing.assert_close(lens.scores(b, -1, 0, metric="rank"), lens.rank[b, 1, slots, 0])
    box = tokens_in_box(model, batch, (3, 0, 6, 3))                 # top-right quadrant
    assert box.tolist()[0] == [p for k, p in enumerate(pos.image[0].tolist())
                               if pos.grid[0][k, 1] < 3 and pos.grid[0][k, 2] >= 3]
    share = lens.localisation(box)
    prob = lens.prob.nan_to_num(0)
    inside = torch.stack([box.mask[b, lens.position[b].clamp_min(0)] & (lens.image_index[b] >= 0)
                          for b in range(6)])
    content = lens.image_index >= 0
    hand = (prob * inside[:, None, :, None]).sum(2) / (prob * content[:, None, :, None]).sum(2)
    torch.testing.assert_close(share, hand)
    torch.testing.assert_close(lens.localisation(box, normalise=True), hand / 0.25)
    masks = [pos.grid[b][:, 1] < 3 for b in range(6)]                # top half, per example
    top = lens.localisation(masks)
    bottom = lens.localisation([~m for m in masks])
    torch.testing.assert_close(top + bottom, torch.ones_like(top))
    torch.testing.assert_close(lens.localisation(PositionSet(pos.image.mask)), torch.ones_like(top))
    assert "image 216, boi 6, eoi 6" in repr(lens) and repr(lens).count("\n") == 1
    fig = lens.plot(model, batch, example=2, layer=3, word="red")
    assert fig.data[0].z.shape == (6, 6)


def test_tokens_in_box_on_pictures(tiny_zoo):
    from tests.tiny import specs

    model, batch = tiny_zoo.batch("llava")
    images = specs()["llava"].images                                # [pic, [pic, pic]]
    pos = batch.positions
    whole = [(0, 0, 24, 20), (0, 0, 24, 20)]
    got = tokens_in_box(model, batch, whole, images=images, image=0)
    assert got[0].tolist() == pos.image[0].tolist()
    assert got[1].tolist() == pos.image[1][pos.grid[1][:, 0] == 0].tolist()
    left = tokens_in_box(model, batch, (0, 0, 12, 20), images=images, image=0)   # 24x20 pictures
    for b in range(2):
        cells = token_boxes(model, batch, b, images[b])
        centre = (cells[:, 0] + cells[:, 2]) / 2
        first = pos.grid[b][:, 0] == 0
        assert 0 < len(left[b]) < int(first.sum())
        assert left[b].tolist() == pos.image[b][(centre < 12) & first].tolist()
    with pytest.raises(ValueError, match="pictures of every example"):
        tokens_in_box(model, batch, (0, 0, 1, 1), images=images[:1])
    with pytest.raises(ValueError, match="one box for every example"):
        tokens_in_box(model, batch, [(0, 0, 1, 1)] * 3)
    with pytest.raises(ValueError, match="min_overlap"):
        tokens_in_box(model, batch, (0, 0, 1, 1), min_overlap=0)


@torch.no_grad()
def test_project_away_removes_the_word_from_the_lens_at_image_tokens(tiny_zoo, family):
    model, batch = tiny_zoo.batch(family)
    pos = batch.positions
    layer = model.cfg.n_layers - 1
    vocab = model.unembed.original_component.weight.shape[0]
    clean = image_logit_lens(model, batch, list(range(vocab)), layers=[layer],
                             point="resid_pre", check=False)
    word = int(clean.prob[:, 0].nanmean((0, 1)).argmax())           # the lens's favourite there
    before = image_logit_lens(model, batch, [word], layers=[layer], point="resid_pre")
    hooks = project_away(model, batch, [word], layers=[layer])
    assert [name for name, _ in hooks] == [f"blocks.{layer}.hook_resid_pre"]
    after = image_logit_lens(model, batch, [word], layers=[layer], point="resid_pre", fwd_hooks=hooks)
    bias = model.unembed.original_component.bias
    zero = 0.0 if bias is None else float(bias[word])
    valid = ~after.logit.isnan()
    scale = before.logit[valid].abs().max()
    assert (after.logit[valid] - zero).abs().max() < 1e-5 * max(1.0, float(scale))
    positive = valid & (before.logit > zero + 1e-3)
    assert positive.any()
    assert (after.prob[positive] < before.prob[positive]).all()      # a positive logit zeroed
    assert after.prob[valid].mean() < before.prob[valid].mean()
    # text positions are untouched, image-side positions changed
    seen = {}
    keep = (f"blocks.{layer}.hook_resid_pre", lambda act, hook: seen.update(x=act.clone()))
    model.run_with_hooks(batch, fwd_hooks=[keep])
    clean_resid = seen["x"]
    model.run_with_hooks(batch, fwd_hooks=hooks + [keep])
    text = pos.text.mask
    assert torch.equal(seen["x"][text], clean_resid[text])
    assert not torch.equal(seen["x"][pos.image_side.mask], clean_resid[pos.image_side.mask])
    assert hooks[0][1].calls == 2


@torch.no_grad()
def test_project_away_during_generation_and_at_resid_post(toy_models):
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    data = make_examples(12, seed=0, questions=["colour"])
    batch = model.prepare(data.prompts, padding_side="left")
    hooks = project_away(model, batch, ["red", "green", "blue", "yellow"], layers="all")
    out = model.generate(batch, fwd_hooks=hooks, max_new_tokens=2)
    assert len(out.text) == 12 and all(fn.calls == 1 for _, fn in hooks)
    post = project_away(model, batch, "red", layers=[1], point="resid_post")
    assert [n for n, _ in post] == ["blocks.1.hook_resid_post"]
    cut = image_logit_lens(model, batch, "red", layers=[1], fwd_hooks=post)
    assert cut.logit.nan_to_num().abs().max() < 1e-4
    raw = project_away(model, batch, "red", layers=[1], point="resid_post", fold_norm=False)
    norm = model.ln_final.original_component.weight
    if not torch.allclose(norm, torch.ones_like(norm)):     # a trained gain: folding matters
        kept = image_logit_lens(model, batch, "red", layers=[1], fwd_hooks=raw)
        assert kept.logit.nan_to_num().abs().max() > 1e-3


def test_bad_input_is_refused_before_any_forward(tiny_zoo, monkeypatch):
    model, batch = tiny_zoo.batch("llava")
    pos = batch.positions

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the arguments were checked")

    monkeypatch.setattr(model, "run_with_hooks", no_forward)
    for fn in (lambda **kw: image_logit_lens(model, batch, **kw),
               lambda **kw: project_away(model, batch, layers=[0], **kw)):
        with pytest.raises(AnswerTokenError, match="not in the vocabulary"):
            fn(words=["cat", "zebra"])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            fn(words=[10**6])
        with pytest.raises(ValueError, match="words is empty"):
            fn(words=[])
        with pytest.raises(TypeError, match="string or a token id"):
            fn(words=[True])
        with pytest.raises(ValueError, match="empty in every example"):
            fn(words="cat", positions=pos.eoi)                     # LLaVA has no EOI
        with pytest.raises(ValueError, match="padding"):
            fn(words="cat", positions=pos.padding | pos.image)
        with pytest.raises(ValueError, match="point must be"):
            fn(words="cat", point="resid_mid")
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        image_logit_lens(model, batch, "cat", layers=[2])
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        project_away(model, batch, "cat", layers=[-3])
    with pytest.raises(TypeError, match="VLMBatch"):
        image_logit_lens(model, batch.input_ids, "cat")
    with pytest.raises(ValueError, match="a box is"):
        tokens_in_box(model, batch, (0, 0, 0, 1))
    with pytest.raises(ValueError, match="a box is"):
        tokens_in_box(model, batch, (0, 0, 1))


def test_result_lookups_refuse_clearly(toy_models):
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    batch = model.prepare(make_examples(2).prompts)
    lens = image_logit_lens(model, batch, ["red", "blue"], layers=[0, 2])
    with pytest.raises(ValueError, match="layer 1 was not computed"):
        lens.scores(0, layer=1)
    with pytest.raises(ValueError, match="'green' is not among"):
        lens.scores(0, word="green")
    with pytest.raises(IndexError, match="outside the batch"):
        lens.scores(5)
    with pytest.raises(ValueError, match="metric must be"):
        lens.scores(0, metric="p")
    with pytest.raises(ValueError, match="boolean tensor over its 36 image tokens"):
        lens.localisation(torch.ones(35, dtype=torch.bool))
    with pytest.raises(ValueError, match="one boolean mask over the image tokens per example"):
        lens.localisation([torch.ones(36, dtype=torch.bool)] * 3)
    with pytest.raises(ValueError, match="region covers"):
        lens.localisation(PositionSet.empty(2, 5))


def docs_block(marker: str) -> str:
    """The python block after ``marker`` in docs/analyses.md."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "analyses.md").read_text()
    found = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, f"no python block after {marker!r} in docs/analyses.md"
    return found.group(1)


def test_the_docs_example_runs():
    namespace: dict = {}
    code = docs_block("<!-- tests/test_image_lens.py runs the next block -->")
    exec(compile(code, "docs/analyses.md", "exec"), namespace)
    assert namespace["lens"].prob.shape == (12, 4, 38, 4)
    assert namespace["share"].shape == (12, 4, 4) and namespace["fig"].data


@torch.no_grad()
def test_chunked_rows_give_the_same_lens(toy_models, monkeypatch):
    from tl_vlm.analyses import image_lens
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    batch = model.prepare(make_examples(4, seed=0).prompts)
    whole = image_logit_lens(model, batch, ["red", "blue"], layers=[1, 3])
    monkeypatch.setattr(image_lens, "_ROWS_PER_CHUNK", 54 * 5)      # 5 rows at a time
    chunked = image_logit_lens(model, batch, ["red", "blue"], layers=[1, 3])
    torch.testing.assert_close(chunked.prob, whole.prob, equal_nan=True)
    torch.testing.assert_close(chunked.rank, whole.rank, equal_nan=True, atol=0, rtol=0)
