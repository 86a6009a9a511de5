"""Training data: the built-in sets in memory, open_clip's CSV/TSV format, and webdataset shards.

Each source renders the batch of given samples in given views (``views.py``: a crop box replayable from the
sample's id); a loader picks the samples of each step, one loader for the whole run (its workers start once and
read on across epoch boundaries). A run's batches are a function of its seed and world size
alone, not of its loader workers, so ``data.workers`` stays out of the run id, and a resumed run sees the batches
an uninterrupted one would have.

| source | where a batch is made | per step |
|---|---|---|
| built-in (``memory.py``) | the training process | an index gather and one ``grid_sample`` (~1 ms) |
| csv (``mapstyle.py``) | ``data.workers`` loader workers, a whole block each | PIL decode and crop per image |
| webdataset (``shards.py``) | loader workers, split by step | seek, decode and crop per image |
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader

from core.builtin import load_builtin
from harness.data.batch import Batch
from harness.data.captions import CaptionChoice
from harness.data.files import INDEX_DIR, CaptionTable, csv_checked_file, expand_shards
from harness.data.inputs import OtherInputs
from harness.data.mapstyle import BlockReader, CsvSource, RankBlocks
from harness.data.memory import InMemoryLoader, InMemorySource
from harness.data.shards import EpochPlan, ShardIndex, ShardSource, ShardSteps
from harness.data.views import Augmentation, ViewSpec


def default_workers() -> int:
    """Loader workers per training process: the CPUs it may use, one left to the training loop. Inside a SLURM
    job those are the task's ``cpus_per_task`` shared among the processes the task runs (one under submitit's
    task per GPU; all of a node's under ``srun torchrun --nproc_per_node 8``); elsewhere the process's CPU
    affinity shared among the processes torchrun started on its node."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus is None:
        return max(0, len(os.sched_getaffinity(0)) // max(1, local) - 1)
    tasks_per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # SLURM writes e.g. 8(x2)
    per_task = max(1, local // int(tasks_per_node)) if tasks_per_node.isdigit() else 1
    return max(0, int(cpus) // per_task - 1)


def workers(configured: int | None) -> int:
    return default_workers() if configured is None else configured


@dataclass
class TrainData:
    """Knows the epoch length and makes the batches of the steps from ``start`` to ``stop``, counted across epochs:
    ``batches(start, stop)``, one loader whose workers start once for the whole run, not once an epoch."""

    num_samples: int
    batch_size: int
    batches: Callable[[int, int], Iterable[Batch]]

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterable[Batch]:
        """The batches of epoch ``epoch`` from its step ``start_step`` on."""
        return self.batches(epoch * self.steps_per_epoch + start_step, (epoch + 1) * self.steps_per_epoch)


def build_source(spec, view: ViewSpec, tokenizer: Callable, augmentation: Augmentation, index_root: Path,
                 others: OtherInputs = OtherInputs(), captions: CaptionChoice = CaptionChoice()):
    """The training set of ``spec`` (a config's ``data``) rendered in ``view`` with ``tokenizer`` (the student's
    input, or a cache builder's teacher's), and in ``others`` (the run's other models' inputs), each sample with the
    caption ``captions`` picks (shards: data/captions.py; other sets have one): an in-memory, CSV or shard source
    with ``render(epoch, ids, views)``."""
    if spec.dataset == "webdataset":
        return ShardSource(ShardIndex(expand_shards(spec.path), Path(index_root) / INDEX_DIR), view, augmentation,
                           tokenizer, others, captions)
    if spec.dataset == "csv":
        table = CaptionTable(spec.path, spec.image_key, spec.caption_key, spec.separator)
        checked = csv_checked_file(Path(index_root) / INDEX_DIR, spec)
        known_bad = {int(row): reason for row, reason in json.loads(checked.read_text()).items()} if checked.is_file() else {}
        return CsvSource(table.first(spec.subset) if spec.subset else table, view, augmentation, tokenizer, known_bad,
                         others)
    split = load_builtin(spec.dataset, "train")
    return InMemorySource.of(split.first(spec.subset) if spec.subset else split, tokenizer, view, augmentation, others)


def build_train_data(spec, source, batch_size: int, seed: int, rank: int, world_size: int, teacher_rows=None,
                     pin_memory: bool = False) -> TrainData:
    if batch_size % world_size:
        raise ValueError(f"train.batch_size {batch_size} is not divisible by the {world_size} processes")
    loader_workers = workers(spec.workers)
    if isinstance(source, ShardSource):
        if spec.num_samples > source.index.total:
            raise ValueError(f"data.num_samples {spec.num_samples} exceeds the {source.index.total} samples (with an "
                             f"image and a caption) in the {len(source.index.shards)} shards of {spec.path}")
        steps = spec.num_samples // batch_size
        if steps == 0:
            raise ValueError(f"data.num_samples {spec.num_samples} is less than one batch of {batch_size}")

        def shard_loader(start: int, stop: int) -> DataLoader:
            plan = EpochPlan(source.index.counts, seed, 0, batch_size, world_size, steps, spec.shuffle_window)
            return DataLoader(ShardSteps(source, plan, rank, start, stop, teacher_rows), batch_size=None,
                              num_workers=min(loader_workers, max(1, stop - start)), pin_memory=pin_memory)

        return TrainData(spec.num_samples, batch_size, shard_loader)

    if len(source) < batch_size:
        raise ValueError(f"train.batch_size {batch_size} exceeds the {len(source)} training samples of {spec.dataset!r}")
    if isinstance(source, InMemorySource):
        loader = InMemoryLoader(source, batch_size, seed, rank, world_size, teacher_rows)
        return TrainData(len(source), batch_size, loader.steps)
    reader = BlockReader(source, teacher_rows)

    def csv_loader(start: int, stop: int) -> DataLoader:
        blocks = RankBlocks(len(source), batch_size, seed, rank, world_size, start, stop)
        return DataLoader(reader, sampler=blocks, batch_size=None, num_workers=loader_workers, pin_memory=pin_memory)

    return TrainData(len(source), batch_size, csv_loader)
