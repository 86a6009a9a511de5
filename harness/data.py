"""Training data: the built-in sets, open_clip's CSV/TSV format and webdataset shards.

Batches are sharding-invariant: step s uses the same global batch whatever the number of processes, each rank
taking its contiguous block, so the gathered batch equals the single-process one. Random augmentation is seeded
by (run seed, epoch, sample index), so a resumed run sees exactly the images the uninterrupted one saw, with any
number of loader workers.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from harness.builtin_data import BUILTIN_DATASETS, CaptionedImages, load_builtin

__all__ = ["BUILTIN_DATASETS", "CaptionedImagesDataset", "TrainData", "build_train_data"]


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return (seed * 1_000_003 + epoch) * 100_000_007 + position


class CaptionedImagesDataset(Dataset):
    """A built-in split as (image tensor, caption tokens) pairs."""

    def __init__(self, split: CaptionedImages, transform: Callable, tokenizer: Callable):
        self.split, self.transform, self.tokenizer = split, transform, tokenizer

    def __len__(self) -> int:
        return len(self.split.labels)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.split.images[index]).convert("RGB")

    def __getitem__(self, index: int):
        return self.transform(self.image(index)), self.tokenizer([self.split.captions[index]])[0]


class SeededItems(Dataset):
    """Wraps a map-style dataset; item (seed, index) is (*dataset[index], index), computed under a torch RNG
    seeded with that seed. The index lets a cached teacher's embeddings be looked up."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]):
        seed, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return (*self.dataset[index], index)


class RankBlockSampler(Sampler):
    """Yields this rank's block of every global batch of one epoch, from ``start_batch`` on."""

    def __init__(self, num_samples, batch_size, seed, epoch, rank, world_size, start_batch=0):
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.block = batch_size // world_size

    def __len__(self) -> int:
        return self.num_samples // self.batch_size - self.start_batch

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        for batch in range(self.start_batch, self.num_samples // self.batch_size):
            start = batch * self.batch_size + self.rank * self.block
            yield [(sample_seed(self.seed, self.epoch, int(i)), int(i)) for i in order[start : start + self.block]]


class WebDatasetStream(IterableDataset):
    """Webdataset shards in a seeded shard order per epoch; each rank keeps its block of every global batch.

    Every rank reads the whole stream and keeps its share, which keeps batches sharding-invariant at the cost of
    decoding what other ranks use: the price of exactness on the small shard sets this is meant for.
    """

    def __init__(self, urls, transform, tokenizer, seed, epoch, rank, world_size, batch_size, start_batch, num_samples):
        self.urls, self.transform, self.tokenizer = urls, transform, tokenizer
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.batch_size, self.start_batch, self.num_samples = batch_size, start_batch, num_samples

    def __iter__(self) -> Iterator:
        import webdataset as wds

        urls = list(self.urls)
        random.Random(self.seed * 7919 + self.epoch).shuffle(urls)
        block = self.batch_size // self.world_size
        stream = wds.WebDataset(urls, shardshuffle=False).decode("pilrgb")
        stream = stream.to_tuple("jpg;png;jpeg;webp", "txt")
        limit = (self.num_samples // self.batch_size) * self.batch_size
        for position, (image, caption) in enumerate(stream):
            if position >= limit:
                return
            if position < self.start_batch * self.batch_size or (position % self.batch_size) // block != self.rank:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, position))
                yield self.transform(image), self.tokenizer([caption])[0], position  # a stream position, not a sample index


@dataclass
class TrainData:
    """Knows the epoch length and builds the loader of one epoch, from a given batch on."""

    num_samples: int
    batch_size: int
    loader_for: Callable[[int, int], DataLoader]

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size


def _csv_dataset(spec, transform, tokenizer) -> Dataset:
    from open_clip_train.data import CsvDataset  # open_clip's own CSV/TSV reader, reused

    if not Path(spec.path).is_file():
        raise ValueError(f"data.path: {spec.path!r} does not exist")
    header = Path(spec.path).open().readline().rstrip("\n").split(spec.separator)
    for field, key in (("image_key", spec.image_key), ("caption_key", spec.caption_key)):
        if key not in header:
            raise ValueError(
                f"data.{field}: {spec.path} has no column {key!r} (separator {spec.separator!r}); columns: {header}"
            )
    return CsvDataset(spec.path, transform, spec.image_key, spec.caption_key, sep=spec.separator, tokenizer=tokenizer)


def training_dataset(spec, transform, tokenizer) -> Dataset:
    """A map-style training set (csv or built-in) as (image, tokens) pairs, in sample-index order."""
    if spec.dataset == "csv":
        return _csv_dataset(spec, transform, tokenizer)
    return CaptionedImagesDataset(load_builtin(spec.dataset, "train"), transform, tokenizer)


def build_train_data(spec, transform, tokenizer, batch_size: int, seed: int, rank: int, world_size: int) -> TrainData:
    if batch_size % world_size:
        raise ValueError(f"train.batch_size {batch_size} is not divisible by the {world_size} processes")
    block = batch_size // world_size
    if spec.dataset == "webdataset":
        import braceexpand

        urls = list(braceexpand.braceexpand(spec.path))
        missing = [url for url in urls if "://" not in url and not Path(url).is_file()]
        if missing:
            raise ValueError(f"data.path: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]!r}")

        def wds_loader(epoch: int, start_batch: int) -> DataLoader:
            stream = WebDatasetStream(
                urls, transform, tokenizer, seed, epoch, rank, world_size, batch_size, start_batch, spec.num_samples
            )
            return DataLoader(stream, batch_size=block, num_workers=0)

        return TrainData(spec.num_samples, batch_size, wds_loader)

    dataset = training_dataset(spec, transform, tokenizer)
    if len(dataset) < batch_size:
        raise ValueError(f"train.batch_size {batch_size} exceeds the {len(dataset)} training samples of {spec.dataset!r}")
    items = SeededItems(dataset)

    def map_loader(epoch: int, start_batch: int) -> DataLoader:
        sampler = RankBlockSampler(len(dataset), batch_size, seed, epoch, rank, world_size, start_batch)
        return DataLoader(items, batch_sampler=sampler, num_workers=spec.workers, persistent_workers=False)

    return TrainData(len(dataset), batch_size, map_loader)
