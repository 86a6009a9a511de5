"""CSV/TSV image-caption sets (open_clip's format), read by loader workers a batch at a time.

open_clip's ``CsvDataset`` applies its transform without the row index; a replayable view is drawn from the
sample's index, so the rows are read here (with the same pandas call) and each worker builds a whole block: its
images with their views, its captions tokenised in one call, and the teacher's cached rows when there are any.
Blocks follow the sharding-invariant order of in-memory sets (``memory.epoch_order``).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset, Sampler

from harness.data.batch import Batch, count_decode, make_block, pil_batch
from harness.data.memory import epoch_order
from harness.data.views import Augmentation, ViewSpec


class CaptionTable:
    """The rows of a CSV/TSV of image paths and captions; every column error names the file and the columns."""

    def __init__(self, path: str, image_key: str, caption_key: str, separator: str):
        if not Path(path).is_file():
            raise ValueError(f"data.path: {path!r} does not exist")
        frame = pd.read_csv(path, sep=separator)
        for field, key in (("image_key", image_key), ("caption_key", caption_key)):
            if key not in frame.columns:
                raise ValueError(f"data.{field}: {path} has no column {key!r} (separator {separator!r}); "
                                 f"columns: {list(frame.columns)}")
        self.images = frame[image_key].astype(str).tolist()
        self.captions = frame[caption_key].astype(str).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def first(self, count: int) -> CaptionTable:
        """The first ``count`` rows (a data budget)."""
        subset = copy.copy(self)
        subset.images, subset.captions = self.images[:count], self.captions[:count]
        return subset

    def image(self, index: int, spec: ViewSpec) -> Image.Image:
        count_decode()
        return spec.draft(Image.open(self.images[index])).convert("RGB")


@dataclass
class CsvSource:
    """A CSV set; ``render`` reads, crops and tokenises the given samples (in a loader worker)."""

    table: CaptionTable
    spec: ViewSpec
    augmentation: Augmentation
    tokenizer: Callable

    def __len__(self) -> int:
        return len(self.table)

    def decode(self, ids: np.ndarray) -> tuple[list[Image.Image], list[str]]:
        """The samples' images, decoded, and captions."""
        return [self.table.image(int(i), self.spec) for i in ids], [self.table.captions[i] for i in ids]

    def render(self, epoch: int, ids: np.ndarray, views: np.ndarray | None) -> Batch:
        images, captions = self.decode(ids)
        return pil_batch(images, captions, ids, views, epoch, self.spec, self.augmentation, self.tokenizer)


@dataclass
class EpochKey:
    epoch: int
    samples: np.ndarray


class BlockReader(Dataset):
    """Item ``EpochKey(epoch, samples)``: the Batch of those samples, with their views and teacher rows."""

    def __init__(self, source: CsvSource, teacher_rows=None):
        self.source, self.teacher_rows = source, teacher_rows

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: EpochKey) -> Batch:
        return make_block(self.source, self.teacher_rows, key.epoch, key.samples)


class RankBlocks(Sampler):
    """This rank's block of every global batch of one epoch, from ``start_step`` on."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                 start_step: int = 0):
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def __len__(self) -> int:
        return self.num_samples // self.batch_size - self.start_step

    def __iter__(self):
        order = epoch_order(self.num_samples, self.seed, self.epoch)
        block = self.batch_size // self.world_size
        for step in range(self.start_step, self.num_samples // self.batch_size):
            start = step * self.batch_size + self.rank * block
            yield EpochKey(self.epoch, order[start: start + block].numpy())
