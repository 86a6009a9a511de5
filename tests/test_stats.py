"""The statistics behind every compared number, against scipy on fixed inputs, and as the leaderboard uses them."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from results import stats
from results.compare import summarize
from results.store import Store

SEEDS_A = {0: 0.612, 1: 0.598, 2: 0.631, 3: 0.605}
SEEDS_B = {0: 0.581, 1: 0.577, 2: 0.602, 4: 0.55}  # seed 4 has no partner in A


def test_t_interval_equals_scipys():
    values = np.array(list(SEEDS_A.values()))
    interval = stats.t_interval(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy_stats.sem(values))
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((values.mean(), low, high), rel=1e-12)
    assert stats.t_interval([0.5]) is None
    n, mean, std = np.array([4, 1]), np.array([values.mean(), 0.5]), np.array([values.std(ddof=1), np.nan])
    vector_low, vector_high = stats.t_from_moments(n, mean, std)
    assert (vector_low[0], vector_high[0]) == pytest.approx((low, high), rel=1e-12) and np.isnan(vector_low[1])


def test_paired_by_seed_equals_scipys_paired_t_test():
    interval, p = stats.paired_by_seed(SEEDS_A, SEEDS_B)
    shared = [0, 1, 2]
    expected = scipy_stats.ttest_rel([SEEDS_A[s] for s in shared], [SEEDS_B[s] for s in shared])
    assert p == pytest.approx(expected.pvalue, rel=1e-12)
    low, high = expected.confidence_interval(0.95)
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12) and interval.n == 3
    assert stats.paired_by_seed({0: 0.5}, {0: 0.4}) is None


def test_bootstrap_over_items_has_scipys_bootstrap_distribution():
    """Drawing category counts is resampling the items: the percentile intervals agree with scipy's bootstrap
    within their Monte Carlo error."""
    rng = np.random.default_rng(3)
    correct = rng.random(2000) < 0.62
    ours = stats.bootstrap_accuracy(correct, resamples=20_000)
    theirs = scipy_stats.bootstrap((correct.astype(float),), np.mean, n_resamples=20_000, method="percentile",
                                   random_state=np.random.default_rng(1), vectorized=True).confidence_interval
    assert ours.estimate == correct.mean() and ours.n == 2000
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), abs=0.004)

    a = rng.random((3, 2000)) < 0.64  # three seeds of a method, item by item
    b = a.copy()
    flip = rng.random((3, 2000)) < 0.1
    b[flip] = ~b[flip]  # a baseline that agrees with it on most items
    interval, p = stats.paired_bootstrap(a, b, resamples=20_000)
    paired = scipy_stats.bootstrap((a.mean(0).astype(float), b.mean(0).astype(float)),
                                   lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True, vectorized=True,
                                   n_resamples=20_000, method="percentile",
                                   random_state=np.random.default_rng(2)).confidence_interval
    assert interval.estimate == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert (interval.low, interval.high) == pytest.approx((paired.low, paired.high), abs=0.003)
    assert 0 <= p <= 1


def test_correlation_interval_is_scipys():
    x, y = np.array([0.1, 0.3, 0.35, 0.6, 0.8, 0.9]), np.array([50.0, 55.0, 53.0, 60.0, 64.0, 63.0])
    interval, p = stats.correlation(x, y)
    expected = scipy_stats.pearsonr(x, y)
    assert interval.estimate == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    low, high = expected.confidence_interval(0.95)
    assert (interval.low, interval.high) == pytest.approx((low, high))
    assert stats.correlation([1, 2], [3, 4]) is None


def test_minimum_detectable_difference():
    sd, n = 0.8, 3  # points of top-1 between paired seeds
    expected = (scipy_stats.t.ppf(0.975, 2) + scipy_stats.t.ppf(0.8, 2)) * sd / np.sqrt(3)
    assert stats.minimum_detectable(sd, n) == pytest.approx(expected)


def test_bits_pack_and_unpack():
    bits = np.random.default_rng(0).random(1001) < 0.5
    assert np.array_equal(stats.unpack(stats.pack(bits), 1001), bits) and len(stats.pack(bits)) == 126


def _rows(method, teacher, values, runs=None):
    return [{"setting_id": "s", "teacher": teacher, "student": "S", "dataset": "d", "method": method,
             "benchmark": "b", "metric": "acc1", "seed": seed, "run_id": (runs or {}).get(seed, f"{method}{seed}"),
             "value": value} for seed, value in values.items()]


def test_summarize_pairs_by_seed_and_falls_back_to_items(tmp_path):
    per_seed = pd.DataFrame(_rows("baseline", None, SEEDS_B) + _rows("kd", "T", SEEDS_A)
                            + _rows("one", "T", {0: 0.7}))
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    rng = np.random.default_rng(5)
    items = {}
    for run_id, accuracy in [("baseline0", 0.58), ("baseline1", 0.58), ("baseline2", 0.6), ("baseline4", 0.55),
                             ("one0", 0.7)]:
        items[run_id] = rng.random(1000) < accuracy
        store.put_run({"id": run_id, "setting_id": "s", "name": run_id, "student": "S", "method": "x", "terms": "{}",
                       "dataset": "d", "seed": 0, "status": "done", "config": "{}"}, items={"b": {"acc1": items[run_id]}})
    table = summarize(per_seed, store).set_index("method")
    kd = table.loc["kd"]
    interval, p = stats.paired_by_seed(SEEDS_A, SEEDS_B)
    assert kd["seeds"] == 4 and kd["test"] == "paired t over 3 seeds"
    assert (kd["delta"], kd["delta_low"], kd["delta_high"], kd["p"]) == pytest.approx(
        (interval.estimate, interval.low, interval.high, p))
    assert kd["significant"] == (p < 0.05) and np.isnan(kd["delta_items_low"])  # kd's runs have no items
    one = table.loc["one"]  # a single seed: bootstrap over items for its interval and for its Δ
    assert one["interval"] == "bootstrap over items"
    expected = stats.bootstrap_accuracy(items["one0"])
    assert (one["low"], one["high"]) == pytest.approx((expected.low, expected.high))
    baseline_bits = np.stack([items[f"baseline{s}"] for s in SEEDS_B])
    delta, p_items = stats.paired_bootstrap(items["one0"][None], baseline_bits)
    assert one["test"] == "paired bootstrap over 1000 items"
    assert (one["delta"], one["delta_low"], one["delta_high"], one["p"]) == pytest.approx(
        (delta.estimate, delta.low, delta.high, p_items))
    baseline = table.loc["baseline"]
    low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(list(SEEDS_B.values())),
                                       scale=scipy_stats.sem(list(SEEDS_B.values())))
    assert (baseline["low"], baseline["high"]) == pytest.approx((low, high))
