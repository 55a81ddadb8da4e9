"""Modality separation and neighbourhood overlap, against direct computations.

Vectors are re-extracted here with ``run_with_cache``; |cos| quartiles and label overlap
are recomputed by brute force (torch / numpy), and DADApy is called directly on the
re-extracted vectors.
"""

import json
import sys

import numpy as np
import pytest
import torch

from tests.tiny import image
from tl_vlm.analyses import geometry as G

WORDS = ["what is this a cat", "describe the image a dog", "the red shape left",
         "blue green colour", "where is the dog", "a cat on the left"]


def _batches(model, n_batches=3, size=4, offset=0, caption_first=False):
    out = []
    for b in range(n_batches):
        ids = range(offset + b * size, offset + (b + 1) * size)
        prompts = [WORDS[i % len(WORDS)] for i in ids]
        if caption_first:  # the paper's image-token source: caption, then the image
            prompts = [f"{p} {model.layout.placeholder}" for p in prompts]
        out.append(model.prepare(prompts, images=[image(i) for i in ids]))
    return out


def _cached(model, batch, names):
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
    return cache


def _points(model):
    n = model.cfg.n_layers
    return [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def _extract(model, batches, pick, seed=None):
    """[point, n, d] vectors and (batch, example, position) index, straight from the cache."""
    names = _points(model)
    rows, index = [[] for _ in names], []
    for i, batch in enumerate(batches):
        chosen = pick(batch)
        if seed is not None:
            chosen = chosen.random(1, seed + i)
        cache = _cached(model, batch, names)
        for j, name in enumerate(names):
            rows[j].append(cache[name][chosen.mask])
        index += [(i, e, p) for e, p in chosen.mask.nonzero().tolist()]
    return np.stack([torch.cat(r).numpy() for r in rows]), index


def _dadapy_by_hand(x, k, Z):
    """DADApy's ADP on the distinct rows (copies share their cluster), written out."""
    from dadapy import Data

    first = {}
    copy_of = np.array([first.setdefault(row.tobytes(), len(first)) for row in x])
    distinct = x[sorted({v: i for i, v in reversed(list(enumerate(copy_of)))}.values())]
    d = Data(distinct.astype(np.float64), maxk=k, verbose=False)
    d.compute_distances(maxk=k, metric="cosine")
    intrinsic_dim = d.compute_id_2NN()[0]
    d.compute_density_PAk()
    d.compute_clustering_ADP(Z=Z)
    return np.asarray(d.cluster_assignment)[copy_of], intrinsic_dim


@pytest.mark.parametrize("name", ["chameleon", "gemma3", "llava"])
def test_modality_separation_equals_direct_computation(tiny_zoo, name):
    from sklearn.metrics import homogeneity_score

    model = tiny_zoo.model(name)
    text_batches = _batches(model)
    image_batches = _batches(model, offset=12, caption_first=True)
    got = G.modality_separation(model, text_batches, image_batches=image_batches, seed=3, k=6)
    text, text_index = _extract(model, text_batches, lambda b: b.positions.after_image, seed=3)
    img, image_index = _extract(model, image_batches, lambda b: b.positions.image, seed=3)
    assert got.text_index == text_index and got.image_index == image_index
    assert got.layers == list(range(model.cfg.n_layers + 1))
    assert len(text_index) == len(image_index) == 12
    labels = np.r_[np.zeros(12), np.ones(12)]
    for i in range(len(got.layers)):
        t = torch.as_tensor(text[i])[:, None, :]
        v = torch.as_tensor(img[i])[None, :, :]
        cos = torch.nn.functional.cosine_similarity(t, v, dim=-1).abs().flatten()   # 144 pairs
        q = torch.quantile(cos.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.double))
        np.testing.assert_allclose([got.cos_q25[i], got.cos_median[i], got.cos_q75[i]],
                                   q.numpy(), atol=1e-6)
        clusters, intrinsic_dim = _dadapy_by_hand(np.concatenate([text[i], img[i]]), k=6, Z=1.65)
        assert got.homogeneity[i] == pytest.approx(homogeneity_score(labels, clusters), abs=1e-12)
        assert got.n_clusters[i] == len(np.unique(clusters))
        assert got.intrinsic_dim[i] == pytest.approx(intrinsic_dim, rel=1e-9)
    json.dumps(got.to_dict())


def test_one_stream_of_batches_gives_both_modalities(tiny_zoo):
    model = tiny_zoo.model("emu3")
    batches = _batches(model)
    got = G.modality_separation(model, batches, layers=[1], final=False, k=6, keep_vectors=True)
    text, text_index = _extract(model, batches, lambda b: b.positions.after_image, seed=0)
    img, image_index = _extract(model, batches, lambda b: b.positions.image, seed=0)
    assert got.layers == [1] and got.text_index == text_index and got.image_index == image_index
    np.testing.assert_array_equal(got.text_vectors[0], text[1])
    np.testing.assert_array_equal(got.image_vectors[0], img[1])
    assert got.to_dict()["params"] == {"k": 6, "Z": 1.65, "metric": "cosine", "density": "PAk",
                                       "seed": 0}


def test_layers_without_enough_distinct_vectors_give_nan(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    batches = _batches(model, n_batches=2)
    with pytest.warns(UserWarning, match="only 2 distinct vectors"):   # EOI and BOI embeddings
        got = G.modality_separation(model, batches, layers=[0], final=False, k=3,
                                    text_tokens=lambda b: b.positions.eoi,
                                    image_tokens=lambda b: b.positions.boi)
    assert np.isnan(got.homogeneity[0]) and got.n_clusters[0] == -1
    assert 0 <= got.cos_median[0] <= 1
    assert json.loads(json.dumps(got.to_dict()))["homogeneity"] == [None]


def test_identical_vectors_share_a_cluster():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    x[[3, 7, 11]] = x[0]
    clusters, intrinsic_dim = G.adp_clusters(x, k=5)
    assert len(set(clusters[[0, 3, 7, 11]])) == 1
    expected, expected_id = _dadapy_by_hand(x, k=5, Z=1.65)
    np.testing.assert_array_equal(clusters, expected)
    assert intrinsic_dim == pytest.approx(expected_id)


def _overlap_brute_force(x, labels, k, weighted=False):
    labels = np.asarray(labels)
    dist = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    neighbours = np.argsort(dist, axis=1, kind="stable")[:, :k]
    chi = (labels[neighbours] == labels[:, None]).mean(1)
    if not weighted:
        return chi.mean()
    counts = {c: (labels == c).sum() for c in set(labels.tolist())}
    return np.average(chi, weights=[1 / counts[c] for c in labels.tolist()])


@pytest.mark.parametrize("name", ["chameleon", "pixtral"])
def test_neighbourhood_overlap_equals_brute_force(tiny_zoo, name):
    from dadapy import Data

    model = tiny_zoo.model(name)
    batches = _batches(model)
    labels = ["cat", "dog", "bird"] * 4
    for representation, pick in (("image_mean", lambda b: b.positions.image),
                                 ("last_image", lambda b: b.positions.last_image)):
        got = G.neighbourhood_overlap(model, batches, labels, representation, k=3)
        x, index = _extract(model, batches, pick)
        assert got.layers == list(range(model.cfg.n_layers + 1))
        ex = sorted({(b, e) for b, e, _ in index})
        assert [(b, e) for b, e, _ in got.index] == ex
        compared = 0
        for i in range(len(got.layers)):
            per_example = np.stack([x[i][[j for j, (b, e, _) in enumerate(index) if (b, e) == key]]
                                    .mean(0) for key in ex])
            if len(np.unique(per_example, axis=0)) < len(per_example):
                continue  # tiny Chameleon's VQ codes collapse at layer 0: tied neighbours
            compared += 1
            assert got.overlap[i] == pytest.approx(_overlap_brute_force(per_example, labels, 3))
            d = Data(per_example.astype(np.float64), maxk=3, verbose=False)
            d.compute_distances(maxk=3)
            codes = np.unique(labels, return_inverse=True)[1]
            assert got.overlap[i] == pytest.approx(d.return_label_overlap(codes, k=3, weighted=False))
        assert compared >= model.cfg.n_layers
    unbalanced = ["cat"] * 6 + ["dog"] * 4 + ["bird"] * 2
    got = G.neighbourhood_overlap(model, batches, unbalanced, lambda b: b.positions.image,
                                  layers=[1], final=False, k=3, weighted=True)
    json.dumps(got.to_dict())
    mean = G.neighbourhood_overlap(model, batches, unbalanced, "image_mean", layers=[1],
                                   final=False, k=3, weighted=True, keep_vectors=True)
    assert got.overlap[0] == pytest.approx(
        _overlap_brute_force(mean.vectors[0], unbalanced, 3, weighted=True))


def test_gate_representation_is_the_gate_token(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    batches = _batches(model, n_batches=2)
    got = G.neighbourhood_overlap(model, batches, [0, 1] * 4, "gate", layers=[1], k=2,
                                  keep_vectors=True)
    x, _ = _extract(model, batches, lambda b: b.positions.gate)
    np.testing.assert_array_equal(got.vectors[0], x[1])       # one gate token per example
    np.testing.assert_array_equal(got.vectors[1], x[-1])


def test_bad_arguments_raise_clearly(tiny_zoo, monkeypatch):
    model = tiny_zoo.model("llava")
    batches = _batches(model, n_batches=1)
    with pytest.raises(ValueError, match="empty in example"):
        G.neighbourhood_overlap(model, batches, [0, 1, 0, 1], "gate", k=2)   # LLaVA has no EOI
    with pytest.raises(ValueError, match="got 3 labels for 4 examples"):
        G.neighbourhood_overlap(model, batches, [0, 1, 0], "last_image", k=2)
    with pytest.raises(ValueError, match="lower k"):
        G.neighbourhood_overlap(model, batches, [0, 1, 0, 1], "last_image", k=4)
    with pytest.raises(ValueError, match="unknown representation"):
        G.neighbourhood_overlap(model, batches, [0, 1, 0, 1], "eoss", k=2)
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        G.neighbourhood_overlap(model, batches, [0, 1, 0, 1], "last_image", layers=[9], k=2)
    with pytest.raises(ValueError, match="no batches"):
        G.neighbourhood_overlap(model, [], [], "last_image", k=2)
    image_last = _batches(model, n_batches=1, caption_first=True)
    with pytest.raises(ValueError, match="text_tokens is empty"):
        G.modality_separation(model, image_last, k=3)
    with pytest.raises(ValueError, match="lower k"):
        G.modality_separation(model, batches, k=16)
    monkeypatch.setitem(sys.modules, "dadapy", None)
    with pytest.raises(ImportError, match=r"tl-vlm\[geometry\]"):
        G.neighbourhood_overlap(model, batches, [0, 1, 0, 1], "last_image", k=2)
