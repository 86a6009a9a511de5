"""Runs ranked by a benchmark's metric, with the delta against the same setting's no-KD baseline."""
import pandas as pd
import streamlit as st

from app.data import filter_boxes, open_reader, paginate
from results.queries import LEADERBOARD_METRICS, as_percent, filter_options, leaderboard, mean_pm_std, render

st.title("Leaderboard")
read = open_reader()
if read is not None:
    options = read(filter_options)
    rank_column, benchmark_column = st.columns(2)
    rank_by = rank_column.selectbox("rank by", LEADERBOARD_METRICS, key="leaderboard_rank_by")
    benchmark = benchmark_column.selectbox("benchmark", options["benchmark"], key="leaderboard_benchmark")
    filters = filter_boxes(options, ("teacher", "student", "dataset", "method"), key="leaderboard")
    table = read(leaderboard, rank_by, benchmark, **filters)
    if table.empty or rank_by not in table.columns:
        st.info(f"No finished run has {rank_by} on {benchmark} with these filters: widen them, or finish a run "
                "that evaluates on this benchmark (`clipkd grid status GRID` shows what is still running).")
    else:
        st.caption(f"{len(table)} rows: mean ± std over seeds; Δ is the difference to the no-KD baseline of the same "
                   "student, data and schedule (accuracies and recalls in %).")
        st.download_button("Download CSV", render(table, "csv"), file_name=f"leaderboard-{benchmark}-{rank_by}.csv",
                           mime="text/csv", icon=":material/download:")
        ranked = table.copy()
        ranked.insert(0, "rank", range(1, len(ranked) + 1))
        page = mean_pm_std(as_percent(paginate(ranked, key="leaderboard_page")))
        deltas = [c for c in page.columns if c.endswith("_delta")]
        page = page.rename(columns={c: "Δ " + c.removesuffix("_delta") for c in deltas})
        deltas = ["Δ " + c.removesuffix("_delta") for c in deltas]

        def colour(value: float) -> str:
            if pd.isna(value) or value == 0:
                return ""
            return "color: #1a7f37" if value > 0 else "color: #cf222e"

        st.dataframe(page.style.map(colour, subset=deltas).format("{:+.2f}", subset=deltas, na_rep="-"),
                     hide_index=True, key="leaderboard_table")
