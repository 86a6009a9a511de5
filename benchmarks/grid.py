"""A grid with the teacher live and with the teacher-embedding cache: total teacher forward passes (samples
the teacher embedded) and wall time, on the local executor, and the two ablation tables.

    python benchmarks/grid.py [--grid grids/demo.yaml] [--max-parallel 2] [--views 8]

Runs the grid twice in a scratch folder, each from scratch with its own store: with a live teacher (augmented
crops drawn afresh, as open_clip trains) and with ``base.teacher: {embeddings: cached, views: K}`` (one cache of K
augmented views per sample, built as a grid step, replayed by the students). The cached students train on stored
augmented views, so the two tables should agree within seed noise (their intervals are printed).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def teacher_forward_samples(output_dir: Path) -> int:
    """Samples the teacher embedded: every live run's count, and every cache's size."""
    total = 0
    for events in output_dir.glob("*/events.jsonl"):
        total += sum(json.loads(line).get("teacher_forward_samples", 0) for line in events.read_text().splitlines())
    for meta in output_dir.glob(".teacher-embeddings/*/meta.json"):
        total += json.loads(meta.read_text())["samples"]
    return total


def run_grid(grid: dict, folder: Path, max_parallel: int) -> tuple[float, int, str]:
    folder.mkdir(parents=True)
    (folder / "grid.yaml").write_text(yaml.safe_dump(grid))
    command = [sys.executable, "-m", "harness.cli"]
    started = time.perf_counter()
    subprocess.run([*command, "grid", "submit", "grid.yaml", "--executor", "local", "--max-parallel",
                    str(max_parallel)], cwd=folder, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    ablation = subprocess.run([*command, "ablation"], cwd=folder, check=True, capture_output=True, text=True).stdout
    return seconds, teacher_forward_samples(folder / grid["output_dir"]), ablation


def with_teacher(grid: dict, name: str, **teacher) -> dict:
    base = grid.get("base", {})
    return {**grid, "name": f"{grid['name']}-{name}", "output_dir": "runs",
            "base": {**base, "teacher": {**base.get("teacher", {}), **teacher}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=str(ROOT / "grids" / "demo.yaml"))
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--views", type=int, default=8, help="augmented views per sample in the cache")
    args = parser.parse_args()
    grid = yaml.safe_load(Path(args.grid).read_text())
    live = with_teacher(grid, "live", embeddings="live", views=0)
    cached = with_teacher(grid, "cached", embeddings="cached", views=args.views)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode, grid in (("live", live), ("cached", cached)):
            results[mode] = run_grid(grid, Path(scratch) / mode, args.max_parallel)
    print(f"{args.grid}, local executor, {args.max_parallel} cells at a time; cache of {args.views} views per sample")
    for mode, (seconds, samples, _) in results.items():
        print(f"{mode:7s} wall {seconds / 60:6.1f} min   teacher forward passes {samples:>10,} samples")
    (live_s, live_n, live_table), (cached_s, cached_n, cached_table) = results["live"], results["cached"]
    print(f"cached/live: wall {cached_s / live_s:.2f}x, teacher forward passes {cached_n / max(live_n, 1):.3f}x")
    print(f"\nablation, live teacher:\n{live_table}\nablation, cached teacher:\n{cached_table}")


if __name__ == "__main__":
    main()
