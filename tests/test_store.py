"""The results store: concurrent writers, idempotent writes, record ingestion, read-only readers and schema
versions, on SQLite and on a real PostgreSQL server (scripts/postgres.sh); and the leaderboard arithmetic."""
import math
import multiprocessing as mp
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from results.queries import ablation, leaderboard, render
from results.store import SCHEMA_VERSION, VALUE_RECORD, Store, StoreError, value_key


def run_row(run_id, method="baseline", seed=0, teacher=None, setting="s1", status="done", student="tiny"):
    return {
        "id": run_id, "setting_id": setting, "name": run_id, "teacher": teacher, "student": student, "method": method,
        "terms": "{}", "dataset": "digits", "seed": seed, "status": status, "config": "{}",
    }


def _write_runs(url, worker, count):
    store = Store(url)
    for i in range(count):
        run_id = f"w{worker}-r{i}"
        metrics = {"digits": {"acc1": i / count, "text_retrieval_recall@1": 0.5}}
        store.put_run(run_row(run_id, seed=i), metrics=metrics, curves=[("task", 1, 4.0), ("task", 2, 3.5)])
        if i % 10 == 0:  # a retried write of the same run must not double it
            store.put_run(run_row(run_id, seed=i), metrics=metrics)


def _count(store: Store, sql: str) -> int:
    with store.engine.connect() as connection:
        return connection.exec_driver_sql(sql).scalar_one()


def test_eight_processes_writing_fifty_runs_each(store_url):
    Store(store_url).engine.dispose()  # the schema first: eight processes must not race to create it
    context = mp.get_context("spawn")
    workers = [context.Process(target=_write_runs, args=(store_url, w, 50)) for w in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    store = Store(store_url)
    assert _count(store, "select count(*) from runs") == 400
    assert _count(store, "select count(distinct id) from runs") == 400
    assert _count(store, "select count(*) from metrics") == 800
    assert _count(store, "select count(*) from curves") == 800
    if store_url.startswith("sqlite"):
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("pragma journal_mode").scalar_one() == "wal"


def test_job_records_are_ingested_once_and_the_newest_wins(store_url, tmp_path):
    """What `grid status` does with the record.json files jobs write: idempotent, newer records replace older."""
    from results.records import ingest, write_record

    runs = [tmp_path / "runs" / f"r{i}" for i in range(5)]
    for i, run_dir in enumerate(runs):
        write_record(run_dir, run_row(f"r{i}", seed=i, status="running"))
    store = Store(store_url)
    assert ingest(store, runs) == 5 and ingest(store, runs) == 0
    write_record(runs[2], run_row("r2", seed=2), metrics={"digits": {"acc1": 0.75}},
                 curves=[("task", 1, 2.0)], items={"digits": {"acc1": np.array([True, True, False, True])}})
    assert ingest(store, runs) == 1
    assert store.get_run("r2")["status"] == "done" and store.metrics("r2") == {"digits": {"acc1": 0.75}}
    assert store.items(["r2"], "digits", "acc1")["r2"].tolist() == [True, True, False, True]
    assert [store.get_run(f"r{i}")["status"] for i in range(5)] == ["running", "running", "done", "running", "running"]


def indexed_values(store: Store) -> dict:
    """What the run_values index holds, and what the metrics table holds, each as {(run, key): value}."""
    with store.engine.connect() as connection:
        index = {(run_id, int(key)): float(value) for run_id, data in connection.exec_driver_sql(
            "select run_id, data from run_values") for key, value in np.frombuffer(data, dtype=VALUE_RECORD)}
        table = {(run_id, value_key(benchmark, metric)): math.nan if value is None else value
                 for run_id, benchmark, metric, value in connection.exec_driver_sql(
                     "select run_id, benchmark, metric, value from metrics")}
    return index, table


def test_the_values_index_follows_every_write_of_the_metrics(store_url):
    store = Store(store_url)
    store.put_run(run_row("a"), metrics={"digits": {"acc1": 0.1, "acc5": 0.5}, "cifar10": {"acc1": 0.3}})
    store.put_run(run_row("b"), metrics={"digits": {"acc1": 0.2, "acc5": float("nan")}})
    store.put_run(run_row("a"), metrics={"digits": {"acc1": 0.15}})  # replaces digits, keeps cifar10
    store.set_status("b", "done")  # a write without metrics leaves them
    index, table = indexed_values(store)
    assert index.keys() == table.keys() and len(index) == 4
    assert all(index[k] == table[k] or math.isnan(index[k]) and math.isnan(table[k]) for k in index)
    assert index[("a", value_key("digits", "acc1"))] == 0.15 and ("a", value_key("digits", "acc5")) not in index
    assert leaderboard(store, "top1", "digits").set_index("method").loc["baseline", "top1"] == pytest.approx(0.175)
    with store.transaction() as connection:
        connection.exec_driver_sql("delete from runs where id = 'a'")
    assert {run for run, _ in indexed_values(store)[0]} == {"b"}  # gone with its run


def test_writes_are_idempotent_and_metrics_replace(store_url):
    store = Store(store_url)
    store.put_run(run_row("a"), metrics={"digits": {"acc1": 0.1, "acc5": 0.5}})
    store.put_run(run_row("a"), metrics={"digits": {"acc1": 0.2}})
    assert store.count_runs() == 1
    assert store.metrics("a") == {"digits": {"acc1": 0.2}}
    store.set_status("a", "failed", "evaluation: boom")
    assert store.get_run("a")["status"] == "failed" and store.get_run("a")["student"] == "tiny"  # fields kept
    with pytest.raises(StoreError, match="unknown status 'finished'; accepted: queued, running, done, failed"):
        store.set_status("a", "finished")


def test_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "store.db"
    Store(f"sqlite:///{path}").put_run(run_row("a"))
    with sqlite3.connect(path) as connection:
        connection.execute("update clipkd_schema set value = ? where key = 'version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this clipkd's {SCHEMA_VERSION}"):
        Store(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:
        assert connection.execute("select count(*) from runs").fetchone()[0] == 1


def test_foreign_database_and_empty_readonly_store_are_refused(tmp_path):
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("create table items (x)")
    with pytest.raises(StoreError, match="is not a clipkd results store"):
        Store(f"sqlite:///{foreign}")
    with pytest.raises(StoreError, match="new.db does not exist: run `clipkd run CONFIG` or `clipkd grid submit GRID`"):
        Store(f"sqlite:///{tmp_path / 'new.db'}", readonly=True)
    sqlite3.connect(tmp_path / "blank.db").close()
    with pytest.raises(StoreError, match="is empty: run `clipkd run CONFIG` first"):
        Store(f"sqlite:///{tmp_path / 'blank.db'}", readonly=True)
    assert not (tmp_path / "new.db").exists()
    notes = tmp_path / "notes.txt"  # a plain path names a SQLite file: one that is not a database is left alone
    notes.write_text("my notes\n")
    for readonly in (True, False):
        with pytest.raises(StoreError, match=f"cannot open results store 'sqlite:///{notes}': file is not a database"):
            Store(str(notes), readonly=readonly)
    assert notes.read_text() == "my notes\n" and [p.name for p in tmp_path.glob("notes.txt*")] == ["notes.txt"]
    with pytest.raises(StoreError, match="is a folder; give the store's file"):
        Store(str(tmp_path), readonly=True)


def test_a_readonly_store_cannot_write(store_url):
    """The dashboard's store: SQLite opened with mode=ro, PostgreSQL in read-only transactions; either way the
    database itself refuses a write, and nothing changes."""
    from sqlalchemy.exc import DBAPIError

    writer = Store(store_url)
    writer.put_run(run_row("a"))
    reader = Store(store_url, readonly=True)
    assert reader.get_run("a")["status"] == "done"
    refused = "readonly database" if store_url.startswith("sqlite") else "read-only transaction"
    with pytest.raises(DBAPIError, match=refused):
        reader.put_run(run_row("b"))
    with pytest.raises(DBAPIError, match=refused), reader.engine.connect() as connection:
        connection.exec_driver_sql("DELETE FROM runs")
    assert writer.count_runs() == 1 and writer.get_run("a")["status"] == "done"


def test_a_readonly_sqlite_store_leaves_its_bytes_alone(tmp_path):
    path = tmp_path / "store.db"
    Store(f"sqlite:///{path}").put_run(run_row("a"))
    before = path.read_bytes()
    reader = Store(f"sqlite:///{path}", readonly=True)
    with pytest.raises(OperationalError, match="readonly database"):
        reader.put_run(run_row("b"))
    assert path.read_bytes() == before


FIXTURES = Path(__file__).with_name("fixtures")


def earlier_store(url: str, version: int) -> None:
    """At ``url``, the store tests/fixtures/store-schemaN.db holds: written by clipkd's own code at schema N
    (commits 5efff5b and e6f9102), as a SQLite file. On PostgreSQL the same rows go into the tables the
    migrations up to revision N make, the schema that code made there."""
    import sqlalchemy as sa

    fixture = FIXTURES / f"store-schema{version}.db"
    if url.startswith("sqlite:///"):
        shutil.copy(fixture, url.removeprefix("sqlite:///"))
        return
    from alembic import command
    from alembic.config import Config

    from results.store import MIGRATIONS

    old, engine = sa.create_engine(f"sqlite:///{fixture}"), sa.create_engine(url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, f"{version:04d}")
        tables = sa.MetaData()
        tables.reflect(connection)
        with old.connect() as source:
            for table in tables.sorted_tables:  # parents before children
                if table.name != "alembic_version":
                    rows = [dict(row._mapping) for row in source.execute(sa.text(f"select * from {table.name}"))]
                    if rows:
                        connection.execute(table.insert(), rows)


@pytest.mark.parametrize("version", [1, 2])
def test_a_store_written_by_an_earlier_clipkd_is_upgraded_in_place(store_url, version):
    """A reader refuses an earlier store until a writer upgrades it, keeping every run, metric and curve; the
    upgraded schema is the one a new store gets, on SQLite and on PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from results.store import Base

    earlier_store(store_url, version)
    with pytest.raises(StoreError, match=f"schema version {version}; this clipkd needs {SCHEMA_VERSION} and opens it "
                                         "read-only"):
        Store(store_url, readonly=True)
    store = Store(store_url)
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    run = store.get_run(f"old-run-{version}")
    assert run["name"] == f"written by schema {version}" and run["train_seconds"] == 12.5
    assert run["device_hours"] is None and run["gflops_image"] is None  # columns added empty
    assert store.metrics(f"old-run-{version}") == {"digits": {"acc1": 0.5, "text_retrieval_recall@1": 0.25}}
    index, table = indexed_values(store)
    assert index == table and len(index) == 2  # the values index built from the metrics already stored
    store.register_grid("g", {f"old-run-{version}": "g/a"})
    store.put_run(run_row("new"), items={"digits": {"acc1": np.array([True, False, True])}})
    assert list(store.items(["new"], "digits", "acc1")["new"]) == [True, False, True]
    reader = Store(store_url, readonly=True)
    assert reader.count_runs() == 2 and reader.get_run("new")["status"] == "done"


def test_a_new_store_is_the_migrations_and_a_newer_one_is_refused(store_url):
    """A new store is Alembic's migrations applied to nothing, equal to the models the code reads with; the
    schema version a newer clipkd writes is refused, on either backend."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from results.store import Base

    store = Store(store_url)
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        assert connection.exec_driver_sql("select version_num from alembic_version").scalar_one() == f"{SCHEMA_VERSION:04d}"
    with store.transaction() as connection:
        connection.exec_driver_sql(f"update clipkd_schema set value = '{SCHEMA_VERSION + 1}' where key = 'version'")
    with pytest.raises(StoreError, match=f"newer than this clipkd's {SCHEMA_VERSION}"):
        Store(store_url)


def filled_store(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    rows = [("b0", "baseline", 0, 0.30), ("b1", "baseline", 1, 0.32),
            ("f0", "fd", 0, 0.40), ("f1", "fd", 1, 0.44), ("c0", "crd+fd+icl", 0, 0.50)]
    for run_id, method, seed, acc in rows:
        teacher = None if method == "baseline" else "big@teacher.pt"
        metrics = {"digits": {"acc1": acc, "image_retrieval_recall@1": acc / 2, "text_retrieval_recall@1": acc / 4}}
        if teacher:
            metrics["digits"]["feature_cosine_image"] = acc + 0.3
        store.put_run(run_row(run_id, method, seed, teacher), metrics=metrics)
    store.put_run(run_row("other", "baseline", 0, setting="s2"), metrics={"digits": {"acc1": 0.9}})
    store.put_run(run_row("broken", "fd", 3, "big@teacher.pt", status="failed"), metrics={"digits": {"acc1": 0.99}})
    return store


def test_leaderboard_intervals_over_seeds_and_paired_delta_against_the_same_settings_baseline(tmp_path):
    from scipy import stats

    table = leaderboard(filled_store(tmp_path))
    s1 = table[table["top1"] != 0.9].set_index("method")
    assert list(table["method"])[:3] == ["baseline", "crd+fd+icl", "fd"]  # ranked by top1: s2's baseline first
    assert s1.loc["fd", "seeds"] == 2
    assert s1.loc["fd", "top1"] == pytest.approx(0.42)
    low, high = stats.t.interval(0.95, 1, loc=0.42, scale=0.02)  # seeds 0.40 and 0.44: sem 0.02
    assert (s1.loc["fd", "top1_low"], s1.loc["fd", "top1_high"]) == pytest.approx((low, high))
    paired = stats.ttest_rel([0.40, 0.44], [0.30, 0.32])  # fd and the baseline share seeds 0 and 1
    assert s1.loc["fd", "top1_delta"] == pytest.approx(0.42 - 0.31)
    assert (s1.loc["fd", "top1_delta_low"], s1.loc["fd", "top1_delta_high"]) == pytest.approx(
        tuple(paired.confidence_interval(0.95)))
    assert s1.loc["fd", "top1_p"] == pytest.approx(paired.pvalue) and s1.loc["fd", "top1_test"].startswith("paired t")
    assert s1.loc["crd+fd+icl", "t2i_r1_delta"] == pytest.approx(0.25 - 0.155)
    assert s1.loc["fd", "cos_img"] == pytest.approx(0.72) and math.isnan(s1.loc["baseline", "cos_img"])
    assert 0.99 not in set(table["top1"])  # failed runs are not ranked
    assert "0.42" not in render(table, "csv") and "42.0" in render(table, "csv")  # percentages
    shown = render(table, "table")
    assert f"42.00 [{low * 100:.2f}, {high * 100:.2f}]" in shown and "* p < 0.05" in shown


def test_filters_are_bound_parameters(tmp_path):
    store = filled_store(tmp_path)
    for hostile in ["x' OR '1'='1", "'; DROP TABLE runs; --", 'big"teacher', "%", "_"]:
        for field in ("teacher", "student", "dataset", "method", "benchmark"):
            assert leaderboard(store, **{field: hostile}).query("method != 'baseline'").empty
    assert store.count_runs() == 7


def test_ablation_has_methods_as_rows_and_benchmarks_as_columns(tmp_path):
    table = ablation(filled_store(tmp_path), student="tiny").set_index("method")
    assert {"digits top1", "digits I2T R@1", "digits T2I R@1"} <= set(table.columns)
    assert table.loc["fd", "digits top1"] == pytest.approx(0.42)


def test_ablation_beside_the_paper_in_markdown_from_a_store_given_as_a_file_path(tmp_path, clipkd):
    store = filled_store(tmp_path)
    store.put_run(run_row("t0", student="big", setting="s3"), metrics={"digits": {"acc1": 0.8}})  # the teacher
    out = clipkd("ablation", "--db", "store.db", "--paper", "--format", "markdown", cwd=tmp_path).stdout
    header, _rule, *lines = [[cell.strip() for cell in line.strip("|").split("|")]
                             for line in out.splitlines() if line.startswith("|")]
    rows = {(row[header.index("student")], row[header.index("method")]): row for row in lines}
    paper, paper_delta = header.index("paper ImageNet top1"), header.index("paper ImageNet top1_delta")
    assert (rows["big", "baseline"][paper], rows["big", "baseline"][paper_delta]) == ("36.99", "-")  # ViT-B/16
    assert (rows["tiny", "fd"][paper], rows["tiny", "fd"][paper_delta]) == ("34.23", "3.68")
    assert "nan" not in out
