"""Built-in sets at memory speed: the split as one uint8 tensor, its captions tokenised once, views per batch.

A batch is an index gather, one vectorised draw of crop boxes and one ``grid_sample``: no PIL, no per-sample
tokenizer call, no loader process. Batches are sharding-invariant: step s of an epoch takes the same global batch
whatever the number of processes, each rank its contiguous block, so the gathered batch equals the
single-process one. The order is a seeded permutation per epoch, so a resumed run sees the batches of an
uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from core.builtin import CaptionedImages
from harness.data.batch import Batch, make_block
from harness.data.inputs import OtherInputs
from harness.data.views import Augmentation, ViewSpec


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def rank_blocks(num_samples: int, batch_size: int, seed: int, rank: int, world_size: int, start: int,
                stop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, sample ids) of this rank's block of each global batch from step ``start`` to ``stop`` of the run,
    steps counted across epochs (step g is step g mod steps-per-epoch of epoch g div steps-per-epoch)."""
    steps, block = num_samples // batch_size, batch_size // world_size
    order_of = None
    for step in range(start, stop):
        epoch, within = divmod(step, steps)
        if order_of is None or order_of[0] != epoch:
            order_of = epoch, epoch_order(num_samples, seed, epoch).numpy()
        first = within * batch_size + rank * block
        yield epoch, order_of[1][first: first + block]


def tokenize_once(captions: list[str], tokenizer: Callable) -> torch.Tensor:
    """Every caption's tokens, each distinct caption tokenised once (built-in captions repeat a lot)."""
    distinct, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    return tokenizer(list(distinct))[torch.from_numpy(inverse.reshape(-1))]


@dataclass
class InMemorySource:
    """A built-in split held as tensors; ``render`` makes the batch of given samples and views."""

    split: CaptionedImages
    tokens: torch.Tensor
    spec: ViewSpec
    augmentation: Augmentation
    others: OtherInputs = field(default_factory=OtherInputs)  # the other models' inputs (data/inputs.py)
    other_tokens: dict = field(default_factory=dict)  # TextSpec -> every caption's tokens

    @classmethod
    def of(cls, split: CaptionedImages, tokenizer: Callable, spec: ViewSpec, augmentation: Augmentation,
           others: OtherInputs = OtherInputs()):
        return cls(split, tokenize_once(split.captions, tokenizer), spec, augmentation, others,
                   {text: tokenize_once(split.captions, other) for text, other in others.texts})

    def __len__(self) -> int:
        return len(self.split.labels)

    def render(self, epoch: int, ids: np.ndarray, views: np.ndarray | None) -> Batch:
        height, width = self.split.images.shape[1:3]
        boxes = self.augmentation.boxes(epoch, ids, views, height, width, self.spec)
        samples, images = torch.from_numpy(ids), torch.from_numpy(self.split.images[ids])
        return Batch(self.spec.tensor(images, boxes), self.tokens[samples], samples,
                     None if views is None else torch.from_numpy(views), torch.from_numpy(boxes),
                     other_images={view: view.tensor(images, boxes) for view in self.others.views},
                     other_texts={text: tokens[samples] for text, tokens in self.other_tokens.items()})


@dataclass
class InMemoryLoader:
    """One rank's blocks, made in this process (a batch costs ~1 ms: no loader worker is needed)."""

    source: InMemorySource
    batch_size: int
    seed: int
    rank: int
    world_size: int
    teacher_rows: object | None = None  # a teacher_cache reader of the cached teacher's rows

    def steps(self, start: int, stop: int) -> Iterator[Batch]:
        for epoch, samples in rank_blocks(len(self.source), self.batch_size, self.seed, self.rank, self.world_size,
                                          start, stop):
            yield make_block(self.source, self.teacher_rows, epoch, samples)
