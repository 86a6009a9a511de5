"""Benchmarks that stream: datasets without a length, such as clip_benchmark's ``wds/…`` sets (every DataComp task
is read so), evaluated as they stream and sharded over the ranks.

clip_benchmark builds a ``wds/…`` set as a webdataset pipeline that every reader walks whole. Here each rank reads
its share of it: whole shards when there are at least as many shards as ranks (shard s to rank s mod W, then
split among the rank's loader workers), else every shard in order by one reader per rank, each rank keeping the
items at its positions of the stream (a sample is skipped before its image is decoded). Every item carries a tag,
its place in the stream (``shard << 32 | position``), gathered with its results; sorting by it gives every rank
the items in the order one reader of the whole stream meets them, whatever the ranks and workers, so per-item
results line up between runs.

The pipeline is rebuilt from clip_benchmark's shard list with webdataset's own stages, the same decoder, image
extensions and fields as ``clip_benchmark.datasets.builder.build_wds_dataset`` (``cls`` labels; ``txt`` captions,
one per line) — deliberately, since its pipeline has no place where an item's tag could ride along. A stream of
any other kind is read whole by each rank, which keeps its share.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from evals.errors import EvalDatasetError

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's build_wds_dataset reads these, first found
POSITION_BITS = 32


def shard_urls(dataset) -> list[str] | None:
    """The shard URLs of a webdataset pipeline that starts from a shard list (clip_benchmark's), else None."""
    stages = getattr(dataset, "pipeline", None)
    return list(stages[0].urls) if stages and hasattr(stages[0], "urls") else None


@dataclass
class StreamedBenchmark:
    """A benchmark without a length, as a recipe for each rank's share (``share``). ``retrieval``: items are
    (image, [captions]), else (image, label); ``limit``: its first N items in stream order (evaluation during
    training); ``dtype``: the images' (the student's parameter dtype)."""

    urls: list[str] | None
    dataset: Any  # a stream other than a webdataset, read as it is (None: read from ``urls``)
    transform: Callable
    retrieval: bool
    classes: list[str] | None = None
    templates: list[str] | None = None
    limit: int | None = None
    dtype: torch.dtype | None = None
    name: str = ""  # clip_benchmark's name for it (a DataComp task scored by its own evaluator: evals/datacomp.py)

    @classmethod
    def of(cls, dataset, transform: Callable, retrieval: bool, name: str = "") -> StreamedBenchmark:
        """A webdataset is read from its shard list (its pipeline, with lambdas, does not pickle for loader
        workers); any other stream as it is."""
        urls = shard_urls(dataset)
        return cls(urls, dataset if urls is None else None, transform, retrieval, getattr(dataset, "classes", None),
                   getattr(dataset, "templates", None), name=name)

    def first(self, count: int | None, dtype: torch.dtype | None = None) -> StreamedBenchmark:
        return dataclasses.replace(self, limit=count, dtype=dtype)

    def share(self, rank: int, world: int) -> RankStream:
        by_shards = self.urls is not None and self.limit is None and len(self.urls) >= world
        return RankStream(self, rank, world, by_shards)


@dataclass
class RankStream(IterableDataset):
    """One rank's items of a streamed benchmark, each as (item, tag)."""

    benchmark: StreamedBenchmark
    rank: int
    world: int
    by_shards: bool

    @property
    def readers(self) -> int:
        """Loader workers that can share the reading: one per shard of this rank's, one reading in order, or none
        (a stream other than a webdataset is read in this process)."""
        if self.benchmark.urls is None:
            return 0
        return len(range(self.rank, len(self.benchmark.urls), self.world)) if self.by_shards else 1

    def __iter__(self) -> Iterator[tuple[tuple, int]]:
        import webdataset as wds

        benchmark = self.benchmark
        if benchmark.urls is None:  # not a webdataset pipeline: every rank reads it whole and keeps its positions
            for position, item in enumerate(itertools.islice(benchmark.dataset, benchmark.limit)):
                if position % self.world == self.rank:
                    yield self._typed(item), position
            return
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        shards = list(enumerate(benchmark.urls))
        if self.by_shards:
            shards = shards[self.rank::self.world][first::stride]
        decode = wds.autodecode.Decoder([wds.autodecode.ImageHandler("pil", extensions=list(IMAGE_EXTENSIONS))])
        for index, sample in self._samples(shards):
            if self.by_shards or index % self.world == self.rank:
                yield self._decoded(decode, sample), index

    def _samples(self, shards: list[tuple[int, str]]) -> Iterator[tuple[int, dict]]:
        """(tag, undecoded sample) in stream order; read in order (not by shards), the tag is the stream index."""
        import webdataset as wds

        stream_index = 0
        for shard, url in shards:
            for position, sample in enumerate(wds.tariterators.tarfile_samples([{"url": url}])):
                if not self.by_shards and self.benchmark.limit is not None and stream_index >= self.benchmark.limit:
                    return
                yield (shard << POSITION_BITS | position) if self.by_shards else stream_index, sample
                stream_index += 1

    def _decoded(self, decode: Callable, sample: dict) -> tuple:
        where = f"{sample.get('__url__')} sample {sample.get('__key__')!r}"
        field = "txt" if self.benchmark.retrieval else "cls"
        try:
            decoded = decode(sample)
            image = next(decoded[key] for key in IMAGE_EXTENSIONS if key in decoded)
            target = decoded[field]
        except StopIteration:
            raise EvalDatasetError(f"{where}: no image ({', '.join(IMAGE_EXTENSIONS)})") from None
        except KeyError:
            raise EvalDatasetError(f"{where}: no {field!r} field") from None
        except Exception as error:
            raise EvalDatasetError(f"{where}: the image cannot be decoded ({type(error).__name__}: {error}); "
                                   "evaluation does not skip images (the benchmark would change)") from None
        return self._typed((image, target.splitlines() if self.benchmark.retrieval else target), transform=True)

    def _typed(self, item: tuple, transform: bool = False) -> tuple:
        image, target = item
        image = self.benchmark.transform(image) if transform else image
        return (image.to(self.benchmark.dtype) if self.benchmark.dtype is not None else image), target


@dataclass
class Tagged:
    """A collate function for (item, tag) pairs: the items collated by ``collate``, the tags as a tensor beside
    them (a class, not a closure: loader workers started by spawn pickle it)."""

    collate: Callable

    def __call__(self, batch):
        items, tags = zip(*batch)
        return self.collate(list(items)), torch.as_tensor(np.asarray(tags, dtype=np.int64))
