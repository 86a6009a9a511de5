"""Accuracy against cost: one point per run, and the Pareto front a user picks a student from."""
import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app.data import filter_boxes, open_reader
from results.queries import COSTS, cost_points, filter_options

ACCURACIES = {"top1": "zero-shot top-1", "i2t_r1": "I2T R@1", "t2i_r1": "T2I R@1"}
# cost axis -> (label, whether more is better)
AXES = {"gflops_image": ("GFLOPs per image", False), "params_m": ("student parameters (M)", False),
        "images_per_s": ("inference images/s", True), "device_hours": ("training device-hours", False),
        "teacher_samples": ("teacher forward samples in training", False),
        "student_samples": ("student forward samples in training (a selector's scoring too)", False)}
WEBGL_ABOVE = 1000


def pareto_front(cost: np.ndarray, accuracy: np.ndarray, more_is_better: bool) -> np.ndarray:
    """Indices of the runs no other run beats on both axes (at least as good on one, better on the other), in
    order of cost."""
    sign = -1 if more_is_better else 1
    order = np.lexsort((-accuracy, sign * cost))
    front, best = [], -np.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return np.array(front, dtype=int)


st.title("Accuracy vs cost")
read = open_reader()
if read is not None:
    options = read(filter_options)
    benchmark_column, accuracy_column, axis_column = st.columns(3)
    benchmark = benchmark_column.selectbox("benchmark", options["benchmark"], key="cost_benchmark")
    accuracy = accuracy_column.selectbox("accuracy", list(ACCURACIES), format_func=ACCURACIES.get, key="cost_accuracy")
    axis = axis_column.selectbox("cost", list(AXES), format_func=lambda a: AXES[a][0], key="cost_axis")
    filters = filter_boxes(options, ("teacher", "student", "dataset", "method"), key="cost")
    points = read(cost_points, benchmark, accuracy, **filters).dropna(subset=["accuracy", axis])
    if points.empty:
        st.info(f"No finished run has {ACCURACIES[accuracy]} on {benchmark} and a recorded {AXES[axis][0]} with these "
                "filters. Runs record their cost when they finish (`clipkd run`, `clipkd grid submit`).")
    else:
        label, more_is_better = AXES[axis]
        points = points.assign(accuracy=points["accuracy"] * 100)
        figure = px.scatter(points, x=axis, y="accuracy", color="method", hover_data={"name": True, "id": True,
                            "teacher": True, "student": True, "seed": True},
                            labels={axis: label, "accuracy": f"{ACCURACIES[accuracy]} (%)"},
                            log_x=axis != "images_per_s" and bool((points[axis] > 0).all()),
                            render_mode="webgl" if len(points) > WEBGL_ABOVE else "svg")
        front = points.iloc[pareto_front(points[axis].to_numpy(), points["accuracy"].to_numpy(), more_is_better)]
        figure.add_trace(go.Scatter(x=front[axis], y=front["accuracy"], mode="lines", name="Pareto front",
                                    line={"color": "black", "dash": "dot", "shape": "hv"}))
        st.plotly_chart(figure, key="cost_scatter")
        st.caption(f"{len(points)} runs; the front joins the runs no other beats on both axes "
                   f"({'more' if more_is_better else 'less'} {label} is better). Costs: {', '.join(AXES[a][0] for a in COSTS)}.")
        st.dataframe(front[["name", "method", "student", "seed", "accuracy", axis]].rename(
            columns={"accuracy": f"{ACCURACIES[accuracy]} (%)", axis: label}), hide_index=True, key="cost_front")
