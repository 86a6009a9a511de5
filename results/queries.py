"""Leaderboard and ablation queries: aggregated in SQL (mean, std over seeds), shaped with pandas.

A method's delta is measured against the no-KD baseline of the same setting: the runs whose resolved configs
differ only in teacher, loss terms and seed (same student, data, optimisation and schedule).
"""
from __future__ import annotations

import math

import pandas as pd
from sqlalchemy import and_, func, select

from harness.errors import ClipkdError
from results import FORMATS
from results.store import Metric, Run, Store

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


def _aggregate(store: Store, metrics: list[str], benchmark=None, teacher=None, student=None, dataset=None,
               method=None) -> pd.DataFrame:
    """One row per (setting, teacher, student, dataset, method, benchmark, metric) with n, mean and std."""
    filters = [Run.status == "done", Metric.metric.in_(metrics)]
    for column, value in ((Metric.benchmark, benchmark), (Run.student, student), (Run.dataset, dataset),
                          (Run.method, method)):
        if value is not None:
            filters.append(column == value)
    if teacher is not None:  # the baseline has no teacher but must stay in the comparison
        filters.append((Run.teacher == teacher) | (Run.method == "baseline"))
    group = [Run.setting_id, Run.teacher, Run.student, Run.dataset, Run.method, Metric.benchmark, Metric.metric]
    query = (
        select(*group, func.count().label("n"), func.avg(Metric.value).label("mean"),
               func.avg(Metric.value * Metric.value).label("mean_sq"))
        .join(Metric, and_(Metric.run_id == Run.id))
        .where(*filters)
        .group_by(*group)
    )
    with store.engine.connect() as connection:
        frame = pd.DataFrame(connection.execute(query).mappings().all(),
                             columns=[c.name for c in group] + ["n", "mean", "mean_sq"])
    variance = (frame["mean_sq"] - frame["mean"] ** 2).clip(lower=0) * frame["n"] / (frame["n"] - 1).where(frame["n"] > 1)
    frame["std"] = variance.map(lambda v: math.sqrt(v) if pd.notna(v) else float("nan"))
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
    table = frame.pivot_table(index=["student", "teacher", "method"], columns="column", values="mean", aggfunc="mean")
    return table.reset_index()


def _is_percent(column: str) -> bool:
    return column.split("_std")[0].split("_delta")[0] in {"top1", "top5", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"} or (
        column.endswith(("top1", "R@1")))


def _mean_pm_std(frame: pd.DataFrame) -> pd.DataFrame:
    """Human formats show "mean ± std" (std over seeds, omitted for a single seed) in one column."""
    shown = frame.copy()
    for column in [c for c in frame.columns if f"{c}_std" in frame.columns]:
        digits = 2 if _is_percent(column) else 3
        shown[column] = [
            "-" if pd.isna(m) else f"{m:.{digits}f}" + ("" if pd.isna(s) else f" ± {s:.{digits}f}")
            for m, s in zip(frame[column], frame[f"{column}_std"])
        ]
        shown = shown.drop(columns=f"{column}_std")
    return shown


def render(frame: pd.DataFrame, fmt: str) -> str:
    """Accuracies and recalls as percentages, like the paper's tables; csv keeps every number in its own column."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if frame.empty:
        return "no finished runs match; run `clipkd run CONFIG` (or a grid) first\n"
    numbers = frame.copy()
    for column in numbers.columns:
        if numbers[column].dtype.kind == "f":
            numbers[column] = (numbers[column] * 100).round(2) if _is_percent(column) else numbers[column].round(4)
    if fmt == "csv":
        return numbers.to_csv(index=False)
    shown = _mean_pm_std(numbers)
    if fmt == "markdown":
        return shown.to_markdown(index=False, floatfmt=".2f") + "\n"
    if fmt == "latex":
        return shown.to_latex(index=False, na_rep="--", float_format="%.2f").replace("±", r"$\pm$")
    return shown.to_string(index=False, na_rep="-") + "\n"
