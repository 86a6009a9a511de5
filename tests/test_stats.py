"""The statistics behind every compared number, against scipy on fixed inputs, and as the leaderboard uses them."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from results import stats
from results.bits import pack, unpack
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


def percentile_tolerance(resamples: int, spread: float, lattice: float, confidence: float = 0.95) -> float:
    """How far two independent percentile bootstraps' interval ends may differ by Monte Carlo error alone: four
    standard errors of the difference of two estimates of the tail quantile (a quantile's error is
    √(q(1−q)/R) / f(x_q), with f normal of sd ``spread``), plus the lattice step the draws land on."""
    tail = (1 - confidence) / 2
    density = scipy_stats.norm.pdf(scipy_stats.norm.ppf(tail)) / spread
    return 4 * np.sqrt(2) * np.sqrt(tail * (1 - tail) / resamples) / density + lattice


def assert_is_the_95_percent_interval(ours, theirs, resamples: int, spread: float, lattice: float) -> None:
    tolerance = percentile_tolerance(resamples, spread, lattice)
    ninety = (scipy_stats.norm.ppf(0.975) - scipy_stats.norm.ppf(0.95)) * spread  # how far a 90 % end lies
    assert tolerance < ninety / 2  # the check tells a 95 % interval from a 90 % one
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), abs=tolerance)


def test_bootstrap_over_items_has_scipys_bootstrap_distribution():
    """Resampling the items draws the binomial of their hits: the interval read off its quantiles (the bootstrap's
    at infinitely many resamples) agrees with scipy's percentile bootstrap within scipy's Monte Carlo error, which
    is smaller than the distance to a 90 % interval."""
    rng, resamples = np.random.default_rng(3), 20_000
    correct = rng.random(2000) < 0.62
    ours = stats.bootstrap_accuracy(correct)
    theirs = scipy_stats.bootstrap((correct.astype(float),), np.mean, n_resamples=resamples, method="percentile",
                                   random_state=np.random.default_rng(1), vectorized=True)
    assert ours.estimate == correct.mean() and ours.n == 2000
    assert_is_the_95_percent_interval(ours, theirs.confidence_interval, resamples,
                                      spread=theirs.bootstrap_distribution.std(), lattice=1 / 2000)
    with pytest.raises(AssertionError):  # a 90 % interval does not pass for one
        assert_is_the_95_percent_interval(stats.bootstrap_accuracy(correct, 0.90), theirs.confidence_interval,
                                          resamples, theirs.bootstrap_distribution.std(), 1 / 2000)


def _paired_bits(rng, flip: float, seeds: int = 3, items: int = 2000):
    a = rng.random((seeds, items)) < 0.64  # seeds of a method, item by item
    b = a.copy()
    flipped = rng.random((seeds, items)) < flip
    b[flipped] = ~b[flipped]  # a baseline that agrees with it on most items
    return a, b


def _scipys_paired(a, b, resamples: int, seed: int):
    return scipy_stats.bootstrap((a.mean(0).astype(float), b.mean(0).astype(float)),
                                 lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True, vectorized=True,
                                 n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed),
                                 batch=10_000)


def test_paired_bootstrap_has_scipys_interval_and_p_value():
    """Its interval as scipy's paired bootstrap's; its p-value (twice the smaller tail mass beyond zero, which
    puts the * on single-seed rows) as the same computed on scipy's bootstrap distribution, within the Monte Carlo
    error of a proportion; on a clear difference and on one near the 5 % line."""
    rng, resamples = np.random.default_rng(3), 50_000
    for flip, p_range in ((0.1, (0, 0.001)), (0.02, (0.005, 0.5))):
        a, b = _paired_bits(rng, flip)
        if flip == 0.02:  # items where b is right and a wrong, to bring Δ near zero
            b[:, :40] = True
        interval, p = stats.paired_bootstrap(a, b, resamples=resamples)
        theirs = _scipys_paired(a, b, resamples, seed=2)
        assert interval.estimate == pytest.approx(a.mean() - b.mean(), abs=1e-12)
        assert_is_the_95_percent_interval(interval, theirs.confidence_interval, resamples,
                                          spread=theirs.bootstrap_distribution.std(), lattice=1 / (3 * 2000))
        draws = theirs.bootstrap_distribution
        their_p = min(1.0, 2 * min(np.mean(draws <= 0), np.mean(draws >= 0)))
        assert p_range[0] <= their_p <= p_range[1]
        error = 4 * 2 * np.sqrt(2 * max(their_p / 2, 1 / resamples) / resamples)
        assert p == pytest.approx(their_p, abs=error)


def test_a_paired_bootstrap_read_off_its_moments_is_the_drawn_one_within_monte_carlo_error():
    """Where enough items differ, a paired Δ's interval and p-value come from the exact mean and variance of the
    bootstrap's multinomial: at ImageNet's 50,000 items and at 10,000 with 250 and 300 discordant items, within the
    Monte Carlo error of 10,000 drawn resamples (20 repetitions give that error); a table with fewer discordant
    items than MOMENTS_FROM is drawn."""
    for n, only_b, only_a in ((50_000, 2500, 3000), (10_000, 250, 300)):
        counts, delta = np.array([n - only_a - only_b - n // 2, only_b, only_a, n // 2]), stats.ONE_SEED_EACH
        (read, p), = stats.paired_from_tables([(counts, delta)])
        draws = [np.random.default_rng(seed).multinomial(n, counts / n, size=10_000) @ delta / n for seed in range(20)]
        ends = np.array([np.quantile(d, [0.025, 0.975]) for d in draws])
        assert np.all(np.abs([read.low, read.high] - ends.mean(0)) <= 3 * ends.std(0) + 1 / n)
        assert read.estimate == (only_a - only_b) / n and p == pytest.approx(
            np.mean([min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))) for d in draws]), abs=0.01)
    few = np.array([900, 20, 25, 55])
    (drawn, _), = stats.paired_from_tables([(few, stats.ONE_SEED_EACH)])
    expected = np.quantile(np.random.default_rng(stats.SEED).multinomial(1000, few / 1000, size=stats.RESAMPLES)
                           @ stats.ONE_SEED_EACH / 1000, [0.025, 0.975])
    assert (drawn.low, drawn.high) == pytest.approx(tuple(expected))


def test_one_seed_against_one_is_tabled_from_packed_bits_as_from_bits():
    rng = np.random.default_rng(0)
    a, b = rng.random(1003) < 0.6, rng.random(1003) < 0.5  # 1003 items: the last byte is padded
    packed = stats.packed_item_table(pack(a), pack(b), 1003)
    counts, delta = stats.item_table(a, b)
    assert packed[0].tolist() == counts.tolist() and packed[1].tolist() == delta.tolist()


def test_correlation_interval_is_fishers():
    x, y = np.array([0.1, 0.3, 0.35, 0.6, 0.8, 0.9]), np.array([50.0, 55.0, 53.0, 60.0, 64.0, 63.0])
    interval, p = stats.correlation(x, y)
    r = np.sum((x - x.mean()) * (y - y.mean())) / np.sqrt(np.sum((x - x.mean()) ** 2) * np.sum((y - y.mean()) ** 2))
    z, half = np.arctanh(r), 1.959963984540054 / np.sqrt(len(x) - 3)  # Fisher: z ~ N(atanh ρ, 1/(n−3))
    assert interval.estimate == pytest.approx(r, rel=1e-12)
    assert (interval.low, interval.high) == pytest.approx((np.tanh(z - half), np.tanh(z + half)), rel=1e-9)
    t = r * np.sqrt((len(x) - 2) / (1 - r**2))  # the test of ρ = 0: t with n − 2 degrees of freedom
    assert p == pytest.approx(2 * scipy_stats.t.sf(abs(t), len(x) - 2), rel=1e-9)
    assert stats.correlation([1, 2], [3, 4]) is None


@pytest.mark.parametrize("seeds", [3, 4, 8])
def test_minimum_detectable_difference_has_80_percent_power(seeds):
    """Checked by simulation: paired t-tests of normal per-seed differences with that true mean reject at 5 %
    in 80 % of trials (within four Monte Carlo standard errors), where the t-shortcut's Δ has 77-79 %."""
    sd, trials = 0.8, 40_000
    delta = stats.minimum_detectable(sd, seeds)
    rng = np.random.default_rng(seeds)
    differences = rng.normal(delta, sd, size=(trials, seeds))
    t = differences.mean(1) / (differences.std(1, ddof=1) / np.sqrt(seeds))
    power = np.mean(np.abs(t) > scipy_stats.t.ppf(0.975, seeds - 1))
    assert power == pytest.approx(0.8, abs=4 * np.sqrt(0.8 * 0.2 / trials))
    assert stats.paired_t_power(delta, sd, seeds) == pytest.approx(0.8, abs=1e-9)


def test_bits_pack_and_unpack():
    bits = np.random.default_rng(0).random(1001) < 0.5
    assert np.array_equal(unpack(pack(bits), 1001), bits) and len(pack(bits)) == 126


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
