"""The paper-style ablation table, with the paper's published numbers beside the cells that match one of its."""
import pandas as pd
import streamlit as st

from app.data import filter_boxes, open_reader, paginate
from results.paper import paper_column, paper_values
from results.queries import ablation, as_percent, filter_options

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
        keys = ["dataset", "student", "teacher", "method"]
        metrics = [c for c in table.columns if c not in keys]
        numbers = as_percent(table)
        best = {c: numbers[c].max() for c in metrics}
        shown = numbers[keys].copy()
        for column in metrics:  # the best value of a column is starred, as the paper sets it in bold
            shown[column] = [("-" if pd.isna(v) else f"{v:.2f}" + (BEST if v == best[column] else ""))
                             for v in numbers[column]]
        published = paper_values(table)
        if published.notna().any():
            at = shown.columns.get_loc(paper_column()) + 1 if paper_column() in shown.columns else len(shown.columns)
            shown.insert(at, f"{paper_column()} (paper)", published.map(lambda v: "" if pd.isna(v) else f"{v:.2f}"))
            st.caption("(paper): Yang et al., CLIP-KD (CVPR 2024), for the rows that match a cell of theirs "
                       "(training data, teacher, student and method; see results/paper_numbers.yaml).")
        st.caption(f"{len(shown)} rows; mean over seeds, in %; ★ marks the best value of each column.")
        st.dataframe(paginate(shown, key="ablation_page"), hide_index=True, key="ablation_table")
