"""Per grid: how many cells are new, queued, running, done and failed."""
import plotly.express as px
import streamlit as st

from app.data import open_reader, paginate
from results.queries import grid_progress, running_runs
from results.store import STATUSES

STATES = ("new", *STATUSES)
COLOURS = {"new": "#d0d7de", "queued": "#9a6700", "running": "#0969da", "done": "#1a7f37", "failed": "#cf222e"}

st.title("Grid progress")
read = open_reader()
if read is not None:
    progress = read(grid_progress)
    if progress.empty:
        st.info("No grid has been submitted to this store: `clipkd grid submit grids/demo.yaml --executor local` "
                "runs the demo grid (`clipkd grid plan GRID` shows a grid's cells first).")
    else:
        shown = paginate(progress, key="grids_page")
        long = shown.melt(id_vars="grid", value_vars=list(STATES), var_name="state", value_name="count")
        figure = px.bar(long, x="count", y="grid", color="state", orientation="h", color_discrete_map=COLOURS,
                        category_orders={"state": list(STATES)})
        figure.update_layout(height=120 + 40 * len(shown))
        st.plotly_chart(figure, key="grids_chart")
        st.dataframe(shown, hide_index=True, key="grids_table")
    running = read(running_runs)
    if not running.empty:  # as each job last published it, every train.live_every_s (30 s by default)
        st.subheader("Training now")
        st.dataframe(running.drop(columns="id"), hide_index=True, key="grids_running",
                     column_config={"samples/s": st.column_config.NumberColumn(format="%.1f"),
                                    "ETA (min)": st.column_config.NumberColumn(format="%.1f")})
        st.caption("`clipkd grid status GRID` lists each cell; `clipkd grid submit GRID` resumes the unfinished ones.")
