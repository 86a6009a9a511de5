"""A cached teacher: the rows of a finished cache read by the loader, handed to the losses as a live teacher's."""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.batch import Batch
from harness.teachers.cache_key import TeacherCacheError, read_meta

MAX_OPEN_ARRAYS = 64  # per process; each open map holds a file descriptor (the usual soft limit is 1,024)


class OpenArrays:
    """A cache folder's ``.npy`` arrays, memory-mapped on first use, at most MAX_OPEN_ARRAYS at a time (the least
    recently used is flushed and closed): a cache of the paper's 1,380 shards holds 4,140 arrays."""

    def __init__(self, folder: Path, writable: bool = False, limit: int = MAX_OPEN_ARRAYS):
        self.folder, self.mode, self.limit = Path(folder), "r+" if writable else "r", limit
        self._open: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._open:
            self._open.move_to_end(name)
        else:
            while len(self._open) >= self.limit:
                self._release(self._open.popitem(last=False)[1])
            self._open[name] = np.load(self.folder / f"{name}.npy", mmap_mode=self.mode)
        return self._open[name]

    def _release(self, array: np.ndarray) -> None:
        if self.mode == "r+":
            array.flush()
        # the map (and its descriptor) closes with its last reference: callers keep copies, never views

    def close(self) -> None:
        while self._open:
            self._release(self._open.popitem()[1])


class CachedRows:
    """Reads the rows of given samples and views from a finished cache. Picklable: each process (a loader worker)
    maps the arrays itself, on first use."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = read_meta(self.folder)
        self.samples, self.embed_dim, self.logit_scale = meta["samples"], meta["embed_dim"], meta["logit_scale"]
        self.logit_bias = meta.get("logit_bias")  # a sigmoid teacher's; None for a CLIP teacher (and older caches)
        self.views, self.shards, self.parts = meta["spec"]["views"], meta.get("shards"), meta.get("parts")
        self.every_caption = meta.get("captions") == "all"  # a text row per caption (data/captions.py)
        # what the live teacher handed the losses: a bf16 run's embeddings are bf16, stored exactly as float32
        self.embedding_dtype = getattr(torch, meta.get("embedding_dtype", "float32"))
        self._arrays, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None, "_pid": None}

    def _array(self, name: str) -> np.ndarray:
        if self._pid != os.getpid():  # maps are never shared with a forked loader worker
            self._arrays, self._pid = OpenArrays(self.folder), os.getpid()
        return self._arrays[name]

    def lookup(self, samples: np.ndarray, views: np.ndarray | None,
               captions: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's image embedding of each sample's view (the un-augmented one when ``views`` is None) and
        of its caption (the ``captions``-th of a cache of every caption; the first when None), as float32 tensors."""
        views = np.zeros(len(samples), dtype=np.int64) if views is None else views
        if captions is not None and not self.every_caption:
            raise TeacherCacheError(f"the teacher-embedding cache {self.folder} holds each sample's first caption "
                                    "only; a run that draws among several captions reads a cache of them all")
        captions = np.zeros(len(samples), dtype=np.int64) if captions is None else captions
        if self.shards is None and self.parts is None:  # a cache from before parts: one array by sample index
            image, text = self._array("image")[samples, views], self._array("text")[samples]
            return torch.from_numpy(np.asarray(image, dtype=np.float32)), torch.from_numpy(np.asarray(text, dtype=np.float32))
        folder, file_of, position = self._locate(samples)
        image = np.empty((len(samples), self.embed_dim), dtype=np.float32)
        text = np.empty_like(image)
        for file in np.unique(file_of):
            rows = file_of == file
            image[rows] = self._array(f"{folder}/{file}.image")[position[rows], views[rows]]
            text_rows = self._array(f"{folder}/{file}.text")
            text[rows] = (text_rows[position[rows], captions[rows]] if self.every_caption
                          else text_rows[position[rows]])
        return torch.from_numpy(image), torch.from_numpy(text)

    def _locate(self, samples: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
        """Which file of the cache holds each sample's rows, and the row: a shard's (by the id's shard and
        position), or a building rank's part (by the part's first sample)."""
        if self.shards is not None:
            from harness.data.shards import split_ids

            return ("shards", *split_ids(samples))
        starts = np.asarray(self.parts, dtype=np.int64)
        part = np.searchsorted(starts, samples, side="right") - 1
        return "parts", part, samples - starts[part]


def info(folder: Path) -> dict[str, Any]:
    """What ``clipkd cache info`` prints: the spec, and the bytes per sample and in all."""
    meta = read_meta(folder)
    total = sum(p.stat().st_size for p in Path(folder).rglob("*.npy"))
    return {"folder": str(folder), "samples": meta["samples"], "views": meta["spec"]["views"],
            "embed_dim": meta["embed_dim"], "storage": meta["spec"]["storage"], "bytes": total,
            "captions": "every caption" if meta.get("captions") == "all" else "the first",
            "bytes_per_sample": total / max(1, meta["samples"]), "teacher": meta["spec"]["teacher"],
            "dataset": meta["spec"]["dataset"].get("path") or meta["spec"]["dataset"]["dataset"]}


class EnsembleRows:
    """The rows of an ensemble's caches side by side: one (image, text) pair of tensors whose columns are each
    cache's in turn, so a batch carries several teachers' embeddings as it carries one's (``CachedTeacher`` reads
    its columns back)."""

    def __init__(self, members: list[CachedRows]):
        self.members = members
        self.samples = members[0].samples

    def lookup(self, samples: np.ndarray, views: np.ndarray | None,
               captions: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [member.lookup(samples, views, captions) for member in self.members]
        return torch.cat([image for image, _ in rows], dim=1), torch.cat([text for _, text in rows], dim=1)


class CachedTeacher:
    """The teacher's embeddings of the batch's samples and views, read from its cache by the loader: it never runs.
    They reach the losses in the dtype the live teacher's would have (bf16 under bf16 autocast). In an ensemble
    its rows are the batch's ``columns`` of the caches' side-by-side rows (``EnsembleRows``)."""

    def __init__(self, rows: CachedRows, device: torch.device, dtype: torch.dtype, columns: slice = slice(None)):
        self.dtype, self.columns = rows.embedding_dtype, columns
        # made here, before any step: a copy from the host inside a step would wait for the device
        self.logit_scale = torch.tensor(rows.logit_scale, device=device, dtype=dtype)
        self.logit_bias = None if rows.logit_bias is None else torch.tensor(rows.logit_bias, device=device, dtype=dtype)

    def __call__(self, batch: Batch):
        image, text = batch.teacher_image[:, self.columns], batch.teacher_text[:, self.columns]
        return image.to(self.dtype), text.to(self.dtype), self.logit_scale, self.logit_bias
