"""The teacher-embedding cache: a frozen teacher's embeddings of a training set, computed once and shared.

Every CLIP-KD loss needs only the teacher's final (normalised) embeddings, so runs that distil the same teacher
on the same data read them by sample index instead of running the teacher on every step. A cache is keyed by a
hash of (teacher, dataset, preprocessing) and lives in ``<output_dir>/.teacher-embeddings/<key>/``: ``image.npy``
and ``text.npy`` (float32, N × D, memory-mapped by readers) and ``meta.json`` (the spec, N, D, the teacher's
logit scale).

The images embedded are the un-augmented view (the student's evaluation transform at its resolution) and the
texts the student's tokens, exactly what the live teacher sees when ``data.augment`` is false. With random
augmentation the student sees augmented views while a cached teacher saw the plain one: a documented trade-off
(``teacher.embeddings: live`` keeps the teacher on the augmented view, at its cost).

Concurrent builders are safe: builders on one filesystem queue on an exclusive lock; each writes a folder of
its own and renames it into place when complete, so a cache folder is whole whenever it exists, and where
locks do not work (some network filesystems) a second builder's finished copy is discarded.
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
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch.utils.data import DataLoader, Subset

from harness.config import RunConfig
from harness.data import training_dataset
from harness.distributed import DistEnv, init_distributed
from harness.errors import ClipkdError
from harness.models import create_teacher, parameter_dtype, register_model_configs, teacher_run_dir

CACHE_DIR = ".teacher-embeddings"
META = "meta.json"


class TeacherCacheError(ClipkdError, RuntimeError):
    pass


def preprocessing(config: RunConfig) -> dict[str, Any]:
    """What turns a sample into the teacher's input: the student's evaluation transform and tokenizer."""
    register_model_configs()
    model = open_clip.get_model_config(config.student.model)
    image = asdict(PreprocessCfg()) | model.get("preprocess_cfg", {}) | {"size": model["vision_cfg"]["image_size"]}
    text = model.get("text_cfg", {})
    forward = {"teacher_dtype": "float64"} if config.train.precision == "fp64" else {}  # fp32 caches keep their key
    return {"image": image, "student": config.student.model, "student_weights": config.student.pretrained,
            "context_length": text.get("context_length", 77), "tokenizer": text.get("hf_tokenizer_name"), **forward}


def teacher_identity(config: RunConfig) -> dict[str, Any]:
    teacher = config.teacher
    if teacher.run:  # a run of this project: its id names its final weights
        return {"run": teacher_run_dir(teacher.run).name}
    weights = Path(teacher.pretrained)
    if weights.is_file():  # a local file: its size and time stand for its contents
        stat = weights.stat()
        return {"model": teacher.model, "file": str(weights.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns}
    return {"model": teacher.model, "pretrained": teacher.pretrained}


@dataclass(frozen=True)
class CacheSpec:
    teacher: dict[str, Any]
    dataset: dict[str, Any]
    preprocessing: dict[str, Any]

    @classmethod
    def of(cls, config: RunConfig) -> CacheSpec:
        if config.teacher is None:
            raise TeacherCacheError(f"{config.name}: a teacher-embedding cache needs a teacher")
        dataset = config.data.model_dump(exclude={"workers", "augment"})
        return cls(teacher_identity(config), dataset, preprocessing(config))

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


@dataclass
class TeacherEmbeddings:
    """A finished cache, memory-mapped: rows are sample indices of the training set."""
    image: np.ndarray
    text: np.ndarray
    logit_scale: float
    embed_dim: int

    @classmethod
    def open(cls, folder: Path) -> TeacherEmbeddings:
        meta = json.loads((folder / META).read_text())
        image, text = (np.load(folder / f"{kind}.npy", mmap_mode="r") for kind in ("image", "text"))
        return cls(image, text, meta["logit_scale"], meta["embed_dim"])

    def rows(self, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        order = indices.cpu().numpy()
        return (torch.from_numpy(np.ascontiguousarray(self.image[order])).to(device),
                torch.from_numpy(np.ascontiguousarray(self.text[order])).to(device))


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another builder holds it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure(config: RunConfig, device: torch.device, env: DistEnv | None = None) -> Path:
    """The cache folder of ``config``'s teacher and data, built first if it does not exist yet."""
    folder = cache_dir(config)
    env = env or init_distributed()
    if env.distributed:  # every rank embeds its share into the folder rank 0 names
        return _build_distributed(config, folder, device, env)
    if _complete(folder):
        return folder
    with _exclusive(folder.with_suffix(".lock")):
        if not _complete(folder):  # another builder may have finished while this one waited
            partial = folder.with_name(f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}")
            _embed(config, partial, device, share=(0, 1), create=True)
            _publish(partial, folder)
    return folder


def _build_distributed(config: RunConfig, folder: Path, device: torch.device, env: DistEnv) -> Path:
    import torch.distributed as dist

    decision = [_complete(folder), f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}"]
    dist.broadcast_object_list(decision, src=0)  # rank 0 decides for all, so no rank waits alone
    built, partial = decision[0], folder.with_name(decision[1])
    if built:
        return folder
    if env.is_main:
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


def _embed(config: RunConfig, folder: Path, device: torch.device, share: tuple[int, int], create: bool) -> None:
    """Embed this rank's contiguous share of the samples into ``folder``'s arrays (created by rank 0)."""
    dtype = parameter_dtype(config.train.precision)
    teacher = create_teacher(config.teacher, device, dtype)
    spec = CacheSpec.of(config)
    transform = image_transform_v2(PreprocessCfg(**spec.preprocessing["image"]), is_train=False)
    samples = training_dataset(config.data, transform, open_clip.get_tokenizer(config.student.model))
    count, dim = len(samples), teacher.embed_dim
    rank, world = share
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        for kind in ("image", "text"):
            np.lib.format.open_memmap(folder / f"{kind}.npy", mode="w+", dtype=np.float32, shape=(count, dim)).flush()
    image, text = (np.load(folder / f"{kind}.npy", mmap_mode="r+") for kind in ("image", "text"))
    start, stop = count * rank // world, count * (rank + 1) // world
    loader = DataLoader(Subset(samples, range(start, stop)), batch_size=config.eval.batch_size,
                        num_workers=config.data.workers)
    position = start
    with torch.no_grad():
        for images, tokens in loader:
            rows = slice(position, position + len(images))
            image[rows] = torch.nn.functional.normalize(teacher.model.encode_image(images.to(device, dtype)), dim=-1).cpu()
            text[rows] = torch.nn.functional.normalize(teacher.model.encode_text(tokens.to(device)), dim=-1).cpu()
            position += len(images)
    image.flush()
    text.flush()
    if rank == 0:
        meta = {"spec": asdict(spec), "samples": count, "embed_dim": dim,
                "logit_scale": float(teacher.model.logit_scale.exp()), "teacher_model": type(teacher.model).__name__}
        (folder / META).write_text(json.dumps(meta, indent=1))
