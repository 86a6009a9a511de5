"""The teacher-embedding cache: a frozen teacher's embeddings of a training set, computed once and shared.

Every CLIP-KD loss needs only the teacher's final (normalised) embeddings, so runs that distil the same teacher on
the same data read them with each sample instead of running the teacher on every step. As in MobileCLIP's dataset
reinforcement (Vasu et al. 2024), a cache can hold K augmented views per sample (``teacher.views: K``): each view's
crop box and the teacher's image embedding of exactly that view. A run then trains on one stored view per sample
and epoch, its student's image rebuilt from the same box (``data/views.py``), so cached and live distillation are
the same experiment. ``views: 0`` stores the un-augmented view alone.

Layout of ``<output_dir>/.teacher-embeddings/<key>/`` (``clipkd cache info`` summarises one):

- ``meta.json``, written last: the spec the key hashes (teacher, data, views, preprocessing, storage dtype), the
  sample count, the embedding size and the teacher's logit scale;
- map-style sets (built-in, CSV): per building rank r, ``parts/r.image.npy`` (n_r × max(K, 1) × D),
  ``parts/r.text.npy`` (n_r × D, a caption once), ``parts/r.boxes.npy`` (n_r × K × 4: top, left, height, width),
  rank r's contiguous range of samples from ``meta["parts"][r]`` on: each rank writes files of its own, so no
  page of one file is written back by two nodes (on NFS a node's write-back of a shared page can overwrite a
  neighbour's rows). Caches built before that hold ``image.npy``, ``text.npy`` and ``boxes.npy`` by sample index;
- webdataset: the same three arrays per shard under ``shards/``, rows by position in the shard, and per shard its
  path, sample count and a digest of its ``__key__``s in ``meta.json``.

Loader workers read the rows of the samples they yield (``CachedRows``); the trainer never builds the teacher.
A build is one pass over the data: under torchrun every rank embeds its share at once (shards: whole shards per
rank and loader worker), in the run's precision. Builders queue on an exclusive lock, write a private folder and
rename it into place, so a cache folder is whole whenever it exists; a builder removes the partial folders whose
builders are gone. No rank waits inside a collective for another's long work (the lock, the embedding): those
waits are polls of the lock and of marker files, and the collectives that remain last a moment.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.distributed import DistEnv, from_main, init_distributed
from core.errors import ClipkdError, worker_errors_unwrapped
from core.precision import autocast, output_dtype, parameter_dtype
from harness.config import RunConfig, teacher_run_dir
from harness.data import build_source, csv_identity, workers
from harness.data.bad import decode_replacing
from harness.data.batch import Batch, crop_views, decodes_to_report
from harness.data.shards import ShardSource
from harness.data.views import Augmentation, ViewSpec
from harness.models import model_identity, model_name
from harness.processes import pid_alive
from harness.teachers import create_teacher
from methods import normalize

CACHE_DIR = ".teacher-embeddings"
META = "meta.json"
# data/views.py's boxes and pixels (2: JPEGs decoded at draft scale; 3: views resampled by torch's uint8 bicubic):
# a change changes every key
VIEWS_VERSION = 3
STORAGE = {"float32": np.float32, "float16": np.float16}


class TeacherCacheError(ClipkdError, RuntimeError):
    pass


def preprocessing(config: RunConfig) -> dict[str, Any]:
    """What turns a sample into the teacher's input: the student's view of it and the student's tokenizer."""
    import open_clip

    text = open_clip.get_model_config(model_name(config.student.model)).get("text_cfg", {})
    forward = {  # the teacher runs in the run's precision: a bf16 run's cache is not an fp32 run's
        "fp64": {"teacher_dtype": "float64"}, "bf16": {"teacher_autocast": "bf16"}, "fp16": {"teacher_autocast": "fp16"},
    }.get(config.train.precision, {})
    return {"view": ViewSpec.of(config.student.model).describe(), "views_version": VIEWS_VERSION,
            "context_length": text.get("context_length", 77), "tokenizer": text.get("hf_tokenizer_name"), **forward}


def teacher_identity(config: RunConfig) -> dict[str, Any]:
    teacher = config.teacher
    if teacher.run:  # a run of this project: its id names its final weights
        return {"run": teacher_run_dir(teacher.run).name}
    weights, model = Path(teacher.pretrained), model_identity(teacher.model)
    if weights.is_file():  # a local file: its size and time stand for its contents
        stat = weights.stat()
        return {"model": model, "file": str(weights.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns}
    return {"model": model, "pretrained": teacher.pretrained}


def data_identity(config: RunConfig) -> dict[str, Any]:
    """The samples: a built-in set by name, a CSV by its table's bytes and its images' sizes and times, shards by
    path, size and time (a rewritten shard, an edited table, an image downloaded again: another dataset)."""
    data = config.data.model_dump(exclude={"workers", "augment", "shuffle_window", "num_samples", "bad_samples",
                                           "max_bad_fraction"})
    if config.data.dataset == "csv":
        data["samples"] = csv_identity(config.data)
    if config.data.dataset == "webdataset":
        from harness.data.shards import INDEX_VERSION, expand_shards

        data["shards"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in expand_shards(config.data.path)]
        data["index_version"] = INDEX_VERSION  # which samples a shard holds
    return data


@dataclass(frozen=True)
class CacheSpec:
    teacher: dict[str, Any]
    dataset: dict[str, Any]
    preprocessing: dict[str, Any]
    views: int
    storage: str

    @classmethod
    def of(cls, config: RunConfig) -> CacheSpec:
        if config.teacher is None:
            raise TeacherCacheError(f"{config.name}: a teacher-embedding cache needs a teacher")
        if isinstance(config.teacher, list):  # callers ask per member: config.with_teacher(member)
            raise TeacherCacheError(f"{config.name}: an ensemble of {len(config.teacher)} teachers has a cache per "
                                    "cached teacher, not one")
        return cls(teacher_identity(config), data_identity(config), preprocessing(config), config.teacher.views,
                   config.teacher.cache_dtype)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / CACHE_DIR / CacheSpec.of(config).key


def is_built(config: RunConfig) -> bool:
    return _complete(cache_dir(config))


def _complete(folder: Path) -> bool:
    return (folder / META).is_file()  # meta.json is written last, inside the folder renamed into place


def failure_file(config: RunConfig) -> Path:
    """Where a failed build leaves its reason (a grid's cache cell is then failed)."""
    return cache_dir(config).with_suffix(".failed")


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META).read_text())


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
        self.views, self.shards, self.parts = meta["spec"]["views"], meta.get("shards"), meta.get("parts")
        # what the live teacher handed the losses: a bf16 run's embeddings are bf16, stored exactly as float32
        self.embedding_dtype = getattr(torch, meta.get("embedding_dtype", "float32"))
        self._arrays, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None, "_pid": None}

    def _array(self, name: str) -> np.ndarray:
        if self._pid != os.getpid():  # maps are never shared with a forked loader worker
            self._arrays, self._pid = OpenArrays(self.folder), os.getpid()
        return self._arrays[name]

    def lookup(self, samples: np.ndarray, views: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's image embedding of each sample's view (the un-augmented one when ``views`` is None) and
        of its caption, as float32 tensors."""
        views = np.zeros(len(samples), dtype=np.int64) if views is None else views
        if self.shards is None and self.parts is None:  # a cache from before parts: one array by sample index
            image, text = self._array("image")[samples, views], self._array("text")[samples]
            return torch.from_numpy(np.asarray(image, dtype=np.float32)), torch.from_numpy(np.asarray(text, dtype=np.float32))
        folder, file_of, position = self._locate(samples)
        image = np.empty((len(samples), self.embed_dim), dtype=np.float32)
        text = np.empty_like(image)
        for file in np.unique(file_of):
            rows = file_of == file
            image[rows] = self._array(f"{folder}/{file}.image")[position[rows], views[rows]]
            text[rows] = self._array(f"{folder}/{file}.text")[position[rows]]
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
            "bytes_per_sample": total / max(1, meta["samples"]), "teacher": meta["spec"]["teacher"],
            "dataset": meta["spec"]["dataset"].get("path") or meta["spec"]["dataset"]["dataset"]}


# -- building ------------------------------------------------------------------------------------------------------
POLL_SECONDS = 0.5


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _exclusive(lock_path: Path, env: DistEnv) -> Iterator[None]:
    """The builders' lock, held by rank 0 for all ranks. It is tried, not waited for: while another job builds,
    the ranks meet in a short broadcast every POLL_SECONDS rather than waiting in one collective for as long as
    that build takes (an NCCL or gloo group times out)."""
    handle = None
    if env.is_main:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a")
    try:
        while not from_main(handle is not None and _try_lock(handle)):
            time.sleep(POLL_SECONDS)
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


OWNER = ".owner.json"  # in a partial folder: the builder's host and pid; its mtime is the builder's heartbeat
STALE_SECONDS = 15 * 60  # a builder on another host is gone when it has not written for this long


def _partial_name(folder: Path) -> str:
    return f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}"


def _claim(partial: Path) -> None:
    partial.mkdir(parents=True)
    (partial / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def _abandoned(partial: Path) -> bool:
    """Whether a partial folder's builder is gone: on this host its process has ended; on another, it has not
    written for STALE_SECONDS. A lock that works keeps other live builders out anyway; this keeps a builder on a
    filesystem whose lock does nothing (some NFS mounts) from deleting the folder another one is filling."""
    owner = partial / OWNER
    try:
        facts, age = json.loads(owner.read_text()), time.time() - owner.stat().st_mtime
    except (OSError, ValueError):  # a folder a builder has just made (or a pre-owner-file one): by its age
        return time.time() - partial.stat().st_mtime > STALE_SECONDS
    if facts.get("host") == socket.gethostname():
        return not pid_alive(int(facts["pid"]))
    return age > STALE_SECONDS


def _remove_abandoned(folder: Path) -> None:
    """Partial folders of builders that died mid-build."""
    for partial in folder.parent.glob(f"{folder.name}.partial-*"):
        with contextlib.suppress(FileNotFoundError):
            if _abandoned(partial):
                shutil.rmtree(partial, ignore_errors=True)


class EnsembleRows:
    """The rows of an ensemble's caches side by side: one (image, text) pair of tensors whose columns are each
    cache's in turn, so a batch carries several teachers' embeddings as it carries one's (``CachedTeacher`` reads
    its columns back)."""

    def __init__(self, members: list[CachedRows]):
        self.members = members
        self.samples = members[0].samples

    def lookup(self, samples: np.ndarray, views: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [member.lookup(samples, views) for member in self.members]
        return torch.cat([image for image, _ in rows], dim=1), torch.cat([text for _, text in rows], dim=1)


def ensure(config: RunConfig, device: torch.device, env: DistEnv | None = None) -> Path:
    """The cache folder of ``config``'s teacher, data and views, built first if it does not exist yet; under
    torchrun every rank embeds its share."""
    folder = cache_dir(config)
    env = env or init_distributed(config.train.collective_timeout_s)
    if from_main(_complete(folder)):
        return folder
    builder = _Builder(config, device)  # the teacher and the data's index, before this rank meets the others
    with _exclusive(folder.with_suffix(".lock"), env), worker_errors_unwrapped():
        built, partial = from_main((_complete(folder), folder.with_name(_partial_name(folder))))
        if not built:  # another builder may have finished while this one waited
            if env.is_main:
                _remove_abandoned(folder)
            builder.build(partial, env)
            if env.is_main:
                _publish(partial, folder)
        _meet(env)  # rank 0 has renamed the folder into place: a moment's wait
    return folder


def _meet(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def _publish(partial: Path, folder: Path) -> None:
    try:
        os.rename(partial, folder)  # atomic: readers see no folder or a whole one
    except OSError:  # a concurrent builder published first (no working lock): keep its copy
        shutil.rmtree(partial, ignore_errors=True)


class _Marks:
    """Files in a partial cache folder by which its builders' ranks follow each other's progress (arrays
    created, a rank's share embedded, a rank failed) without waiting inside a collective."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, name: str) -> Path:
        return self.folder / f".mark-{name}"

    def set(self, name: str, text: str = "") -> None:
        self._path(name).write_text(text)

    def wait(self, names: list[str]) -> None:
        """Until every mark in ``names`` is set; a failed rank's mark raises here."""
        while True:
            failed = sorted(self.folder.glob(".mark-failed-*"))
            if failed:
                raise TeacherCacheError(f"building {self.folder}: {failed[0].name.removeprefix('.mark-')}: "
                                        f"{failed[0].read_text()}")
            if all(self._path(name).is_file() for name in names):
                return
            time.sleep(POLL_SECONDS)

    def read(self, name: str) -> str:
        return self._path(name).read_text()

    def clear(self) -> None:
        for mark in self.folder.glob(".mark-*"):
            mark.unlink()


class _Work(IterableDataset):
    """The chunks a rank embeds, split again across its loader workers: (array prefix, rows, images per view
    (K' × n × C × H × W), the pixels' normalisation or None, tokens, boxes per view, images decoded). Loader
    workers decode each image once and cut its K views from it; the main process runs the teacher."""

    def __init__(self, source, chunks: list[tuple[str, np.ndarray, np.ndarray]], views: int):
        self.source, self.chunks, self.views = source, chunks, views

    def __iter__(self):
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        stored = [None] if not self.views else list(range(self.views))
        for prefix, rows, ids in self.chunks[first::stride]:
            source, bad = self.source, []
            if hasattr(source, "load"):  # files: decoded once, every view cut from the one image
                decoded = decode_replacing(source, ids)  # a bad sample's row holds its replacement, as a run reads
                ids, bad = decoded.ids, [asdict(entry) for entry in decoded.bad]
                cut = [crop_views(decoded.images, ids, None if v is None else np.full(len(ids), v), 0, source.spec,
                                  source.augmentation) for v in stored]
                pixels, tokens = (source.spec.mean, source.spec.std), source.tokenizer(decoded.captions)
            else:  # in memory: nothing to decode
                batches = [source.render(0, ids, None if v is None else np.full(len(ids), v)) for v in stored]
                cut, pixels, tokens = [(b.images, b.boxes.numpy()) for b in batches], None, batches[0].texts
            yield (prefix, rows, torch.stack([images for images, _ in cut]), pixels, tokens,
                   torch.stack([torch.from_numpy(boxes) for _, boxes in cut]), decodes_to_report(), json.dumps(bad))


def _chunks(source, share: tuple[int, int], batch: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """This rank's work as (array prefix, rows in those arrays, sample ids): its part of a map-style set (a
    contiguous share, in files of its own), or every world-th shard."""
    rank, world = share
    if isinstance(source, ShardSource):
        from harness.data.shards import SHARD_BITS

        chunks = []
        for shard in range(rank, len(source.index.shards), world):
            positions = np.arange(int(source.index.counts[shard]))
            for start in range(0, len(positions), batch):
                rows = positions[start:start + batch]
                chunks.append((f"shards/{shard}.", rows, (np.int64(shard) << SHARD_BITS) | rows))
        return chunks
    ids = np.arange(*_part_range(len(source), rank, world))
    rows = ids - ids[0] if len(ids) else ids
    return [(f"parts/{rank}.", rows[start:start + batch], ids[start:start + batch]) for start in range(0, len(ids), batch)]


def _part_range(count: int, rank: int, world: int) -> tuple[int, int]:
    """The samples of a map-style set that building rank ``rank`` of ``world`` embeds into its own files."""
    return count * rank // world, count * (rank + 1) // world


class _Builder:
    """One process's part of a build: the teacher, run in the run's precision (the cached embeddings are the ones
    a live teacher of the same run computes), and the training set as the student sees it."""

    def __init__(self, config: RunConfig, device: torch.device):
        self.config, self.device, self.spec = config, device, CacheSpec.of(config)
        self.teacher = create_teacher(config.teacher, device, config.train.precision)
        augmentation = Augmentation("replay", views=self.spec.views) if self.spec.views else Augmentation("none")
        self.source = build_source(config.data, config.student.model, student_tokenizer(config), augmentation,
                                   config.output_dir)
        self.sharded = isinstance(self.source, ShardSource)

    def files(self, world: int) -> list[tuple[str, int]]:
        """Each file set of the cache (its prefix) and its rows: a shard's, or a building rank's part."""
        if self.sharded:
            return [(f"shards/{i}.", int(n)) for i, n in enumerate(self.source.index.counts)]
        ranges = [_part_range(len(self.source), rank, world) for rank in range(world)]
        return [(f"parts/{rank}.", stop - start) for rank, (start, stop) in enumerate(ranges)]

    def build(self, folder: Path, env: DistEnv) -> None:
        """Rank 0 creates the arrays (cheap: their files), then every rank embeds its share at once; they meet
        when all are done."""
        marks = _Marks(folder)
        try:
            if env.is_main:
                _claim(folder)
                self.create_arrays(folder, env.world_size)
                marks.set("created")
            else:
                marks.wait(["created"])
            embedded = self.embed(folder, (env.rank, env.world_size))
        except BaseException as error:
            if folder.is_dir():
                marks.set(f"failed-rank{env.rank}", f"{type(error).__name__}: {error}")
            raise
        marks.set(f"embedded-{env.rank}", json.dumps({"embedded": embedded, "decoded": self.decoded,
                                                      "bad": list(self.bad.values())}))
        marks.wait([f"embedded-{rank}" for rank in range(env.world_size)])
        _meet(env)  # every rank has seen every mark: a moment's wait
        if env.is_main:
            ranks = [json.loads(marks.read(f"embedded-{rank}")) for rank in range(env.world_size)]
            marks.clear()
            (folder / OWNER).unlink()
            self.write_meta(folder, ranks, env.world_size)

    def create_arrays(self, folder: Path, world: int) -> None:
        (folder / ("shards" if self.sharded else "parts")).mkdir()
        storage, views, dim = STORAGE[self.spec.storage], self.spec.views, self.teacher.embed_dim
        for prefix, count in self.files(world):
            shapes = {"image": ((count, max(1, views), dim), storage), "text": ((count, dim), storage),
                      "boxes": ((count, views, 4), np.int32)}
            for name, (shape, dtype) in shapes.items():
                np.lib.format.open_memmap(folder / f"{prefix}{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()

    def embed(self, folder: Path, share: tuple[int, int]) -> int:
        """Embed this rank's share of the samples (every stored view) into the arrays; returns how many."""
        chunks = _chunks(self.source, share, self.config.eval.batch_size)
        loader = DataLoader(_Work(self.source, chunks, self.spec.views), batch_size=None,
                            num_workers=min(workers(self.config.data.workers), len(chunks)))
        storage, model = STORAGE[self.spec.storage], self.teacher.model
        dtype = parameter_dtype(self.config.train.precision)
        arrays, owner = OpenArrays(folder, writable=True), folder / OWNER
        self.decoded, self.bad = 0, {}
        with torch.no_grad():
            for prefix, rows, images, pixels, tokens, boxes, decoded, bad in loader:
                os.utime(owner)  # the heartbeat that tells other builders this one is alive
                self.decoded += int(decoded)
                self.bad |= {entry["sample"]: entry for entry in json.loads(bad)}
                views, n = images.shape[:2]
                images = Batch(images.flatten(0, 1), tokens, torch.as_tensor(rows), pixels=pixels).to(self.device, dtype)
                with autocast(self.device, self.config.train.precision):
                    image = normalize(model.encode_image(images.images))
                    text = normalize(model.encode_text(tokens.to(self.device)))
                # through float64, which holds a bf16, fp32 or fp64 value exactly: one rounding, to the storage dtype
                arrays[f"{prefix}image"][rows] = image.view(views, n, -1).transpose(0, 1).double().cpu().numpy().astype(storage)
                arrays[f"{prefix}text"][rows] = text.double().cpu().numpy().astype(storage)
                if self.spec.views:
                    arrays[f"{prefix}boxes"][rows] = boxes.transpose(0, 1).numpy()
        arrays.close()
        return sum(len(rows) for _, rows, _ in chunks)

    def write_meta(self, folder: Path, ranks: list[dict[str, int]], world: int) -> None:
        """``ranks``: each rank's samples embedded and images decoded (files: once each, whatever the views)."""
        files = self.files(world)
        meta = {"spec": asdict(self.spec), "samples": sum(n for _, n in files),
                "embedded_by_rank": [rank["embedded"] for rank in ranks],
                "decoded_by_rank": [rank["decoded"] for rank in ranks],
                # the bad samples found (data/bad.py): their rows hold their replacements, which runs read instead
                "bad_samples": sorted((entry for rank in ranks for entry in rank["bad"]), key=lambda e: e["sample"]),
                "embed_dim": self.teacher.embed_dim, "logit_scale": float(self.teacher.model.logit_scale.exp()),
                "embedding_dtype": str(output_dtype(self.config.train.precision)).removeprefix("torch."),
                "teacher_model": type(self.teacher.model).__name__}
        if self.sharded:  # which shard's rows are where (the key names the shards by path, size and time)
            meta["shards"] = [{"path": str(path), "samples": count}
                              for path, (_, count) in zip(self.source.index.shards, files)]
        else:  # each part's first sample
            meta["parts"] = [_part_range(len(self.source), rank, world)[0] for rank in range(world)]
        (folder / META).write_text(json.dumps(meta, indent=1))


def student_tokenizer(config: RunConfig):
    import open_clip

    return open_clip.get_tokenizer(model_name(config.student.model))

