"""Small-sample statistics for comparing methods over forget sets (METHOD.md section 7).

Everything here is over a handful of splits (3 to 10), so: sample standard deviations
(ddof=1), Student-t intervals (not normal ones), and paired tests over the *same* splits
(each split's oracle is shared by every method, so the split-to-split difference in
difficulty cancels in the pairing). Pure numpy/scipy; no project imports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st


@dataclass(frozen=True)
class Interval:
    """mean, sample std (ddof=1), n and the two-sided t interval [lo, hi] of the mean."""

    mean: float
    std: float
    n: int
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0


@dataclass(frozen=True)
class PairedTest:
    """A paired t test of a - b over the same units: the mean difference, its t interval,
    the t statistic (df = n - 1) and the two-sided p value."""

    n: int
    mean_diff: float
    std_diff: float
    lo: float
    hi: float
    t: float
    p: float

    @property
    def spans_zero(self) -> bool:
        return self.lo <= 0.0 <= self.hi


def t_critical(n: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t quantile for the mean of n values (df = n - 1)."""
    if n < 2:
        return float("nan")
    return float(_st.t.ppf(0.5 + confidence / 2.0, n - 1))


def sample_std(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) >= 2 else float("nan")


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of `values` with its two-sided Student-t confidence interval
    (mean +- t_{n-1} * s / sqrt(n), s the sample std). One value: std and bounds are nan."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        raise ValueError("t_interval of no values")
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, float("nan"), 1, float("nan"), float("nan"))
    s = float(v.std(ddof=1))
    half = t_critical(n, confidence) * s / math.sqrt(n)
    return Interval(mean, s, n, mean - half, mean + half)


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedTest:
    """Paired t test of mean(a - b) = 0, a[i] and b[i] measured on the same unit (split).
    Differences all equal: the interval has zero width, t is 0 (all zero, p = 1) or +-inf (p = 0)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_t needs the same units on both sides, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("paired_t needs at least 2 pairs")
    d = x - y
    iv = t_interval(d, confidence)
    n = len(d)
    if iv.std == 0.0:
        t = 0.0 if iv.mean == 0.0 else math.copysign(math.inf, iv.mean)
        p = 1.0 if iv.mean == 0.0 else 0.0
    else:
        t = iv.mean / (iv.std / math.sqrt(n))
        p = float(2.0 * _st.t.sf(abs(t), n - 1))
    return PairedTest(n, iv.mean, iv.std, iv.lo, iv.hi, float(t), p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p values (same order as given): the k-th smallest of m is
    multiplied by (m - k + 1), made non-decreasing in that order, capped at 1."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return [float(x) for x in adjusted]
