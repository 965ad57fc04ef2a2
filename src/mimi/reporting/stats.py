"""Statistics over seeds for the benchmark report: mean with its standard error, a paired bootstrap interval,
and a two-stage (tasks, then seeds within a task) bootstrap interval for when the pairs are not independent.

Numpy only, so the report does not pull in scipy for two formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MeanSE:
    """The mean of some values and its standard error.

    Attributes:
        mean: The arithmetic mean.
        se: Sample standard deviation (ddof=1) over sqrt(n); None with a single value, where it is undefined.
        n: The number of values.
    """

    mean: float
    se: float | None
    n: int


@dataclass(frozen=True)
class PairedDiff:
    """The mean of paired differences with a percentile bootstrap interval of that mean.

    Attributes:
        mean: Mean of the differences.
        low: Lower end of the interval.
        high: Upper end of the interval.
        n: The number of pairs.
    """

    mean: float
    low: float
    high: float
    n: int

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies inside the interval (ends included)."""
        return self.low <= value <= self.high


def _as_array(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    return arr


def mean_se(values: Sequence[float]) -> MeanSE:
    """Mean and standard error of the mean.

    Args:
        values: One or more numbers (e.g. one test accuracy per seed).

    Returns:
        The mean, ``std(ddof=1) / sqrt(n)`` (None when n == 1) and n.

    Raises:
        ValueError: If ``values`` is empty.
    """
    arr = _as_array(values)
    se = float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else None
    return MeanSE(float(arr.mean()), se, int(arr.size))


def bootstrap_mean_interval(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the values with replacement, take the quantiles.

    Memory is ``resamples * len(values)`` floats, small for the tens of pairs of a benchmark.

    Args:
        values: One or more numbers (e.g. paired differences).
        confidence: Coverage of the interval, in (0, 1).
        resamples: Number of bootstrap resamples.
        seed: Seed of the numpy generator, fixed so that the same values always give the same interval.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: If ``values`` is empty or ``confidence`` is not in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arr = _as_array(values)
    idx = np.random.default_rng(seed).integers(0, arr.size, size=(resamples, arr.size))
    means = arr[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    # Any resample's mean lies within [min, max]; clipping only removes rounding noise, so identical
    # values give exactly their value as the interval.
    lo, hi = np.clip([low, high], arr.min(), arr.max())
    return float(lo), float(hi)


def clustered_bootstrap_interval(
    groups: Sequence[Sequence[float]], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Two-stage percentile bootstrap interval of the mean of all values: resample the groups with replacement,
    then each drawn group's own values with replacement, and take the quantiles of the pooled means.

    Values in one group (the seeds of one task) share that group's effect, so resampling them as if independent
    understates the uncertainty about a new group (another task). With one value per group this is the plain
    bootstrap of ``bootstrap_mean_interval``; with a single group it is the plain bootstrap of that group.

    Args:
        groups: One or more non-empty groups of numbers (e.g. one task's paired differences over seeds).
        confidence: Coverage of the interval, in (0, 1).
        resamples: Number of bootstrap resamples.
        seed: Seed of the numpy generator (fixed: the same groups always give the same interval).

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: If there are no groups, a group is empty, or ``confidence`` is not in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arrays = [_as_array(g) for g in groups]
    if not arrays:
        raise ValueError("expected one or more groups, got none")
    sizes = np.array([a.size for a in arrays])
    table = np.zeros((len(arrays), sizes.max()))  # groups padded to the longest; the padding is never drawn
    for i, a in enumerate(arrays):
        table[i, : a.size] = a
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, len(arrays), size=(resamples, len(arrays)))  # stage 1: which groups
    n = sizes[picked]  # (resamples, groups): each drawn group's size
    # stage 2: as many draws from each drawn group as it has values; slots past its size are masked off
    slot = np.arange(sizes.max())
    draws = (rng.random((resamples, len(arrays), sizes.max())) * n[..., None]).astype(np.int64)
    used = slot < n[..., None]
    values = table[picked[..., None], draws] * used
    means = values.sum(axis=(1, 2)) / used.sum(axis=(1, 2))
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    everything = np.concatenate(arrays)
    lo, hi = np.clip([low, high], everything.min(), everything.max())  # rounding noise only, as above
    return float(lo), float(hi)


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> PairedDiff:
    """Mean of ``a - b`` over pairs, with a percentile bootstrap interval that resamples the pairs.

    Args:
        a: First value of each pair.
        b: Second value of each pair, in the same order.
        confidence: Coverage of the interval, in (0, 1).
        resamples: Number of bootstrap resamples.
        seed: Seed of the numpy generator (fixed: the same pairs always give the same interval).

    Returns:
        The mean difference, its interval and the number of pairs.

    Raises:
        ValueError: If ``a`` and ``b`` differ in length or are empty.
    """
    arr_a, arr_b = _as_array(a), _as_array(b)
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"paired values differ in length: {arr_a.size} vs {arr_b.size}")
    diffs = arr_a - arr_b
    low, high = bootstrap_mean_interval(diffs, confidence=confidence, resamples=resamples, seed=seed)
    return PairedDiff(float(diffs.mean()), low, high, int(diffs.size))
