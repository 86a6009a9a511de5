"""The paper-style ablation table, with the paper's published numbers beside the cells that match one of its."""
import pandas as pd
import streamlit as st

from app.data import filter_boxes, open_reader, paginate
from results.paper import paper_column, paper_values, table1_by_method
from results.queries import (
    LEGEND,
    ablation,
    as_percent,
    filter_options,
    reference_columns,
    split_references,
    with_intervals,
)

BEST = " ★"

st.title("Ablation")
read = open_reader()
if read is not None:
    filters = filter_boxes(read(filter_options), ("teacher", "student", "dataset"), key="ablation")
    table = read(ablation, **filters)
    if table.empty:
        st.info("No finished run has zero-shot or retrieval metrics with these filters: widen them, or wait for "
                "a run to finish (`clipkd grid status GRID`).")
    else:
        keys = ["dataset", "student", "teacher", "method", "seeds"]
        table, references = split_references(table)
        numbers = as_percent(table)
        shown = with_intervals(numbers)
        metrics = [c for c in shown.columns if c not in keys and not c.endswith("_delta")]
        for column in metrics:  # the best mean of a column is starred, as the paper sets it in bold
            best = numbers[column].max()
            shown[column] = [text + (BEST if value == best else "") for text, value in zip(shown[column], numbers[column])]
        shown = shown.rename(columns={c: "Δ " + c.removesuffix("_delta") for c in shown.columns if c.endswith("_delta")})
        if st.toggle("the paper's Table 1 beside every method (ViT-B/16 → ViT-T/16, ImageNet top-1)",
                     key="ablation_table1"):
            table1 = table1_by_method(table)  # beside the method, so that orderings read side by side
            at = shown.columns.get_loc("seeds") + 1
            shown.insert(at, "paper Δ", table1["paper Δ"].map(lambda v: "" if pd.isna(v) else f"{v:+.2f}"))
            shown.insert(at, "paper top1", table1["paper top1"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}"))
            st.caption("paper top1, paper Δ: Yang et al. (CVPR 2024), Table 1 — ViT-B/16 → ViT-T/16 on CC3M+12M, "
                       "ImageNet top-1 and its Δ against their baseline, for comparing the ordering of methods.")
        published = paper_values(table)
        if published.notna().any():
            at = shown.columns.get_loc(paper_column()) + 1 if paper_column() in shown.columns else len(shown.columns)
            shown.insert(at, f"{paper_column()} (paper)", published.map(lambda v: "" if pd.isna(v) else f"{v:.2f}"))
            st.caption("(paper): Yang et al., CLIP-KD (CVPR 2024), for the rows that match a cell of theirs "
                       "(training data, teacher, student and method; see results/paper_numbers.yaml).")
        st.caption(f"{len(shown)} rows; mean over seeds, in %; ★ marks the best value of each column. {LEGEND}.")
        st.dataframe(paginate(shown, key="ablation_page"), hide_index=True, key="ablation_table")
        if not references.empty:
            st.subheader("Reference models")
            st.caption("Evaluated here, not trained here (`clipkd eval ... --record`).")
            st.dataframe(with_intervals(as_percent(reference_columns(references))), hide_index=True,
                         key="ablation_references")
