"""CIDEr-D, exactly as pycocoevalcap 1.2 computes it (``Cider()``, n=4, sigma=6).

A caption becomes n-gram counts for n = 1..4. An n-gram's document frequency is the
number of images whose *reference set* contains it; hypotheses do not count. Each
count is weighted by ``tf * (log(N images) - log(max(1, df)))``, with one vector per
n-gram order.

For order n, a hypothesis and one reference score

    sum_g min(h_g, r_g) * r_g / (|h| |r|) * exp(-delta**2 / (2 * 6**2)).

The norms are those of the unclipped vectors, and the score is 0 when either norm is
0. The length difference ``delta`` counts *bigrams*, not words: upstream adds up the
counts of order index 1. This quirk is kept, though it never changes a score: for two
non-empty captions the bigram and word differences agree, and an empty caption's
similarity is 0 anyway.

An image scores ``10 * mean_n(sum over its references) / #references``, and the corpus
scores the mean over images. The weights depend on the whole set, so an image's score
depends on the other images: a single image always scores 0. Compare conditions only
on the same set of images.

Example:
    >>> refs = {1: ["a dog runs on grass", "a brown dog running"],
    ...         2: ["a red bus on a street", "a bus parked by the road"]}
    >>> result = cider_d({1: "a dog running on grass", 2: "a cat on a sofa"}, refs)
    >>> round(result.corpus, 4), {k: round(v, 4) for k, v in result.per_image.items()}
    (1.4558, {1: 2.636, 2: 0.2757})
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Literal, NamedTuple

from tl_vlm.eval.metrics.ptb import (java_ptb_unavailable_reason, ptb_tokenize_approx,
                                ptb_tokenize_java)

TokenizeMode = Literal["raw", "ptb-approx", "ptb"]
TOKENIZE_MODES: tuple[str, ...] = ("raw", "ptb-approx", "ptb")

_MAX_ORDER = 4
_SIGMA = 6.0
_SCALE = 10.0

NGram = tuple[str, ...]


@dataclass(frozen=True)
class CiderResult:
    """CIDEr-D scores of a set of captions.

    Attributes:
        corpus: the mean of ``per_image``; this is the number papers report (for
            example 0.35, with no x100).
        per_image: the score of each image, keyed and ordered as the predictions.
        tokenize: the tokenisation actually used. It is ``"ptb-approx"`` when ``"ptb"``
            was asked for but Java was unavailable.

    Example:
        >>> refs = {"a": ["a cat"], "b": ["a dog"]}
        >>> result = cider_d({"a": "a cat", "b": "a bird"}, refs)
        >>> result.tokenize, len(result), round(result.corpus, 3)
        ('raw', 2, 2.5)
    """

    corpus: float
    per_image: dict[Hashable, float]
    tokenize: str

    def __len__(self) -> int:
        return len(self.per_image)


class _Vector(NamedTuple):
    """A caption's tf-idf weights and norm for each n-gram order, and its length."""

    weights: list[dict[NGram, float]]
    norms: list[float]
    length: int            # counts bigrams (upstream quirk), not words


def _ngram_counts(tokens: Sequence[str]) -> Counter[NGram]:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, _MAX_ORDER + 1)
                   for i in range(len(tokens) - n + 1))


def _vector(counts: Counter[NGram], document_frequency: Counter[NGram],
            log_images: float) -> _Vector:
    weights: list[dict[NGram, float]] = [{} for _ in range(_MAX_ORDER)]
    for ngram, tf in counts.items():
        weights[len(ngram) - 1][ngram] = tf * (log_images - math.log(max(1, document_frequency[ngram])))
    norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
    length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
    return _Vector(weights, norms, length)


def _similarity(hyp: _Vector, ref: _Vector) -> list[float]:
    """The per-order similarity of a hypothesis to one reference, length penalty included."""
    penalty = math.exp(-float(hyp.length - ref.length) ** 2 / (2 * _SIGMA ** 2))
    out = []
    for h, r, h_norm, r_norm in zip(hyp.weights, ref.weights, hyp.norms, ref.norms):
        if h_norm == 0 or r_norm == 0:
            # All weights of one side are 0 here, so upstream's unnormalised sum is 0 too.
            out.append(0.0)
            continue
        clipped = sum(min(w, r.get(ngram, 0.0)) * r.get(ngram, 0.0) for ngram, w in h.items())
        out.append(clipped / (h_norm * r_norm) * penalty)
    return out


def _check_inputs(predictions: Mapping, references: Mapping) -> None:
    for name, value in (("predictions", predictions), ("references", references)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping from image id to caption(s), got "
                            f"{type(value).__name__}")
    if not predictions:
        raise ValueError("predictions is empty: CIDEr needs at least one image")
    if predictions.keys() != references.keys():
        only_pred = [k for k in predictions if k not in references]
        only_ref = [k for k in references if k not in predictions]
        raise ValueError(
            f"predictions and references must have the same image ids; "
            f"{len(only_pred)} only in predictions (e.g. {only_pred[:5]}), "
            f"{len(only_ref)} only in references (e.g. {only_ref[:5]}). "
            f"Score the same subset on both sides.")
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"predictions[{key!r}] must be one caption (str), got "
                            f"{type(caption).__name__}: {caption!r}")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(f"references[{key!r}] must be a list of caption strings, got "
                            f"{type(refs).__name__}: {refs!r}")
        if not refs:
            raise ValueError(f"references[{key!r}] is empty: every image needs at least one "
                             f"reference caption")
        bad = [r for r in refs if not isinstance(r, str)]
        if bad:
            raise TypeError(f"references[{key!r}] holds a {type(bad[0]).__name__} "
                            f"({bad[0]!r}); references must be strings")


def _tokenizer(mode: str) -> tuple[Callable[[list[str]], list[str]], str]:
    """A function from captions to tokenised captions, and the mode it implements."""
    if mode == "raw":
        return (lambda texts: texts), "raw"
    if mode == "ptb":
        reason = java_ptb_unavailable_reason()
        if reason is None:
            return ptb_tokenize_java, "ptb"
        warnings.warn(f"tokenize='ptb' needs the Java PTBTokenizer ({reason}); using "
                      f"'ptb-approx' instead", stacklevel=3)
    return (lambda texts: [ptb_tokenize_approx(t) for t in texts]), "ptb-approx"


def cider_d(predictions: Mapping[Hashable, str],
            references: Mapping[Hashable, Sequence[str]],
            tokenize: TokenizeMode = "raw") -> CiderResult:
    """CIDEr-D of one predicted caption per image against that image's references.

    The values match pycocoevalcap 1.2 ``Cider().compute_score`` on the same token
    strings. ``tokenize`` says how the captions are cut into words:

    - ``"raw"`` (default, the paper's setting): ``str.split()``. It is case sensitive
      and keeps punctuation attached ("wave." is not "wave").
    - ``"ptb-approx"``: :func:`ptb_tokenize_approx`, pure Python.
    - ``"ptb"``: the Java Stanford PTBTokenizer, as standard COCO evaluation does. When
      Java or its jar is missing, it warns once and uses ``"ptb-approx"``.
      :attr:`CiderResult.tokenize` records which one ran.

    Example:
        >>> refs = {1: ["A man riding a wave.", "A surfer on a wave."],
        ...         2: ["Two dogs play.", "Dogs playing in grass."]}
        >>> hyps = {1: "A man riding a wave.", 2: "Two dogs in the grass."}
        >>> raw, ptb = cider_d(hyps, refs), cider_d(hyps, refs, tokenize="ptb-approx")
        >>> round(raw.corpus, 4), round(ptb.corpus, 4)
        (3.8212, 4.0305)
        >>> cider_d({1: "a dog"}, {1: ["a dog"]}).corpus     # one image: idf is 0
        0.0
    """
    if tokenize not in TOKENIZE_MODES:
        raise ValueError(f"tokenize must be one of {TOKENIZE_MODES}, got {tokenize!r}")
    _check_inputs(predictions, references)
    split, used = _tokenizer(tokenize)

    ids = list(predictions)
    hyp_tokens = [caption.split() for caption in split([predictions[k] for k in ids])]
    flat = iter(split([r for k in ids for r in references[k]]))   # one tokenizer run
    ref_counts = [[_ngram_counts(caption.split()) for caption in islice(flat, len(references[k]))]
                  for k in ids]

    document_frequency: Counter[NGram] = Counter()
    for refs in ref_counts:
        document_frequency.update(set().union(*refs))
    log_images = math.log(len(ids))

    per_image: dict[Hashable, float] = {}
    for k, tokens, refs in zip(ids, hyp_tokens, ref_counts):
        hyp = _vector(_ngram_counts(tokens), document_frequency, log_images)
        totals = [0.0] * _MAX_ORDER
        for ref in refs:
            for n, sim in enumerate(_similarity(hyp, _vector(ref, document_frequency, log_images))):
                totals[n] += sim
        per_image[k] = sum(totals) / _MAX_ORDER / len(refs) * _SCALE
    corpus = sum(per_image.values()) / len(per_image)
    return CiderResult(corpus=corpus, per_image=per_image, tokenize=used)
