"""Each loss term against step for the selected runs, after what was measured during training (eval.every_steps):
zero-shot accuracy, and the paper's §4.4 pair similarity gap and feature similarity to the teacher."""
import plotly.express as px
import streamlit as st

from app.data import filter_boxes, open_reader
from results.queries import (
    PROGRESS_TERM,
    SIMILARITY_CURVES,
    TEACHER_GAP,
    batch_sizes,
    filter_options,
    list_runs,
    running_runs,
    training_curves,
)

CHOICES = 500  # runs offered at once: narrow with the filters or the search box beyond that
ORDER = {"accuracy": 0, "similarity": 1, "loss": 2}  # samples needed first, then §4.4, then the loss terms


def curve_kind(term: str) -> str:
    """accuracy (during training), similarity (§4.4), teacher (the teacher's gap, a reference line) or loss."""
    if term.startswith(PROGRESS_TERM):
        return "accuracy"
    metric = term.partition(" ")[0]
    return "similarity" if metric in SIMILARITY_CURVES else "teacher" if metric == TEACHER_GAP else "loss"


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
            kinds = curves["term"].map(curve_kind)  # accuracy first (samples needed), then §4.4, then the losses
            for term, points in sorted(curves[kinds != "teacher"].groupby("term"), key=lambda group: ORDER[curve_kind(group[0])]):
                figure = px.line(points, x=axis, y="value", color="name", log_y=log_scale, title=term,
                                 hover_data={"id": True}, markers=curve_kind(term) != "loss")
                reference = curves[curves["term"] == f"{TEACHER_GAP} {term.partition(' ')[2]}"]
                if term.startswith(SIMILARITY_CURVES[0]) and not reference.empty:  # the frozen teacher's own gap
                    for name, value in reference.groupby("name")["value"].first().items():
                        figure.add_hline(y=value, line_dash="dash", annotation_text=f"teacher of {name}")
                st.plotly_chart(figure, key=f"curve_{term}")
            if not (kinds == "accuracy").any():
                st.caption("Zero-shot accuracy against samples seen, and the pair similarity gap and feature "
                           "similarity to the teacher during training (the paper's §4.4), appear here for runs "
                           "with `eval: {every_steps: N}`.")
