"""What a job will read, checked before it queues: its training data, every benchmark root, its tokenizers, and
whether its student can inherit from its source's architecture.

A mistake found at plan or submit time costs a second; found by the job, it costs the hours it waited in the
queue. Checks read only file metadata (a shard set is counted, never opened), and are cached across cells that
share their data. ``grid plan/submit --no-check-data`` skips them, for a head node that cannot see the compute
nodes' filesystems.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import braceexpand

from core.builtin import BUILTIN_DATASETS, FASHION_MNIST_DIR
from harness.config.run_config import RunConfig, teacher_input
from harness.config.specs import BenchmarkSpec, DataSpec
from harness.models.names import ModelLoadError, text_input


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


@functools.cache
def tokenizer(model: str) -> str | None:
    """The problem with building a model's tokenizer here, or None. Only an HF or SigLIP tokenizer is built (and
    open_clip imported): open_clip's CLIP tokenizer ships in its wheel."""
    if text_input(model)["tokenizer"] is None:
        return None
    from harness.models.build import create_tokenizer

    try:
        create_tokenizer(model)
    except ModelLoadError as error:
        return str(error)
    return None


def problems(config: RunConfig) -> list[str]:
    """Everything a run's job would fail to read or build before it trains, each named: its data, its benchmarks,
    its models' tokenizers. (A teacher's weights, a model-config file and a model's preprocessing are checked
    earlier, when the grid and its configs are loaded.)"""
    models = [config.student.model]
    for spec in config.teachers:
        with contextlib.suppress(ModelLoadError):  # a teacher run not trained yet: its model is checked when it runs
            models.append(teacher_input(spec)[0])
    found = [training_data(config.data), *(benchmark(spec) for spec in config.benchmarks()),
             *(tokenizer(model) for model in dict.fromkeys(models))]
    inherit = config.student.inherit
    if inherit and inherit.source == "teacher" and config.teachers[0].model:  # a run's shape is known once trained
        found.append(inheritance(config.student.model, config.teachers[0].model, inherit.prune is not None,
                                 tuple((tower, tuple(blocks)) for tower, blocks in inherit.layers.items())))
    return [problem for problem in found if problem]


@functools.cache
def inheritance(student: str, source: str, prune: bool, layers: tuple) -> str | None:
    """The problem with inheriting ``student`` from ``source``'s weights, or None: both built on the meta device
    (shapes, no memory), the manual slices taken or the towers asked to be prunable."""
    from harness.models.build import create_clip
    from harness.models.inherit import inherited_state
    from harness.models.prunable import towers

    try:
        teacher = create_clip(source, device="meta").model
        if prune:
            towers(teacher)
        else:
            inherited_state(create_clip(student, device="meta").model, teacher, dict(layers))
    except ModelLoadError as refused:
        return f"student.inherit: {refused}"
    return None
