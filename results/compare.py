"""Intervals and paired tests on the store's numbers (results/stats.py), vectorised over a leaderboard's rows.

Input: one row per (run, benchmark, metric) with the run's group keys and seed; a group is a setting, teacher,
method, benchmark and metric across seeds. Output per group: the seeds, the mean and its 95 % interval (t over
seeds; for a single seed a bootstrap over the test items where the store has them), and against the no-KD
baseline of the same setting and benchmark the Δ with its interval and p-value: paired by seed where at least
two seeds are shared (a paired t-test), else a paired bootstrap over the test items of the two runs; where items
exist, the item bootstrap is also reported beside the seed-paired one.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from results import stats
from results.store import Store

GROUP = ["setting_id", "teacher", "method", "benchmark", "metric"]  # a setting fixes the student and the data
PAIRED = ["setting_id", "benchmark", "metric"]  # a method and its baseline share these
SIGNIFICANCE = 0.05


def summarize(per_seed: pd.DataFrame, store: Store | None = None, confidence: float = stats.CONFIDENCE) -> pd.DataFrame:
    """Per group: seeds, mean, low, high, interval; delta, delta_low, delta_high, p, test, significant; and the
    item bootstrap of the delta (delta_items_low/high, p_items) where both sides have per-item results."""
    columns = ["setting_id", "teacher", "student", "dataset", "method", "benchmark", "metric"]
    if per_seed.empty:
        return pd.DataFrame(columns=[*columns, "seeds", "mean", "low", "high", "delta", "p"])
    frame = per_seed.assign(teacher=per_seed["teacher"].fillna("-"))
    row = frame.groupby(GROUP, sort=False).ngroup().to_numpy()
    values = frame["value"].to_numpy(dtype=float)
    table = frame.drop_duplicates(GROUP)[columns].reset_index(drop=True)
    seed_column, seed_ids = pd.factorize(frame["seed"])
    by_seed = np.full((len(table), len(seed_ids)), np.nan)
    by_seed[row, seed_column] = values
    counts = np.bincount(row, minlength=len(table))
    table["seeds"] = counts
    table["mean"] = np.bincount(row, weights=values, minlength=len(table)) / counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one seed: no spread
        std = np.nanstd(by_seed, axis=1, ddof=1)
    table["low"], table["high"] = stats.t_from_moments(counts, table["mean"].to_numpy(), std, confidence)
    table["interval"] = np.where(counts > 1, "t over seeds", "")
    _delta_by_seed(table, by_seed, confidence)
    for column in ("delta_items_low", "delta_items_high", "p_items"):
        table[column] = np.nan
    if store is not None:
        _item_intervals(table, frame.assign(row=row), store, confidence)
    table["significant"] = table["p"] < SIGNIFICANCE
    return table


def _baseline_rows(table: pd.DataFrame) -> np.ndarray:
    """For each row, the index of its setting's baseline row on the same benchmark and metric (or -1)."""
    baselines = table[table["method"] == "baseline"].reset_index().set_index(PAIRED)["index"]
    keys = pd.MultiIndex.from_frame(table[PAIRED])
    return baselines.reindex(keys).fillna(-1).astype(int).to_numpy()


def _delta_by_seed(table: pd.DataFrame, by_seed: np.ndarray, confidence: float) -> None:
    """Δ against the baseline; where two seeds or more are shared, its paired t-interval and p-value (the paired
    t-test of scipy.stats.ttest_rel, on the per-seed differences), for every row at once."""
    base = _baseline_rows(table)
    has_base = (base >= 0) & (table["method"] != "baseline").to_numpy()
    means = table["mean"].to_numpy()
    table["delta"] = np.where(base >= 0, means - means[base], np.nan)
    differences = by_seed - np.where((base >= 0)[:, None], by_seed[base], np.nan)
    shared = (~np.isnan(differences)).sum(axis=1)
    paired = has_base & (shared >= 2)
    masked = np.where(paired[:, None], differences, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with no shared seed: all-NaN, masked below
        mean = np.nanmean(masked, axis=1)
        sd = np.nanstd(masked, axis=1, ddof=1)
        sem = sd / np.sqrt(shared)
        degrees = np.where(paired, shared - 1, np.nan)
        half = scipy_stats.t.ppf(0.5 + confidence / 2, degrees) * sem
        p = np.where(sd > 0, 2 * scipy_stats.t.sf(np.abs(mean) / sem, degrees), np.where(mean == 0, 1.0, 0.0))
    table["delta"] = np.where(paired, mean, table["delta"])
    table["delta_low"] = np.where(paired, mean - half, np.nan)
    table["delta_high"] = np.where(paired, mean + half, np.nan)
    table["p"] = np.where(paired, p, np.nan)
    table["test"] = np.where(paired, pd.Series(shared).map("paired t over {} seeds".format), "")


def _item_intervals(table: pd.DataFrame, frame: pd.DataFrame, store: Store, confidence: float) -> None:
    """Bootstrap intervals over test items where every run of a row has them: a single seed's mean, and every Δ
    whose two sides have items."""
    with_items = store.runs_with_items(set(frame["benchmark"]), set(frame["metric"]))
    frame = frame[frame["run_id"].isin(with_items)]
    if frame.empty:
        return
    runs_of = frame.groupby("row")["run_id"].agg(list)
    complete = {i for i, runs in runs_of.items() if len(runs) == table.at[i, "seeds"]}  # every seed has items
    base = _baseline_rows(table)
    for (benchmark, metric), rows in table.loc[sorted(complete)].groupby(["benchmark", "metric"]).groups.items():
        found = store.items({r for i in rows for r in runs_of[i]}, benchmark, metric)
        bits = {i: [found[r] for r in runs_of[i]] for i in rows if all(r in found for r in runs_of[i])}
        for i, mine in bits.items():
            if len(mine) == 1:
                interval = stats.bootstrap_accuracy(mine[0], confidence)
                table.loc[i, ["low", "high", "interval"]] = interval.low, interval.high, "bootstrap over items"
            theirs = bits.get(base[i])
            if theirs is None or table.at[i, "method"] == "baseline" or len({len(x) for x in mine + theirs}) != 1:
                continue
            delta, p = stats.paired_bootstrap(np.stack(mine), np.stack(theirs), confidence)
            table.loc[i, ["delta_items_low", "delta_items_high", "p_items"]] = delta.low, delta.high, p
            if not table.at[i, "test"]:  # no seeds to pair: the items are the comparison
                table.loc[i, ["delta", "delta_low", "delta_high", "p", "test"]] = (
                    delta.estimate, delta.low, delta.high, p, f"paired bootstrap over {delta.n} items")
