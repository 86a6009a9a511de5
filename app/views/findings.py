"""The paper's findings (§4.2–§4.4), each with its test and verdict on the store (results/findings.py)."""
import streamlit as st

from app.data import ALL, open_reader
from results import findings
from results.queries import filter_options
from results.stats import CONFIDENCE

BADGES = {findings.HOLDS: ":green-badge[holds]", findings.CONTRADICTED: ":red-badge[contradicted]",
          findings.UNRESOLVED: ":orange-badge[unresolved at this power]", findings.UNTESTED: ":gray-badge[not tested]"}

st.title("The paper's findings, tested")
read = open_reader()
if read is not None:
    options = read(filter_options)
    grid_column, benchmark_column, similarity_column, margin_column = st.columns(4)
    grid = grid_column.selectbox("grid", [ALL, *options["grid"]], key="findings_grid",
                                 format_func=lambda v: "all runs" if v is ALL else v)
    benchmark = benchmark_column.selectbox("benchmark", [ALL, *options["benchmark"]], key="findings_benchmark",
                                           format_func=lambda v: "ImageNet, else the most evaluated" if v is ALL else v)
    similarity = similarity_column.selectbox("feature similarity (finding 5)", findings.SIMILARITIES,
                                             key="findings_similarity")
    margin = margin_column.number_input("notable difference (points of top-1)", 0.1, 10.0, 1.0, 0.1,
                                        key="findings_margin")
    report = read(findings.findings, benchmark, grid, margin / 100, similarity)
    if not report:
        st.info("No setting here has a no-KD baseline and distilled runs. The findings need the paper's cells: "
                "`clipkd grid submit grids/demo_findings.yaml` (about an hour on 2 cores) or "
                "`grids/paper_ablation.yaml` on a cluster.")
    for setting in dict.fromkeys(f.setting for f in report):
        st.subheader(setting)
        for finding in (f for f in report if f.setting == setting):
            st.markdown(f"**{finding.number}. {finding.claim}** {BADGES[finding.verdict]}  \npaper: {finding.paper}")
            table = findings.details([finding])
            if not table.empty:
                st.dataframe(table[["comparison", "tested", "estimate", "low", "high", "p_adjusted", "test", "verdict"]],
                             hide_index=True, key=f"findings_{setting}_{finding.number}")
            if finding.missing:
                st.caption("missing: " + ", ".join(finding.missing))
    if report:
        st.caption(findings.legend(margin / 100, CONFIDENCE))
