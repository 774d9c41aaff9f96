"""Aggregating relative errors for tolerance checks so that a NaN cannot slip past them."""

from __future__ import annotations

import math
from collections.abc import Iterable


def nan_max(values: Iterable[float]) -> float:
    """The largest value, or NaN if any value is NaN.

    The builtin ``max`` keeps a NaN only when it comes first (every comparison with NaN is
    false), so ``max(errors) <= tol`` passes when a later rank's or tensor's error is NaN.
    """
    return max(values, key=lambda v: math.inf if math.isnan(v) else v)
