"""Short reprs for result objects: shapes and headline numbers, never a tensor dump.

A notebook shows a cell's last value with ``repr``; a result object that prints every
tensor it holds (a batch's pixels, a [layer, head, query, key] pattern) fills the page.
:func:`short_repr` writes ``Name(field=tensor[2, 39], score=0.931, ...)`` instead.

Example:
    >>> import torch
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Result:
    ...     scores: torch.Tensor
    ...     mean: float
    ...     names: list
    ...     __repr__ = short_repr
    >>> Result(torch.zeros(2, 3), 0.12345, ["a", "b", "c", "d", "e"])
    Result(scores=tensor[2, 3], mean=0.123, names=[5 items])
"""

from __future__ import annotations

import dataclasses
from typing import Any


def short(value: Any, depth: int = 0) -> str:
    """One value in a few characters: tensors and arrays by shape, floats to 3 digits,
    long lists and dicts by their length.

    Example:
        >>> import numpy as np
        >>> short(np.ones((4, 2))), short(2.0 / 3), short({"a": 1, "b": [1, 2]})
        ('array[4, 2]', '0.667', "{'a': 1, 'b': [1, 2]}")
    """
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (int, float)):
        kind = "tensor" if type(value).__module__.startswith("torch") else "array"
        return f"{kind}{list(value.shape)}"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, (list, tuple)):
        if len(value) <= 4 and depth < 2 and all(not hasattr(v, "shape") for v in value):
            inner = ", ".join(short(v, depth + 1) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        if len(value) <= 4 and depth < 2:
            return "{" + ", ".join(f"{k!r}: {short(v, depth + 1)}" for k, v in value.items()) + "}"
        return f"{{{len(value)} keys}}"
    return type(value).__name__


def short_repr(obj: Any) -> str:
    """``Name(field=..., ...)`` of a dataclass, each field by :func:`short` (fields marked
    ``repr=False`` left out). The module's example shows it.

    Example:
        >>> from tl_vlm.core.positions import PositionSet
        >>> import torch
        >>> @dataclasses.dataclass
        ... class Cut:
        ...     keys: PositionSet
        ...     __repr__ = short_repr
        >>> Cut(PositionSet(torch.zeros(2, 5, dtype=torch.bool)))
        Cut(keys=PositionSet)
    """
    parts = [f"{f.name}={short(getattr(obj, f.name))}"
             for f in dataclasses.fields(obj) if f.repr]
    return f"{type(obj).__name__}({', '.join(parts)})"
