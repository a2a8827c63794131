"""Small statistics shared by the benchmarks and the measuring tests."""

from __future__ import annotations


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile of values, interpolated between the closest ranks."""
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)
