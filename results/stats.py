"""Intervals and paired tests for comparing runs (DESIGN §6).

- Over seeds: the mean and a Student-t interval (``scipy.stats.t``).
- One seed: a bootstrap over the test items. Item correctness is a bit, so resampling items only redraws how many
  items fall in each category: the bootstrap distribution of an accuracy is Binomial(n, p)/n and that of a paired
  difference a Multinomial over the 2×2 (or, pooled over S seeds, (S+1)×(S+1)) table of per-item outcomes (tests
  compare both with ``scipy.stats.bootstrap``). An accuracy's interval is read off the binomial's quantiles
  (exact); a difference's off its exact moments where enough items differ (within the Monte Carlo error of
  10,000 resamples), else from drawn counts: no item is resampled, and a lab's leaderboard of thousands of
  single-seed rows takes milliseconds.
- Δ against the baseline, paired: by seed where both methods have the same seeds (a t-interval of the per-seed
  differences, ``scipy.stats.ttest_rel``'s test), and a paired bootstrap over the test items of the two runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0  # bootstrap intervals are reproducible: the same store prints the same table


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    method: str  # "t" (over seeds) or "bootstrap" (over test items)
    n: int  # seeds (t) or test items (bootstrap)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def t_interval(values, confidence: float = CONFIDENCE) -> Interval | None:
    """Mean and t-interval over seeds; None for fewer than two values (no spread to measure). Its moments are
    ``t_from_moments``' (scipy's ``t.interval`` of the mean and its standard error, without the per-call
    overhead of a report's thousands of comparisons)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    mean, std = values.mean(), values.std(ddof=1)
    if std == 0:
        return Interval(float(mean), float(mean), float(mean), "t", len(values))
    low, high = t_from_moments(len(values), mean, std, confidence)
    return Interval(float(mean), float(low), float(high), "t", len(values))


def t_from_moments(n: np.ndarray, mean: np.ndarray, std: np.ndarray, confidence: float = CONFIDENCE
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised t-interval bounds from (n, mean, sample std) per row: SQL aggregates, no per-row work. NaN for
    n < 2."""
    n = np.asarray(n, dtype=float)
    half = stats.t.ppf(0.5 + confidence / 2, np.where(n > 1, n - 1, np.nan)) * np.asarray(std) / np.sqrt(n)
    return mean - half, mean + half


def paired_by_seed(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE
                   ) -> tuple[Interval, float] | None:
    """Δ = a − b over the seeds both have: its t-interval and the paired t-test's two-sided p-value. None for fewer
    than two shared seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    differences = np.array([a[s] - b[s] for s in seeds])
    interval = t_interval(differences, confidence)
    std = differences.std(ddof=1)
    if std == 0:
        p = 0.0 if differences[0] != 0 else 1.0
    else:  # scipy.stats.ttest_rel's statistic and two-sided p-value
        p = float(2 * stats.t.sf(abs(differences.mean()) / (std / np.sqrt(len(seeds))), len(seeds) - 1))
    return interval, p


def _percentile(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def accuracy_intervals(hits: np.ndarray, n: np.ndarray, confidence: float = CONFIDENCE
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Each accuracy's percentile bootstrap interval over its test items, for many at once: resampling the items
    draws Binomial(n, hits/n)/n, so the interval's ends are that distribution's quantiles — the bootstrap's at
    infinitely many resamples, exact, with no Monte Carlo error."""
    tail, n = (1 - confidence) / 2, np.asarray(n, dtype=float)
    p = np.asarray(hits, dtype=float) / n
    return stats.binom.ppf(tail, n, p) / n, stats.binom.ppf(1 - tail, n, p) / n


def bootstrap_accuracy(correct: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """Percentile bootstrap over test items of one run's accuracy (``correct``: a bit per item)."""
    correct = np.asarray(correct, dtype=bool)
    n, hits = len(correct), int(correct.sum())
    low, high = accuracy_intervals(hits, n, confidence)
    return Interval(hits / n, float(low), float(high), "bootstrap", n)


def item_table(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per item, how many of A's and of B's seeds got it right (a: seeds × items bits, likewise b): the counts of
    each (i, j) outcome and the Δ each contributes, flattened."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.int64)), np.atleast_2d(np.asarray(b, dtype=np.int64))
    seeds_a, seeds_b = a.shape[0], b.shape[0]
    outcome = a.sum(0) * (seeds_b + 1) + b.sum(0)
    counts = np.bincount(outcome, minlength=(seeds_a + 1) * (seeds_b + 1))
    i, j = np.divmod(np.arange(len(counts)), seeds_b + 1)
    return counts, i / seeds_a - j / seeds_b


ONE_SEED_EACH = np.array([0.0, -1.0, 1.0, 0.0])  # the Δ of item outcomes (a, b) = 00, 01, 10, 11


def packed_item_table(a: bytes, b: bytes, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``item_table`` of one seed against one over ``count`` items, from the two runs' packed bits (``pack``):
    three popcounts of their bytes, no unpacking (a lab's leaderboard makes thousands of these on 50,000 items
    each). The last byte's padding bits are 0 on both sides, so they fall in no count but 00's, which is the rest."""
    a, b = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    both, only_a, only_b = (int(np.bitwise_count(x).sum()) for x in (a & b, a & ~b, ~a & b))
    return np.array([count - both - only_a - only_b, only_b, only_a, both]), ONE_SEED_EACH


MOMENTS_FROM = 50  # discordant items from which a paired bootstrap is read off its exact moments


def paired_from_tables(tables: list[tuple[np.ndarray, np.ndarray]], confidence: float = CONFIDENCE,
                       resamples: int = RESAMPLES, seed: int = SEED) -> list[tuple[Interval, float]]:
    """For each item table (``item_table``): Δ of mean accuracy with its percentile bootstrap interval over the
    items and the two-sided bootstrap p-value (twice the smaller tail mass beyond zero). Resampling the items
    draws the table's counts from a multinomial, so Δ* is a sum of them: with at least MOMENTS_FROM discordant
    items its interval and p are those of the normal distribution of Δ*'s exact mean and variance (10,000
    resamples land within their own Monte Carlo error of it: tests/test_stats.py), for thousands of tables at
    once; with fewer, the counts are drawn."""
    n = np.array([counts.sum() for counts, _ in tables], dtype=float)
    first = np.array([float(counts @ delta) for counts, delta in tables]) / n
    second = np.array([float(counts @ delta**2) for counts, delta in tables]) / n
    discordant = np.array([counts[delta != 0].sum() for counts, delta in tables])
    sd = np.sqrt(np.maximum(second - first**2, 0.0) / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = stats.norm.interval(confidence, first, sd)
        p = np.where(sd > 0, 2 * stats.norm.sf(np.abs(first) / sd), (first == 0).astype(float))
    found = []
    for k, (counts, delta) in enumerate(tables):
        if discordant[k] >= MOMENTS_FROM:
            found.append((Interval(float(first[k]), float(low[k]), float(high[k]), "bootstrap", int(n[k])),
                          float(min(1.0, p[k]))))
            continue
        draws = np.random.default_rng(seed).multinomial(int(n[k]), counts / n[k], size=resamples) @ delta / n[k]
        tail = min(np.mean(draws <= 0), np.mean(draws >= 0))
        found.append((Interval(float(first[k]), *_percentile(draws, confidence), "bootstrap", int(n[k])),
                      float(min(1.0, 2 * tail))))
    return found


def paired_bootstrap(a: np.ndarray, b: np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                     seed: int = SEED) -> tuple[Interval, float]:
    """Δ of mean accuracy (A − B, each averaged over its seeds) over the test items the runs share, with its
    bootstrap interval and p-value (``paired_from_tables``)."""
    return paired_from_tables([item_table(a, b)], confidence, resamples, seed)[0]


def paired_t_power(difference: float, differences_sd: float, seeds: int, confidence: float = CONFIDENCE) -> float:
    """The exact power of a two-sided paired t-test over ``seeds`` seeds against a true mean difference: the
    statistic is noncentral t with seeds − 1 degrees of freedom and noncentrality Δ·√seeds / sd."""
    degrees = seeds - 1
    critical = stats.t.ppf(0.5 + confidence / 2, degrees)
    shift = difference * np.sqrt(seeds) / differences_sd
    wrong_side = stats.nct.cdf(-critical, degrees, shift)  # ~0 for Δ > 0; scipy returns nan far out in that tail
    return float(stats.nct.sf(critical, degrees, shift) + np.nan_to_num(wrong_side, nan=0.0))


def minimum_detectable(differences_sd: float, seeds: int, confidence: float = CONFIDENCE, power: float = 0.8) -> float:
    """The smallest true paired Δ that a two-sided paired t-test over ``seeds`` seeds detects with ``power``,
    given the standard deviation of per-seed differences: solved on the exact (noncentral t) power. The usual
    shortcut (t_{1-α/2} + t_{power}) · sd / √n falls short of the power asked: 0.77 at 3 seeds, 0.78 at 4."""
    from scipy.optimize import brentq

    degrees = seeds - 1
    upper = (stats.t.ppf(0.5 + confidence / 2, degrees) + stats.t.ppf(power, degrees)) * differences_sd / np.sqrt(seeds)
    while paired_t_power(upper, differences_sd, seeds, confidence) < power:  # the shortcut is an underestimate
        upper *= 1.2
    return float(brentq(lambda d: paired_t_power(d, differences_sd, seeds, confidence) - power, 0.0, upper,
                        xtol=1e-12 * differences_sd))


def correlation(x, y, confidence: float = CONFIDENCE) -> tuple[Interval, float] | None:
    """Pearson's r with its interval (Fisher's z, ``scipy.stats.pearsonr``) and p-value; None below 3 points or
    when either side does not vary."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    result = stats.pearsonr(x, y)
    interval = result.confidence_interval(confidence)
    return Interval(float(result.statistic), float(interval.low), float(interval.high), "Fisher z", len(x)), float(
        result.pvalue)
