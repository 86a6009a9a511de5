"""Webdataset shards, split across ranks and loader workers so that each sample is decoded once per epoch.

An epoch (``data.num_samples`` samples, in whole global batches) is planned from a seeded shard order, not
streamed: the shards, shuffled per epoch, are one virtual sequence of samples; rank r takes the r-th contiguous
run of it; within that run, windows of ``data.shuffle_window`` samples are permuted (seeded by run, epoch, rank
and window: the shuffle buffer); step s of the epoch takes the rank's outputs s·block … (s+1)·block. Which sample
a step takes is thus a function of (seed, epoch, rank, world size), not of the number of loader workers: worker j
of W builds steps start+j, start+j+W, …, seeking straight to each of its samples.

- Uneven shards need no resampling: the split is of samples, not shards, so every rank and worker decodes exactly
  its share. open_clip's ``--dataset-resampled`` draws shards with replacement instead, which decodes some
  samples twice and others never within an epoch.
- Resuming at step s decodes nothing before it: a sample is a (shard, position) whose byte offset the shard index
  holds.
- The index (per shard: each usable sample's key and the byte range of its members) is read from the tar headers
  once, without decoding, and kept in ``<output_dir>/.shard-index/``, keyed by the shard's path, size and time.
  A sample is a key with an image (jpg, jpeg, png, webp) or a caption (txt); one that lacks either, or whose
  image does not decode, is a bad sample, replaced as the loader meets it (data/bad.py).

Shards must be files (a mounted filesystem): the loader seeks in them, which a ``pipe:`` or ``http://`` stream
cannot do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from harness.data.bad import Unusable, open_image, usable_caption
from harness.data.batch import Batch, count_decode, make_block
from harness.data.captions import SYNTHETIC_MEMBER, CaptionChoice, synthetic_captions
from harness.data.files import INDEX_VERSION
from harness.data.inputs import OtherInputs
from harness.data.views import Augmentation, ViewSpec, mix

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_BITS = 32  # a sample id is shard << 32 | position in the shard


def scan_shard(path: Path) -> dict[str, np.ndarray]:
    """Every sample of a tar with an image or a caption: its key and the byte range [start, end) of its members,
    from headers only. One with only one of the two is bad, found as the loader reads it (data/bad.py)."""
    keys, starts, ends = [], [], []
    current, extensions, first, last = None, set(), 0, 0

    def close() -> None:
        if current is not None and extensions & {"txt", *IMAGE_EXTENSIONS}:
            keys.append(current)
            starts.append(first)
            ends.append(last)

    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            split = base_plus_ext(member.name)
            if split is None:
                continue
            key, extension = split
            if key != current:
                close()
                current, extensions, first = key, set(), member.offset
            extensions.add(extension.lower())
            last = member.offset_data + ((member.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        close()
    return {"keys": np.asarray(keys, dtype=str), "starts": np.asarray(starts, dtype=np.int64),
            "ends": np.asarray(ends, dtype=np.int64)}


def _index_file(folder: Path, shard: Path) -> Path:
    stat = shard.stat()
    identity = f"{shard.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{INDEX_VERSION}"
    return folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:20]}.npz"


def checked_file(index_file: Path) -> Path:
    """Where ``clipkd data check`` leaves a shard's bad samples (position -> reason), beside its index."""
    return index_file.with_suffix(".bad.json")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ShardIndex:
    """The samples of a shard set: counts up front, each shard's keys and byte ranges on demand."""

    def __init__(self, shards: list[Path], folder: Path):
        self.shards, self.folder = shards, Path(folder)
        self.files = [_index_file(self.folder, shard) for shard in shards]
        self._entries: dict[int, dict[str, np.ndarray]] = {}
        self.build()
        self.counts = np.array([self.entries(i)["starts"].shape[0] for i in range(len(shards))], dtype=np.int64)
        self._entries.clear()  # a worker loads the shards it reads

    def build(self) -> None:
        """Scan the shards that have no index yet (threads: the scan waits on the disk, not the CPU)."""
        todo = [i for i, file in enumerate(self.files) if not file.is_file()]
        if not todo:
            return
        with _locked(self.folder / ".lock"):
            todo = [i for i in todo if not self.files[i].is_file()]  # another process may have built them
            with ThreadPoolExecutor(max_workers=min(16, len(todo) or 1)) as pool:
                for i, arrays in zip(todo, pool.map(lambda i: scan_shard(self.shards[i]), todo)):
                    partial = self.files[i].with_suffix(f".{os.getpid()}.tmp.npz")
                    np.savez(partial, **arrays)
                    os.replace(partial, self.files[i])

    def entries(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._entries:
            with np.load(self.files[shard]) as arrays:
                self._entries[shard] = {name: arrays[name] for name in arrays.files}
        return self._entries[shard]

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def caption_counts(self, shard: int) -> np.ndarray:
        """Each sample's number of captions (its ``txt`` and its ``syn.json``'s), read from the shard's caption
        members alone (the images are seeked over) and kept beside its index: what a cache of every caption sizes
        its arrays by."""
        kept = self.files[shard].with_suffix(".captions.npy")
        if kept.is_file():
            return np.load(kept)
        entries, counts = self.entries(shard), []
        reader = ShardReader(self, members=("txt", SYNTHETIC_MEMBER))
        for position in range(len(entries["starts"])):
            members = reader.read(shard, position)[1]
            counts.append(int("txt" in members) + len(synthetic_captions(members.get(SYNTHETIC_MEMBER))))
        reader.close()
        self._entries.pop(shard, None)  # as after the index's build: a reader loads the shards it reads
        partial = kept.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(partial, np.asarray(counts, dtype=np.int64))
        os.replace(partial, kept)
        return np.load(kept)

    def known_bad(self) -> dict[int, str]:
        """The bad samples a data check found (sample id -> reason), for the shards it checked."""
        found = {}
        for shard, file in enumerate(self.files):
            if checked_file(file).is_file():
                for position, reason in json.loads(checked_file(file).read_text()).items():
                    found[(shard << SHARD_BITS) | int(position)] = reason
        return found


@dataclass(frozen=True)
class EpochPlan:
    """Which (shard, position) each output of each rank reads in one epoch; see the module's docstring."""

    counts: np.ndarray
    seed: int
    epoch: int
    batch_size: int
    world_size: int
    steps: int
    window: int

    @property
    def block(self) -> int:
        return self.batch_size // self.world_size

    def _stream(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng(int(mix(self.seed, self.epoch, -1)[()])).permutation(len(self.counts))
        return order, np.cumsum(self.counts[order])

    def samples(self, rank: int, step: int) -> np.ndarray:
        """Sample ids (shard << 32 | position) of rank ``rank``'s block at ``step``."""
        order, ends = self._stream()
        outputs = np.arange(step * self.block, (step + 1) * self.block)
        per_rank = self.steps * self.block
        window = outputs // self.window
        positions = np.empty_like(outputs)
        for w in np.unique(window):
            size = min(self.window, per_rank - w * self.window)
            permutation = np.random.default_rng(int(mix(self.seed, self.epoch, rank, w)[()])).permutation(size)
            chosen = window == w
            positions[chosen] = w * self.window + permutation[outputs[chosen] - w * self.window]
        stream = rank * per_rank + positions
        slot = np.searchsorted(ends, stream, side="right")
        shard = order[slot]
        offset = stream - (ends[slot] - self.counts[shard])
        return (shard.astype(np.int64) << SHARD_BITS) | offset


def split_ids(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return samples >> SHARD_BITS, samples & ((1 << SHARD_BITS) - 1)


class ShardReader:
    """Reads samples by (shard, position): seeks to the sample's members, never touches the others."""

    def __init__(self, index: ShardIndex, open_limit: int = 4, members: tuple[str, ...] | None = None):
        self.index, self.open_limit, self.members = index, open_limit, members  # members: read only these
        self._open: dict[int, tarfile.TarFile] = {}

    def _tar(self, shard: int) -> tarfile.TarFile:
        if shard not in self._open:
            if len(self._open) >= self.open_limit:
                self._open.pop(next(iter(self._open))).close()
            self._open[shard] = tarfile.open(self.index.shards[shard], mode="r:")
        return self._open[shard]

    def read(self, shard: int, position: int) -> tuple[str, dict[str, bytes]]:
        """The sample's key and its members' bytes by extension."""
        entries = self.index.entries(shard)
        tar, start, end = self._tar(shard), int(entries["starts"][position]), int(entries["ends"][position])
        # TarFile.next() reads the header at tar.offset, the file positioned there: that pair is the seek
        tar.fileobj.seek(start)
        tar.offset, tar.firstmember, tar.members = start, None, []
        members = {}
        while tar.offset < end and (member := tar.next()) is not None:
            if not member.isfile():
                continue
            extension = base_plus_ext(member.name)[1].lower()
            if self.members is None or extension in self.members:
                members[extension] = tar.extractfile(member).read()
        return str(entries["keys"][position]), members

    def close(self) -> None:
        for tar in self._open.values():
            tar.close()
        self._open.clear()


def decode_sample(members: dict[str, bytes], spec: ViewSpec) -> tuple[torch.Tensor, list[str]]:
    """A sample's image and captions (its ``txt``, then any synthetic ones: data/captions.py); Unusable
    (data/bad.py) for a bad one."""
    caption = members.get("txt")
    try:
        caption = usable_caption(None if caption is None else caption.decode("utf-8"))
    except UnicodeDecodeError:
        raise Unusable("the caption is not UTF-8 text") from None
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        raise Unusable("no image")
    count_decode()
    return open_image(io.BytesIO(image), spec), [caption, *synthetic_captions(members.get(SYNTHETIC_MEMBER))]


class ShardSource:
    """A shard set; loader workers read samples by seeking, decode, crop and tokenise them (``data.batch``)."""

    def __init__(self, index: ShardIndex, spec: ViewSpec, augmentation: Augmentation, tokenizer: Callable,
                 others: OtherInputs = OtherInputs(), captions: CaptionChoice = CaptionChoice()):
        self.index, self.spec, self.augmentation, self.tokenizer = index, spec, augmentation, tokenizer
        self.others, self.captions = others, captions  # the other models' inputs (data/inputs.py); the caption read
        self.known_bad = index.known_bad()
        self._reader, self._reader_pid = None, None

    def __len__(self) -> int:
        return self.index.total

    def reader(self) -> ShardReader:
        """This process's reader: open files are never shared with a forked loader worker."""
        if self._reader_pid != os.getpid():
            self._reader, self._reader_pid = ShardReader(self.index), os.getpid()
        return self._reader

    def __getstate__(self):
        return {**self.__dict__, "_reader": None, "_reader_pid": None}

    def read_order(self, ids: np.ndarray) -> np.ndarray:
        """File order: reads move forward through each shard."""
        shards, positions = split_ids(ids)
        return np.lexsort((positions, shards))

    def load(self, sample: int) -> tuple[torch.Tensor, list[str]]:
        shard, position = split_ids(np.int64(sample))
        return decode_sample(self.reader().read(int(shard), int(position))[1], self.others.decode_view(self.spec))

    def after(self, sample: int) -> int:
        """The next sample in the shards' own order (the next shard's first after a shard's last; then the first)."""
        shard, position = (int(v) for v in split_ids(np.int64(sample)))
        if position + 1 < self.index.counts[shard]:
            return (shard << SHARD_BITS) | (position + 1)
        following = next(s for s in [*range(shard + 1, len(self.index.counts)), *range(shard + 1)] if self.index.counts[s])
        return following << SHARD_BITS

    def where(self, sample: int) -> str:
        shard, position = (int(v) for v in split_ids(np.int64(sample)))
        return f"{self.index.shards[shard]} key {self.index.entries(shard)['keys'][position]}"


class ShardSteps(IterableDataset):
    """One rank's steps ``start`` … ``stop`` - 1 of the run, counted across epochs (step g is step g mod
    ``plan.steps`` of epoch g div ``plan.steps``; ``plan`` is any epoch's, each step takes its own epoch). In loader
    worker j of W, steps start+j, start+j+W, …: the DataLoader hands the workers' outputs on in turn, so the steps
    arrive in order, and one loader serves the whole run, its workers reading the next epoch's first batches while
    the last of this one train."""

    def __init__(self, source: ShardSource, plan: EpochPlan, rank: int, start: int, stop: int, teacher_rows=None):
        self.source, self.plan, self.rank, self.teacher_rows = source, plan, rank, teacher_rows
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in range(self.start + first, self.stop, stride):
            epoch, within = divmod(step, self.plan.steps)
            samples = dataclasses.replace(self.plan, epoch=epoch).samples(self.rank, within)
            yield make_block(self.source, self.teacher_rows, epoch, samples)
