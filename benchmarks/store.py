"""Leaderboard and ablation queries on generated stores of 10,000 runs (target: under 200 ms each).

    python benchmarks/store.py [--runs 10000] [--repeats 7] [--postgres URL]

Two shapes of store (results/synthetic.py): the dashboard's test store (five seeds a cell, two benchmarks, no
per-item results: every interval is a t over seeds) and a lab's (``fill_lab``: single-seed cells, so every
interval and Δ is the bootstrap over test items, per-item bits for every metric at the test sets' real sizes,
ImageNet's 50,000 included, and three benchmarks). Each on SQLite and, with ``--postgres`` (a server's URL whose
user may create databases; ``scripts/postgres.sh url``), on PostgreSQL. Times each query uncached (the
dashboard's cache only helps from the second read of an unchanged store): the median of ``--repeats`` calls after
one warm-up, and the ratio to the 200 ms target.
"""
import argparse
import contextlib
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

from results import queries, synthetic
from results.store import Store

TARGET_S = 0.200
SHAPES = {"dashboard": ("the dashboard's test store: 5 seeds a cell, no per-item bits", synthetic.fill),
          "lab": ("a lab's: single seeds, per-item bits of 3 benchmarks", synthetic.fill_lab)}


def median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextlib.contextmanager
def sqlite_store(folder: Path):
    yield f"sqlite:///{folder / f'store-{uuid.uuid4().hex[:8]}.db'}"


@contextlib.contextmanager
def postgres_store(server: str):
    """A database of its own on the server, dropped afterwards."""
    name = f"clipkd_bench_{uuid.uuid4().hex[:8]}"
    maintenance = create_engine(make_url(server).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with maintenance.connect() as connection:
        connection.execute(text(f'create database "{name}"'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with maintenance.connect() as connection:
            connection.execute(text(f'drop database "{name}" with (force)'))
        maintenance.dispose()


def time_queries(url: str, fill, runs: int, repeats: int, benchmark: str) -> None:
    writer = Store(url)
    started = time.perf_counter()
    fill(writer, runs=runs)
    written = time.perf_counter() - started
    writer.engine.dispose()  # the last writer's close checkpoints the bulk write's log, as a lab's writers do
    store = Store(url, readonly=True)
    timed = {
        f"leaderboard ({benchmark}, top1)": lambda: queries.leaderboard(store, "top1", benchmark),
        "leaderboard (all benchmarks)": lambda: queries.leaderboard(store, "top1"),
        "ablation": lambda: queries.ablation(store),
        "similarity scatter": lambda: queries.similarity_points(store, benchmark),
        "grid progress": lambda: queries.grid_progress(store),
    }
    print(f"  written in {written:.0f} s")
    for name, call in timed.items():
        seconds = median_seconds(call, repeats)
        print(f"  {name:32s} {seconds * 1000:8.1f} ms   {seconds / TARGET_S:6.2f}x the target")
    store.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--postgres", help="a PostgreSQL server's URL (its user may create databases)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of: " + ", ".join(SHAPES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        backends = {"SQLite": lambda: sqlite_store(Path(folder))}
        if args.postgres:
            backends["PostgreSQL"] = lambda: postgres_store(args.postgres)
        print(f"{args.runs} runs a store; median of {args.repeats}; target {TARGET_S * 1000:.0f} ms")
        for shape in args.shapes.split(","):
            described, fill = SHAPES[shape]
            for backend, made in backends.items():
                print(f"{described}; {backend}:")
                with made() as url:
                    time_queries(url, fill, args.runs, args.repeats, "imagenet1k")


if __name__ == "__main__":
    main()
