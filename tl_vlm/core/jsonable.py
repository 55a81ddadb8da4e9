"""Results as JSON: one conversion for every analysis's ``to_dict``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """``value`` with tuples and arrays as lists, numpy scalars as Python numbers and NaN
    as None (JSON has no NaN), recursively through dicts and lists.

    Example:
        >>> jsonable({"a": (1, float("nan")), "b": np.array([0.5, 2.0]), "c": np.float32(1.5)})
        {'a': [1, None], 'b': [0.5, 2.0], 'c': 1.5}
    """
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
