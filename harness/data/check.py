"""``clipkd data check``: one pass over a training set that decodes every sample, before anything queues.

Loader workers decode the samples as training would (the student's view, at its draft scale) and report the bad
ones (data/bad.py). The findings are written where the loaders read them — beside each shard's index, or the
CSV's — so a run replaces a known bad sample without decoding it again, and a set is not checked twice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from harness.data.bad import BadSample, Unusable
from harness.data.files import INDEX_DIR, csv_checked_file
from harness.data.loaders import build_source, workers
from harness.data.shards import SHARD_BITS, ShardSource, checked_file
from harness.data.views import Augmentation, ViewSpec

CHUNK = 256


@dataclass
class CheckReport:
    samples: int
    bad: list[BadSample]
    by_part: dict[str, int]  # a shard's path (or the CSV's) -> its bad samples

    def describe(self, limit: int = 20) -> str:
        share = len(self.bad) / max(1, self.samples)
        lines = [f"{len(self.bad):,} bad samples of {self.samples:,} ({share:.3%}) in {len(self.by_part)} "
                 f"{'shard' if len(self.by_part) == 1 else 'shards or files'}"]
        lines += [f"  {part}: {count} bad" for part, count in self.by_part.items()]
        lines += [f"  {entry.describe()}" for entry in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  … {len(self.bad) - limit} more")
        return "\n".join(lines)


class _Chunks(IterableDataset):
    """The samples to decode, a chunk at a time, split across loader workers: each chunk's bad samples."""

    def __init__(self, source, chunks: list[np.ndarray]):
        self.source, self.chunks = source, chunks

    def __iter__(self):
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        for ids in self.chunks[first::stride]:
            found = []
            for sample in ids[self.source.read_order(ids)]:
                try:
                    self.source.load(int(sample))
                except Unusable as problem:
                    found.append([int(sample), self.source.where(int(sample)), problem.reason])
            yield len(ids), json.dumps(found)


def check(spec, student_model: str, tokenizer, index_root: Path, loader_workers: int | None = None,
          progress: bool = True) -> CheckReport:
    """Decode every sample of the training set ``spec`` (a config's ``data``) and record the bad ones."""
    source = build_source(spec, ViewSpec.of(student_model), tokenizer, Augmentation("none"), index_root)
    if not hasattr(source, "load"):  # a built-in set, in memory: nothing to decode
        return CheckReport(len(source), [], {})
    sharded = isinstance(source, ShardSource)
    if sharded:
        ids = [(np.int64(shard) << SHARD_BITS) | np.arange(count) for shard, count in enumerate(source.index.counts)]
    else:
        ids = [np.arange(len(source), dtype=np.int64)]
    chunks = [part[start:start + CHUNK] for part in ids for start in range(0, len(part), CHUNK)]
    loader = DataLoader(_Chunks(source, chunks), batch_size=None, num_workers=min(workers(loader_workers), len(chunks)))
    bad = []
    with tqdm(total=len(source), disable=not progress, desc="decoding", unit="samples") as bar:
        for count, found in loader:
            bad += [BadSample(*entry) for entry in json.loads(found)]
            bar.update(int(count))
    bad.sort(key=lambda entry: entry.sample)
    by_part: dict[str, int] = {}
    if sharded:
        for shard, file in enumerate(source.index.files):
            mine = {str(int(e.sample) & ((1 << SHARD_BITS) - 1)): e.reason for e in bad if e.sample >> SHARD_BITS == shard}
            checked_file(file).write_text(json.dumps(mine))
            if mine:
                by_part[str(source.index.shards[shard])] = len(mine)
    else:
        (Path(index_root) / INDEX_DIR).mkdir(parents=True, exist_ok=True)
        csv_checked_file(Path(index_root) / INDEX_DIR, spec).write_text(
            json.dumps({str(e.sample): e.reason for e in bad}))
        if bad:
            by_part[spec.path] = len(bad)
    return CheckReport(len(source), bad, by_part)


def training_sets(configs) -> list:
    """The distinct training sets of run configs (a grid's cells), each with the first config that reads it."""
    distinct = {}
    for config in configs:
        key = json.dumps(config.data.model_dump(exclude={"workers", "bad_samples", "max_bad_fraction"}), sort_keys=True)
        distinct.setdefault(key, config)
    return list(distinct.values())


def check_configs(configs, loader_workers: int | None = None, progress: bool = True) -> bool:
    """Check each distinct training set and print its report; whether every set stays within its bound."""
    import open_clip

    from harness.models.build import model_name

    within = True
    for config in training_sets(configs):
        data = config.data
        tokenizer = open_clip.get_tokenizer(model_name(config.student.model))
        report = check(data, config.student.model, tokenizer, Path(config.output_dir), loader_workers, progress)
        print(f"{data.path or data.dataset}: {report.describe()}")
        if len(report.bad) > data.max_bad_fraction * report.samples:
            within = False
            print(f"  more than data.max_bad_fraction {data.max_bad_fraction:g}: a run on it would stop")
    return within
