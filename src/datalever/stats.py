"""Confidence intervals: one definition for the experiment's report and the theory runs."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def t_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval over the finite values.

    Non-finite values (a direction that was never learned, say) are left out; the half-width is
    NaN for fewer than two values, and both are NaN for none.
    """
    from scipy.stats import t as student_t

    x = np.asarray(list(values), dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan
    half = student_t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)
