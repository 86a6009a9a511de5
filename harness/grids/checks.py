"""What a job will read, checked before it queues: its training data and every benchmark root.

A mistake found at plan or submit time costs a second; found by the job, it costs the hours it waited in the
queue. Checks read only file metadata (a shard set is counted, never opened), and are cached across cells that
share their data. ``grid plan/submit --no-check-data`` skips them, for a head node that cannot see the compute
nodes' filesystems.
"""
from __future__ import annotations

import functools
from pathlib import Path

import braceexpand

from core.builtin import BUILTIN_DATASETS, FASHION_MNIST_DIR
from harness.config.run_config import RunConfig
from harness.config.specs import BenchmarkSpec, DataSpec


def _builtin(name: str) -> str | None:
    if name == "fashion-mnist" and not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return (f"fashion-mnist needs Debian's dataset-fashion-mnist ({FASHION_MNIST_DIR} not found: "
                "scripts/install_debian.sh fashion-mnist)")
    return None


@functools.cache
def training_data(data: DataSpec) -> str | None:
    """The problem with a run's training data, or None."""
    if data.dataset in BUILTIN_DATASETS:
        return _builtin(data.dataset)
    if data.dataset == "csv":
        return None if Path(data.path).is_file() else f"training data {data.path!r} does not exist"
    urls = list(braceexpand.braceexpand(data.path))
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        return f"{len(missing)} of {len(urls)} training shards do not exist, e.g. {missing[0]!r}"
    return None


@functools.cache
def benchmark(spec: BenchmarkSpec) -> str | None:
    """The problem with a benchmark's data, or None (clip_benchmark datasets: their staged root)."""
    if spec.dataset in BUILTIN_DATASETS:
        return _builtin(spec.dataset)
    if spec.root is None:
        return f"benchmark {spec.dataset!r} needs a root (where it is staged)"
    if "://" not in spec.root and not Path(spec.root).exists():
        return f"benchmark {spec.dataset!r}: root {spec.root!r} does not exist"
    return None


def problems(config: RunConfig) -> list[str]:
    """Everything a run's job would fail to read, each named. (A teacher's weights and a model-config file are
    checked earlier, when the grid and its configs are loaded.)"""
    found = [training_data(config.data), *(benchmark(spec) for spec in config.benchmarks())]
    return [problem for problem in found if problem]
