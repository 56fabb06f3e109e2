"""Statistics over training seeds: mean, sample standard deviation, and Student-t 95% intervals
of a mean and of a paired difference (runs of two variants that share a seed share its data
order and differ in the model, so their per-seed differences are the paired sample).

The t quantile is computed here (regularised incomplete beta function + bisection) so that
megatron-delta does not need SciPy; it matches scipy.stats.t.ppf to 1e-9 (relative).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Mean of n values with its sample standard deviation and 95% t-interval (None for n < 2)."""

    mean: float
    std: float | None
    n: int
    low: float | None
    high: float | None

    def excludes(self, value: float) -> bool:
        """Whether the interval lies entirely on one side of `value` (False without an interval)."""
        return self.low is not None and (self.low > value or self.high < value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def estimate(values: list[float], confidence: float = 0.95) -> Estimate:
    """Mean, sample std (n - 1) and the t-interval mean +- t_{(1+c)/2, n-1} * std / sqrt(n)."""
    n = len(values)
    if n == 0:
        raise ValueError("estimate() needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, None, 1, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return Estimate(mean, std, n, mean - half, mean + half)


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> Estimate:
    """Estimate of mean(a_i - b_i) over pairs i (a and b in the same seed order)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equal lengths, got {len(a)} and {len(b)}")
    return estimate([x - y for x, y in zip(a, b)], confidence)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t distribution with df degrees of freedom (0 < p < 1)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):  # bisection to float precision
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), using the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a
