"""The paper's published numbers (``paper_numbers.yaml``), matched to rows of our ablation table."""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pandas as pd
import yaml

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")
ABLATION_METRIC_NAMES = {"top1": "top1", "i2t_r1": "I2T R@1", "t2i_r1": "T2I R@1"}


@cache
def _published() -> dict:
    return yaml.safe_load(PAPER_NUMBERS.read_text())


def paper_column() -> str:
    """The ablation column the published numbers sit beside."""
    published = _published()
    return f"{published['benchmark']} {ABLATION_METRIC_NAMES[published['metric']]}"


def paper_values(rows: pd.DataFrame) -> pd.Series:
    """For each ablation row (dataset, student, teacher, method) the paper's number for that cell, else NaN."""
    published = _published()
    trained_on_paper_data = rows["dataset"].map(lambda d: re.search(published["train_data"], d) is not None)
    values = pd.Series(float("nan"), index=rows.index)
    for teacher, student, method, value, _where in published["cells"]:
        has_teacher = rows["teacher"] != "-"
        teacher_matches = (~has_teacher if teacher is None
                           else has_teacher & rows["teacher"].map(lambda t, p=teacher: re.match(p, t) is not None))
        matches = trained_on_paper_data & teacher_matches & (rows["student"] == student) & (rows["method"] == method)
        values[matches] = value
    return values


def _table1() -> dict[str, float]:
    """Table 1's top-1 per method: ViT-B/16 → ViT-T/16 on CC3M+12M, the baseline included."""
    return {method: value for teacher, student, method, value, _ in _published()["cells"]
            if student == "ViT-T-16" and (teacher is None or not teacher.startswith("ViT-B-16@laion"))}


def table1_deltas() -> dict[str, float]:
    """Each distillation method's Δ over the baseline in Table 1 (points of ImageNet top-1)."""
    cells = _table1()
    return {method: round(value - cells["baseline"], 2) for method, value in cells.items() if method != "baseline"}


def table1_by_method(rows: pd.DataFrame) -> pd.DataFrame:
    """Beside each row's method, whatever its data and models: the paper's Table 1 number for that method
    (ViT-B/16 → ViT-T/16 on CC3M+12M, ImageNet top-1, %) and its Δ against the paper's baseline: a reference for
    the ordering of methods, not a cell-for-cell comparison. A row whose model teaches other rows gets the paper's
    teacher (ViT-B/16)."""
    cells = _table1()
    teacher = next(value for t, student, method, value, _ in _published()["cells"] if student == "ViT-B-16"
                   and t is None)
    teaching = {label.split("@")[0] for label in rows["teacher"] if label != "-"}
    is_teacher = rows["student"].isin(teaching) & (rows["method"] == "baseline")
    paper = rows["method"].map(cells).where(~is_teacher, teacher)
    return pd.DataFrame({"paper top1": paper, "paper Δ": (paper - cells["baseline"]).where(~is_teacher)},
                        index=rows.index)
