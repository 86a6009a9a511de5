"""Runs ranked by a benchmark's metric, with the delta against the same setting's no-KD baseline."""
import pandas as pd
import streamlit as st

from app.data import filter_boxes, open_reader, paginate
from results.queries import (
    LEADERBOARD_METRICS,
    LEGEND,
    as_percent,
    filter_options,
    leaderboard,
    reference_columns,
    render,
    split_references,
    with_intervals,
)

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
        st.caption(f"{len(table)} rows, accuracies and recalls in %. {LEGEND}. Green or red: a significant Δ.")
        st.download_button("Download CSV", render(table, "csv"), file_name=f"leaderboard-{benchmark}-{rank_by}.csv",
                           mime="text/csv", icon=":material/download:")
        table, references = split_references(table)
        ranked = table.copy()
        ranked.insert(0, "rank", range(1, len(ranked) + 1))
        numbers = as_percent(paginate(ranked, key="leaderboard_page"))
        page = with_intervals(numbers)
        page = page.rename(columns={c: "Δ " + c.removesuffix("_delta") for c in page.columns if c.endswith("_delta")})
        deltas = [c for c in page.columns if c.startswith("Δ ")]

        def colour(column: pd.Series) -> list[str]:
            """Significant deltas in green (better) or red (worse); the others unstyled."""
            name = column.name.removeprefix("Δ ")
            significant = numbers.get(f"{name}_significant", pd.Series(False, index=numbers.index)).fillna(False)
            return ["" if not s or pd.isna(d) else "color: #1a7f37" if d > 0 else "color: #cf222e"
                    for s, d in zip(significant.astype(bool), numbers[f"{name}_delta"])]

        st.dataframe(page.style.apply(colour, subset=deltas), hide_index=True, key="leaderboard_table")
        if not references.empty:  # public models evaluated here: beside the students, not ranked among them
            st.subheader("Reference models")
            st.caption("Evaluated here on the same benchmarks, not trained here (`clipkd eval --model NAME --pretrained "
                       "TAG|FILE --record`); the name says model@weights.")
            st.dataframe(with_intervals(as_percent(reference_columns(references))), hide_index=True,
                         key="leaderboard_references")
