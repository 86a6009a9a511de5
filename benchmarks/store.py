"""Leaderboard and ablation queries on a generated store of 10,000 runs (target: under 200 ms each).

    python benchmarks/store.py [--runs 10000] [--repeats 7]

Times each query uncached (the dashboard's cache only helps from the second read of an unchanged store): the
median of ``--repeats`` calls after one warm-up, and the ratio to the 200 ms target.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

from results import queries, synthetic
from results.store import Store

TARGET_S = 0.200


def median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'store.db'}"
        writer = Store(url)
        synthetic.fill(writer, runs=args.runs)
        writer.engine.dispose()  # the last writer's close checkpoints the bulk write's log, as a lab's writers do
        store = Store(url, readonly=True)
        timed = {
            "leaderboard (imagenet1k, top1)": lambda: queries.leaderboard(store, "top1", "imagenet1k"),
            "leaderboard (all benchmarks)": lambda: queries.leaderboard(store, "top1"),
            "ablation": lambda: queries.ablation(store),
            "similarity scatter": lambda: queries.similarity_points(store, "imagenet1k"),
            "grid progress": lambda: queries.grid_progress(store),
        }
        print(f"{args.runs} runs, SQLite; median of {args.repeats}; target {TARGET_S * 1000:.0f} ms")
        for name, call in timed.items():
            seconds = median_seconds(call, args.repeats)
            print(f"{name:32s} {seconds * 1000:7.1f} ms   {seconds / TARGET_S:5.2f}x the target")


if __name__ == "__main__":
    main()
