"""The check both compare tests make of a report number over seeds: its `_ci` is SciPy's 95%
Student-t interval of the per-seed values, clipped to the metric's range where it has one."""

import numpy as np
import pytest
from scipy import stats

from rlhf_jax.loops.compare_seeds import METRIC_RANGE


def t_interval(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    if np.all(v == v[0]):  # no spread (SciPy gives nan): the interval is the point
        return float(v[0]), float(v[0])
    return stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))


def check_t_interval(row: dict, key: str, name: str) -> None:
    lo, hi = t_interval(row[f"{key}_seeds"])
    # the library's t table has 3 decimals: 12.706 against SciPy's 12.7062...
    tol = 1e-4 * (hi - lo) + 1e-12
    if key in METRIC_RANGE:  # a share's interval is clipped to [0, 1]
        lo, hi = max(lo, METRIC_RANGE[key][0]), min(hi, METRIC_RANGE[key][1])
    got_lo, got_hi = row[f"{key}_ci"]
    assert got_lo == pytest.approx(lo, abs=tol), (name, key)
    assert got_hi == pytest.approx(hi, abs=tol), (name, key)
