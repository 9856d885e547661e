import math

import pytest

from datalever.stats import t_interval


def test_t_interval_matches_a_hand_computed_case():
    # values 1, 2, 3: mean 2, sample sd 1, t(0.975, 2) = 4.302653; half-width 4.302653 / sqrt(3)
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_t_interval_leaves_out_non_finite_values_and_says_nan_when_it_cannot_tell():
    assert t_interval([1.0, 2.0, 3.0, math.nan, math.inf]) == t_interval([1.0, 2.0, 3.0])
    mean, half = t_interval([5.0])
    assert mean == 5.0 and math.isnan(half)
    assert all(math.isnan(v) for v in t_interval([]))
