"""A run's configuration: one YAML file per run, validated by typed models (``specs``).

Every error names the file, the field and what would be accepted. A run is identified by a stable hash of its
resolved config (everything except cosmetic fields), so training the same config twice reuses one run directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from harness.config.specs import (
    BenchmarkSpec,
    ConfigError,
    DataSpec,
    DistillTerm,
    EvalSpec,
    MethodTerm,
    ModelSpec,
    OptimSpec,
    Strict,
    TeacherSpec,
    TrainSpec,
    format_validation_error,
)
from harness.models.names import FINAL_CHECKPOINT, ModelLoadError, has_logit_bias, image_input, model_identity

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
NEUTRAL_DEFAULTS = {"train.grad_compression": "none", "train.task_loss": "clip", "student.inherit": None,
                    "student.inherit.width": "leading", "student.inherit.prune": None, "train.selection": None,
                    "data.captions": "first"}
# What varies within one comparable setting: the leaderboard compares methods and teachers across seeds.
SETTING_VARIES = {"teacher", "distill", "seed", "train.selection"}


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

        registered = methods.names()  # a name with a plain weight is checked without importing the methods
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
        inherit = self.student.inherit
        if inherit and inherit.source == "teacher" and self.teacher is None:
            raise ValueError("student.inherit from: teacher needs a `teacher` (or name a run to inherit from)")
        source = self.teachers[0].model if inherit and inherit.prune and inherit.source == "teacher" else None
        if source is not None and model_identity(self.student.model) != model_identity(source):
            raise ValueError(f"student.inherit.prune: automatic inheritance prunes the teacher itself: the student "
                             f"model must be the teacher's, {source}, not {self.student.model}")
        if self.train.selection is not None and self.train.selection.needs_teacher and self.teacher is None:
            raise ValueError(f"train.selection: selector {self.train.selection.method!r} scores with a teacher; give "
                             "the run a `teacher`")
        if self.views and not self.data.augment:
            raise ValueError(f"teacher.views: {self.views} replays augmented views, but data.augment is false")
        if self.train.task_loss == "siglip" and not has_logit_bias(self.student.model):
            raise ValueError(f"train.task_loss: siglip needs a student with a logit bias; {self.student.model} has "
                             "none (a model config sets one with init_logit_bias, as open_clip's SigLIP configs do)")
        return self

    @model_validator(mode="after")
    def _inputs_and_teachers_suit(self) -> RunConfig:
        """Every model's preprocessing can be built (a bad ``preprocess_cfg`` is named before any model loads), and
        every method distils from the run's kind of teachers (``siglip_kd`` asks for sigmoid ones)."""
        import methods

        models = {"student": (self.student.model, self.student.pretrained)}
        for k, spec in enumerate(self.teachers, start=1):
            with contextlib.suppress(ModelLoadError):  # a teacher run a grid has not trained yet: checked when it runs
                models[f"teacher {k}" if len(self.teachers) > 1 else "teacher"] = teacher_input(spec)
        for role, (model, pretrained) in models.items():
            try:
                image_input(model, pretrained)
            except ModelLoadError as error:
                raise ValueError(f"{role}: {error}") from None
        sigmoid = {f"{models[role][0]} ({role})": has_logit_bias(models[role][0]) for role in models if role != "student"}
        for name in self.distill:
            problem = methods.teacher_problem(name, sigmoid) if sigmoid else None
            if problem:
                raise ValueError(f"distill.{name}: {problem}")
        return self

    @property
    def task_loss(self) -> str:
        """The student's own loss: ``train.task_loss``, else siglip for a student with a logit bias, else clip."""
        return self.train.task_loss or ("siglip" if has_logit_bias(self.student.model) else "clip")

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
        """The config with every default filled in, the student's task loss too (the same run given or implied)."""
        resolved = self.model_dump(mode="json")
        resolved["train"]["task_loss"] = self.task_loss
        return resolved

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
        from harness.models.build import accumulation_changes_weights

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
        """The sorted loss names joined by "+", and the selector with its ratio (``learnability@0.5``); "baseline"
        for neither."""
        selection = self.train.selection
        chosen = [f"{selection.method}@{selection.ratio:g}"] if selection else []
        return "+".join([*sorted(self.distill), *chosen]) or "baseline"

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


_ABSENT = object()


def _at(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path (``train.log_every``) of ``data``; ``_ABSENT`` below a field that is not a
    mapping (``student.inherit.width`` where ``student.inherit`` is null)."""
    for key in path.split("."):
        if not isinstance(data, dict):
            return _ABSENT
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


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a run configuration is a YAML mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None


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


def teacher_input(spec: TeacherSpec) -> tuple[str, str | None]:
    """The (model, pretrained) whose input a teacher is fed (``names.image_input``, ``text_input``): its own, or a
    teacher run's student's, whose input its final weights learnt from. Import-light: a cache key reads it."""
    if not spec.run:
        return spec.model, spec.pretrained
    path = Path(spec.run)
    if path.suffix in {".yaml", ".yml"}:
        student = load_config(path).student
        return student.model, student.pretrained
    config_file = path / "config.json"
    if not config_file.is_file():
        if path.resolve() in _PLANNED_STUDENTS:  # a teacher a grid trains before it
            return _PLANNED_STUDENTS[path.resolve()]
        raise ModelLoadError(f"teacher run {spec.run!r}: {config_file} not found; is it a run directory of this project?")
    student = json.loads(config_file.read_text())["student"]
    return student["model"], student.get("pretrained")


_PLANNED_STUDENTS: dict[Path, tuple[str, str | None]] = {}  # run dir -> its student, for runs a grid plans


def plan_run(config: RunConfig) -> None:
    """Make a run a grid will train known by its directory before it exists: a teacher given as that directory is
    fed as its student (a teacher-embedding cache's key is planned with the grid)."""
    _PLANNED_STUDENTS[config.run_dir.resolve()] = (config.student.model, config.student.pretrained)


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
