"""Sampling error: half-widths of normal-approximation 95 % intervals of a mean or a rate."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_ci95(values: Sequence[float]) -> float | None:
    """Half-width of the 95 % interval of the mean of `values`: 1.96 sample standard deviations
    over sqrt(n). `None` below two values (no spread to estimate)."""
    if len(values) < 2:
        return None
    return 1.96 * float(np.std(np.asarray(values, dtype=np.float64), ddof=1)) / math.sqrt(
        len(values))


def proportion_ci95(rate: float | None, n: int) -> float | None:
    """`mean_ci95` of n yes/no outcomes of which a fraction `rate` are yes (e.g. an accuracy)."""
    if rate is None or n < 2:
        return None
    return 1.96 * math.sqrt(rate * (1.0 - rate) / (n - 1))
