"""What a training loader yields: one rank's block of a global batch."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch


@dataclass
class Batch:
    """Images and caption tokens of a block of samples, with the ids that name them (a built-in or CSV set's row
    index; a shard's ``shard << 32 | position``), the stored view each one replays (if any), and the teacher's
    cached embeddings of those views when the run reads a teacher-embedding cache."""

    images: torch.Tensor
    texts: torch.Tensor
    samples: torch.Tensor
    views: torch.Tensor | None = None
    boxes: torch.Tensor | None = None  # the crop box (top, left, height, width) each image was cut to
    teacher_image: torch.Tensor | None = None
    teacher_text: torch.Tensor | None = None
    caption_index: torch.Tensor | None = None  # which of its captions each sample reads (data/captions.py): None, its first
    decoded: int = 0  # images its process decoded since that process made its previous block (count_decode)
    # images as decoded pixels (uint8, a quarter of float32's bytes to move), normalised where they are used:
    # the student's (mean, std); None when ``images`` are normalised already (the in-memory sets)
    pixels: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    bad: list[dict] = field(default_factory=list)  # the bad samples this block replaced (data/bad.py), as dicts
    # the other models' inputs unlike the student's (data/inputs.py), by what makes them: images (uint8 pixels
    # where ``pixels`` is set, normalised by their key's mean and std when moved) and tokens
    other_images: dict = field(default_factory=dict)  # ViewSpec -> tensor
    other_texts: dict = field(default_factory=dict)  # TextSpec -> tensor

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def map_tensors(self, function: Callable[[str, torch.Tensor], torch.Tensor]) -> Batch:
        """This batch with ``function(field name, tensor)`` applied to each tensor, the other models' inputs too."""
        return replace(self, **{name: function(name, t) for name, t in self._tensors().items()},
                       other_images={k: function("other_images", t) for k, t in self.other_images.items()},
                       other_texts={k: function("other_texts", t) for k, t in self.other_texts.items()})

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this: page-locked host memory for asynchronous copies to a GPU."""
        return self.map_tensors(lambda _, t: t.pin_memory())

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Batch:
        """On ``device``; images normalised there (from uint8 pixels) and teacher embeddings in the run's
        ``dtype``, ids and tokens as they are."""
        def move(name: str, tensor: torch.Tensor) -> torch.Tensor:
            floating = name in ("images", "other_images", "teacher_image", "teacher_text")
            if device.type == "cuda" and not tensor.is_pinned():  # from pageable memory a copy waits for the GPU
                tensor = tensor.pin_memory()
            pixels = self.pixels and name in ("images", "other_images")
            return tensor.to(device, None if pixels else dtype if floating else None, non_blocking=True)

        moved = self.map_tensors(move)
        if self.pixels:
            moved.images = normalize(moved.images, *self.pixels).to(dtype)
            moved.other_images = {view: normalize(t, view.mean, view.std).to(dtype)
                                  for view, t in moved.other_images.items()}
        moved.pixels = None
        return moved

    def __len__(self) -> int:
        return len(self.samples)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """torchvision's ``to_tensor`` then ``normalize`` of uint8 (…, C, H, W) pixels, the same float32 operations in
    the same order (so the same bits on the CPU as the transform on decoded images)."""
    mean, std = _channel_stats(pixels.device, tuple(mean), tuple(std))
    return pixels.float().div_(255).sub_(mean).div_(std)


@functools.cache
def _channel_stats(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a copy from the host on every batch would wait for the GPU each time."""
    return (torch.tensor(mean, device=device).view(-1, 1, 1), torch.tensor(std, device=device).view(-1, 1, 1))


_decodes = 0  # images this process has turned from bytes into pixels
_reported = 0  # of those, how many a block made here has reported already


def count_decode() -> None:
    """Called by every function that decodes an image file (shards, CSV sets)."""
    global _decodes
    _decodes += 1


def decodes_to_report() -> int:
    """Images decoded in this process since its previous block: summed over the blocks of an epoch, every decode
    of every process that made them, also those no block used (a loader worker forked from a process inherits
    its counts, so it starts from zero)."""
    global _reported
    fresh, _reported = _decodes - _reported, _decodes
    return fresh


def crop_views(images: list, ids: np.ndarray, views: np.ndarray | None, epoch: int, spec,
               augmentation, others=()) -> tuple[torch.Tensor, np.ndarray, dict]:
    """Decoded images (uint8, C × H × W) cut to their views' boxes (``views.ViewSpec.cut``), the boxes, and the
    same boxes cut for each of the ``others`` view specs."""
    boxes = augmentation.boxes(epoch, ids, views, [i.shape[-2] for i in images], [i.shape[-1] for i in images], spec)
    cut = {view: torch.stack([view.cut(image, box) for image, box in zip(images, boxes)]) for view in (spec, *others)}
    return cut.pop(spec), boxes, cut


def decoded_batch(images: list, captions: list[list[str]], ids: np.ndarray, views: np.ndarray | None, epoch: int,
                  source) -> Batch:
    """Decoded images cropped to this epoch's views for every input of ``source``, and the caption of each sample
    this epoch (``source.captions``) tokenised at once by each tokenizer."""
    pixels, boxes, other_images = crop_views(images, ids, views, epoch, source.spec, source.augmentation,
                                             source.others.views)
    index = source.captions.choose(epoch, ids, [len(texts) for texts in captions])
    read = [texts[i] for texts, i in zip(captions, np.zeros(len(ids), dtype=np.int64) if index is None else index)]
    return Batch(pixels, source.tokenizer(read), torch.from_numpy(ids),
                 None if views is None else torch.from_numpy(views), torch.from_numpy(boxes),
                 caption_index=None if index is None else torch.from_numpy(index),
                 pixels=(source.spec.mean, source.spec.std), other_images=other_images,
                 other_texts=source.others.tokens(read))


def make_block(source, teacher_rows, epoch: int, ids: np.ndarray) -> Batch:
    """The batch of samples ``ids`` in ``epoch``: each sample's view of the epoch, and the cached teacher's rows of
    those views when the run reads a teacher-embedding cache (read here, in the loader, not in the trainer). From
    files, a bad sample is replaced first (data/bad.py): the views and rows are the replacement's."""
    from harness.data.bad import decode_replacing

    bad = []
    if hasattr(source, "load"):  # files: decoded here
        decoded = decode_replacing(source, ids)
        ids, bad = decoded.ids, decoded.bad
        views = source.augmentation.choose(epoch, ids)
        batch = decoded_batch(decoded.images, decoded.captions, ids, views, epoch, source)
    else:  # in memory: no file to decode
        views = source.augmentation.choose(epoch, ids)
        batch = source.render(epoch, ids, views)
    if teacher_rows is not None:
        captions = None if batch.caption_index is None else batch.caption_index.numpy()
        batch.teacher_image, batch.teacher_text = teacher_rows.lookup(ids, views, captions)
    batch.decoded, batch.bad = decodes_to_report(), [asdict(entry) for entry in bad]
    return batch
