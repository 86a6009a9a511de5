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
- map-style sets (built-in, CSV): ``image.npy`` (N × max(K, 1) × D), ``text.npy`` (N × D, a caption once),
  ``boxes.npy`` (N × K × 4: top, left, height, width), rows by sample index;
- webdataset: the same three arrays per shard under ``shards/``, rows by position in the shard, and per shard its
  path, sample count and a digest of its ``__key__``s in ``meta.json``.

Loader workers read the rows of the samples they yield (``CachedRows``); the trainer never builds the teacher.
A build is one pass over the data: under torchrun every rank embeds its share (shards: whole shards per rank and
loader worker). Builders queue on an exclusive lock, write a private folder and rename it into place, so a cache
folder is whole whenever it exists; a builder that holds the lock removes the partial folders of killed builders.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.config import RunConfig
from harness.data import build_source, workers
from harness.data.shards import ShardSource
from harness.data.views import Augmentation, ViewSpec
from harness.distributed import DistEnv, init_distributed
from harness.errors import ClipkdError
from harness.models import create_teacher, model_identity, model_name, parameter_dtype, teacher_run_dir

CACHE_DIR = ".teacher-embeddings"
META = "meta.json"
VIEWS_VERSION = 1  # the crop-box drawing of data/views.py: a change there must change every cache key
STORAGE = {"float32": np.float32, "float16": np.float16}


class TeacherCacheError(ClipkdError, RuntimeError):
    pass


def preprocessing(config: RunConfig) -> dict[str, Any]:
    """What turns a sample into the teacher's input: the student's view of it and the student's tokenizer."""
    import open_clip

    text = open_clip.get_model_config(model_name(config.student.model)).get("text_cfg", {})
    forward = {"teacher_dtype": "float64"} if config.train.precision == "fp64" else {}
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
    """The samples: a built-in set by name, a CSV by path, shards by path, size and time (a rewritten shard is
    another dataset)."""
    data = config.data.model_dump(exclude={"workers", "augment", "shuffle_window", "num_samples"})
    if config.data.dataset == "webdataset":
        from harness.data.shards import expand_shards

        data["shards"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in expand_shards(config.data.path)]
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


class CachedRows:
    """Reads the rows of given samples and views from a finished cache. Picklable: each process (a loader worker)
    maps the arrays itself, on first use."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = read_meta(self.folder)
        self.samples, self.embed_dim, self.logit_scale = meta["samples"], meta["embed_dim"], meta["logit_scale"]
        self.views, self.shards = meta["spec"]["views"], meta.get("shards")
        self._arrays: dict[str, np.ndarray] = {}
        self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}, "_pid": None}

    def _array(self, name: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def lookup(self, samples: np.ndarray, views: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's image embedding of each sample's view (the un-augmented one when ``views`` is None) and
        of its caption, as float32 tensors."""
        views = np.zeros(len(samples), dtype=np.int64) if views is None else views
        if self.shards is None:
            image, text = self._array("image")[samples, views], self._array("text")[samples]
        else:
            from harness.data.shards import split_ids

            shard_of, position = split_ids(samples)
            image = np.empty((len(samples), self.embed_dim), dtype=np.float32)
            text = np.empty_like(image)
            for shard in np.unique(shard_of):
                rows = shard_of == shard
                image[rows] = self._array(f"shards/{shard}.image")[position[rows], views[rows]]
                text[rows] = self._array(f"shards/{shard}.text")[position[rows]]
        return torch.from_numpy(np.asarray(image, dtype=np.float32)), torch.from_numpy(np.asarray(text, dtype=np.float32))


def info(folder: Path) -> dict[str, Any]:
    """What ``clipkd cache info`` prints: the spec, and the bytes per sample and in all."""
    meta = read_meta(folder)
    total = sum(p.stat().st_size for p in Path(folder).rglob("*.npy"))
    return {"folder": str(folder), "samples": meta["samples"], "views": meta["spec"]["views"],
            "embed_dim": meta["embed_dim"], "storage": meta["spec"]["storage"], "bytes": total,
            "bytes_per_sample": total / max(1, meta["samples"]), "teacher": meta["spec"]["teacher"],
            "dataset": meta["spec"]["dataset"].get("path") or meta["spec"]["dataset"]["dataset"]}


# -- building ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another builder holds it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _partial_name(folder: Path) -> str:
    return f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}"


def _remove_abandoned(folder: Path) -> None:
    """Partial folders of builders that died mid-build: with the lock held, no live builder owns one."""
    for abandoned in folder.parent.glob(f"{folder.name}.partial-*"):
        shutil.rmtree(abandoned, ignore_errors=True)


def ensure(config: RunConfig, device: torch.device, env: DistEnv | None = None) -> Path:
    """The cache folder of ``config``'s teacher, data and views, built first if it does not exist yet."""
    folder = cache_dir(config)
    env = env or init_distributed()
    if env.distributed:  # every rank embeds its share into the folder rank 0 names
        return _build_distributed(config, folder, device, env)
    if _complete(folder):
        return folder
    with _exclusive(folder.with_suffix(".lock")):
        if not _complete(folder):  # another builder may have finished while this one waited
            _remove_abandoned(folder)
            partial = folder.with_name(_partial_name(folder))
            _embed(config, partial, device, share=(0, 1), create=True)
            _publish(partial, folder)
    return folder


def _build_distributed(config: RunConfig, folder: Path, device: torch.device, env: DistEnv) -> Path:
    import torch.distributed as dist

    lock = contextlib.ExitStack()
    if env.is_main:
        lock.enter_context(_exclusive(folder.with_suffix(".lock")))  # rank 0 holds it for the whole build
    with lock:
        decision = [_complete(folder), _partial_name(folder)]
        dist.broadcast_object_list(decision, src=0)  # rank 0 decides for all, so no rank waits alone
        built, partial = decision[0], folder.with_name(decision[1])
        if built:
            return folder
        if env.is_main:
            _remove_abandoned(folder)
            _embed(config, partial, device, share=(0, env.world_size), create=True)
        dist.barrier()  # the arrays exist; the other ranks fill their rows
        if not env.is_main:
            _embed(config, partial, device, share=(env.rank, env.world_size), create=False)
        dist.barrier()
        if env.is_main:
            _publish(partial, folder)
    dist.barrier()
    return folder


def _publish(partial: Path, folder: Path) -> None:
    try:
        os.rename(partial, folder)  # atomic: readers see no folder or a whole one
    except OSError:  # a concurrent builder published first (no working lock): keep its copy
        shutil.rmtree(partial, ignore_errors=True)


class _Work(IterableDataset):
    """The chunks a rank embeds, split again across its loader workers: (array prefix, rows, images per view
    (K' × n × C × H × W), tokens, boxes per view). Loader workers decode and crop; the main process runs the
    teacher."""

    def __init__(self, source, chunks: list[tuple[str, np.ndarray, np.ndarray]], views: int):
        self.source, self.chunks, self.views = source, chunks, views

    def __iter__(self):
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        for prefix, rows, ids in self.chunks[first::stride]:
            rendered = [self.source.render(0, ids, None if not self.views else np.full(len(ids), v))
                        for v in range(max(1, self.views))]
            yield (prefix, rows, torch.stack([batch.images for batch in rendered]), rendered[0].texts,
                   torch.stack([batch.boxes for batch in rendered]))


def _chunks(source, share: tuple[int, int], batch: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """This rank's work as (array prefix, rows in those arrays, sample ids): a contiguous share of a map-style set,
    or every world-th shard."""
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
    count = len(source)
    ids = np.arange(count * rank // world, count * (rank + 1) // world)
    return [("", ids[start:start + batch], ids[start:start + batch]) for start in range(0, len(ids), batch)]


def _create_arrays(folder: Path, prefix: str, count: int, views: int, dim: int, storage) -> None:
    shapes = {"image": ((count, max(1, views), dim), storage), "text": ((count, dim), storage),
              "boxes": ((count, views, 4), np.int32)}
    for name, (shape, dtype) in shapes.items():
        np.lib.format.open_memmap(folder / f"{prefix}{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()


def _embed(config: RunConfig, folder: Path, device: torch.device, share: tuple[int, int], create: bool) -> None:
    """Embed this rank's share of the samples (every stored view) into ``folder``'s arrays (created by rank 0)."""
    spec = CacheSpec.of(config)
    dtype = parameter_dtype(config.train.precision)
    teacher = create_teacher(config.teacher, device, dtype)
    augmentation = Augmentation("replay", views=spec.views) if spec.views else Augmentation("none")
    source = build_source(config.data, config.student.model, student_tokenizer(config), augmentation,
                          config.output_dir)
    storage, dim = STORAGE[spec.storage], teacher.embed_dim
    prefixes = ([(f"shards/{i}.", int(n)) for i, n in enumerate(source.index.counts)]
                if isinstance(source, ShardSource) else [("", len(source))])
    if create:
        (folder / "shards" if isinstance(source, ShardSource) else folder).mkdir(parents=True, exist_ok=True)
        for prefix, count in prefixes:
            _create_arrays(folder, prefix, count, spec.views, dim, storage)
    chunks = _chunks(source, share, config.eval.batch_size)
    loader = DataLoader(_Work(source, chunks, spec.views), batch_size=None,
                        num_workers=min(workers(config.data.workers), len(chunks)))
    opened: dict[str, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        for prefix, rows, images, tokens, boxes in loader:
            arrays = opened.setdefault(prefix, {name: np.load(folder / f"{prefix}{name}.npy", mmap_mode="r+")
                                                for name in ("image", "text", "boxes")})
            views, n = images.shape[:2]
            embedded = teacher.model.encode_image(images.flatten(0, 1).to(device, dtype))
            embedded = torch.nn.functional.normalize(embedded, dim=-1).view(views, n, -1).transpose(0, 1)
            arrays["image"][rows] = embedded.cpu().numpy().astype(storage)
            texts = torch.nn.functional.normalize(teacher.model.encode_text(tokens.to(device)), dim=-1)
            arrays["text"][rows] = texts.cpu().numpy().astype(storage)
            if spec.views:
                arrays["boxes"][rows] = boxes.transpose(0, 1).numpy()
    for arrays in opened.values():
        for array in arrays.values():
            array.flush()
    if share[0] == 0:
        meta = {"spec": asdict(spec), "samples": sum(n for _, n in prefixes), "embed_dim": dim,
                "logit_scale": float(teacher.model.logit_scale.exp()), "teacher_model": type(teacher.model).__name__}
        if isinstance(source, ShardSource):
            meta["shards"] = [{"path": str(path), "samples": count, "keys": _keys_digest(source, i)}
                              for i, (path, (_, count)) in enumerate(zip(source.index.shards, prefixes))]
        (folder / META).write_text(json.dumps(meta, indent=1))


def student_tokenizer(config: RunConfig):
    import open_clip

    return open_clip.get_tokenizer(model_name(config.student.model))


def _keys_digest(source: ShardSource, shard: int) -> str:
    keys = source.index.entries(shard)["keys"]
    return hashlib.sha256("\n".join(map(str, keys)).encode()).hexdigest()[:16]
