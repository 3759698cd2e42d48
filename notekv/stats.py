"""Intervals for reported rates and means: Wilson for proportions, a random bootstrap for means."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from .errors import InputError, check_int


def _count(name: str, value, high: int | None = None) -> int:
    """A count: any whole number (Python, numpy or torch, a sum of bools) >= 0."""
    if isinstance(value, numbers.Integral):  # bool and numpy integers included
        value = int(value)
    return check_int(name, value, low=0, high=high)


def _values(x, what: str = "x") -> np.ndarray:
    try:
        return np.asarray(list(x), dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what}: {x!r:.60} is not a sequence of numbers") from None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95% for z = 1.96); (nan, nan) if n = 0."""
    n = _count("n", n)
    k = _count("k", k, high=n)
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(x: Sequence[float], n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: percentile interval of the mean over ``n_boot`` random resamples."""
    n_boot = check_int("n_boot", n_boot, low=1)
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise InputError(f"level={level!r}: pass the interval's coverage, a number between 0 and 1 (e.g. 0.95)")
    a = _values(x)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    means = a[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(a.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def summary(x: Sequence[float], seed: int = 0) -> dict:
    """``{"mean", "ci": [lo, hi], "median", "n"}`` of finite values, bootstrap CI."""
    a = _values(x)
    a = a[np.isfinite(a)]
    mean, lo, hi = bootstrap_mean(a, seed=seed)
    return {"mean": mean, "ci": [lo, hi], "median": float(np.median(a)) if a.size else math.nan, "n": int(a.size)}


def rate(k: int, n: int) -> dict:
    """``{"k", "n", "rate", "ci"}`` with a Wilson interval."""
    lo, hi = wilson(k, n)
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else math.nan, "ci": [lo, hi]}
