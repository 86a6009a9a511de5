"""Each loss term against step for the selected runs."""
import plotly.express as px
import streamlit as st

from app.data import filter_boxes, open_reader
from results.queries import PROGRESS_TERM, batch_sizes, filter_options, list_runs, running_runs, training_curves

CHOICES = 500  # runs offered at once: narrow with the filters or the search box beyond that

st.title("Training curves")
read = open_reader()
if read is not None:
    filters = filter_boxes(read(filter_options), ("teacher", "student", "dataset", "method"), key="curves")
    search = st.text_input("search run name or id", key="curves_search")
    runs, total = read(list_runs, limit=CHOICES, search=search or None, **filters)
    if runs.empty:
        st.info("No run matches these filters; clear the search box or widen the filters.")
    else:
        labels = dict(zip(runs["id"], runs["name"] + " · " + runs["id"]))
        if total > CHOICES:
            st.caption(f"{total} runs match; the newest {CHOICES} are offered: narrow the filters to reach the others.")
        chosen = st.multiselect("runs", list(labels), default=list(labels)[:3], format_func=labels.get,
                                key="curves_runs")
        curves = read(training_curves, chosen) if chosen else None
        running = read(running_runs)
        for _, run in running[running["id"].isin(chosen)].iterrows():
            st.caption(f"still training: {run['name']} · step {run['step']} of {run['total_steps']} "
                       f"(curves as of {run['reported at'][:19]} UTC; the page shows newer points on reload)")
        if curves is None or curves.empty:
            st.info("The chosen runs have no training curve yet: a run publishes its curves as it trains "
                    "(every train.live_every_s seconds) and when it finishes.")
        else:
            scale_column, axis_column = st.columns(2)
            log_scale = scale_column.toggle("log scale", key="curves_log")
            axis = axis_column.radio("x axis", ["step", "samples seen"], horizontal=True, key="curves_axis")
            if axis == "samples seen":  # steps times each run's global batch
                curves = curves.assign(**{"samples seen": curves["step"] * curves["id"].map(read(batch_sizes, chosen))})
            progress = curves["term"].str.startswith(PROGRESS_TERM)  # accuracy during training first: samples needed
            for term, points in [*curves[progress].groupby("term"), *curves[~progress].groupby("term")]:
                figure = px.line(points, x=axis, y="value", color="name", log_y=log_scale, title=term,
                                 hover_data={"id": True}, markers=term.startswith(PROGRESS_TERM))
                st.plotly_chart(figure, key=f"curve_{term}")
            if not progress.any():
                st.caption("Zero-shot accuracy against samples seen appears here for runs with `eval: {every_steps: N}`.")
