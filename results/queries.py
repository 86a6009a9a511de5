"""Leaderboard and ablation queries: selected in SQL with bound parameters, compared (results/compare.py) and
shaped with pandas.

A method's delta is measured against the no-KD baseline of the same setting: the runs whose resolved configs
differ only in teacher, loss terms and seed (same student, data, optimisation and schedule).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from sqlalchemy import and_, case, func, literal, select, union
from sqlalchemy.orm import aliased

from core.errors import ClipkdError
from results import FORMATS
from results.compare import summarize
from results.store import STATUSES, VALUE_RECORD, CurvePoint, GridCell, Metric, Run, RunValues, Store, value_key

# Short names for the columns researchers read; the store keeps clip_benchmark's own metric names.
METRIC_ALIASES = {
    "top1": "acc1",
    "top5": "acc5",
    "i2t_r1": "text_retrieval_recall@1",
    "t2i_r1": "image_retrieval_recall@1",
    "i2t_r5": "text_retrieval_recall@5",
    "t2i_r5": "image_retrieval_recall@5",
    "cos_img": "feature_cosine_image",
    "cos_txt": "feature_cosine_text",
    "cka_img": "feature_cka_image",
    "cka_txt": "feature_cka_text",
    "sim_gap": "pair_similarity_gap",
}
PROGRESS_TERM = "zero-shot acc1"  # the curve of accuracy during training (eval.every_steps), per benchmark
# the paper's §4.4 curves during training, each "METRIC (BENCHMARK)"; the frozen teacher's gap is their reference
SIMILARITY_CURVES = ("pair_similarity_gap", "feature_cka_image", "feature_cka_text", "feature_cosine_image",
                     "feature_cosine_text")
TEACHER_GAP = "teacher_pair_similarity_gap"
REFERENCE = "reference"  # the method and setting of a public model evaluated, not trained, here (clipkd eval --record)
LEADERBOARD_METRICS = ["top1", "top5", "i2t_r1", "t2i_r1", "cos_img", "cos_txt", "cka_img", "cka_txt", "sim_gap"]


class QueryError(ClipkdError, ValueError):
    pass


def metric_name(name: str) -> str:
    return METRIC_ALIASES.get(name, name)


def run_filters(teacher=None, student=None, dataset=None, method=None, search=None, baselines_too=True) -> list:
    """SQL conditions on runs; every value is a bound parameter. The no-KD baseline has no teacher but stays
    in a teacher's comparison unless ``baselines_too`` is false. ``search`` matches a substring of the run's name
    or id."""
    filters = [column == value for column, value in
               ((Run.student, student), (Run.dataset, dataset), (Run.method, method)) if value is not None]
    if teacher is not None:
        filters.append((Run.teacher == teacher) | (Run.method == "baseline") if baselines_too else Run.teacher == teacher)
    if search:
        filters.append(Run.name.contains(search, autoescape=True) | Run.id.contains(search, autoescape=True))
    return filters


def per_seed(store: Store, metrics: list[str], benchmark=None, teacher=None, student=None, dataset=None,
             method=None) -> pd.DataFrame:
    """Every finished run's value of each metric: one row per (run, benchmark, metric), with its group's keys."""
    runs = [Run.status == "done", *run_filters(teacher, student, dataset, method)]
    run_columns = ["run_id", "setting_id", "teacher", "student", "dataset", "method", "seed"]
    with store.engine.connect() as connection:
        benchmarks = [benchmark] if benchmark is not None else _benchmarks(connection)
        rows = raw_rows(connection, select(Run.id, *_run_keys(), RunValues.data)
                        .join(RunValues, RunValues.run_id == Run.id).where(*runs))
    # every run's values in one read (results/store.py, RunValues); those asked for found by their keys
    wanted = {value_key(b, m): (i, j) for i, b in enumerate(benchmarks) for j, m in enumerate(metrics)}
    empty = pd.DataFrame(columns=["benchmark", "metric", "value", *run_columns])
    if not wanted:
        return empty
    keys = np.array(sorted(wanted), dtype=np.int64)
    records = np.frombuffer(b"".join(row[-1] for row in rows), dtype=VALUE_RECORD)
    run_of = np.repeat(np.arange(len(rows)), [len(row[-1]) // VALUE_RECORD.itemsize for row in rows])
    found = np.searchsorted(keys, records["key"]).clip(max=len(keys) - 1)
    taken = keys[found] == records["key"]
    if not taken.any():
        return empty
    codes = np.array([wanted[k] for k in keys.tolist()], dtype=np.int64).reshape(-1, 2)[found[taken]]
    runs_table = _frame([row[:-1] for row in rows], run_columns)
    position = run_of[taken]
    frame = pd.DataFrame({name: _codes(runs_table[name], position) for name in run_columns})
    frame["benchmark"] = pd.Categorical.from_codes(codes[:, 0], benchmarks)
    frame["metric"] = pd.Categorical.from_codes(codes[:, 1], list(metrics))
    frame["value"] = records["value"][taken]
    return frame


def _benchmarks(connection) -> list[str]:
    """The distinct benchmarks with values, by hopping along the benchmark index (one seek per benchmark; reading
    the index's every entry for a DISTINCT took 20 ms at 10,000 runs)."""
    hops = ("WITH RECURSIVE hop(benchmark) AS (SELECT min(benchmark) FROM metrics UNION ALL "
            "SELECT (SELECT min(benchmark) FROM metrics WHERE benchmark > hop.benchmark) FROM hop "
            "WHERE hop.benchmark IS NOT NULL) SELECT benchmark FROM hop WHERE benchmark IS NOT NULL")
    return [benchmark for (benchmark,) in connection.exec_driver_sql(hops)]


def _codes(column: pd.Series, position: np.ndarray):
    """A runs' column taken at ``position``: text as a categorical of the runs' distinct values (no string is
    copied per value), numbers as they are."""
    if column.dtype.kind in "iuf":
        return column.to_numpy()[position]
    codes, uniques = pd.factorize(column)
    return pd.Categorical.from_codes(codes[position], uniques)


def _run_keys():
    return Run.setting_id, Run.teacher, Run.student, Run.dataset, Run.method, Run.seed


def raw_rows(connection, query) -> list[tuple]:
    """A query's rows as the DB-API driver returns them, plain tuples, its values still bound parameters: without
    SQLAlchemy's per-row processing, which took half the leaderboard's time at 10,000 runs."""
    compiled = query.compile(dialect=connection.dialect, compile_kwargs={"render_postcompile": True})
    parameters = compiled.construct_params()
    if compiled.positional:
        parameters = tuple(parameters[name] for name in compiled.positiontup)
    cursor = connection.connection.cursor()
    try:
        cursor.execute(compiled.string, parameters)
        return cursor.fetchall()
    finally:
        cursor.close()


def _frame(rows: list, columns: list[str]) -> pd.DataFrame:
    """Rows as a frame, built column by column from plain tuples (pandas probes Row objects slowly)."""
    return pd.DataFrame(dict(zip(columns, zip(*rows))) if rows else {c: [] for c in columns}, columns=columns)


# per metric, the columns a comparison adds beside its mean (results/compare.py)
INTERVAL_COLUMNS = ["low", "high", "delta", "delta_low", "delta_high", "p", "significant"]
RANK_ONLY_COLUMNS = ["test", "delta_items_low", "delta_items_high", "p_items"]


def suite_metrics(store: Store) -> list[str]:
    """The averages stored for suites (evals/suites.py: ``average``, ``average:GROUP``…), as leaderboard columns."""
    with store.engine.connect() as connection:
        # a range on the indexed benchmark column (a LIKE would read every value)
        rows = connection.execute(select(Metric.metric).where(Metric.benchmark >= "suite:", Metric.benchmark < "suite;")
                                  .distinct()).all()
    return sorted(metric for (metric,) in rows)


def leaderboard(store: Store, rank_by: str = "top1", benchmark=None, teacher=None, student=None, dataset=None,
                method=None) -> pd.DataFrame:
    """One row per (setting, teacher, method, benchmark), ranked by ``rank_by``: per metric its mean over seeds with
    a 95 % interval, and the Δ against the same setting's no-KD baseline with its paired interval and p-value."""
    wanted = [metric_name(m) for m in LEADERBOARD_METRICS] + suite_metrics(store)
    rank_metric = metric_name(rank_by)
    if rank_metric not in wanted:
        wanted.append(rank_metric)
    short = {m: m for m in wanted} | {metric_name(a): a for a in LEADERBOARD_METRICS} | {rank_metric: rank_by}
    summary = summarize(per_seed(store, wanted, benchmark, teacher, student, dataset, method), store,
                        item_deltas={rank_metric})
    keys = ["setting_id", "teacher", "student", "dataset", "method", "benchmark"]
    if summary.empty:
        return pd.DataFrame(columns=keys[1:] + ["seeds"])
    # one pivot: a column per (statistic, metric)
    wide = summary.set_index([*keys, "metric"])[["seeds", "mean", *INTERVAL_COLUMNS, *RANK_ONLY_COLUMNS]].unstack("metric")
    columns = {"seeds": wide["seeds"].max(axis=1).astype(int)}
    present = set(summary["metric"])
    for metric in [m for m in wanted if m in present]:  # (statistic, metric) pairs: one column each, no sub-frames
        name = short[metric]
        statistics = ["low", "high"]
        if wide[("delta", metric)].notna().any():  # a baseline to compare with (feature similarity has none)
            statistics = [*INTERVAL_COLUMNS, *(RANK_ONLY_COLUMNS if metric == rank_metric else [])]
        columns |= {name: wide[("mean", metric)], **{f"{name}_{c}": wide[(c, metric)] for c in statistics}}
    costs = run_costs(store, teacher, student, dataset, method)
    cost_rows = costs.reindex(pd.MultiIndex.from_arrays([wide.index.get_level_values(k)
                                                          for k in ("setting_id", "teacher", "method")]))
    columns |= {name: cost_rows[name].to_numpy() for name in costs.columns}
    table = pd.DataFrame(columns).reset_index().drop(columns="setting_id")
    if rank_by in table.columns:
        table = table.sort_values(rank_by, ascending=False, na_position="last")
    return table.reset_index(drop=True)


COSTS = {"params_m": Run.student_params / 1e6, "gflops_image": Run.gflops_image, "images_per_s": Run.images_per_second,
         "device_hours": Run.device_hours, "teacher_samples": Run.teacher_forward_samples,
         "student_samples": Run.student_forward_samples}


def run_costs(store: Store, teacher=None, student=None, dataset=None, method=None) -> pd.DataFrame:
    """Per (setting, teacher, method), the mean over seeds of what its runs cost: the student's parameters (M),
    GFLOPs per image, inference images/s, training device-hours, the samples the live teacher embedded and those
    the student embedded (a selector's scoring forward included)."""
    query = (select(Run.setting_id, func.coalesce(Run.teacher, literal("-")), Run.method,
                    *[func.avg(column) for column in COSTS.values()])
             .where(Run.status == "done", *run_filters(teacher, student, dataset, method))
             .group_by(Run.setting_id, Run.teacher, Run.method))
    with store.engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(query)]
    return pd.DataFrame(rows, columns=["setting_id", "teacher", "method", *COSTS]).set_index(
        ["setting_id", "teacher", "method"])


def cost_points(store: Store, benchmark: str, accuracy: str = "top1", **filters) -> pd.DataFrame:
    """One point per finished run: its accuracy on ``benchmark`` and what it costs (for the Pareto front)."""
    query = (select(Run.id, Run.name, Run.method, Run.teacher, Run.student, Run.seed, Metric.value.label("accuracy"),
                    *[column.label(name) for name, column in COSTS.items()])
             .join(Metric, and_(Metric.run_id == Run.id, Metric.benchmark == benchmark,
                                Metric.metric == metric_name(accuracy)))
             .where(Run.status == "done", *run_filters(**filters)))
    with store.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return pd.DataFrame(rows, columns=["id", "name", "method", "teacher", "student", "seed", "accuracy", *COSTS])


def batch_sizes(store: Store, run_ids: list[str]) -> dict[str, int]:
    """Each run's global batch size (from its resolved config): steps to samples seen."""
    with store.engine.connect() as connection:
        rows = connection.execute(select(Run.id, Run.config).where(Run.id.in_(run_ids))).all()
    return {run_id: json.loads(config).get("train", {}).get("batch_size", 1) for run_id, config in rows}


ABLATION_METRICS = {"acc1": "top1", "text_retrieval_recall@1": "I2T R@1", "image_retrieval_recall@1": "T2I R@1"}


def ablation(store: Store, teacher=None, student=None, dataset=None) -> pd.DataFrame:
    """The paper's ablation table: methods as rows; zero-shot top-1 per benchmark and I2T/T2I R@1 as columns,
    each a mean over seeds with its 95 % interval, Δ and paired p-value against the baseline."""
    summary = summarize(per_seed(store, list(ABLATION_METRICS), teacher=teacher, student=student, dataset=dataset),
                        store, item_deltas=set())
    if summary.empty:
        return pd.DataFrame()
    summary["column"] = summary["benchmark"] + " " + summary["metric"].map(ABLATION_METRICS)
    keys = ["dataset", "student", "teacher", "method"]
    table = summary.groupby(keys, sort=False)["seeds"].max().to_frame()
    order = list(ABLATION_METRICS)
    columns = summary.drop_duplicates("column").sort_values("metric", key=lambda m: m.map(order.index), kind="stable")
    for column in columns.sort_values("benchmark", kind="stable")["column"]:
        part = summary[summary["column"] == column].groupby(keys)[["mean", *INTERVAL_COLUMNS]].first()
        table = table.join(part.rename(columns={"mean": column, **{c: f"{column}_{c}" for c in INTERVAL_COLUMNS}}))
    return table.reset_index()


def filter_options(store: Store) -> dict[str, list[str]]:
    """The distinct values each filter offers, and the benchmarks and metrics stored."""
    columns = {"teacher": Run.teacher, "student": Run.student, "dataset": Run.dataset, "method": Run.method,
               "grid": Run.grid, "benchmark": Metric.benchmark, "metric": Metric.metric}
    with store.engine.connect() as connection:
        return {name: sorted(v for (v,) in connection.execute(select(column).distinct()) if v is not None)
                for name, column in columns.items()}


def list_runs(store: Store, status=None, offset: int = 0, limit: int = 50, **filters) -> tuple[pd.DataFrame, int]:
    """One page of runs (newest first) and how many match in all; a teacher filter keeps that teacher's runs only."""
    conditions = run_filters(**filters, baselines_too=False) + ([Run.status == status] if status else [])
    columns = [Run.id, Run.name, Run.status, Run.teacher, Run.student, Run.dataset, Run.method, Run.seed, Run.grid,
               Run.updated_at]
    with store.engine.connect() as connection:
        total = connection.execute(select(func.count()).select_from(Run).where(*conditions)).scalar_one()
        rows = connection.execute(select(*columns).where(*conditions).order_by(Run.updated_at.desc(), Run.id)
                                  .offset(offset).limit(limit)).mappings().all()
    return pd.DataFrame(rows, columns=[c.name for c in columns]), total


def similarity_points(store: Store, benchmark: str, similarity: str = "cos_img", accuracy: str = "top1",
                      **filters) -> pd.DataFrame:
    """One point per finished run: its teacher-student feature similarity and its accuracy on ``benchmark``."""
    similar, accurate = aliased(Metric), aliased(Metric)
    query = (
        select(Run.id, Run.name, Run.method, Run.teacher, Run.student, Run.seed,
               similar.value.label("similarity"), accurate.value.label("accuracy"))
        .join(similar, and_(similar.run_id == Run.id, similar.benchmark == benchmark,
                            similar.metric == metric_name(similarity)))
        .join(accurate, and_(accurate.run_id == Run.id, accurate.benchmark == benchmark,
                             accurate.metric == metric_name(accuracy)))
        .where(Run.status == "done", *run_filters(**filters))
    )
    with store.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return pd.DataFrame(rows, columns=["id", "name", "method", "teacher", "student", "seed", "similarity", "accuracy"])


def training_curves(store: Store, run_ids: list[str]) -> pd.DataFrame:
    query = (select(Run.id, Run.name, CurvePoint.term, CurvePoint.step, CurvePoint.value)
             .join(CurvePoint, CurvePoint.run_id == Run.id).where(Run.id.in_(run_ids))
             .order_by(Run.id, CurvePoint.term, CurvePoint.step))
    with store.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return pd.DataFrame(rows, columns=["id", "name", "term", "step", "value"])


RUNNING_COLUMNS = ["id", "name", "grid", "step", "total_steps", "samples seen", "samples/s", "ETA (min)", "reported at"]


def running_runs(store: Store) -> pd.DataFrame:
    """The runs training now, with their progress as their jobs last published it (harness/training/trackers.py)."""
    query = (select(Run.id, Run.name, Run.grid, Run.step, Run.total_steps, Run.samples_per_second, Run.eta_seconds,
                    Run.updated_at, Run.config).where(Run.status == "running").order_by(Run.grid, Run.name))
    with store.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return pd.DataFrame([{
        "id": r["id"], "name": r["name"], "grid": r["grid"], "step": r["step"], "total_steps": r["total_steps"],
        "samples seen": (r["step"] * json.loads(r["config"]).get("train", {}).get("batch_size", 1)
                         if r["step"] is not None else None),
        "samples/s": r["samples_per_second"],
        "ETA (min)": r["eta_seconds"] / 60 if r["eta_seconds"] is not None else None,
        "reported at": r["updated_at"]} for r in rows], columns=RUNNING_COLUMNS)


def grid_cells():
    """Every grid's runs: the cells it registered (a run it shares with another grid included) and the runs it
    wrote, as (grid, run_id) rows."""
    return union(select(GridCell.grid, GridCell.run_id),
                 select(Run.grid, Run.id.label("run_id")).where(Run.grid.is_not(None))).subquery()


def grid_progress(store: Store) -> pd.DataFrame:
    """Per grid, its cells counted by state; a registered cell with no run yet is "new"."""
    cells = grid_cells()
    state = func.coalesce(Run.status, literal("new"))
    counts = [func.sum(case((state == s, 1), else_=0)).label(s) for s in ("new", *STATUSES)]
    query = (select(cells.c.grid, *counts, func.count().label("cells"))
             .select_from(cells).outerjoin(Run, Run.id == cells.c.run_id).group_by(cells.c.grid).order_by(cells.c.grid))
    with store.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return pd.DataFrame(rows, columns=["grid", "new", *STATUSES, "cells"])


PERCENT_METRICS = {"top1", "top5", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"}
SUFFIXES = sorted([f"_{c}" for c in INTERVAL_COLUMNS + RANK_ONLY_COLUMNS] + ["_items_low", "_items_high"],
                  key=len, reverse=True)


def base_column(column: str) -> str:
    """The metric a column belongs to: ``top1_delta_low`` -> ``top1``."""
    for suffix in SUFFIXES:
        if column.endswith(suffix):
            return base_column(column[: -len(suffix)])
    return column


def is_percent(column: str) -> bool:
    base = base_column(column)
    return base in PERCENT_METRICS or base.endswith(("top1", "R@1")) and not column.endswith(("_p", "_items"))


def with_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """Human formats: "mean [low, high]" per metric and "+Δ [low, high] *" (significant at 5 %, paired) per delta,
    in one column each; the helper columns are dropped."""
    shown = frame.copy()
    for column in [c for c in frame.columns if f"{c}_low" in frame.columns]:
        digits = 2 if is_percent(column) else 3
        sign = "+" if column.endswith("_delta") else ""
        shown[column] = [
            "-" if pd.isna(m) else f"{m:{sign}.{digits}f}" + ("" if pd.isna(lo) else f" [{lo:{sign}.{digits}f}, "
                                                                                   f"{hi:{sign}.{digits}f}]")
            for m, lo, hi in zip(frame[column], frame[f"{column}_low"], frame[f"{column}_high"])]
        significant = frame.get(f"{column.removesuffix('_delta')}_significant")
        if column.endswith("_delta") and significant is not None:
            shown[column] = [v + (" *" if s is True else "") for v, s in zip(shown[column], significant)]
    helpers = [c for c in frame.columns if c != base_column(c) and not c.endswith("_delta")]
    return shown.drop(columns=helpers)


def as_percent(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracies and recalls (their intervals and deltas too) as rounded percentages; others to 4 places."""
    numbers = frame.copy()
    for column in numbers.columns:
        if numbers[column].dtype.kind == "f":
            numbers[column] = (numbers[column] * 100).round(2) if is_percent(column) else numbers[column].round(4)
    return numbers


LEGEND = ("[low, high]: 95 % interval over seeds (t), or for one seed over test items (bootstrap: test-set noise "
          "only, not training noise); Δ: against the same setting's no-KD baseline, paired by seed (t-test) where two "
          "or more seeds are shared, else a paired bootstrap over test items; * p < 0.05")


def split_references(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs trained here, and reference models (evaluated only), which are shown apart."""
    if "method" not in frame.columns:
        return frame, frame.iloc[0:0]
    reference = frame["method"] == REFERENCE
    return frame[~reference].reset_index(drop=True), frame[reference].reset_index(drop=True)


def reference_columns(references: pd.DataFrame) -> pd.DataFrame:
    """Reference rows as shown: no teacher, method or comparison with a baseline; their dataset is their weights."""
    compared = [c for c in references.columns
                if "delta" in c or c.endswith(("_p", "_significant", "_test")) or c in ("teacher", "method")]
    return references.drop(columns=compared).rename(columns={"dataset": "weights"})


def render(frame: pd.DataFrame, fmt: str) -> str:
    """Accuracies and recalls as percentages, like the paper's tables; csv keeps every number in its own column;
    the other formats show reference models (evaluated, not trained here) in a table of their own."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if frame.empty:
        return "no finished runs match; run `clipkd run CONFIG` (or a grid) first\n"
    trained, references = split_references(frame)
    if fmt != "csv" and not references.empty:
        return ((_render(trained, fmt) if not trained.empty else "")
                + "\nreference models (evaluated here, not trained here):\n" + _render(reference_columns(references), fmt))
    return _render(frame, fmt)


def _render(frame: pd.DataFrame, fmt: str) -> str:
    numbers = as_percent(frame)
    if fmt == "csv":
        return numbers.to_csv(index=False)
    shown = with_intervals(numbers)
    if fmt == "markdown":
        missing_as_none = shown.astype(object).where(shown.notna(), None)  # tabulate prints NaN as "nan"
        return missing_as_none.to_markdown(index=False, floatfmt=".2f", missingval="-") + f"\n\n{LEGEND}\n"
    if fmt == "latex":
        return (shown.to_latex(index=False, na_rep="--", float_format="%.2f").replace("Δ", r"$\Delta$")
                + f"% {LEGEND}\n")
    return shown.to_string(index=False, na_rep="-") + f"\n{LEGEND}\n"
