"""Intervals and paired tests on the store's numbers (results/stats.py), vectorised over a leaderboard's rows.

Input: one row per (run, benchmark, metric) with the run's group keys and seed; a group is a setting, teacher,
method, benchmark and metric across seeds. Output per group: the seeds, the mean and its 95 % interval (t over
seeds; for a single seed a bootstrap over the test items where the store has them), and against the no-KD
baseline of the same setting and benchmark the Δ with its interval and p-value: paired by seed where at least
two seeds are shared (a paired t-test), else a paired bootstrap over the test items of the two runs; where items
exist, the item bootstrap is also reported beside the seed-paired one.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from results import stats
from results.bits import unpack
from results.store import Store

GROUP = ["setting_id", "teacher", "method", "benchmark", "metric"]  # a setting fixes the student and the data
COLUMNS = ["setting_id", "teacher", "student", "dataset", "method", "benchmark", "metric"]
PAIRED = ["setting_id", "benchmark", "metric"]  # a method and its baseline share these
SIGNIFICANCE = 0.05


def summarize(per_seed: pd.DataFrame, store: Store | None = None, confidence: float = stats.CONFIDENCE,
              item_deltas: set[str] | None = None) -> pd.DataFrame:
    """Per group: seeds, mean, low, high, interval; delta, delta_low, delta_high, p, test, significant; and the
    item bootstrap of the delta (delta_items_low/high, p_items) where both sides have per-item results (for
    every metric, or those in ``item_deltas`` where seeds are also paired). Group keys may be text or
    categoricals (queries.per_seed's); every statistic is computed on integer codes, for all groups at once."""
    if per_seed.empty:
        return pd.DataFrame(columns=[*COLUMNS, "seeds", "mean", "low", "high", "delta", "p"])
    teacher = per_seed["teacher"]
    if isinstance(teacher.dtype, pd.CategoricalDtype) and "-" not in teacher.cat.categories:
        teacher = teacher.cat.add_categories(["-"])
    frame = per_seed.assign(teacher=teacher.fillna("-")).reset_index(drop=True)
    row = frame.groupby(GROUP, sort=False, observed=True).ngroup().to_numpy()
    values = frame["value"].to_numpy(dtype=float)
    _, first = np.unique(row, return_index=True)
    table = frame.iloc[first][COLUMNS].reset_index(drop=True)
    for name in table.columns[table.dtypes == "category"]:  # shown as text
        table[name] = table[name].astype(str)
    counts = np.bincount(row, minlength=len(table))
    means = np.bincount(row, weights=values, minlength=len(table)) / counts
    table["seeds"], table["mean"] = counts, means
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.bincount(row, weights=(values - means[row]) ** 2, minlength=len(table)) / (counts - 1))
    table["low"], table["high"] = stats.t_from_moments(counts, means, std, confidence)
    table["interval"] = np.where(counts > 1, "t over seeds", "")
    _delta_by_seed(table, frame, row, values, confidence)
    for column in ("delta_items_low", "delta_items_high", "p_items"):
        table[column] = np.nan
    if store is not None:
        _item_intervals(table, frame.assign(row=row), store, confidence, item_deltas)
    table["significant"] = table["p"] < SIGNIFICANCE
    return table


def _baseline_rows(table: pd.DataFrame) -> np.ndarray:
    """For each row, the index of its setting's baseline row on the same benchmark and metric (or -1)."""
    baselines = table[table["method"] == "baseline"].reset_index().set_index(PAIRED)["index"]
    keys = pd.MultiIndex.from_frame(table[PAIRED])
    return baselines.reindex(keys).fillna(-1).astype(int).to_numpy()


def _delta_by_seed(table: pd.DataFrame, frame: pd.DataFrame, row: np.ndarray, values: np.ndarray,
                   confidence: float) -> None:
    """Δ against the baseline; where two seeds or more are shared, its paired t-interval and p-value (the paired
    t-test of scipy.stats.ttest_rel, on the per-seed differences), for every row at once."""
    base = _baseline_rows(table)
    means = table["mean"].to_numpy(dtype=float)
    table["delta"] = np.where(base >= 0, means - means[base], np.nan)
    # each value's baseline partner: the baseline's value of the same setting, benchmark, metric and seed
    partner = frame.groupby([*PAIRED, "seed"], sort=False, observed=True).ngroup().to_numpy()
    is_base = (frame["method"] == "baseline").to_numpy()
    baseline_value = np.full(partner.max() + 1, np.nan)
    baseline_value[partner[is_base]] = values[is_base]
    difference = values - baseline_value[partner]
    has = ~is_base & ~np.isnan(difference)
    shared = np.bincount(row[has], minlength=len(table))
    paired = (base >= 0) & (table["method"] != "baseline").to_numpy() & (shared >= 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(row[has], weights=difference[has], minlength=len(table)) / shared
        sd = np.sqrt(np.bincount(row[has], weights=(difference[has] - mean[row[has]]) ** 2, minlength=len(table))
                     / (shared - 1))
        sem = sd / np.sqrt(shared)
        degrees = np.where(paired, shared - 1, np.nan)
        half = scipy_stats.t.ppf(0.5 + confidence / 2, degrees) * sem
        p = np.where(sd > 0, 2 * scipy_stats.t.sf(np.abs(mean) / sem, degrees), np.where(mean == 0, 1.0, 0.0))
    table["delta"] = np.where(paired, mean, table["delta"])
    table["delta_low"] = np.where(paired, mean - half, np.nan)
    table["delta_high"] = np.where(paired, mean + half, np.nan)
    table["p"] = np.where(paired, p, np.nan)
    labels = np.array([f"paired t over {n} seeds" for n in range(shared.max(initial=0) + 1)], dtype=object)
    table["test"] = np.where(paired, labels[shared], "")


def _item_intervals(table: pd.DataFrame, frame: pd.DataFrame, store: Store, confidence: float,
                    item_deltas: set[str] | None) -> None:
    """Bootstrap intervals over test items where every run of a row has them: a single seed's mean, and every Δ
    whose two sides have items (where seeds are paired too, only for the metrics in ``item_deltas``). Bits are read
    packed; a single seed against a single seed is compared on them by popcounts, without unpacking."""
    with_items = store.runs_with_items(frame["benchmark"].unique().tolist(), frame["metric"].unique().tolist())
    frame = frame[frame["run_id"].isin(with_items)]
    if frame.empty:
        return
    order = np.argsort(frame["row"].to_numpy(), kind="stable")
    rows, starts = np.unique(frame["row"].to_numpy()[order], return_index=True)
    runs_of = dict(zip(rows.tolist(), np.split(frame["run_id"].to_numpy()[order], starts[1:])))
    seeds, methods, metrics = (table[column].to_numpy() for column in ("seeds", "method", "metric"))
    complete = {i for i, ids in runs_of.items() if len(ids) == seeds[i]}  # every seed has items
    wanted = {i for i in complete if seeds[i] == 1 or item_deltas is None or metrics[i] in item_deltas}
    base = _baseline_rows(table)
    complete = wanted | {int(base[i]) for i in wanted if base[i] >= 0 and int(base[i]) in complete}
    singles, deltas = {}, {}
    for (benchmark, metric), group in table.loc[sorted(complete)].groupby(["benchmark", "metric"]).groups.items():
        found = store.packed_items({r for i in group for r in runs_of[i]}, benchmark, metric)
        bits = {i: [found[r] for r in runs_of[i]] for i in group if all(r in found for r in runs_of[i])}
        for i, mine in bits.items():
            if len(mine) == 1:
                count, packed = mine[0]
                singles[i] = (int(np.bitwise_count(np.frombuffer(packed, dtype=np.uint8)).sum()), count)
            theirs = bits.get(base[i])
            if (theirs is None or i not in wanted or methods[i] == "baseline"
                    or len({count for count, _ in mine + theirs}) != 1):
                continue
            if len(mine) == len(theirs) == 1:
                item_table = stats.packed_item_table(mine[0][1], theirs[0][1], mine[0][0])
            else:
                item_table = stats.item_table(*(np.stack([unpack(b, n) for n, b in side]) for side in (mine, theirs)))
            deltas[i] = item_table
    if singles:
        hits, counts = np.array(list(singles.values())).T
        low, high = stats.accuracy_intervals(hits, counts, confidence)
        table.loc[list(singles), ["low", "high", "interval"]] = np.column_stack(
            [low, high, np.full(len(low), "bootstrap over items", dtype=object)])
    if deltas:
        deltas = dict(zip(deltas, stats.paired_from_tables(list(deltas.values()), confidence)))
        table.loc[list(deltas), ["delta_items_low", "delta_items_high", "p_items"]] = [
            (delta.low, delta.high, p) for delta, p in deltas.values()]
        tests = table["test"].to_numpy()
        unpaired = [i for i in deltas if not tests[i]]  # no seeds to pair: the items are the comparison
        if unpaired:
            table.loc[unpaired, ["delta", "delta_low", "delta_high", "p", "test"]] = [
                (d.estimate, d.low, d.high, p, f"paired bootstrap over {d.n} items") for d, p in map(deltas.get, unpaired)]
