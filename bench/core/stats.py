"""Statistics of paired per-sample results: the intervals and the grading rule the sanity checks
use (and the report's comparisons). A check that compares two attacks pairs them sample by sample
and tests the difference with a confidence interval (Newcombe's method for paired proportions; a
normal interval for paired losses), so a small sample cannot fail a model by chance and a large one
cannot hide a real gap."""

from __future__ import annotations

import math

import numpy as np

Z = 1.959964  # two-sided 95%


def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = Z) -> tuple[float, float, float]:
    """mean(a) − mean(b) for paired booleans, with Newcombe's (1998, method 10) score interval."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = len(a)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson(both + only_a, n, z)
    l2, u2 = wilson(both + only_b, n, z)
    denominator = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(denominator) if denominator > 0 else 0.0
    theta = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return theta, theta - lower, theta + upper


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test for paired booleans: `only_a` and `only_b` are the
    discordant counts (true for one, false for the other); under the null each discordant pair
    falls either way with probability 1/2, so p = min(1, 2·P(X ≤ min) for X ~ Binomial(n, 1/2))."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def mean_difference(a: np.ndarray, b: np.ndarray, z: float = Z) -> tuple[float, float, float]:
    """mean(a − b) for paired real values, with a normal confidence interval."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    half = z * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def grade(estimate: float, lower: float, warn_above: float, fail_above: float) -> str:
    """fail when the violation exceeds `fail_above` with 95% confidence (its lower bound does);
    warn when it is significant (lower bound above 0) and its point estimate exceeds `warn_above`;
    pass otherwise. A flag thus always rests on evidence, not on a few samples' noise.
    (Comparisons ignore float rounding: one sample in 100 is 0.01, not 0.010000000000000009.)"""
    if lower > fail_above + 1e-12:
        return "fail"
    if lower > 1e-12 and estimate > warn_above + 1e-12:
        return "warn"
    return "pass"
