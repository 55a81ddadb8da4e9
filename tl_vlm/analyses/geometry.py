"""Residual-stream geometry: modality separation and neighbourhood overlap per layer.

Two analyses of the Narrow Gate paper (and the same group's neighbouring tools):

- :func:`modality_separation` (analysis 1): per layer, the residual of one random text
  token and one random image token per example; the median |cosine similarity| of all
  text-image pairs (with the interquartile range), the homogeneity (scikit-learn) of
  DADApy's Advanced Density Peaks clusters against the modality labels, and the 2NN
  intrinsic dimension of the pooled vectors.
- :func:`neighbourhood_overlap` (analysis 3, "semantic probing"): per layer, the
  fraction of each example's ``k`` nearest neighbours (Euclidean) sharing its class
  label, on one vector per example (the gate token, the last image token, the mean of
  the image tokens, ...).

Residuals are collected by streaming hooks over the batches; only the selected vectors
are kept (``layers x examples x d_model`` floats), never whole caches. Layer ``l``
means ``blocks.{l}.hook_resid_pre`` (the input of block ``l``; layer 0 is the
embedding); with ``final=True`` one more row, labelled ``n_layers``, holds the output
of the last block (the input of the final norm).

DADApy and scikit-learn are the optional ``geometry`` extra:
``pip install "tl-vlm[geometry]"``.

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> data = make_examples(48, seed=0, questions=["colour"])
    >>> batches = [model.prepare(data[i:i + 24].prompts) for i in (0, 24)]
    >>> chi = neighbourhood_overlap(model, batches, data.labels, "gate", k=5)
    >>> chi.layers                                 # 4: the output of the last block
    [0, 1, 2, 3, 4]
    >>> bool(chi.overlap[1] > 0.8)                 # the gate knows the colour after one layer
    True
    >>> sep = modality_separation(model, batches, k=8)
    >>> sep.cos_median.shape, bool((sep.cos_median[1:4] < 0.5).all())   # text, image apart
    ((5,), True)
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.core.progress import progress
from tl_vlm.analyses.knockout import Layers, resolve_layers
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet
from tl_vlm.core.jsonable import jsonable
from tl_vlm.core.reprs import short_repr

Selector = Callable[[VLMBatch], PositionSet]
Representation = Union[str, Selector]
Index = list[tuple[int, int, int]]  # (batch, example, position)

_INSTALL = 'the geometry analyses need DADApy and scikit-learn: pip install "tl-vlm[geometry]"'


def _dadapy_data():
    try:
        from dadapy import Data
    except ImportError as err:  # optional dependency
        raise ImportError(_INSTALL) from err
    return Data


def _homogeneity_score():
    try:
        from sklearn.metrics import homogeneity_score
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    return homogeneity_score


# -- collecting ------------------------------------------------------------------------
def residual_points(model, layers: Layers = "all", final: bool = True) -> list[tuple[int, str]]:
    """``(label, hook name)`` of each residual the geometry analyses read.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")       # 4 layers
        >>> residual_points(model, [0, -1])
        [(0, 'blocks.0.hook_resid_pre'), (3, 'blocks.3.hook_resid_pre'),
         (4, 'blocks.3.hook_resid_post')]
        >>> residual_points(model, "all", final=False)[-1]
        (3, 'blocks.3.hook_resid_pre')
    """
    points = [(l, f"blocks.{l}.hook_resid_pre") for l in resolve_layers(model, layers)]
    if final:
        n = model.cfg.n_layers
        points.append((n, f"blocks.{n - 1}.hook_resid_post"))
    return points


def _select(batch: VLMBatch, selector: Selector, what: str, b_index: int) -> PositionSet:
    chosen = batch.positions.check(selector(batch), f"{what} (batch {b_index})")
    empty = (chosen.counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{what} is empty in example(s) {empty} of batch {b_index}: every example needs "
            f"at least one such token (does this family have it? e.g. LLaVA has no "
            f"end-of-image token: use 'last_image'; text after the image needs a prompt "
            f"that continues after it)"
        )
    return chosen


def collect_residuals(model, batch: VLMBatch, points: Sequence[tuple[int, str]],
                      picks: dict[str, tuple[Tensor, str]]) -> dict[str, Tensor]:
    """One forward pass of ``batch``; per pick, ``[point, rows, d_model]`` float32
    residuals at each of ``points`` (:func:`residual_points`).

    A pick is ``(mask [batch, pos], how)``: ``"each"`` keeps every selected position
    (example-major), ``"mean"`` the mean over each example's selected positions.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(3).prompts)
        >>> out = collect_residuals(model, batch, residual_points(model, [0]),
        ...                         {"gate": (batch.positions.gate.mask, "mean")})
        >>> out["gate"].shape                                 # [point, example, d_model]
        torch.Size([2, 3, 64])
    """
    kept: dict[str, list[Tensor]] = {name: [torch.empty(0)] * len(points) for name in picks}

    def make(i: int):
        def keep(act: Tensor, hook) -> None:
            act = act.detach().float()
            for name, (mask, how) in picks.items():
                m = mask.to(act.device)
                if how == "each":
                    rows = act[m]
                else:
                    w = m.to(act.dtype)[..., None]
                    rows = (act * w).sum(1) / w.sum(1)
                kept[name][i] = rows.cpu()
        return keep

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=[(name, make(i)) for i, (_, name) in
                                               enumerate(points)])
    return {name: torch.stack(rows) for name, rows in kept.items()}


def _collect(
    model,
    batches: Iterable[VLMBatch],
    points: list[tuple[int, str]],
    selectors: dict[str, tuple[Callable[[VLMBatch, int], PositionSet], Literal["each", "mean"]]],
    show_progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Index]]:
    """Stream ``batches``; per selector, ``[point, n, d_model]`` float32 vectors and their index.

    A selector is called as ``selector(batch, batch_index)``. ``"each"`` keeps one vector
    per selected position, ``"mean"`` the mean over each example's selected positions.
    """
    vectors: dict[str, list[list[Tensor]]] = {k: [[] for _ in points] for k in selectors}
    index: dict[str, Index] = {k: [] for k in selectors}
    n_batches = 0
    for b_index, batch in enumerate(progress(batches, desc="activations", enabled=show_progress)):
        if not isinstance(batch, VLMBatch):
            raise TypeError(f"batch {b_index} is a {type(batch).__name__}; pass VLMBatches "
                            f"from model.prepare(...)")
        n_batches += 1
        masks = {}
        for key, (selector, how) in selectors.items():
            chosen = selector(batch, b_index)
            masks[key] = (chosen.mask, how)
            if how == "each":
                index[key] += [(b_index, int(e), int(p)) for e, p in chosen.mask.nonzero().tolist()]
            else:
                index[key] += [(b_index, e, -1) for e in range(len(batch))]

        got = collect_residuals(model, batch, points, masks)
        for key, per_point in got.items():
            for i, rows in enumerate(per_point):
                vectors[key][i].append(rows)
    if n_batches == 0:
        raise ValueError("no batches given")
    out = {k: np.stack([torch.cat(rows).numpy() for rows in per_point])
           for k, per_point in vectors.items()}
    return out, index


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first copy of each distinct row (in order), and each row's copy."""
    _, first, inverse = np.unique(x, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    keep = first[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return keep, rank[inverse.reshape(-1)]


#: the smallest k DADApy's ADP clustering works with (below it its density estimate
#: reads past the k neighbours it computed)
ADP_MIN_K = 3


def _check_adp_k(k: Any) -> None:
    if isinstance(k, (int, np.integer)) and 0 < k < ADP_MIN_K:
        raise ValueError(f"k={k}: ADP clustering needs k >= {ADP_MIN_K} neighbours; give "
                         f"k={ADP_MIN_K} or more (and more points than k)")


def _check_k(k: int, n: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if n <= k:
        raise ValueError(f"{what}: {n} points but k={k} neighbours asked; give more examples "
                         f"or lower k (below {n})")


# -- modality separation ---------------------------------------------------------------
@dataclass
class ModalitySeparation:
    """Per-layer modality separation (every array is ``[layer]``).

    Attributes:
        layers: layer labels; ``n_layers`` stands for the output of the last block.
        cos_median, cos_q25, cos_q75: median and quartiles of |cos| over all text-image
            pairs of vectors.
        homogeneity: homogeneity of the ADP clusters w.r.t. the modality labels (1: every
            cluster holds one modality; 0: clusters ignore modality, e.g. one cluster).
            NaN at a layer with no more than ``k`` distinct vectors (with a warning).
        n_clusters: number of ADP clusters (-1 where homogeneity is NaN).
        intrinsic_dim: 2NN intrinsic dimension of the pooled text and image vectors.
        text_index, image_index: ``(batch, example, position)`` of each vector.
        params: the settings used (k, Z, metric, density, seed).
        text_vectors, image_vectors: ``[layer, n, d_model]`` when ``keep_vectors=True``.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(24, seed=0).prompts)
        >>> sep = modality_separation(model, [batch], k=8, keep_vectors=True)
        >>> sep.layers, sep.text_vectors.shape                # one text, one image token each
        ([0, 1, 2, 3, 4], (5, 24, 64))
        >>> sep.text_index[0], sep.params["k"]                # (batch, example, position)
        ((0, 0, 39), 8)
        >>> sorted(sep.to_dict())[:4]
        ['cos_median', 'cos_q25', 'cos_q75', 'homogeneity']
    """

    __repr__ = short_repr   # shapes and headline numbers, not tensors

    layers: list[int]
    cos_median: Float[np.ndarray, "layer"]
    cos_q25: Float[np.ndarray, "layer"]
    cos_q75: Float[np.ndarray, "layer"]
    homogeneity: Float[np.ndarray, "layer"]
    n_clusters: Int[np.ndarray, "layer"]
    intrinsic_dim: Float[np.ndarray, "layer"]
    text_index: Index
    image_index: Index
    params: dict[str, Any] = field(default_factory=dict)
    text_vectors: Optional[Float[np.ndarray, "layer n d"]] = field(default=None, repr=False)
    image_vectors: Optional[Float[np.ndarray, "layer n d"]] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays become lists, NaN becomes None; vectors are left out."""
        return jsonable({f.name: getattr(self, f.name) for f in fields(self)
                          if f.name not in ("text_vectors", "image_vectors")})


def abs_cosine_quartiles(text: Float[np.ndarray, "n d"],
                         image: Float[np.ndarray, "m d"]) -> tuple[float, float, float]:
    """(q25, median, q75) of |cos| over all ``n x m`` text-image pairs.

    Example:
        >>> import numpy as np
        >>> abs_cosine_quartiles(np.eye(2), np.eye(2))
        (0.0, 0.5, 1.0)
    """
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    i = image / np.linalg.norm(image, axis=1, keepdims=True)
    q25, med, q75 = np.quantile(np.abs(t @ i.T), [0.25, 0.5, 0.75])
    return float(q25), float(med), float(q75)


def adp_clusters(
    x: Float[np.ndarray, "n d"],
    k: int = 16,
    Z: float = 1.65,
    metric: str = "cosine",
    density: Literal["PAk", "kstarNN"] = "PAk",
) -> tuple[Int[np.ndarray, "n"], float]:
    """DADApy Advanced Density Peaks cluster of each row, and the 2NN intrinsic dimension.

    Steps: ``Data(x, maxk=k)``, ``compute_distances(maxk=k, metric)``, ``compute_id_2NN()``,
    ``compute_density_PAk()`` (or ``compute_density_kstarNN()``),
    ``compute_clustering_ADP(Z)``. Identical rows (e.g. the same token at layer 0, where
    the residual is its embedding) would give zero distances, which break the density
    estimate: each distinct row is clustered once and its copies share its cluster.
    Rows that are still tied (parallel vectors, at cosine distance 0) have their ties
    broken by DADApy with a little noise; its warnings about that are silenced here.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> shift = np.r_[10.0, np.zeros(4)]
        >>> x = np.concatenate([rng.normal(size=(60, 5)) + shift, rng.normal(size=(60, 5)) - shift])
        >>> clusters, intrinsic_dim = adp_clusters(x, k=8, Z=1.65)      # cosine distances
        >>> clusters.shape, len(np.unique(clusters[:60])), bool(clusters[0] != clusters[-1])
        ((120,), 1, True)
    """
    Data = _dadapy_data()
    _check_adp_k(k)
    keep, copy_of = _unique_rows(np.asarray(x, dtype=np.float64))
    _check_k(k, len(keep), "ADP clustering (distinct vectors)")
    if density not in ("PAk", "kstarNN"):
        raise ValueError(f"density must be 'PAk' or 'kstarNN', got {density!r}")
    d = Data(np.ascontiguousarray(np.asarray(x, dtype=np.float64)[keep]), maxk=k, verbose=False)
    with _distance_ties_expected():
        d.compute_distances(maxk=k, metric=metric)
        intrinsic_dim = float(d.compute_id_2NN()[0])
        if density == "PAk":
            d.compute_density_PAk()
        else:
            d.compute_density_kstarNN()
        d.compute_clustering_ADP(Z=Z)
    return np.asarray(d.cluster_assignment)[copy_of], intrinsic_dim


@contextlib.contextmanager
def _distance_ties_expected():
    """Silence DADApy's two warnings about tied distances, which residual vectors produce
    by design (parallel vectors are at cosine distance 0; a token's embedding repeats):
    DADApy then breaks the ties with a little noise, as documented in the functions here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There are points with neighbours at 0 distance")
        warnings.filterwarnings("ignore", message=r"Found \d+ nearest neighbours at identical distance")
        yield


def _after_image(batch: VLMBatch) -> PositionSet:
    return batch.positions.after_image


def _image(batch: VLMBatch) -> PositionSet:
    return batch.positions.image


def modality_separation(
    model,
    batches: Iterable[VLMBatch],
    layers: Layers = "all",
    image_batches: Optional[Iterable[VLMBatch]] = None,
    *,
    text_tokens: Selector = _after_image,
    image_tokens: Selector = _image,
    seed: int = 0,
    k: int = 16,
    Z: float = 1.65,
    metric: str = "cosine",
    density: Literal["PAk", "kstarNN"] = "PAk",
    final: bool = True,
    keep_vectors: bool = False,
    show_progress: bool = True,
) -> ModalitySeparation:
    """How far apart text and image residuals are, layer by layer (Narrow Gate analysis 1).

    From every example one random text token (``text_tokens``, default: the text after the
    image) of ``batches`` and one random image token (``image_tokens``) of
    ``image_batches`` (default: the same batches; the paper takes text from
    image-then-caption prompts and image tokens from caption-then-image prompts). The
    ``i``-th batch of each stream draws with ``PositionSet.random(1, seed + i)``.

    Args:
        batches: VLMBatches (any iterable, read once) giving the text tokens.
        layers: ``"all"``, an int or a sequence of layer indices (``hook_resid_pre``).
        image_batches: VLMBatches giving the image tokens (default: ``batches``).
        text_tokens, image_tokens: ``batch -> PositionSet`` pools to draw from.
        k, Z, metric, density: ADP settings (paper: cosine, k=16, Z=1.65).
        final: add the output of the last block as layer ``n_layers``.
        keep_vectors: keep the ``[layer, n, d_model]`` vectors in the result.
        show_progress: report progress over the batches (terminal/notebook bar, log lines).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batches = [model.prepare(make_examples(12, seed=s).prompts) for s in (0, 1)]
        >>> sep = modality_separation(model, batches, layers=[1, 2], k=8, seed=0)
        >>> sep.layers, sep.cos_median.shape, sep.homogeneity.shape      # [layer] each
        ([1, 2, 4], (3,), (3,))
        >>> sep = modality_separation(model, batches[:1], k=30)
        Traceback (most recent call last):
        ...
        ValueError: modality separation (text and image vectors): 24 points but k=30 neighbours ...

        The paper's setting: text from image-then-caption prompts, image tokens from
        caption-then-image prompts (Chameleon's placeholder ``<image>`` placed last), on a
        real checkpoint:

        >>> model = HookedVLM.from_pretrained("facebook/chameleon-7b")         # doctest: +SKIP
        >>> text = [model.prepare(caps, images=ims) for caps, ims in loader]   # doctest: +SKIP
        >>> image = [model.prepare([c + " <image>" for c in caps], images=ims)  # doctest: +SKIP
        ...          for caps, ims in loader]
        >>> sep = modality_separation(model, text, image_batches=image)        # doctest: +SKIP
    """
    _homogeneity_score()
    _dadapy_data()  # fail before the forward passes if DADApy is missing
    _check_adp_k(k)
    points = residual_points(model, layers, final)

    def draw(selector: Selector, what: str):
        def pick(batch: VLMBatch, i: int) -> PositionSet:
            return _select(batch, selector, what, i).random(1, seed + i)
        return pick

    text_pick = ("text", (draw(text_tokens, "text_tokens"), "each"))
    image_pick = ("image", (draw(image_tokens, "image_tokens"), "each"))
    if image_batches is None:
        vecs, idx = _collect(model, batches, points, dict([text_pick, image_pick]), show_progress)
        text, image = vecs["text"], vecs["image"]
        text_index, image_index = idx["text"], idx["image"]
    else:
        tv, ti = _collect(model, batches, points, dict([text_pick]), show_progress)
        iv, ii = _collect(model, image_batches, points, dict([image_pick]), show_progress)
        text, image, text_index, image_index = tv["text"], iv["image"], ti["text"], ii["image"]

    return separation_from_vectors(
        text, image, [label for label, _ in points], k=k, Z=Z, metric=metric,
        density=density, seed=seed, text_index=text_index, image_index=image_index,
        keep_vectors=keep_vectors)


def separation_from_vectors(
    text: Float[np.ndarray, "layer n d"],
    image: Float[np.ndarray, "layer m d"],
    layers: Sequence[int],
    k: int = 16,
    Z: float = 1.65,
    metric: str = "cosine",
    density: Literal["PAk", "kstarNN"] = "PAk",
    seed: int = 0,
    text_index: Index = (),
    image_index: Index = (),
    keep_vectors: bool = False,
) -> ModalitySeparation:
    """:func:`modality_separation`'s statistics from vectors already collected (e.g.
    recorded batch by batch by a sharded run), one ``[n, d]`` slice per layer.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> shift = np.r_[10.0, np.zeros(4)]             # text and image on opposite sides
        >>> text, image = rng.normal(size=(1, 60, 5)) + shift, rng.normal(size=(1, 60, 5)) - shift
        >>> sep = separation_from_vectors(text, image, [0], k=8)
        >>> sep.homogeneity.tolist(), sep.n_clusters.tolist()   # each cluster: one modality
        ([1.0], [2])
    """
    homogeneity_score = _homogeneity_score()
    labels = np.r_[np.zeros(text.shape[1], dtype=int), np.ones(image.shape[1], dtype=int)]
    _check_k(k, len(labels), "modality separation (text and image vectors)")
    stats: dict[str, list] = {n: [] for n in ("q25", "med", "q75", "hom", "nc", "id")}
    for i, label in enumerate(layers):
        q25, med, q75 = abs_cosine_quartiles(text[i], image[i])
        pooled = np.concatenate([text[i], image[i]])
        n_distinct = len(_unique_rows(pooled)[0])
        if n_distinct <= k:
            warnings.warn(
                f"layer {label}: only {n_distinct} distinct vectors of {len(pooled)} (the same "
                f"tokens' embeddings?), not more than k={k}: homogeneity and intrinsic "
                f"dimension are NaN there", stacklevel=3)
            hom, n_clusters, intrinsic_dim = float("nan"), -1, float("nan")
        else:
            clusters, intrinsic_dim = adp_clusters(pooled, k=k, Z=Z, metric=metric,
                                                   density=density)
            hom, n_clusters = homogeneity_score(labels, clusters), len(np.unique(clusters))
        for name, value in zip(stats, (q25, med, q75, hom, n_clusters, intrinsic_dim)):
            stats[name].append(value)
    return ModalitySeparation(
        layers=list(layers),
        cos_median=np.array(stats["med"]), cos_q25=np.array(stats["q25"]),
        cos_q75=np.array(stats["q75"]), homogeneity=np.array(stats["hom"]),
        n_clusters=np.array(stats["nc"]), intrinsic_dim=np.array(stats["id"]),
        text_index=list(text_index), image_index=list(image_index),
        params=dict(k=k, Z=Z, metric=metric, density=density, seed=seed),
        text_vectors=text if keep_vectors else None,
        image_vectors=image if keep_vectors else None,
    )


# -- neighbourhood overlap -------------------------------------------------------------
@dataclass
class NeighbourhoodOverlap:
    """Per-layer label overlap of one representation per example.

    Attributes:
        layers: layer labels; ``n_layers`` stands for the output of the last block.
        overlap: ``[layer]`` mean fraction of the ``k`` nearest neighbours (Euclidean)
            that share the example's label (class-weighted if ``params["weighted"]``).
        representation: what was averaged per example.
        index: ``(batch, example, -1)`` of each vector.
        params: the settings used (k, weighted).
        vectors: ``[layer, n, d_model]`` when ``keep_vectors=True``.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(24, seed=0, questions=["shape"])
        >>> chi = neighbourhood_overlap(model, [model.prepare(data.prompts)], data.labels,
        ...                             "image_mean", layers=[0], k=5, keep_vectors=True)
        >>> chi.layers, chi.overlap.shape, chi.vectors.shape, chi.representation
        ([0, 4], (2,), (2, 24, 64), 'image_mean')
        >>> chi.to_dict()["params"]
        {'k': 5, 'weighted': False}
    """

    __repr__ = short_repr   # shapes and headline numbers, not tensors

    layers: list[int]
    overlap: Float[np.ndarray, "layer"]
    representation: str
    index: Index
    params: dict[str, Any] = field(default_factory=dict)
    vectors: Optional[Float[np.ndarray, "layer n d"]] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays become lists; vectors are left out."""
        return jsonable({f.name: getattr(self, f.name) for f in fields(self)
                          if f.name != "vectors"})


_ALIASES = {"image_mean": "image"}


def representation_selector(representation: Representation) -> tuple[str, Selector]:
    """Name and ``batch -> PositionSet`` of a representation.

    Names: ``"gate"``, ``"last_image"``, ``"specials"``, ``"image_mean"`` (the image
    tokens, averaged), or any other :class:`ImagePositions` set (``"eoi"``, ``"boi"``,
    ``"row_breaks"``, ``"last"``, ...); or a callable ``batch -> PositionSet``.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> name, pick = representation_selector("gate")
        >>> name, pick(batch) == batch.positions.gate
        ('gate', True)
        >>> representation_selector("image_mean")[1](batch) == batch.positions.image
        True
        >>> representation_selector("grid")
        Traceback (most recent call last):
        ...
        ValueError: unknown representation 'grid'; use one of [...] or a callable batch -> PositionSet
    """
    if callable(representation):
        return getattr(representation, "__name__", "custom"), representation
    if not isinstance(representation, str):
        raise TypeError(f"representation must be a name or a callable, got {representation!r}")
    attr = _ALIASES.get(representation, representation)
    probe = getattr(ImagePositions, attr, None)
    known = isinstance(probe, property) or attr in ImagePositions.__dataclass_fields__
    if not known or attr in ("grid", "batch_size", "seq_len"):
        names = sorted({"gate", "last_image", "specials", "image_mean", "eoi", "boi", "image",
                        "row_breaks", "text", "after_image", "last", "image_side"})
        raise ValueError(f"unknown representation {representation!r}; use one of {names} or "
                         f"a callable batch -> PositionSet")
    return representation, lambda batch: getattr(batch.positions, attr)


def label_overlap(x: Float[np.ndarray, "n d"], labels: Sequence[Any], k: int = 30,
                  weighted: bool = False) -> float:
    """DADApy ``return_label_overlap`` on Euclidean distances (k nearest neighbours).

    Identical vectors (every example's gate token at layer 0, where the residual is the
    token's embedding) are all at distance 0: their neighbour order, and so the overlap,
    is then arbitrary.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = np.concatenate([rng.normal(size=(40, 3)) + 8, rng.normal(size=(40, 3)) - 8])
        >>> label_overlap(x, ["a"] * 40 + ["b"] * 40, k=10)        # two separate classes
        1.0
        >>> round(label_overlap(x, ["a", "b"] * 40, k=10), 1)      # labels unrelated to x
        0.5
    """
    Data = _dadapy_data()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    _check_k(k, len(x), "neighbourhood overlap")
    codes = np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)
    d = Data(x, maxk=k, verbose=False)
    with _distance_ties_expected():
        d.compute_distances(maxk=k, metric="euclidean")
    return float(d.return_label_overlap(codes, k=k, weighted=weighted))


def neighbourhood_overlap(
    model,
    batches: Iterable[VLMBatch],
    labels: Sequence[Any],
    representation: Representation = "gate",
    layers: Layers = "all",
    k: int = 30,
    *,
    weighted: bool = False,
    final: bool = True,
    keep_vectors: bool = False,
    show_progress: bool = True,
) -> NeighbourhoodOverlap:
    """Semantic probing: how much each layer's neighbourhoods follow class labels.

    Per example one vector: the mean of its residuals over the representation's positions
    (``"gate"``: EOI, or EOI and EOF for Emu3; ``"last_image"``: the last token of each
    image; ``"specials"``; ``"image_mean"``: all image tokens). Per layer the overlap
    ``chi = mean_i (#{k nearest neighbours of i with i's label} / k)`` (DADApy
    ``return_label_overlap``, Euclidean; ``weighted=True`` weights examples by 1/class
    size, DADApy's default; the paper's definition is the plain mean).

    Args:
        batches: VLMBatches (any iterable, read once).
        labels: one label per example over all batches, in order (any hashable values).
        representation: a name (see :func:`representation_selector`) or a callable
            ``batch -> PositionSet``.
        layers: ``"all"``, an int or a sequence of layer indices (``hook_resid_pre``).
        k: neighbours (paper: 30); needs more than ``k`` examples.
        final: add the output of the last block as layer ``n_layers``.
        show_progress: report progress over the batches (terminal/notebook bar, log lines).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(48, seed=0, questions=["colour"])
        >>> batches = (model.prepare(data[i:i + 12].prompts) for i in range(0, 48, 12))  # streamed
        >>> chi = neighbourhood_overlap(model, batches, data.labels, "gate", k=5)
        >>> chi.overlap.shape                                     # [layer]: 4 blocks + the output
        (5,)
        >>> neighbourhood_overlap(model, [model.prepare(data[:12].prompts)], data.labels, k=5)
        Traceback (most recent call last):
        ...
        ValueError: got 48 labels for 12 examples; pass one label per example, ...
    """
    [result] = neighbourhood_overlaps(model, batches, labels, [representation], layers, k,
                                     weighted=weighted, final=final, keep_vectors=keep_vectors,
                                     show_progress=show_progress).values()
    return result


def neighbourhood_overlaps(
    model,
    batches: Iterable[VLMBatch],
    labels: Sequence[Any],
    representations: Sequence[Representation] = ("gate", "last_image", "image_mean"),
    layers: Layers = "all",
    k: int = 30,
    *,
    weighted: bool = False,
    final: bool = True,
    keep_vectors: bool = False,
    show_progress: bool = True,
) -> dict[str, NeighbourhoodOverlap]:
    """:func:`neighbourhood_overlap` of several representations from one pass over the data.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(48, seed=0, questions=["colour"])
        >>> batches = [model.prepare(data[i:i + 12].prompts) for i in range(0, 48, 12)]
        >>> chis = neighbourhood_overlaps(model, batches, data.labels, ["gate", "image_mean"], k=5)
        >>> sorted(chis), chis["gate"].overlap.shape
        (['gate', 'image_mean'], (5,))
        >>> bool(abs(chis["gate"].overlap - neighbourhood_overlap(
        ...     model, batches, data.labels, "gate", k=5).overlap).max() == 0)
        True
    """
    _dadapy_data()
    points = residual_points(model, layers, final)
    selectors = {}
    for representation in representations:
        name, selector = representation_selector(representation)

        def pick(batch: VLMBatch, i: int, name=name, selector=selector) -> PositionSet:
            return _select(batch, selector, f"representation {name!r}", i)

        selectors[name] = (pick, "mean")
    vecs, idx = _collect(model, batches, points, selectors, show_progress)
    labels = list(labels)
    out = {}
    for name in selectors:
        x = vecs[name]
        if len(labels) != x.shape[1]:
            raise ValueError(f"got {len(labels)} labels for {x.shape[1]} examples; pass one "
                             f"label per example, over all batches in order")
        _check_k(k, x.shape[1], "neighbourhood overlap")
        overlap = np.array([label_overlap(x[i], labels, k=k, weighted=weighted)
                            for i in range(len(points))])
        out[name] = NeighbourhoodOverlap(
            layers=[label for label, _ in points], overlap=overlap, representation=name,
            index=idx[name], params=dict(k=k, weighted=weighted),
            vectors=x if keep_vectors else None)
    return out
