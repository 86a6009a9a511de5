"""The parts of a run configuration, each a typed model: the student and teachers, the methods, the data, the
optimiser, training, evaluation. Every error names the field and what would be accepted."""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ClipkdError
from harness.models.names import (
    ModelLoadError,
    is_config_file,
    known_model_names,
    read_config_file,
)


class ConfigError(ClipkdError, ValueError):
    """A configuration that cannot run; the message names the file, field and accepted values."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneSpec(Strict):
    """TinyCLIP's automatic inheritance (harness/models/prunable.py): the student starts as its source and learns
    masks over heads, MLP neurons and embedding dims under a sparsity target, then is made dense."""

    sparsity: float = Field(gt=0, lt=1, description="the share of the blocks' attention and MLP weights removed by "
                            "the end of the run (of the source's: a stage after another prunes its own source)")
    warmup: float = Field(0.5, gt=0, le=1, description="the share of the steps over which the target rises "
                          "linearly from 0 to `sparsity`; it is held after")
    lr: float = Field(0.1, gt=0, description="the masks' learning rate (their log α under AdamW), held after the "
                      "run's warmup")


WidthChoice = Literal["leading", "magnitude"]


class InheritSpec(Strict):
    """TinyCLIP's weight inheritance: manual (harness/models/inherit.py), the student built from chosen blocks and
    widths of another model's weights; or automatic (``prune``), the student that model itself, pruned as it
    distils."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    source: str = Field("teacher", alias="from", description="teacher: the run's (first) teacher; or a run "
                        "directory or YAML config of this project (an earlier stage)")
    layers: dict[Literal["image", "text"], list[int]] = Field(
        default_factory=dict, description="the teacher block each student block takes, per tower; by default "
        "TinyCLIP's: every (teacher depth // student depth)-th from the first")
    width: WidthChoice | dict[Literal["image", "text"], WidthChoice] = Field(
        "leading", description="which heads and MLP neurons a narrower student keeps, for both towers or per tower "
        "({image: magnitude, text: leading}): TinyCLIP's leading ones, or those of largest weight norm "
        "(harness/models/inherit.py)")
    prune: PruneSpec | None = Field(None, description="automatic inheritance instead: the student is the source's "
                                    "model, pruned to a sparsity as it distils")

    def width_of(self, tower: str) -> str:
        return self.width.get(tower, "leading") if isinstance(self.width, dict) else self.width

    @model_validator(mode="after")
    def _manual_or_automatic(self) -> InheritSpec:
        if self.prune is not None and (self.layers or self.width != "leading"):
            raise ValueError("`prune` (automatic inheritance) keeps every block and learns the widths: give it "
                             "without `layers` or `width`")
        return self


class ModelSpec(Strict):
    model: str = Field(description="an open_clip model name, a config of harness/models/configs/ or of a plugin "
                       "package, or the path of an open_clip model-config JSON file")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or a local checkpoint file")
    inherit: InheritSpec | None = Field(None, description="start from another model's weights, TinyCLIP's weight "
                                        "inheritance, manual or automatic (part of the run id)")

    @model_validator(mode="after")
    def _one_start(self) -> ModelSpec:
        if self.inherit is not None and self.pretrained is not None:
            raise ValueError("give either `pretrained` or `inherit`: both set the student's starting weights")
        return self

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
        "computed once and read with each sample (harness/teachers/)")
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
    captions: Literal["first", "sample"] = Field(
        "first", description="which of a sample's captions a step reads (shards: the `txt`, then a `syn.json`'s "
        "synthetic ones, as DataCompDR's): first, its own; sample, one drawn uniformly per (seed, epoch, sample)")
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
        if self.captions != "first" and self.dataset != "webdataset":
            raise ValueError(f"captions: {self.captions!r} draws among a sample's several captions, which webdataset "
                             f"shards carry (a `syn.json` beside the `txt`); {self.dataset!r} has one per sample")
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


class SelectionSpec(Strict):
    """Batch selection (selection/): each step loads ``batch_size / ratio`` samples and trains on the
    ``batch_size`` a selector keeps."""

    method: str = Field(description="a registered selector: uniform, hard, learnability, or a plugin's")
    ratio: float = Field(gt=0, le=1, description="the share of the super-batch a step trains on: 0.5 trains on half "
                         "of a batch twice the size; 1.0 scores every sample and keeps them all")
    options: dict[str, Any] = Field(default_factory=dict, description="the selector's own options")

    @field_validator("method")
    @classmethod
    def _known_selector(cls, name: str) -> str:
        from selection import BUILTIN

        if name not in BUILTIN:  # a plugin's: its package's entry points are read (and imported) only then
            from selection.registry import get

            get(name)
        return name

    @property
    def needs_teacher(self) -> bool:
        from selection import BUILTIN, NEEDS_TEACHER

        if self.method in BUILTIN:
            return self.method in NEEDS_TEACHER
        from selection.registry import get

        return bool(getattr(get(self.method), "needs_teacher", False))


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
                            "every loss still on the whole batch (harness/training/accumulation.py): the memory of a batch N "
                            "times smaller; part of the run id only for a student with BatchNorm or dropout")
    grad_checkpointing: bool = Field(False, description="recompute each tower's blocks in backward (open_clip's "
                                     "set_grad_checkpointing): less memory, the same gradients; not part of the run id")
    grad_compression: Literal["none", "bf16"] = Field(
        "none", description="bf16: gradients cross between processes as bfloat16 (DDP's bf16_compress_hook), half "
        "float32's bytes between nodes, each rounded to 8 bits of mantissa")
    selection: SelectionSpec | None = Field(None, description="train on the examples a selector keeps from a larger "
                                            "super-batch (selection/); none: every loaded sample")
    compile: str | None = Field(None, description="a torch.compile backend ('inductor' on GPUs) for the student's "
                                "repeated blocks (harness/models/build.py compile_repeated_blocks): the same math; not part "
                                "of the run id")

    task_loss: Literal["clip", "siglip"] | None = Field(
        None, description="the student's own contrastive loss on the global batch: clip (InfoNCE) or siglip (the "
        "sigmoid loss, for a student with a logit bias: open_clip's SigLIP configs); default: siglip for such a "
        "student, else clip")

    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="trackers that also get the run's curves and metrics (harness/training/trackers.py); "
        "each needs its extra installed; not part of the run id")
    live_every_s: float = Field(30.0, ge=0, description="a running run publishes its progress and curves to its "
                                "record (and a server store) at most this often; not part of the run id")
    collective_timeout_s: float = Field(600.0, gt=0, description="a collective between the run's processes that "
                                        "waits longer fails (NCCL's watchdog, gloo's timeout); not part of the run id")

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, names: list[str]) -> list[str]:
        from harness.training.trackers import missing_tracker

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
        if self.selection is not None and abs(self.batch_size / self.selection.ratio - self.loaded_batch_size) > 1e-6:
            raise ValueError(f"selection.ratio {self.selection.ratio}: batch_size {self.batch_size} / ratio must be a "
                             "whole number of samples (0.5 and 0.25 always are)")
        return self

    @property
    def loaded_batch_size(self) -> int:
        """The samples a step loads: the batch, or the super-batch a selector keeps ``batch_size`` of."""
        return self.batch_size if self.selection is None else round(self.batch_size / self.selection.ratio)


class BenchmarkSpec(Strict):
    dataset: str = Field(description="a built-in dataset, imagefolder, csv, winogavil (DataComp's, its Hugging Face "
                         "split as parquet), or a clip_benchmark dataset name")
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


def format_validation_error(source: str, error: ValidationError, kind: str = "run configuration") -> str:
    lines = [f"{source}: invalid {kind}"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)
