"""What names a teacher-embedding cache: the teacher, the samples, the teacher's view of them and the storage.
Read by every process that plans (``clipkd grid status``), so it imports neither torch nor open_clip."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import ClipkdError
from harness.config.run_config import RunConfig, teacher_input, teacher_run_dir
from harness.data.files import INDEX_VERSION, csv_identity, expand_shards
from harness.data.inputs import ModelInput
from harness.models.names import model_identity

CACHE_DIR = ".teacher-embeddings"


META = "meta.json"


# data/views.py's boxes and pixels (2: JPEGs decoded at draft scale; 3: views resampled by torch's uint8 bicubic):
# a change changes every key
VIEWS_VERSION = 3


class TeacherCacheError(ClipkdError, RuntimeError):
    pass


def preprocessing(config: RunConfig) -> dict[str, Any]:
    """What turns a sample into the teacher's input: the teacher's own view of it and its own tokenizer (a student
    of another resolution or tokenizer reads the same cache), in the run's precision. For a teacher that
    preprocesses like the student, the key of a cache made when the teacher was fed the student's input."""
    own = ModelInput.of(*teacher_input(config.teacher))
    forward = {  # the teacher runs in the run's precision: a bf16 run's cache is not an fp32 run's
        "fp64": {"teacher_dtype": "float64"}, "bf16": {"teacher_autocast": "bf16"}, "fp16": {"teacher_autocast": "fp16"},
    }.get(config.train.precision, {})
    return {"view": own.view.describe(), "views_version": VIEWS_VERSION, **own.text.describe(), **forward}


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
    """The samples (and, for a run that reads several captions per sample, all of them): a built-in set by name, a
    CSV by its table's bytes and its images' sizes and times, shards by path, size and time (a rewritten shard, an
    edited table, an image downloaded again: another dataset)."""
    data = config.data.model_dump(exclude={"workers", "augment", "shuffle_window", "num_samples", "bad_samples",
                                           "max_bad_fraction", "captions"})
    if config.data.captions != "first":  # the cache holds every caption's embedding, whichever a run draws
        data["captions"] = "all"
    if config.data.dataset == "csv":
        data["samples"] = csv_identity(config.data)
    if config.data.dataset == "webdataset":
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
    return complete(cache_dir(config))


def complete(folder: Path) -> bool:
    return (folder / META).is_file()  # meta.json is written last, inside the folder renamed into place


def failure_file(config: RunConfig) -> Path:
    """Where a failed build leaves its reason (a grid's cache cell is then failed)."""
    return cache_dir(config).with_suffix(".failed")


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META).read_text())
