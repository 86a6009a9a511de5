"""The paper's analysis: teacher-student feature similarity against zero-shot accuracy, one point per run."""
import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app.data import filter_boxes, open_reader
from results.queries import METRIC_ALIASES, filter_options, similarity_points
from results.stats import correlation

SIMILARITIES = {"cos_img": "image cosine (through P)", "cos_txt": "text cosine (through P)",
                "cka_img": "image linear CKA", "cka_txt": "text linear CKA"}
ACCURACIES = {"top1": "zero-shot top-1", "i2t_r1": "I2T R@1", "t2i_r1": "T2I R@1"}
WEBGL_ABOVE = 1000  # points; SVG slows the browser beyond that

st.title("Feature similarity vs accuracy")
read = open_reader()
if read is not None:
    options = read(filter_options)
    benchmark_column, similarity_column, accuracy_column = st.columns(3)
    benchmark = benchmark_column.selectbox("benchmark", options["benchmark"], key="similarity_benchmark")
    similarity = similarity_column.selectbox("similarity", list(SIMILARITIES), format_func=SIMILARITIES.get,
                                             key="similarity_metric")
    accuracy = accuracy_column.selectbox("accuracy", list(ACCURACIES), format_func=ACCURACIES.get,
                                         key="similarity_accuracy")
    filters = filter_boxes(options, ("teacher", "student", "dataset", "method"), key="similarity")
    points = read(similarity_points, benchmark, similarity, accuracy, **filters)
    if points.empty:
        st.info(f"No finished distilled run has both {METRIC_ALIASES[similarity]} and {METRIC_ALIASES[accuracy]} on "
                f"{benchmark} with these filters. Feature similarity is measured for runs with a teacher: run a "
                "grid with distillation methods (`clipkd grid submit grids/demo.yaml`).")
    else:
        points = points.assign(accuracy=points["accuracy"] * 100)
        figure = px.scatter(points, x="similarity", y="accuracy", color="method",
                            hover_data={"name": True, "id": True, "teacher": True, "student": True, "seed": True},
                            labels={"similarity": SIMILARITIES[similarity], "accuracy": f"{ACCURACIES[accuracy]} (%)"},
                            render_mode="webgl" if len(points) > WEBGL_ABOVE else "svg")
        x, y = points["similarity"].to_numpy(), points["accuracy"].to_numpy()
        measured = correlation(x, y)
        if measured is not None:
            r, p = measured
            slope, intercept = np.polyfit(x, y, 1)
            line = np.array([x.min(), x.max()])
            figure.add_trace(go.Scatter(x=line, y=slope * line + intercept, mode="lines",
                                        name=f"fit (r = {r.estimate:.3f})", line={"color": "black", "dash": "dash"}))
            left, middle, right = st.columns(3)
            left.metric("Pearson correlation r", f"{r.estimate:.3f}")
            middle.metric("95 % interval of r (Fisher z)", f"[{r.low:.3f}, {r.high:.3f}]")
            right.metric("fitted slope (points of accuracy per unit similarity)", f"{slope:.2f}")
            st.caption(f"r over {r.n} runs, p = {p:.3g}: "
                       + ("the interval excludes 0." if r.excludes_zero else "the interval includes 0: no measured "
                          "correlation at this number of runs."))
        else:
            st.caption("A correlation needs at least three runs that differ in both similarity and accuracy.")
        st.plotly_chart(figure, key="similarity_scatter")
        st.caption(f"{len(points)} runs; hover a point for its run.")
