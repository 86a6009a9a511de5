"""Run configuration: one YAML file per run, validated by typed models.

Every error names the file, the field and what would be accepted. A run is identified by a stable hash of its
resolved config (everything except cosmetic fields), so training the same config twice reuses one run directory.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ClipkdError
from harness.model_names import (
    FINAL_CHECKPOINT,
    ModelLoadError,
    is_config_file,
    known_model_names,
    model_identity,
    read_config_file,
)

# Fields that cannot change the trained weights stay out of the run id (and the setting id): renaming a run,
# moving it, adding a benchmark, loader workers (batches are a function of seed and world size, not of workers),
# how often a run checkpoints or logs, recomputing activations in backward or compiling the blocks (tested equal),
# what to do with bad samples (a finished run trained on the same replacements either way), where its numbers are
# reported while it trains, how long a collective may wait. The same cell on another partition or with other
# workers is the same run.
NON_TRAINING_FIELDS = {"name", "output_dir", "eval", "data.workers", "train.checkpoint_every", "train.log_every",
                       "train.grad_checkpointing", "data.bad_samples", "data.max_bad_fraction", "train.report_to",
                       "train.live_every_s", "train.compile", "train.collective_timeout_s"}
# Fields added after run ids were first kept, out of the id at the value every earlier run trained with: the ids
# of earlier runs stand, so a grid re-run after an upgrade is still a no-op.
NEUTRAL_DEFAULTS = {"train.grad_compression": "none"}
# What varies within one comparable setting: the leaderboard compares methods and teachers across seeds.
SETTING_VARIES = {"teacher", "distill", "seed"}


class ConfigError(ClipkdError, ValueError):
    """A configuration that cannot run; the message names the file, field and accepted values."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    model: str = Field(description="an open_clip model name, a config of harness/model_configs/ or of a plugin "
                       "package, or the path of an open_clip model-config JSON file")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or a local checkpoint file")

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if is_config_file(name):  # the path of an open_clip model-config JSON file
            try:
                read_config_file(name)
            except ModelLoadError as error:
                raise ValueError(str(error)) from None
            return name
        names = known_model_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `open_clip.list_models()`"
            raise ValueError(f"unknown model {name!r}{hint}")
        return name


class TeacherSpec(Strict):
    """A frozen teacher: an open_clip model with weights, or a run this project trained earlier."""

    model: str | None = None
    pretrained: str | None = Field(None, description="open_clip pretrained tag or local checkpoint file")
    run: str | None = Field(None, description="a run directory of this project, or the YAML config of that run")
    embeddings: Literal["live", "cached"] = Field(
        "live", description="live: the teacher embeds every batch; cached: its embeddings of the training set are "
        "computed once and read with each sample (harness/teacher_cache.py)")
    views: int = Field(0, ge=0, description="K > 0: the student trains on K stored augmented views per sample "
                       "(one drawn per epoch), whose teacher embeddings a cache holds; 0: live views (or, cached, the "
                       "un-augmented view)")
    cache_dtype: Literal["float32", "float16"] = Field(
        "float32", description="how a cache stores embeddings; float16 halves its size (benchmarks/README.md)")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if self.run is not None:
            if self.model is not None or self.pretrained is not None:
                raise ValueError("give either `run` or `model` + `pretrained`, not both")
        elif self.model is None or self.pretrained is None:
            raise ValueError(
                "a teacher needs weights: `model` with `pretrained` (an open_clip tag or a checkpoint file), "
                "or `run` (a run directory or run config of this project)"
            )
        else:
            ModelSpec(model=self.model)
        return self


class MethodTerm(Strict):
    model_config = ConfigDict(extra="allow", frozen=True)
    weight: float = Field(ge=0)


DistillTerm = Annotated[float, Field(ge=0)] | MethodTerm


class DataSpec(Strict):
    dataset: str = Field(description="a built-in dataset (digits, fashion-mnist), `csv` or `webdataset`")
    path: str | None = Field(None, description="csv/tsv file, or webdataset shards as a brace pattern")
    image_key: str = "filepath"
    caption_key: str = "title"
    separator: str = "\t"
    num_samples: int | None = Field(None, gt=0, description="samples per epoch of a webdataset (it has no length)")
    shuffle_window: int = Field(5000, gt=0, description="webdataset: samples permuted together (the shuffle buffer)")
    subset: int | None = Field(None, gt=0, description="a data budget: train on the first N samples of a built-in "
                               "or CSV set (in its fixed order, the same for every seed)")
    workers: int | None = Field(None, ge=0, description="loader workers per process; default: the process's CPUs "
                                "(SLURM's cpus_per_task, shared among a task's processes) less one; not part of the "
                                "run id")
    augment: bool = Field(True, description="open_clip's random training crop; false: the evaluation view")
    bad_samples: Literal["skip", "error"] = Field(
        "skip", description="a sample whose image cannot be decoded or whose caption is missing or empty: skip "
        "replaces it by the next good sample and logs it; error stops the run (harness/data/bad.py)")
    max_bad_fraction: float = Field(0.001, ge=0, le=1, description="with skip, the run stops past this fraction of "
                                    "the training set's samples found bad")

    @model_validator(mode="after")
    def _source(self) -> DataSpec:
        from core.builtin import BUILTIN_DATASETS

        accepted = [*BUILTIN_DATASETS, "csv", "webdataset"]
        if self.dataset not in accepted:
            raise ValueError(f"unknown dataset {self.dataset!r}; accepted: {', '.join(accepted)}")
        if self.dataset in ("csv", "webdataset") and not self.path:
            raise ValueError(f"dataset {self.dataset!r} needs `path`")
        if self.dataset == "webdataset" and self.num_samples is None:
            raise ValueError("dataset 'webdataset' needs `num_samples` (shards carry no length)")
        if self.dataset == "webdataset" and self.subset is not None:
            raise ValueError("`subset` takes the first N samples of a built-in or CSV set; a webdataset's budget is "
                             "its shards and `num_samples`")
        return self


class OptimSpec(Strict):
    """Defaults are the paper's: AdamW lr 1e-3, wd 0.1, cosine schedule after 10k linear warmup steps."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(10_000, ge=0)
    grad_clip_norm: float | None = Field(1.0, gt=0)


class TrainSpec(Strict):
    batch_size: int = Field(gt=0, description="global batch size, split across processes")
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16", "fp16", "fp64"] = Field(
        "fp32", description="fp64 runs student, teacher and losses in float64: slow, for checking that two "
        "computations are the same math on any CPU")
    checkpoint_every: int = Field(1000, gt=0)
    log_every: int = Field(1, gt=0, description="steps between train_log records; the step's values are read from "
                           "the device only then (on a GPU, say 50: no host sync in between)")
    accum_freq: int = Field(1, ge=1, description="split each process's samples of a step into N micro-batches, "
                            "every loss still on the whole batch (harness/accumulation.py): the memory of a batch N "
                            "times smaller; part of the run id only for a student with BatchNorm or dropout")
    grad_checkpointing: bool = Field(False, description="recompute each tower's blocks in backward (open_clip's "
                                     "set_grad_checkpointing): less memory, the same gradients; not part of the run id")
    grad_compression: Literal["none", "bf16"] = Field(
        "none", description="bf16: gradients cross between processes as bfloat16 (DDP's bf16_compress_hook), half "
        "float32's bytes between nodes, each rounded to 8 bits of mantissa")
    compile: str | None = Field(None, description="a torch.compile backend ('inductor' on GPUs) for the student's "
                                "repeated blocks (harness/models.py compile_repeated_blocks): the same math; not part "
                                "of the run id")

    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="trackers that also get the run's curves and metrics (harness/reporting.py); "
        "each needs its extra installed; not part of the run id")
    live_every_s: float = Field(30.0, ge=0, description="a running run publishes its progress and curves to its "
                                "record (and a server store) at most this often; not part of the run id")
    collective_timeout_s: float = Field(600.0, gt=0, description="a collective between the run's processes that "
                                        "waits longer fails (NCCL's watchdog, gloo's timeout); not part of the run id")

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, names: list[str]) -> list[str]:
        from harness.reporting import missing_tracker

        problems = [problem for name in names if (problem := missing_tracker(name))]
        if problems:
            raise ValueError("; ".join(problems))
        return names

    @field_validator("compile")
    @classmethod
    def _known_backend(cls, backend: str | None) -> str | None:
        if backend is not None:
            import torch._dynamo

            if backend not in torch._dynamo.list_backends(exclude_tags=()):  # debug backends such as aot_eager too
                raise ValueError(f"{backend!r} is not a torch.compile backend: use one of "
                                 f"{', '.join(torch._dynamo.list_backends())} (or a debug backend such as aot_eager)")
        return backend

    @model_validator(mode="after")
    def _duration(self) -> TrainSpec:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of `epochs` or `steps`")
        return self


class BenchmarkSpec(Strict):
    dataset: str = Field(description="a built-in dataset, imagefolder, csv, or a clip_benchmark dataset name")
    root: str | None = Field(None, description="where a clip_benchmark dataset is staged, or the folder / CSV")
    task: Literal["zeroshot_classification", "zeroshot_retrieval"] | None = Field(
        None, description="clip_benchmark's task for the dataset; by default the one clip_benchmark gives its name")


class SuiteTaskSpec(Strict):
    dataset: str
    root: str | None = None
    metric: str = Field("acc1", description="the metric the suite averages: acc1, mean_per_class_recall, "
                        "mean_recall@1 (of image and text retrieval), or any metric the evaluation stores")
    groups: list[str] = Field(default_factory=list, description="groups with an average of their own")


class SuiteSpec(Strict):
    """A suite of benchmarks evaluated together, with its average (evals/suites.py): a named one (imagenet-shifts,
    datacomp) staged under ``root``, or one of your own (``tasks``)."""

    name: str
    root: str | None = Field(None, description="where a named suite's tasks are staged")
    tasks: list[SuiteTaskSpec] | None = Field(None, description="a suite of your own: its tasks")

    @model_validator(mode="after")
    def _known(self) -> SuiteSpec:
        from evals.suites import SUITES

        if self.tasks is None and self.name not in SUITES:
            raise ValueError(f"unknown suite {self.name!r}; named suites: {', '.join(SUITES)}, or give `tasks`")
        if self.tasks is not None and self.name in SUITES:
            raise ValueError(f"suite {self.name!r} is a named suite: leave out `tasks`, or name yours otherwise")
        return self

    def expand(self):
        """The suite and a benchmark per evaluated task (dict task -> BenchmarkSpec, in order)."""
        from pathlib import PurePosixPath

        from evals.suites import SUITES, Suite, SuiteTask

        if self.tasks is None:
            suite = SUITES[self.name]
            root = PurePosixPath(self.root or ".")
            return suite, {task: BenchmarkSpec(dataset=task.dataset, root=str(root / task.folder), task=task.task)
                           for task in suite.tasks}
        tasks = [SuiteTask(t.dataset, t.root or "", t.metric, tuple(t.groups)) for t in self.tasks]
        suite = Suite(self.name, tuple(tasks), len(tasks))
        return suite, {task: BenchmarkSpec(dataset=t.dataset, root=t.root) for task, t in zip(tasks, self.tasks)}


class EvalSpec(Strict):
    benchmarks: list[BenchmarkSpec] | None = Field(
        None, description="what to evaluate; by default the test split of a built-in training dataset"
    )
    batch_size: int = Field(256, gt=0)
    workers: int | None = Field(None, ge=0, description="loader workers; default as data.workers")
    every_steps: int | None = Field(None, gt=0, description="also evaluate zero-shot top-1 during training, every N "
                                    "steps, on the first benchmark: accuracy against samples seen")
    during_items: int | None = Field(None, gt=0, description="during training, a fixed subset: the first N items")
    suites: list[SuiteSpec] = Field(default_factory=list, description="suites of benchmarks evaluated with their "
                                    "averages (evals/suites.py), besides the benchmarks")


class RunConfig(Strict):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    student: ModelSpec
    teacher: TeacherSpec | list[TeacherSpec] | None = Field(
        None, description="a frozen teacher, or a list of them (an ensemble): every method sees the first, "
        "an ensemble method (mobileclip_dr) all of them")
    distill: dict[str, DistillTerm] = Field(default_factory=dict, description="method name -> weight (or options)")
    data: DataSpec
    optim: OptimSpec = OptimSpec()
    train: TrainSpec
    eval: EvalSpec = EvalSpec()

    @field_validator("distill")
    @classmethod
    def _known_methods(cls, terms: dict[str, Any]) -> dict[str, Any]:
        import methods

        registered = methods.available()
        for name, term in terms.items():
            if name not in registered:
                raise ValueError(f"unknown method {name!r}; registered: {', '.join(registered)}")
            if isinstance(term, MethodTerm):
                accepted = list(inspect.signature(methods.get(name)).parameters)[2:]  # after the two dims
                unknown = sorted(set(term.model_dump()) - {"weight", *accepted})
                if unknown:
                    raise ValueError(
                        f"{name}: unknown option {', '.join(map(repr, unknown))}; "
                        f"accepted: weight{''.join(', ' + a for a in accepted)}"
                    )
        return terms

    @field_validator("teacher", mode="after")
    @classmethod
    def _one_teacher_is_not_a_list(cls, teacher):
        """A list of one teacher is that teacher (the same run id); an empty list is no ensemble."""
        if isinstance(teacher, list):
            if not teacher:
                raise ValueError("an ensemble of teachers needs at least one; leave `teacher` out for no teacher")
            if len(teacher) == 1:
                return teacher[0]
            views = {t.views for t in teacher}
            if len(views) > 1:
                raise ValueError(f"the teachers of an ensemble see the same views of each sample; they ask for "
                                 f"views {sorted(views)}: give them one `views`")
        return teacher

    @model_validator(mode="after")
    def _teacher_when_distilling(self) -> RunConfig:
        if self.distill and self.teacher is None:
            raise ValueError(f"distill terms {sorted(self.distill)} need a `teacher`")
        if self.views and not self.data.augment:
            raise ValueError(f"teacher.views: {self.views} replays augmented views, but data.augment is false")
        return self

    @property
    def teachers(self) -> list[TeacherSpec]:
        """The run's teachers in order: none, one, or an ensemble."""
        if self.teacher is None:
            return []
        return list(self.teacher) if isinstance(self.teacher, list) else [self.teacher]

    @property
    def views(self) -> int:
        """The K stored augmented views a run replays (its teachers' ``views``, one for all; 0: live views)."""
        return self.teachers[0].views if self.teachers else 0

    def with_teacher(self, teacher: TeacherSpec) -> RunConfig:
        """This run as if ``teacher`` were its only one: what one member of an ensemble's cache is built for."""
        return self.model_copy(update={"teacher": teacher})

    def method_terms(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """Each distillation term as (weight, constructor options)."""
        terms = {}
        for name, term in self.distill.items():
            if isinstance(term, MethodTerm):
                options = term.model_dump()
                terms[name] = (options.pop("weight"), options)
            else:
                terms[name] = (float(term), {})
        return terms

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def training_fields(self) -> dict[str, Any]:
        """The resolved config without the fields that cannot change the trained weights; a model given as a
        config file by its content, not its path."""
        resolved = self.resolved()
        neutral = {path for path, value in NEUTRAL_DEFAULTS.items() if _at(resolved, path) == value}
        fields = _without(resolved, NON_TRAINING_FIELDS | neutral | self._exact_accumulation())

        def identified(model_spec):
            if isinstance(model_spec, list):  # an ensemble of teachers
                return [identified(member) for member in model_spec]
            if (model_spec or {}).get("model"):
                return {**model_spec, "model": model_identity(model_spec["model"])}
            return model_spec

        return {**fields, "student": identified(fields["student"]), "teacher": identified(fields.get("teacher"))}

    def _exact_accumulation(self) -> set[str]:
        """``train.accum_freq`` when it cannot change the weights beyond float rounding (and always at 1, so run ids
        from before it existed stand): then the same cell at another accumulation is the same run."""
        if self.train.accum_freq == 1:
            return {"train.accum_freq"}
        from harness.models import accumulation_changes_weights  # builds the model (on the meta device)

        return {"train.accum_freq"} if accumulation_changes_weights(self.student.model) is None else set()

    @property
    def run_id(self) -> str:
        return _digest(self.training_fields())

    @property
    def setting_id(self) -> str:
        """Identifies runs that differ only in teacher, method and seed: the baseline's comparison group."""
        return _digest(_without(self.training_fields(), SETTING_VARIES))

    @property
    def method_label(self) -> str:
        return "+".join(sorted(self.distill)) or "baseline"

    def benchmarks(self) -> list[BenchmarkSpec]:
        from core.builtin import BUILTIN_DATASETS

        if self.eval.benchmarks is not None:
            listed = list(self.eval.benchmarks)
        else:
            listed = [BenchmarkSpec(dataset=self.data.dataset)] if self.data.dataset in BUILTIN_DATASETS else []
        for suite in self.eval.suites:  # each task once, however many suites and lists name it
            listed += [spec for spec in suite.expand()[1].values() if spec not in listed]
        return listed

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_id


def _at(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path (``train.log_every``) of ``data``."""
    for key in path.split("."):
        data = data[key]
    return data


def _without(data: dict[str, Any], paths: set[str]) -> dict[str, Any]:
    """``data`` less the fields named by dotted paths (``train.log_every``)."""
    kept = {}
    for key, value in data.items():
        inner = {p.split(".", 1)[1] for p in paths if p.startswith(f"{key}.")}
        if key in paths:
            continue
        kept[key] = _without(value, inner) if inner and isinstance(value, dict) else value
    return kept


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _format_validation_error(source: str, error: ValidationError, kind: str = "run configuration") -> str:
    lines = [f"{source}: invalid {kind}"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a run configuration is a YAML mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read run configuration ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, str(path))


def teacher_run_dir(run: str) -> Path:
    """A teacher given as a run directory, or as the YAML config of that run."""
    path = Path(run)
    return load_config(path).run_dir if path.suffix in {".yaml", ".yml"} else path


def resolve_teacher_run(run: str) -> tuple[str, str]:
    """A run directory, or the YAML config of a run, as (model name, path of its final checkpoint)."""
    run_dir = teacher_run_dir(run)
    config_file, checkpoint = run_dir / "config.json", run_dir / FINAL_CHECKPOINT
    if not config_file.is_file():
        raise ModelLoadError(f"teacher run {run!r}: {config_file} not found; is it a run directory of this project?")
    if not checkpoint.is_file():
        raise ModelLoadError(f"teacher run {run!r} has not finished training: {checkpoint} not found")
    resolved: dict[str, Any] = json.loads(config_file.read_text())
    return resolved["student"]["model"], str(checkpoint)
