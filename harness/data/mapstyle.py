"""CSV/TSV image-caption sets (open_clip's format), read by loader workers a batch at a time.

open_clip's ``CsvDataset`` applies its transform without the row index; a replayable view is drawn from the
sample's index, so the rows are read here (with the same pandas call) and each worker builds a whole block: its
images with their views, its captions tokenised in one call, and the teacher's cached rows when there are any.
Blocks follow the sharding-invariant order of in-memory sets (``memory.epoch_order``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from harness.data.bad import open_image, usable_caption
from harness.data.batch import Batch, count_decode, make_block
from harness.data.captions import CaptionChoice
from harness.data.files import CaptionTable
from harness.data.inputs import OtherInputs
from harness.data.memory import rank_blocks
from harness.data.views import Augmentation, ViewSpec


@dataclass
class CsvSource:
    """A CSV set; loader workers read, crop and tokenise its samples (``data.batch``)."""

    table: CaptionTable
    spec: ViewSpec
    augmentation: Augmentation
    tokenizer: Callable
    known_bad: dict[int, str] = field(default_factory=dict)  # found by a data check
    others: OtherInputs = field(default_factory=OtherInputs)  # the other models' inputs (data/inputs.py)
    captions: CaptionChoice = field(default_factory=CaptionChoice)  # one per row: always the first

    def __len__(self) -> int:
        return len(self.table)

    def read_order(self, ids: np.ndarray) -> range:
        return range(len(ids))

    def load(self, sample: int) -> tuple[torch.Tensor, list[str]]:
        caption = usable_caption(self.table.captions[sample])
        count_decode()
        return open_image(self.table.images[sample], self.others.decode_view(self.spec)), [caption]

    def after(self, sample: int) -> int:
        return (sample + 1) % len(self.table)

    def where(self, sample: int) -> str:
        return f"{self.table.path} row {sample + 2} ({self.table.images[sample]})"  # the header is row 1


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
    """This rank's block of every global batch from step ``start`` to ``stop`` of the run (``memory.rank_blocks``)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int, start: int, stop: int):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start, self.stop = rank, world_size, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for epoch, samples in rank_blocks(self.num_samples, self.batch_size, self.seed, self.rank, self.world_size,
                                          self.start, self.stop):
            yield EpochKey(epoch, samples)
