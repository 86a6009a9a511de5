"""Leaderboard and ablation queries: aggregated in SQL (mean, std over seeds), shaped with pandas.

A method's delta is measured against the no-KD baseline of the same setting: the runs whose resolved configs
differ only in teacher, loss terms and seed (same student, data, optimisation and schedule).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sqlalchemy import and_, case, func, literal, select, union
from sqlalchemy.orm import aliased

from harness.errors import ClipkdError
from results import FORMATS
from results.store import STATUSES, CurvePoint, GridCell, Metric, Run, Store

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


def _aggregate(store: Store, metrics: list[str], benchmark=None, teacher=None, student=None, dataset=None,
               method=None) -> pd.DataFrame:
    """One row per (setting, teacher, student, dataset, method, benchmark, metric) with n, mean and std."""
    filters = [Run.status == "done", Metric.metric.in_(metrics), *run_filters(teacher, student, dataset, method)]
    if benchmark is not None:
        filters.append(Metric.benchmark == benchmark)
    # a setting fixes the student and the data, so grouping by the setting id alone keeps the sort keys short
    group = [Run.setting_id, Run.teacher, Run.method, Metric.benchmark, Metric.metric]
    query = (
        select(Run.setting_id, Run.teacher, func.min(Run.student), func.min(Run.dataset), Run.method,
               Metric.benchmark, Metric.metric, func.count(), func.avg(Metric.value),
               func.avg(Metric.value * Metric.value))
        .join(Metric, and_(Metric.run_id == Run.id))
        .where(*filters)
        .group_by(*group)
    )
    columns = ["setting_id", "teacher", "student", "dataset", "method", "benchmark", "metric", "n", "mean", "mean_sq"]
    with store.engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(query)]  # plain tuples: pandas probes Row objects slowly
        frame = pd.DataFrame(rows, columns=columns)
    variance = (frame["mean_sq"] - frame["mean"] ** 2).clip(lower=0) * frame["n"] / (frame["n"] - 1).where(frame["n"] > 1)
    frame["std"] = np.sqrt(variance.astype(float))
    return frame.drop(columns="mean_sq")


def leaderboard(store: Store, rank_by: str = "top1", benchmark=None, teacher=None, student=None, dataset=None,
                method=None) -> pd.DataFrame:
    """Methods ranked by ``rank_by``, one row per (setting, teacher, method, benchmark), with Δ vs the baseline."""
    wanted = [metric_name(m) for m in LEADERBOARD_METRICS]
    rank_metric = metric_name(rank_by)
    if rank_metric not in wanted:
        wanted.append(rank_metric)
    frame = _aggregate(store, wanted, benchmark, teacher, student, dataset, method)
    keys = ["setting_id", "teacher", "student", "dataset", "method", "benchmark"]
    if frame.empty:
        return pd.DataFrame(columns=keys[1:] + ["seeds"])
    frame["teacher"] = frame["teacher"].fillna("-")
    means = frame.pivot_table(index=keys, columns="metric", values="mean", aggfunc="first")
    stds = frame.pivot_table(index=keys, columns="metric", values="std", aggfunc="first", dropna=False)
    stds = stds.reindex(index=means.index, columns=means.columns)
    seeds = frame.groupby(keys)["n"].max()
    baseline = means.xs("baseline", level="method").droplevel("teacher") if "baseline" in set(frame["method"]) else None
    comparable = means.index.droplevel(["teacher", "method"])  # (setting, student, dataset, benchmark)
    table = pd.DataFrame({"seeds": seeds}, index=means.index)
    short = {metric_name(a): a for a in LEADERBOARD_METRICS} | {rank_metric: rank_by}
    for metric in [m for m in wanted if m in means.columns]:
        name = short[metric]
        table[name], table[f"{name}_std"] = means[metric], stds[metric]
        if baseline is not None and baseline[metric].notna().any():  # a baseline has no teacher, so no similarity
            table[f"{name}_delta"] = means[metric].to_numpy() - baseline[metric].reindex(comparable).to_numpy()
    table = table.reset_index().drop(columns="setting_id")
    if rank_by in table.columns:
        table = table.sort_values(rank_by, ascending=False, na_position="last")
    return table.reset_index(drop=True)


def ablation(store: Store, teacher=None, student=None, dataset=None) -> pd.DataFrame:
    """The paper's ablation table: methods as rows; zero-shot top-1 per benchmark and I2T/T2I R@1 as columns."""
    metrics = {"acc1": "top1", "text_retrieval_recall@1": "I2T R@1", "image_retrieval_recall@1": "T2I R@1"}
    frame = _aggregate(store, list(metrics), teacher=teacher, student=student, dataset=dataset)
    if frame.empty:
        return pd.DataFrame()
    frame["teacher"] = frame["teacher"].fillna("-")
    frame["column"] = frame["benchmark"] + " " + frame["metric"].map(metrics)
    table = frame.pivot_table(index=["dataset", "student", "teacher", "method"], columns="column", values="mean",
                              aggfunc="mean")
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


def grid_progress(store: Store) -> pd.DataFrame:
    """Per grid, its cells counted by state; a registered cell with no run yet is "new"."""
    cells = union(select(GridCell.grid, GridCell.run_id),
                  select(Run.grid, Run.id.label("run_id")).where(Run.grid.is_not(None))).subquery()
    state = func.coalesce(Run.status, literal("new"))
    counts = [func.sum(case((state == s, 1), else_=0)).label(s) for s in ("new", *STATUSES)]
    query = (select(cells.c.grid, *counts, func.count().label("cells"))
             .select_from(cells).outerjoin(Run, Run.id == cells.c.run_id).group_by(cells.c.grid).order_by(cells.c.grid))
    with store.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return pd.DataFrame(rows, columns=["grid", "new", *STATUSES, "cells"])


def is_percent(column: str) -> bool:
    return column.split("_std")[0].split("_delta")[0] in {"top1", "top5", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"} or (
        column.endswith(("top1", "R@1")))


def mean_pm_std(frame: pd.DataFrame) -> pd.DataFrame:
    """Human formats show "mean ± std" (std over seeds, omitted for a single seed) in one column."""
    shown = frame.copy()
    for column in [c for c in frame.columns if f"{c}_std" in frame.columns]:
        digits = 2 if is_percent(column) else 3
        shown[column] = [
            "-" if pd.isna(m) else f"{m:.{digits}f}" + ("" if pd.isna(s) else f" ± {s:.{digits}f}")
            for m, s in zip(frame[column], frame[f"{column}_std"])
        ]
        shown = shown.drop(columns=f"{column}_std")
    return shown


def as_percent(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracies and recalls (and their std and delta) as rounded percentages; other numbers to 4 places."""
    numbers = frame.copy()
    for column in numbers.columns:
        if numbers[column].dtype.kind == "f":
            numbers[column] = (numbers[column] * 100).round(2) if is_percent(column) else numbers[column].round(4)
    return numbers


def render(frame: pd.DataFrame, fmt: str) -> str:
    """Accuracies and recalls as percentages, like the paper's tables; csv keeps every number in its own column."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if frame.empty:
        return "no finished runs match; run `clipkd run CONFIG` (or a grid) first\n"
    numbers = as_percent(frame)
    if fmt == "csv":
        return numbers.to_csv(index=False)
    shown = mean_pm_std(numbers)
    if fmt == "markdown":
        return shown.to_markdown(index=False, floatfmt=".2f") + "\n"
    if fmt == "latex":
        return shown.to_latex(index=False, na_rep="--", float_format="%.2f").replace("±", r"$\pm$")
    return shown.to_string(index=False, na_rep="-") + "\n"
