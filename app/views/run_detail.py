"""One run: status, error, timings, metrics, the resolved config and its run directory (?run=ID links here)."""
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from app import formats
from app.data import PAGE_SIZE, filter_boxes, open_reader, page_number
from results.queries import filter_options, list_runs
from results.store import STATUSES

DOWNLOADABLE = ("config.json", "record.json", "train_log.jsonl", "events.jsonl")  # the small text files of a run


def show_run(run: dict, metrics: dict) -> None:
    st.subheader(run["name"])
    status, method, seed = st.columns(3)
    status.metric("status", run["status"])
    method.metric("method", run["method"])
    seed.metric("seed", run["seed"])
    if run["error"]:
        st.markdown("**error**")
        st.code(run["error"], language=None, wrap_lines=True)
    if run["notes"]:  # what its numbers do not say, e.g. micro-batch BatchNorm statistics under train.accum_freq
        st.warning(run["notes"])
    if run["status"] == "running" and run["step"] is not None:
        st.caption(f"training: step {run['step']} of {run['total_steps']}, as of {run['updated_at'][:19]} UTC")
    facts = {"run id": run["id"], "setting id": run["setting_id"], "teacher": run["teacher"] or "none (no KD)",
             "student": run["student"], "dataset": run["dataset"], "loss weights": run["terms"], "grid": run["grid"],
             "training time": formats.duration(run["train_seconds"]),
             "training processes": run["world_size"], "training device-hours": formats.number(run["device_hours"]),
             "teacher forward samples": formats.count(run["teacher_forward_samples"]),
             "student forward samples": formats.count(run["student_forward_samples"]),
             "bad training samples (replaced)": (f"{formats.count(run['bad_samples'])} (listed in bad_samples.jsonl)"
                                                 if run["bad_samples"] else formats.count(run["bad_samples"])),
             "evaluation time": formats.duration(run["eval_seconds"]),
             "started": run["started_at"], "finished": run["finished_at"], "updated": run["updated_at"],
             "host": run["host"], "code version": run["code_version"],
             "student parameters": formats.count(run["student_params"]),
             "teacher parameters": formats.count(run["teacher_params"]),
             "student GFLOPs per image / text": f"{formats.number(run['gflops_image'])} / {formats.number(run['gflops_text'])}",
             "inference": f"{formats.count(run['images_per_second'])} images/s"}
    st.dataframe(pd.DataFrame({"": [str(v) if v is not None else "-" for v in facts.values()]}, index=list(facts)),
                 key="run_facts")
    st.markdown("**metrics**")
    if metrics:
        table = pd.DataFrame(metrics).T.sort_index(axis=0).sort_index(axis=1)
        shown = table.apply(lambda column: column.map(formats.percent if formats.is_fraction(column.name) else
                                                      lambda v: formats.number(v, 4)))
        st.dataframe(shown, key="run_metrics")
    else:
        st.caption("no metrics stored: the run has not finished its evaluation")
    st.markdown("**run directory**")
    show_run_dir(run["run_dir"])
    with st.expander("resolved config"):
        st.json(json.loads(run["config"]) if run["config"] else {})


def show_run_dir(run_dir: str | None) -> None:
    if not run_dir:
        st.caption("not recorded")
        return
    path = Path(run_dir)
    st.markdown(f"[{path}]({path.as_uri()})")
    if not path.is_dir():
        st.caption("not on this machine (the run may have been trained on another host)")
        return
    for column, name in zip(st.columns(len(DOWNLOADABLE)), DOWNLOADABLE):
        if (path / name).is_file():
            column.download_button(name, (path / name).read_bytes(), file_name=name, key=f"download_{name}")


st.title("Run detail")
read = open_reader()
if read is not None:
    # a link (?run=ID) picks the run when the page opens; from then on the filters and the run box do
    wanted = st.query_params.get("run") if "run_choice" not in st.session_state else None
    if wanted and read.store.get_run(wanted) is None:
        st.warning(f"No run has id {wanted!r}; pick one below.")
        wanted = None
    filters = filter_boxes(read(filter_options), ("teacher", "student", "dataset", "method"), key="run")
    search_column, status_column = st.columns([3, 1])
    search = search_column.text_input("search run name or id", key="run_search")
    status = status_column.selectbox("status", [None, *STATUSES], format_func=lambda s: s or "all", key="run_status")
    _, total = read(list_runs, status=status, search=search or None, limit=0, **filters)
    if total == 0:
        st.info("No run matches these filters; clear the search box or widen the filters.")
    else:
        pages = max(1, -(-total // PAGE_SIZE))
        page = page_number(pages, total, key="run_page") if pages > 1 else 1
        runs, _ = read(list_runs, status=status, search=search or None, offset=(page - 1) * PAGE_SIZE, **filters)
        labels = dict(zip(runs["id"], runs["status"] + " · " + runs["name"] + " · " + runs["id"]))
        if wanted and wanted not in labels:
            labels = {wanted: wanted, **labels}
        chosen = st.selectbox("run", list(labels), format_func=labels.get, key="run_choice",
                              index=list(labels).index(wanted) if wanted else 0)
        st.query_params["run"] = chosen
        show_run(read.store.get_run(chosen), read.store.metrics(chosen))
