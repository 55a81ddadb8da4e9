"""Statistics over per-example drops: means and standard errors of the finite entries,
rank correlation, per-batch vectors joined in example order.

Example:
    >>> import torch
    >>> drops = torch.tensor([1.0, 3.0, float("nan")])       # NaN: the example lacks it
    >>> finite_mean(drops), standard_error(drops)
    (2.0, 1.0)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def finite_mean(drops: Tensor) -> float:
    """Mean of the finite entries, in float64 (every exact drop is averaged this way).

    Example:
        >>> finite_mean(torch.tensor([1.0, float("nan"), 2.0]))
        1.5
    """
    return float(drops[drops.isfinite()].double().mean())


def standard_error(drops: Tensor) -> Optional[float]:
    """Standard error of the mean of the finite entries (None below two of them).

    Example:
        >>> standard_error(torch.tensor([1.0, 3.0])), standard_error(torch.tensor([1.0]))
        (1.0, None)
    """
    values = drops[drops.isfinite()].double()
    if values.numel() < 2:
        return None
    return float(values.std() / math.sqrt(values.numel()))


def per_example(by_start: dict[int, Tensor], starts: dict[int, int]) -> Tensor:
    """Per-batch vectors (keyed by batch start) as one vector over every example in
    order, NaN for batches that lack it (``starts``: batch start -> its size).

    Example:
        >>> per_example({0: torch.tensor([1.0, 2.0])}, {0: 2, 2: 1})
        tensor([1., 2., nan])
    """
    return torch.cat([by_start.get(start, torch.full((n,), float("nan")))
                      for start, n in starts.items()])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN below 3 points.

    Example:
        >>> round(spearman([1, 2, 3], [30, 20, 10]), 6), spearman([1, 2], [1, 2])
        (-1.0, nan)
    """
    if len(x) < 3:
        return float("nan")

    def ranks(v: Sequence[float]) -> Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for value in t.unique():                   # ties share their mean rank
            same = t == value
            r[same] = r[same].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float("nan") if denom == 0 else float((rx @ ry).item() / denom)
