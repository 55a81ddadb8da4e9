"""The verdict of a gate search: narrow, mixed, distributed or no image effect; the best
class; the positions the sample settles.

``narrow`` when the best one or two single positions, knocked out together, take at
least ``narrow`` (0.6) of the image's effect; ``distributed`` when they take less than
``distributed`` (0.25); ``mixed`` in between; ``no image effect`` when knocking out the
whole image side moves the metric by no more than ``min_effect``. The gate is the best
position alone when it takes ``narrow`` or 0.85 of the best two's share, else both.

Example:
    >>> verdict_of([0.98, 0.99], total=11.0, best=["eoi", "boi"])
    ('narrow', ['eoi'], 0.98)
    >>> verdict_of([0.05, 0.06], total=11.0, best=["boi", "eoi"])[0]
    'distributed'
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor

from tl_vlm.analyses.gates.candidates import IMAGE_SIDE
from tl_vlm.analyses.gates.result import GateCandidate
from tl_vlm.analyses.gates.stats import finite_mean, standard_error


def verdict_of(top_shares: Sequence[float], total: float, best: Sequence[Any],
               narrow: float = 0.6, distributed: float = 0.25, min_effect: float = 0.1
               ) -> tuple[str, list, float]:
    """``(verdict, gate, gate_share)`` from the exact shares of the best one and the best
    two positions together (``top_shares``), the whole image side's exact effect
    (``total``) and the best two positions by exact effect (``best``).

    Example:
        >>> verdict_of([0.3, 0.7], total=5.0, best=["image (2, 3)", "eoi"])
        ('narrow', ['image (2, 3)', 'eoi'], 0.7)
        >>> verdict_of([0.3, 0.4], total=5.0, best=["a", "b"])
        ('mixed', ['a', 'b'], 0.4)
        >>> verdict_of([0.9, 0.9], total=0.01, best=["eoi"])
        ('no image effect', [], nan)
    """
    if not total > min_effect:
        return "no image effect", [], float("nan")
    one, two = top_shares
    verdict = "narrow" if two >= narrow else "distributed" if two < distributed else "mixed"
    if verdict == "distributed":
        return verdict, [], float("nan")
    if one >= narrow or one >= 0.85 * two:
        return verdict, list(best[:1]), one
    return verdict, list(best), two


def best_class(classes: Sequence[GateCandidate]) -> Optional[GateCandidate]:
    """The narrowest class that carries (nearly) as much as the best one: of the classes
    but ``image`` and ``image_side`` within 5% of the largest effect, the one with the
    fewest positions (``last_image``, not the row it ends, when both carry everything).

    Example:
        >>> def klass(name, effect, size):
        ...     return GateCandidate(name, "class", name, effect, effect, n_positions=size)
        >>> best_class([klass("row 5", 1.0, 6), klass("last_image", 0.98, 1),
        ...             klass("image", 1.1, 36)]).name
        'last_image'
    """
    pool = [c for c in classes if c.name not in ("image", IMAGE_SIDE)]
    top_effect = max((c.effect for c in pool), default=0.0)
    return min((c for c in pool if c.effect >= top_effect - 0.05 * abs(top_effect)),
               key=lambda c: (c.n_positions, -c.effect), default=None)


def settled(by_exact: list, measured: dict[Any, Tensor], k: int) -> list:
    """The exact top ``k`` that lead the next one by more than two standard errors of
    their paired difference (both were knocked out in the same examples): the part of
    the top k this sample ranks at all. Empty when fewer than k + 1 were measured.

    Example (paired: a constant lead of 0.1 is settled however noisy the drops are):
        >>> import torch
        >>> drops = torch.tensor([0.0, 5.0, 1.0, 9.0])
        >>> settled(["a", "b"], {"a": drops + 0.1, "b": drops}, 1)
        ['a']
    """
    if len(by_exact) <= k:
        return []
    runner_up = measured[by_exact[k]]
    out = []
    for key in by_exact[:k]:
        difference = measured[key] - runner_up            # NaN where either is absent
        se = standard_error(difference)
        if se is not None and finite_mean(difference) > 2 * se:
            out.append(key)
    return out
