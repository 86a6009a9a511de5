"""The dashboard's entry point: `clipkd app [--db URL] [--port N]`, or `CLIPKD_DB=URL streamlit run app/main.py`."""
from pathlib import Path

import streamlit as st

VIEWS = Path(__file__).with_name("views")

st.set_page_config(page_title="clipkd leaderboard", page_icon="📊", layout="wide")  # a material icon here is fetched from Google
pages = [
    st.Page(VIEWS / "leaderboard.py", title="Leaderboard", icon=":material/leaderboard:", default=True),
    st.Page(VIEWS / "ablation.py", title="Ablation", icon=":material/table_chart:"),
    st.Page(VIEWS / "findings.py", title="The paper's findings", icon=":material/fact_check:", url_path="findings"),
    st.Page(VIEWS / "similarity.py", title="Feature similarity vs accuracy", icon=":material/scatter_plot:",
            url_path="similarity"),
    st.Page(VIEWS / "cost.py", title="Accuracy vs cost", icon=":material/speed:", url_path="cost"),
    st.Page(VIEWS / "curves.py", title="Training curves", icon=":material/show_chart:"),
    st.Page(VIEWS / "run_detail.py", title="Run detail", icon=":material/description:", url_path="run"),
    st.Page(VIEWS / "grids.py", title="Grid progress", icon=":material/grid_view:", url_path="grids"),
]
st.navigation(pages).run()
