"""The dashboard through Streamlit's AppTest: every page on real runs and on 10,000 generated ones, cached reads
that follow the store, bound parameters under hostile filter values, and a store that stays untouched."""
import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_clipkd
from sqlalchemy import event
from sqlalchemy.engine import Engine
from streamlit.testing.v1 import AppTest

from results import findings, queries, synthetic
from results.store import Store

pytestmark = pytest.mark.xdist_group("smoke_grid")  # pyproject.toml: one worker runs the group

MAIN = ROOT / "app" / "main.py"
PAGES = {"leaderboard": "Leaderboard", "ablation": "Ablation", "similarity": "Feature similarity vs accuracy",
         "cost": "Accuracy vs cost", "curves": "Training curves", "run_detail": "Run detail", "grids": "Grid progress",
         "findings": "The paper's findings, tested"}
SMOKE_METHODS = {"baseline", "crd", "fd", "mfd", "gd", "icl", "afd", "crd+fd+icl"}


def open_page(url: str, page: str, monkeypatch, query: dict | None = None, **widgets) -> AppTest:
    """The app on ``page``; ``widgets`` (key=value) are set and the page rerun before it is returned."""
    monkeypatch.setenv("CLIPKD_DB", url)
    app = AppTest.from_file(str(MAIN), default_timeout=120)
    app.run()
    if query:
        app.query_params.update(query)
    app.switch_page(f"views/{page}.py").run()
    for key, value in widgets.items():
        app.get_widget(key).set_value(value) if hasattr(app, "get_widget") else _widget(app, key).set_value(value)
        app.run()
    assert not app.exception, app.exception[0].value if app.exception else ""
    assert app.title[0].value == PAGES[page]
    return app


def _widget(app: AppTest, key: str):
    for kind in ("selectbox", "multiselect", "text_input", "number_input", "toggle"):
        try:
            return getattr(app, kind)(key=key)
        except KeyError:
            continue
    raise KeyError(key)


def plotly_specs(app: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]


def plotly_values(array) -> list:
    """A trace's data array: a plain list, or plotly's typed binary {"dtype", "bdata"}."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def digest(path: Path) -> str:
    """The store's bytes, its write-ahead log included."""
    wal = path.with_name(path.name + "-wal")
    return hashlib.sha256(path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")).hexdigest()


@pytest.fixture(scope="module")
def real_store(smoke_grid) -> Path:
    return smoke_grid[0] / "results" / "clipkd.db"


@pytest.fixture(scope="module")
def generated_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("generated") / "store.db"
    writer = Store(f"sqlite:///{path}")
    assert synthetic.fill(writer) == 10_000
    writer.engine.dispose()  # closing the last writer checkpoints the log: from here on the bytes stay put
    return path


# -- every page, on the store the smoke grid's real runs filled ---------------------------------------------------
def test_leaderboard_ranks_the_real_runs_with_deltas(real_store, monkeypatch):
    app = open_page(f"sqlite:///{real_store}", "leaderboard", monkeypatch)
    shown = app.dataframe[0].value
    expected, references = queries.split_references(
        queries.leaderboard(Store(f"sqlite:///{real_store}", readonly=True), "top1", "digits"))
    assert list(shown["method"]) == list(expected["method"]) and set(shown["method"]) == SMOKE_METHODS
    assert list(shown["rank"]) == list(range(1, 10))
    # one seed: its interval is a bootstrap over the test items
    assert shown["top1"].iloc[0].startswith(f"{expected['top1'].iloc[0] * 100:.2f} [")
    baseline = shown[(shown["method"] == "baseline") & (shown["teacher"] == "-") & (shown["student"] == "clipkd-tiny")]
    assert baseline["Δ top1"].iloc[0] == "+0.00"
    assert app.get("download_button")[0].proto.label == "Download CSV"
    apart = app.dataframe[1].value  # the reference model, in a table of its own, its weights named
    assert list(apart["student"]) == ["clipkd-tiny-teacher"] and list(apart["weights"]) == [
        "pretrained:published-tiny-teacher.pt"]
    assert app.subheader[0].value == "Reference models" and len(references) == 1


def test_ablation_stars_the_best_value_of_each_column(real_store, monkeypatch):
    app = open_page(f"sqlite:///{real_store}", "ablation", monkeypatch)
    shown = app.dataframe[0].value
    assert SMOKE_METHODS <= set(shown["method"])
    for column in ["digits top1", "digits I2T R@1", "digits T2I R@1"]:
        assert shown[column].str.endswith("★").sum() >= 1
    assert not any(c.endswith("(paper)") for c in shown.columns)  # digits is not a cell of the paper


def test_similarity_scatter_has_a_point_per_distilled_run_and_the_fitted_correlation(real_store, monkeypatch):
    app = open_page(f"sqlite:///{real_store}", "similarity", monkeypatch)
    (spec,) = plotly_specs(app)
    points = [t for t in spec["data"] if t["mode"] == "markers"]
    expected = queries.similarity_points(Store(f"sqlite:///{real_store}", readonly=True), "digits")
    assert len(expected) >= 6 and set(expected["method"]) <= SMOKE_METHODS - {"baseline"}  # runs with a teacher
    assert sorted(row[0] for t in points for row in t["customdata"]) == sorted(expected["name"])
    fit = [t for t in spec["data"] if t["name"].startswith("fit")]
    r = np.corrcoef(expected["similarity"], expected["accuracy"])[0, 1]
    assert len(fit) == 1 and fit[0]["name"] == f"fit (r = {r:.3f})"
    assert app.metric[0].value == f"{r:.3f}"
    assert all(len(t["customdata"][0]) == 5 for t in points)  # hover: name, id, teacher, student, seed


def test_findings_page_states_each_finding_with_its_comparisons_and_verdict(real_store, monkeypatch):
    app = open_page(f"sqlite:///{real_store}", "findings", monkeypatch)
    expected = findings.findings(Store(f"sqlite:///{real_store}", readonly=True))
    stated = [m.value for m in app.markdown if m.value.startswith("**")]
    assert [s.split("**")[1] for s in stated] == [f"{f.number}. {f.claim}" for f in expected]
    assert all(findings.details([f]).empty or f"[{f.verdict.split(' at ')[0]}" in s for f, s in zip(expected, stated))
    first = app.dataframe[0].value  # finding 1: each single loss against the baseline, over test items (one seed)
    assert list(first["comparison"]) == [c.label for c in expected[0].comparisons]
    assert first["estimate"].tolist() == pytest.approx([c.estimate for c in expected[0].comparisons])
    assert first["test"].str.startswith("paired bootstrap over").all()


def test_accuracy_vs_cost_draws_each_run_and_the_pareto_front(real_store, monkeypatch):
    from app.views.cost import pareto_front

    app = open_page(f"sqlite:///{real_store}", "cost", monkeypatch)
    (spec,) = plotly_specs(app)
    points = [t for t in spec["data"] if t.get("mode") == "markers"]
    expected = queries.cost_points(Store(f"sqlite:///{real_store}", readonly=True), "digits")
    assert sum(len(t["customdata"]) for t in points) == len(expected) == 10  # every run, with its cost
    assert "reference" in {t["name"] for t in points}  # and the reference model, on the same axes
    assert (expected["gflops_image"] > 0).all() and (expected["images_per_s"] > 0).all()
    (front,) = [t for t in spec["data"] if t["name"] == "Pareto front"]
    table = app.dataframe[0].value
    front_x, front_y = plotly_values(front["x"]), plotly_values(front["y"])
    assert len(front_x) == len(table) >= 1
    # no run of the front is beaten on both axes by another run
    for cost, accuracy in zip(front_x, front_y):
        assert not ((expected["gflops_image"] <= cost) & (expected["accuracy"] * 100 > accuracy)).any()
    assert list(pareto_front(np.array([3.0, 1.0, 2.0, 1.0]), np.array([0.9, 0.5, 0.8, 0.4]), False)) == [1, 2, 0]
    assert list(pareto_front(np.array([10.0, 30.0, 20.0]), np.array([0.9, 0.5, 0.95]), True)) == [1, 2]


def test_training_curves_plot_each_term_for_the_chosen_runs(real_store, monkeypatch):
    store = Store(f"sqlite:///{real_store}", readonly=True)
    runs, _ = queries.list_runs(store, method="crd+fd+icl")
    app = open_page(f"sqlite:///{real_store}", "curves", monkeypatch, curves_method="crd+fd+icl")
    assert app.multiselect(key="curves_runs").value == list(runs["id"])
    titles = {spec["layout"]["title"]["text"] for spec in plotly_specs(app)}
    stored = queries.training_curves(store, list(runs["id"]))
    teacher_gap = stored["term"].str.startswith(queries.TEACHER_GAP)  # a reference line, not a chart of its own
    assert titles == set(stored["term"][~teacher_gap]) and {"task", "crd", "fd", "icl"} <= titles
    gap = next(s for s in plotly_specs(app) if s["layout"]["title"]["text"].startswith("pair_similarity_gap"))
    lines = sorted(shape["y0"] for shape in gap["layout"]["shapes"])
    assert lines == pytest.approx(sorted(stored[teacher_gap].groupby("id")["value"].first()))  # each run's teacher
    order = [spec["layout"]["title"]["text"].split(" ")[0] for spec in plotly_specs(app)]
    assert order[0] == "zero-shot" and order[1] in queries.SIMILARITY_CURVES  # samples needed, then §4.4
    task = next(s for s in plotly_specs(app) if s["layout"]["title"]["text"] == "task")
    assert len(task["data"]) == len(runs) and len(task["data"][0]["customdata"]) == (stored["term"] == "task").sum() / len(runs)


def test_run_detail_shows_config_metrics_timings_and_the_run_directory(real_store, monkeypatch):
    store = Store(f"sqlite:///{real_store}", readonly=True)
    teacher = next(r for r in queries.list_runs(store)[0].itertuples() if r.name == "smoke/teacher/tiny-teacher")
    app = open_page(f"sqlite:///{real_store}", "run_detail", monkeypatch, query={"run": teacher.id})
    assert app.subheader[0].value == "smoke/teacher/tiny-teacher"
    assert [m.value for m in app.metric] == ["done", "baseline", "0"]
    facts = app.dataframe[0].value.iloc[:, 0]
    assert facts["run id"] == teacher.id and re.fullmatch(r"\d+\.\d s|\d+ min \d+ s", facts["training time"])
    assert facts["student parameters"].endswith(" M") and facts["inference"].endswith("images/s")
    metrics = app.dataframe[1].value
    assert metrics.loc["digits", "acc1"] == f"{100 * store.metrics(teacher.id)['digits']['acc1']:.2f} %"
    assert [b.proto.label for b in app.get("download_button")] == ["config.json", "record.json", "train_log.jsonl",
                                                                  "events.jsonl"]
    assert json.loads(app.json[0].proto.body)["student"]["model"] == "clipkd-tiny-teacher"


def test_grid_progress_counts_the_smoke_grids_cells(real_store, monkeypatch):
    app = open_page(f"sqlite:///{real_store}", "grids", monkeypatch)
    row = app.dataframe[0].value.set_index("grid").loc["smoke"]
    assert (row["done"], row["cells"], row["new"], row["failed"]) == (9, 9, 0, 0)


# -- every page, on 10,000 generated runs -------------------------------------------------------------------------
def test_leaderboard_pages_10000_runs(generated_store, monkeypatch):
    url = f"sqlite:///{generated_store}"
    app = open_page(url, "leaderboard", monkeypatch)
    first = app.dataframe[0].value
    assert len(first) == 50 and app.number_input(key="leaderboard_page").max == 37  # 1,850 (setting, method) rows
    app.number_input(key="leaderboard_page").set_value(37).run()
    last = app.dataframe[0].value
    assert list(last["rank"]) == list(range(1801, 1851)) and not set(last["rank"]) & set(first["rank"])
    assert re.fullmatch(r"\d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]", first["top1"].iloc[0])  # five seeds: an interval


def test_ablation_shows_the_papers_numbers_beside_matching_cells(generated_store, monkeypatch):
    cc = synthetic.DATASETS[0]
    app = open_page(f"sqlite:///{generated_store}", "ablation", monkeypatch, ablation_dataset=cc,
                    ablation_student="ViT-T-16")
    shown = app.dataframe[0].value.set_index(["teacher", "method"])
    paper = shown["imagenet1k top1 (paper)"]
    assert list(shown.columns).index("imagenet1k top1 (paper)") == list(shown.columns).index("imagenet1k top1") + 1
    assert paper[("-", "baseline")] == "30.55" and paper[("ViT-B-16@run:cc3m-cc12m", "crd")] == "31.94"
    assert paper[("ViT-B-16@run:cc3m-cc12m", "crd+fd+icl")] == "34.90"
    assert paper[("ViT-B-16@laion400m_e32", "crd+fd+icl")] == "42.60"
    assert paper[("ViT-L-14@laion400m_e32", "crd")] == ""  # the paper has no such cell
    assert shown["imagenet1k top1"].str.endswith("★").sum() == 1


def test_similarity_scatter_of_9000_runs_uses_webgl(generated_store, monkeypatch):
    app = open_page(f"sqlite:///{generated_store}", "similarity", monkeypatch)
    (spec,) = plotly_specs(app)
    points = [t for t in spec["data"] if not t["name"].startswith("fit")]
    assert sum(len(t["customdata"]) for t in points) == 9000 and {t["type"] for t in points} == {"scattergl"}


def test_curves_offer_the_newest_runs_and_say_how_to_reach_the_others(generated_store, monkeypatch):
    app = open_page(f"sqlite:///{generated_store}", "curves", monkeypatch)
    assert len(app.multiselect(key="curves_runs").options) == 500
    assert "10000 runs match" in app.caption[0].value
    assert len(plotly_specs(app)) >= 2


def test_run_detail_pages_runs_and_shows_a_failed_runs_error(generated_store, monkeypatch):
    app = open_page(f"sqlite:///{generated_store}", "run_detail", monkeypatch, run_status="failed")
    assert app.metric[0].value == "failed"
    assert "NonFiniteLossError" in app.code[0].value
    app = open_page(f"sqlite:///{generated_store}", "run_detail", monkeypatch)
    assert app.number_input(key="run_page").max == 200


def test_grid_progress_of_10000_runs(generated_store, monkeypatch):
    app = open_page(f"sqlite:///{generated_store}", "grids", monkeypatch)
    table = app.dataframe[0].value
    assert len(table) == 5 and table["cells"].sum() == 10_000 and table["done"].sum() == 9250
    assert (table[["new", "queued", "running", "done", "failed"]].sum(axis=1) == table["cells"]).all()


def test_the_dashboards_own_connection_refuses_writes(generated_store, monkeypatch):
    """Not only do the pages not write: the connection they read through cannot (SQLite's mode=ro)."""
    from sqlalchemy.exc import OperationalError

    from app.data import _open

    url, before = f"sqlite:///{generated_store}", digest(generated_store)
    open_page(url, "leaderboard", monkeypatch)
    store = _open(url)  # the cached Store every page of this process reads through
    assert store.readonly and store.count_runs() == 10_000
    with pytest.raises(OperationalError, match="readonly database"):
        store.put_run({"id": "intruder", "setting_id": "s", "name": "x", "student": "S", "method": "baseline",
                       "terms": "{}", "dataset": "d", "seed": 0, "status": "done", "config": "{}"})
    with pytest.raises(OperationalError, match="readonly database"), store.engine.connect() as connection:
        connection.exec_driver_sql("DELETE FROM runs")
    assert digest(generated_store) == before


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_on_postgresql_every_page_reads_and_the_dashboards_connection_cannot_write(store_url, monkeypatch):
    from sqlalchemy.exc import DBAPIError

    from app.data import _open

    writer = Store(store_url)
    for run_id, method, top1 in (("b", "baseline", 0.5), ("f", "fd", 0.6)):
        _run(run_id, method, top1, writer)
    for page in PAGES:
        open_page(store_url, page, monkeypatch)
    store = _open(store_url)
    assert store.readonly and store.count_runs() == 2
    with pytest.raises(DBAPIError, match="read-only transaction"):
        store.put_run({"id": "intruder", "setting_id": "s", "name": "x", "student": "S", "method": "baseline",
                       "terms": "{}", "dataset": "d", "seed": 0, "status": "done", "config": "{}"})
    assert writer.count_runs() == 2


def test_pages_leave_the_store_untouched(generated_store, monkeypatch):
    before = digest(generated_store)
    for page in PAGES:
        open_page(f"sqlite:///{generated_store}", page, monkeypatch)
    assert digest(generated_store) == before


# -- empty states, caching ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_empty_states_say_what_to_run(tmp_path, monkeypatch, page):
    app = open_page(f"sqlite:///{tmp_path / 'none.db'}", page, monkeypatch)
    assert "does not exist" in app.info[0].value and "make demo" in app.info[0].value
    Store(f"sqlite:///{tmp_path / 'empty.db'}")  # a store with its schema but no run
    app = open_page(f"sqlite:///{tmp_path / 'empty.db'}", page, monkeypatch)
    assert "has no runs yet" in app.info[0].value and "clipkd grid submit" in app.info[0].value


def _run(run_id: str, method: str, top1: float, store: Store) -> None:
    store.put_run({"id": run_id, "setting_id": "s", "name": run_id, "teacher": None if method == "baseline" else "T@x",
                   "student": "S", "method": method, "terms": "{}", "dataset": "digits", "seed": 0, "status": "done",
                   "config": "{}"}, metrics={"digits": {"acc1": top1}})


def test_reads_are_cached_until_the_store_changes(tmp_path, monkeypatch):
    writer = Store(f"sqlite:///{tmp_path / 'store.db'}")
    _run("a", "baseline", 0.5, writer)
    statements = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731 - (conn, cursor, statement, ...)
    event.listen(Engine, "before_cursor_execute", listener)
    try:
        app = open_page(f"sqlite:///{tmp_path / 'store.db'}", "leaderboard", monkeypatch)
        assert list(app.dataframe[0].value["method"]) == ["baseline"]
        statements.clear()
        app.run()
        assert len(statements) == 3 and all("count" in s or "max" in s for s in statements)  # the revision only
        _run("b", "fd", 0.7, writer)
        app.run()
        assert list(app.dataframe[0].value["method"]) == ["fd", "baseline"]
    finally:
        event.remove(Engine, "before_cursor_execute", listener)


# -- hostile values through every filter --------------------------------------------------------------------------
HOSTILE = ["x' OR '1'='1", '"; DROP TABLE runs; --', "') UNION SELECT id, name FROM runs --", "%", "_"]


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory) -> Path:
    """Normal runs, and for each hostile string a baseline and a distilled run whose every field is that string."""
    path = tmp_path_factory.mktemp("hostile") / "store.db"
    store = Store(f"sqlite:///{path}")
    cases = [("normal", None, "plain")] + [(f"h{i}", text, text) for i, text in enumerate(HOSTILE)]
    for prefix, teacher, text in cases:
        for method in ("baseline", text if teacher else "fd"):
            run_id = f"{prefix}{'b' if method == 'baseline' else 'd'}"
            store.put_run({"id": run_id, "setting_id": prefix, "name": f"{text} {method}", "student": text,
                           "teacher": None if method == "baseline" else (teacher or "plain-teacher"), "method": method,
                           "terms": "{}", "dataset": text, "seed": 0, "status": "done", "config": "{}", "grid": text},
                          metrics={text: {"acc1": 0.5, "text_retrieval_recall@1": 0.4, "image_retrieval_recall@1": 0.3,
                                          "feature_cosine_image": 0.6}},
                          curves=[("task", 1, 2.0), ("task", 2, 1.5)])
        store.register_grid(text, {f"{prefix}b": "b", f"{prefix}d": "d"})
    store.engine.dispose()
    return path


def shown_text(app: AppTest) -> str:
    """Everything a page shows of the store: tables, chart data and the choices it offers."""
    parts = [frame.value.to_json() for frame in app.dataframe] + [chart.proto.spec for chart in app.get("plotly_chart")]
    parts += [json.dumps([str(o) for o in box.options]) for box in [*app.multiselect, *app.selectbox]
              if box.key in ("curves_runs", "run_choice")]
    return "\n".join(parts)


FILTERED_PAGES = {"leaderboard": ("teacher", "student", "dataset", "method"), "ablation": ("teacher", "student", "dataset"),
                  "similarity": ("teacher", "student", "dataset", "method"),
                  "curves": ("teacher", "student", "dataset", "method"), "run_detail": ("teacher", "student", "dataset",
                                                                                          "method")}
WIDGET_PREFIX = {"run_detail": "run"}


@pytest.mark.parametrize("page", FILTERED_PAGES)
def test_hostile_filter_values_are_bound_parameters(hostile_store, monkeypatch, page):
    url, before = f"sqlite:///{hostile_store}", digest(hostile_store)
    statements = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(Engine, "before_cursor_execute", listener)
    try:
        for text in HOSTILE:
            prefix = WIDGET_PREFIX.get(page, page)
            for name in FILTERED_PAGES[page]:
                extra = {f"{page}_benchmark": text} if page in ("leaderboard", "similarity") else {}
                app = open_page(url, page, monkeypatch, **extra, **{f"{prefix}_{name}": text})
                shown = shown_text(app)
                # a teacher filter keeps every baseline in the comparison tables
                leak = "plain-teacher" if name == "teacher" and page in ("leaderboard", "ablation") else "plain"
                assert leak not in shown, f"{page}: filter {name}={text!r} let other runs through"
                assert json.dumps(text)[1:-1] in shown
            if page in ("curves", "run_detail"):
                app = open_page(url, page, monkeypatch, **{f"{prefix}_search": text})
                assert "plain" not in shown_text(app) and text in shown_text(app)
        assert not [s for s in statements if any(text in s for text in HOSTILE[:3])]  # values never in the SQL text
    finally:
        event.remove(Engine, "before_cursor_execute", listener)
    assert digest(hostile_store) == before and Store(url, readonly=True).count_runs() == 12


def test_hostile_run_id_in_the_link(hostile_store, monkeypatch):
    app = open_page(f"sqlite:///{hostile_store}", "run_detail", monkeypatch, query={"run": HOSTILE[0]})
    assert "No run has id" in app.warning[0].value


def test_grid_progress_with_hostile_grid_names(hostile_store, monkeypatch):
    table = open_page(f"sqlite:///{hostile_store}", "grids", monkeypatch).dataframe[0].value
    assert set(table["grid"]) == {"plain", *HOSTILE} and (table["cells"] == 2).all()


# -- the command ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--db", "not a scheme://x"], "--db 'not a scheme://x' is not an SQLAlchemy URL"),
    (["--port", "70000"], "--port 70000: a TCP port is 1-65535"),
])
def test_app_command_rejects_bad_arguments(tmp_path, args, message):
    result = run_clipkd("app", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr
