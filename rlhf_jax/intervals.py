"""95% intervals for the numbers the reports print: a proportion (Wilson score) and a mean over
a few independent runs (Student-t). Host-side NumPy; no SciPy at run time.

Which interval and why:
- `wilson_interval(k, n)`: the share of n independent pass/fail checks (exact-answer accuracy
  on held-out prompts). Unlike the normal approximation p ± 1.96·sqrt(p(1-p)/n) it stays inside
  [0, 1] and does not collapse to a zero-width interval at 0% or 100% (Wilson, 1927).
- `student_t_interval(values)`: the mean of a metric over seeds. With 3–5 seeds the normal
  quantile 1.96 is far too narrow (the t quantile at 2 degrees of freedom is 4.30).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30 (any statistics table;
# checked in the tests against scipy.stats.t.ppf). Beyond 30 the normal quantile is within 4%.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t_{0.975} at `df` degrees of freedom (table to 30, the normal quantile beyond)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else Z975


def wilson_interval(successes: int, trials: int, z: float = Z975) -> tuple[float, float]:
    """The Wilson score interval of `successes` out of `trials` (95% at the default z)."""
    if trials <= 0:
        raise ValueError(f"trials must be > 0, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    # At 0 or n successes the bound on that side is exactly 0 or 1; rounding would leave
    # 0.9999999999999999 and a p_hat outside its own interval.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def student_t_interval(
    values: Sequence[float], within: tuple[float, float] | None = None
) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean of independent `values`
    (e.g. one metric over seeds). One value gives a zero-width interval at that value: there is
    no spread to measure, and the report says how many seeds it used.

    `within`: the range the metric can take (an accuracy's [0, 1]). The t interval is
    symmetric and knows no range, so three seeds at 0.9, 1.0, 1.0 would report an upper bound
    of 1.12; the bounds are clipped to `within` (the mean, inside it, is unchanged)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, mean, mean
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile_975(n - 1) * math.sqrt(var / n)
    low, high = mean - half, mean + half
    if within is not None:
        low, high = max(low, within[0]), min(high, within[1])
    return mean, low, high
