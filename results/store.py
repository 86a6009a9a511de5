"""The results store: runs, their metrics and training curves, in any SQLAlchemy database.

SQLite (``results/clipkd.db``) is the default, in WAL mode with a busy timeout, every write transaction begun
with ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing on a lock upgrade. A lab's shared store
is any SQLAlchemy URL (``--db`` or ``CLIPKD_DB``), e.g. ``postgresql+psycopg://host/clipkd``. Every write is one
transaction and an upsert: writing the same run twice leaves one run. A read-only store (the dashboard's) opens
SQLite with ``mode=ro`` and PostgreSQL with read-only transactions, so a reader can never change what is stored.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import QueuePool

from core.errors import ClipkdError
from results.bits import pack, unpack

SCHEMA_VERSION = 8
DEFAULT_URL = "sqlite:///results/clipkd.db"
STATUSES = ("queued", "running", "done", "failed")


class StoreError(ClipkdError, RuntimeError):
    pass


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    __tablename__ = "clipkd_schema"
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(64))


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # hash of the resolved training config
    setting_id: Mapped[str] = mapped_column(String(32))  # the same, without teacher, method and seed
    name: Mapped[str] = mapped_column(String(200))
    teacher: Mapped[str | None] = mapped_column(String(300))
    student: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(200))  # "baseline", or the sorted loss names joined by "+"
    terms: Mapped[str] = mapped_column(Text)  # JSON: {name: weight}
    dataset: Mapped[str] = mapped_column(String(300))
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    config: Mapped[str] = mapped_column(Text)
    run_dir: Mapped[str | None] = mapped_column(Text)
    grid: Mapped[str | None] = mapped_column(String(200))
    host: Mapped[str | None] = mapped_column(String(200))
    code_version: Mapped[str | None] = mapped_column(String(100))
    student_params: Mapped[int | None] = mapped_column(Integer)
    teacher_params: Mapped[int | None] = mapped_column(Integer)
    train_seconds: Mapped[float | None] = mapped_column(Float)  # summed over the attempts of a resumed run
    eval_seconds: Mapped[float | None] = mapped_column(Float)
    world_size: Mapped[int | None] = mapped_column(Integer)  # training processes (one per GPU)
    device_hours: Mapped[float | None] = mapped_column(Float)  # train_seconds x world_size / 3600
    teacher_forward_samples: Mapped[int | None] = mapped_column(BigInteger)  # a live teacher's; a cache's are its own
    student_forward_samples: Mapped[int | None] = mapped_column(BigInteger)  # training's, a selector's scoring too
    gflops_image: Mapped[float | None] = mapped_column(Float)  # the student's, per image (torch flop counter)
    gflops_text: Mapped[float | None] = mapped_column(Float)
    images_per_second: Mapped[float | None] = mapped_column(Float)  # the student's image tower, evaluation device
    bad_samples: Mapped[int | None] = mapped_column(Integer)  # training samples found bad and replaced
    step: Mapped[int | None] = mapped_column(Integer)  # training progress, published while the run trains
    total_steps: Mapped[int | None] = mapped_column(Integer)
    samples_per_second: Mapped[float | None] = mapped_column(Float)  # over the last published interval
    eta_seconds: Mapped[float | None] = mapped_column(Float)  # training time left at that rate
    notes: Mapped[str | None] = mapped_column(Text)  # what a reader of its numbers should know
    started_at: Mapped[str | None] = mapped_column(String(40))
    finished_at: Mapped[str | None] = mapped_column(String(40))
    updated_at: Mapped[str] = mapped_column(String(40))
    __table_args__ = (
        Index("ix_runs_cell", "student", "dataset", "teacher", "method"),
        Index("ix_runs_setting", "setting_id", "method"),
        Index("ix_runs_status", "status"),
        Index("ix_runs_grid", "grid", "status"),
        Index("ix_runs_id_status", "id", "status"),  # covers a value's join to its finished run
    )


class Metric(Base):
    __tablename__ = "metrics"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    benchmark: Mapped[str] = mapped_column(String(200), primary_key=True)
    metric: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[float | None] = mapped_column(Float)
    __table_args__ = (Index("ix_metrics_benchmark", "benchmark", "metric", "run_id", "value"),)


class RunValues(Base):
    """Each run's metrics again, as one array of (key, value) records (``VALUE_RECORD``, the key ``value_key``):
    kept by every write of its metrics, for readers of every run's values at once (a leaderboard: 10,000 runs'
    109,000 values are one 9,250-row read of 25 ms here, against 115 ms as rows, whose Python objects are most of
    that time). The metrics table stays what a run's values are; this is its index, as MLflow's latest_metrics."""
    __tablename__ = "run_values"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


VALUE_RECORD = np.dtype([("key", "<i8"), ("value", "<f8")])


def value_key(benchmark: str, metric: str) -> int:
    """A (benchmark, metric) pair as 64 bits of its BLAKE2b hash: a key any reader computes from the names."""
    digest = hashlib.blake2b(f"{benchmark}\0{metric}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def index_values(connection: Connection, run_ids: Iterable[str] | None = None) -> None:
    """Rewrite the ``run_values`` of these runs (of every run: None) from their metrics; an upsert, as concurrent
    writers of one run's metrics do."""
    query = select(Metric.run_id, Metric.benchmark, Metric.metric, Metric.value).order_by(
        Metric.run_id, Metric.benchmark, Metric.metric)
    if run_ids is not None:
        run_ids = list(run_ids)
        query = query.where(Metric.run_id.in_(run_ids))
    rows = [{"run_id": run_id, "data": np.array(
        [(value_key(benchmark, metric), np.nan if value is None else value) for _, benchmark, metric, value in values],
        dtype=VALUE_RECORD).tobytes()} for run_id, values in groupby(connection.execute(query), key=lambda r: r[0])]
    emptied = delete(RunValues) if run_ids is None else delete(RunValues).where(
        RunValues.run_id.in_(set(run_ids) - {row["run_id"] for row in rows}))
    connection.execute(emptied)
    for start in range(0, len(rows), 1000):
        _upsert(connection, RunValues.__table__, rows[start:start + 1000])


class CurvePoint(Base):
    __tablename__ = "curves"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    term: Mapped[str] = mapped_column(String(100), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float | None] = mapped_column(Float)


class ItemResult(Base):
    """Per test item, whether it counted for a metric (top-k hit, recall@k hit): packed bits, so intervals and
    paired tests need no re-evaluation (results/stats.py)."""
    __tablename__ = "item_results"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    benchmark: Mapped[str] = mapped_column(String(200), primary_key=True)
    metric: Mapped[str] = mapped_column(String(100), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    bits: Mapped[bytes] = mapped_column(LargeBinary)


class GridCell(Base):
    """The cells a grid expands to, so progress can count those not yet submitted ("new")."""
    __tablename__ = "grid_cells"
    grid: Mapped[str] = mapped_column(String(200), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cell: Mapped[str] = mapped_column(String(300))


# Versioned schema: Alembic migrations in results/migrations/versions, revision "000N" being schema N. The version
# is also kept in clipkd_schema, which every clipkd since the first reads: a store from a newer clipkd is refused.
MIGRATIONS = Path(__file__).with_name("migrations")


def _revision(version: int) -> str:
    return f"{version:04d}"


def _migrate(connection: Connection, from_version: int | None) -> None:
    """Bring the store to SCHEMA_VERSION with Alembic; a store from before Alembic (clipkd_schema alone) is first
    stamped with the revision of its version."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    if from_version is not None and "alembic_version" not in inspect(connection).get_table_names():
        command.stamp(config, _revision(from_version))
    command.upgrade(config, _revision(SCHEMA_VERSION))
    _upsert(connection, SchemaInfo.__table__, [{"key": "version", "value": str(SCHEMA_VERSION)}])


RUN_COLUMNS = {column.name for column in Run.__table__.columns}


def now() -> str:
    """An ISO time to the microsecond: records rewritten within one second still order (ingestion compares them)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def resolve_url(url: str | None = None) -> str:
    """A SQLAlchemy URL; a plain file path (no ``scheme://``) names a SQLite file, as researchers type it."""
    url = url or os.environ.get("CLIPKD_DB") or DEFAULT_URL
    return url if "://" in url else f"sqlite:///{url}"


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 60})
    path = engine.url.database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # transactions are begun explicitly below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 60000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _readonly_sqlite_engine(url: str) -> Engine:
    path = make_url(url).database
    if path and Path(path).is_dir():
        raise StoreError(f"results store {url}: {path!r} is a folder; give the store's file (e.g. results/clipkd.db)")
    if not path or path == ":memory:" or not Path(path).is_file():
        raise StoreError(f"results store {url} does not exist: run `clipkd run CONFIG` or `clipkd grid submit GRID` "
                         "first, or pass --db URL")
    # mode=ro: SQLite itself refuses every write; WAL readers still see the writers' committed transactions
    uri = f"file:{Path(path).resolve()}?mode=ro"
    return create_engine("sqlite://", poolclass=QueuePool,
                         creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=60))


def _upsert(connection: Connection, table, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    dialect = connection.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # other backends: delete-then-insert inside the caller's transaction
        keys = [c.name for c in table.primary_key.columns]
        for row in rows:
            connection.execute(delete(table).where(*[table.c[k] == row[k] for k in keys]))
        connection.execute(table.insert(), rows)
        return
    statement = insert(table).values(rows)
    keys = [c.name for c in table.primary_key.columns]
    updates = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    connection.execute(statement.on_conflict_do_update(index_elements=keys, set_=updates))


class Store:
    def __init__(self, url: str | None = None, readonly: bool = False):
        self.url, self.readonly = resolve_url(url), readonly
        try:
            if self.url.startswith("sqlite"):
                self.engine = _readonly_sqlite_engine(self.url) if readonly else _sqlite_engine(self.url)
            else:
                readonly_options = {"postgresql_readonly": True} if readonly and self.url.startswith("postgresql") else {}
                self.engine = create_engine(self.url, execution_options=readonly_options)
        except StoreError:
            raise
        except Exception as error:  # a malformed URL or a missing driver
            raise StoreError(f"cannot open results store {self.url!r}: {error}") from None
        try:
            self._check_schema(readonly)
        except DBAPIError as error:  # a file that is not a database, a server that does not answer
            raise StoreError(f"cannot open results store {self.url!r}: {error.orig}") from None

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    # -- schema --------------------------------------------------------------------------------------------------
    def _check_schema(self, readonly: bool) -> None:
        with self.transaction() as connection:
            tables = set(inspect(connection).get_table_names())
            if tables and SchemaInfo.__tablename__ not in tables:
                raise StoreError(f"{self.url} is not a clipkd results store (it has tables {sorted(tables)[:5]} "
                                 f"but no {SchemaInfo.__tablename__})")
            if not tables:
                if readonly:
                    raise StoreError(f"results store {self.url} is empty: run `clipkd run CONFIG` first")
                _migrate(connection, None)  # a new store is the migrations applied to nothing
                return
            version = int(connection.execute(select(SchemaInfo.value).where(SchemaInfo.key == "version")).scalar_one())
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"results store {self.url} has schema version {version}, newer than this clipkd's "
                    f"{SCHEMA_VERSION}: upgrade clipkd to read it (nothing was changed)"
                )
            if version < SCHEMA_VERSION:
                self._upgrade(connection, version, readonly)

    def _upgrade(self, connection: Connection, version: int, readonly: bool) -> None:
        if readonly:
            raise StoreError(f"results store {self.url} has schema version {version}; this clipkd needs "
                             f"{SCHEMA_VERSION} and opens it read-only: upgrade it with any write command first")
        _migrate(connection, version)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        if self.readonly:  # BEGIN IMMEDIATE takes a write lock, which a read-only connection cannot
            with self.engine.connect() as connection:
                yield connection
            return
        with self.engine.begin() as connection:
            yield connection

    # -- writes --------------------------------------------------------------------------------------------------
    def put_run(self, run: dict[str, Any], metrics: dict[str, dict[str, float]] | None = None,
                curves: Iterable[tuple[str, int, float]] | None = None,
                items: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        """Insert or update a run; ``metrics`` ({benchmark: {metric: value}}) and ``items`` ({benchmark: {metric:
        bits}}) replace those benchmarks' values."""
        unknown = set(run) - RUN_COLUMNS
        if unknown:
            raise StoreError(f"unknown run fields {sorted(unknown)}")
        with self.transaction() as connection:
            self._put(connection, run, metrics, curves, items)

    def _put(self, connection, run, metrics, curves, items=None) -> None:
        existing = connection.execute(select(Run.__table__).where(Run.id == run["id"])).mappings().first()
        if existing and run.get("updated_at") and existing["updated_at"] > run["updated_at"]:
            return  # a state as of an earlier time (a grid's "queued") never replaces a later one (the job's "done")
        row = {**(dict(existing) if existing else {}), **run}
        row["updated_at"] = run.get("updated_at") or now()  # an ingested record keeps its own time
        _upsert(connection, Run.__table__, [row])
        for benchmark, values in (metrics or {}).items():
            connection.execute(delete(Metric).where(Metric.run_id == run["id"], Metric.benchmark == benchmark))
            _upsert(connection, Metric.__table__, [
                {"run_id": run["id"], "benchmark": benchmark, "metric": m, "value": v} for m, v in values.items()
            ])
        if metrics:
            index_values(connection, [run["id"]])
        for benchmark, bits in (items or {}).items():
            connection.execute(delete(ItemResult).where(ItemResult.run_id == run["id"], ItemResult.benchmark == benchmark))
            _upsert(connection, ItemResult.__table__, [
                {"run_id": run["id"], "benchmark": benchmark, "metric": m, "count": len(b), "bits": pack(b)}
                for m, b in bits.items()
            ])
        if curves is not None:
            connection.execute(delete(CurvePoint).where(CurvePoint.run_id == run["id"]))
            _upsert(connection, CurvePoint.__table__, [
                {"run_id": run["id"], "term": term, "step": step, "value": value} for term, step, value in curves
            ])

    def register_grid(self, grid: str, cells: dict[str, str]) -> None:
        """Record the cells ({run id: cell name}) grid ``grid`` expands to now, replacing an earlier expansion."""
        with self.transaction() as connection:
            connection.execute(delete(GridCell).where(GridCell.grid == grid))
            _upsert(connection, GridCell.__table__, [{"grid": grid, "run_id": r, "cell": c} for r, c in cells.items()])

    def set_status(self, run_id: str, status: str, error: str | None = None, **fields: Any) -> None:
        if status not in STATUSES:
            raise StoreError(f"unknown status {status!r}; accepted: {', '.join(STATUSES)}")
        self.put_run({"id": run_id, "status": status, "error": error, **fields})

    # -- reads ---------------------------------------------------------------------------------------------------
    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(Run.__table__).where(Run.id == run_id)).mappings().first()
        return dict(row) if row else None

    def benchmarks(self, run_id: str) -> set[str]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(Metric.benchmark).where(Metric.run_id == run_id).distinct())
            return {r[0] for r in rows}

    def metrics(self, run_id: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        with self.engine.connect() as connection:
            rows = connection.execute(select(Metric.benchmark, Metric.metric, Metric.value).where(Metric.run_id == run_id))
            for benchmark, metric, value in rows:
                out.setdefault(benchmark, {})[metric] = value
        return out

    def items(self, run_ids: Iterable[str], benchmark: str, metric: str) -> dict[str, np.ndarray]:
        """Each run's per-item bits for ``metric`` on ``benchmark``, for the runs that have them."""
        return {run_id: unpack(bits, count) for run_id, (count, bits) in self.packed_items(run_ids, benchmark,
                                                                                            metric).items()}

    def packed_items(self, run_ids: Iterable[str], benchmark: str, metric: str) -> dict[str, tuple[int, bytes]]:
        """Each run's per-item results for ``metric`` on ``benchmark`` as stored: (items, packed bits)."""
        query = select(ItemResult.run_id, ItemResult.count, ItemResult.bits).where(
            ItemResult.run_id.in_(list(run_ids)), ItemResult.benchmark == benchmark, ItemResult.metric == metric)
        with self.engine.connect() as connection:
            return {run_id: (count, bytes(bits)) for run_id, count, bits in connection.execute(query)}

    def runs_with_items(self, benchmarks: Iterable[str], metrics: Iterable[str]) -> set[str]:
        """The runs that stored per-item results for any of these benchmarks and metrics."""
        query = select(ItemResult.run_id).where(ItemResult.benchmark.in_(list(benchmarks)),
                                                ItemResult.metric.in_(list(metrics))).distinct()
        with self.engine.connect() as connection:
            return {row[0] for row in connection.execute(query)}

    def count_runs(self) -> int:
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(Run)).scalar_one()

    def revision(self) -> tuple:
        """Changes whenever a run, a metric or a grid's cells are written: the key of a reader's cache."""
        with self.engine.connect() as connection:
            runs = connection.execute(select(func.count(), func.max(Run.updated_at))).one()
            metrics = connection.execute(select(func.count()).select_from(Metric)).scalar_one()
            cells = connection.execute(select(func.count()).select_from(GridCell)).scalar_one()
        return (*runs, metrics, cells)


def terms_json(terms: dict[str, float]) -> str:
    return json.dumps(terms, sort_keys=True)
