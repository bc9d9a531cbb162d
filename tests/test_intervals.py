"""The report intervals against SciPy (a reference no one here wrote) and hand-computed values."""

import math

import numpy as np
import pytest
from scipy import stats

from rlhf_jax.intervals import student_t_interval, t_quantile_975, wilson_interval


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 29, 30])
def test_t_table_matches_scipy(df):
    assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


def test_t_beyond_table_is_normal():
    assert t_quantile_975(500) == pytest.approx(stats.norm.ppf(0.975), abs=1e-5)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (66, 192), (187, 192), (1, 1)])
def test_wilson_solves_the_score_equation(k, n):
    # The score interval solved directly: the p for which |p_hat - p| = z * sqrt(p(1-p)/n).
    z = stats.norm.ppf(0.975)
    p_hat = k / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    disc = math.sqrt(b * b - 4 * a * c)
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(max(0.0, (-b - disc) / (2 * a)), abs=1e-6)  # z to 7 digits
    assert hi == pytest.approx(min(1.0, (-b + disc) / (2 * a)), abs=1e-6)  # z to 7 digits
    assert 0.0 <= lo <= p_hat <= hi <= 1.0


def test_wilson_never_zero_width_at_the_edges():
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi > 0.1
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo < 0.9


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_student_t_against_scipy():
    values = [0.61, 0.70, 0.66]
    mean, lo, hi = student_t_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx(ref, abs=1e-3)


def test_student_t_one_value_has_no_spread():
    assert student_t_interval([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        student_t_interval([])


def test_student_t_clipped_to_the_metrics_range():
    values = [0.9, 1.0, 1.0]
    mean, lo, hi = student_t_interval(values)
    assert hi > 1.0
    assert student_t_interval(values, within=(0.0, 1.0)) == (mean, lo, 1.0)
    assert student_t_interval([0.0, 0.1, 0.0], within=(0.0, 1.0))[1] == 0.0
