"""Grid files: a base run config and axes (teachers × students × methods × selections × datasets × seeds) → grid
cells. ``selections`` names batch selectors (``train.selection``; none by default): a cell's method reads
``METHOD+SELECTION``, and a cell with a selector that scores with a teacher has one even without a loss.

Teachers that the grid trains itself are cells of a first stage; teacher-embedding caches (for runs with
``teacher: {embeddings: cached}``, e.g. set in ``base``) are built by cells of a second stage, one per cache key;
``stages`` are runs trained before the axes, each after the cells it needs (a stage may start from an earlier
one: TinyCLIP's pruning in stages); the students wait for the cells they need.
Everything is checked at plan time, before anything is submitted: each cell's config, duplicate cells,
that every teacher is reachable without a download, and the SLURM options.
"""
from __future__ import annotations

import copy
import functools
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ClipkdError
from harness.config.run_config import RunConfig, parse_config, plan_run
from harness.config.specs import ConfigError, DistillTerm, SelectionSpec
from harness.config.specs import format_validation_error as _format_validation_error

AXES = ("teachers", "students", "methods", "selections", "datasets", "seeds")
NO_SELECTION = "none"


class GridError(ClipkdError, ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlurmSpec(_Strict):
    """Resources of every cell's job; the names follow sbatch's options."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int | None = Field(None, ge=1, description="default: one task per GPU")
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    timeout_min: int = Field(60, ge=1, description="the job's time limit; it checkpoints and requeues before it")
    array_parallelism: int = Field(256, ge=1)
    max_parallel: int = Field(2, ge=1, description="cells at once with the local executor, which has no queue")
    setup: list[str] = Field(default_factory=list, description="shell lines run before each job (module load …)")
    additional: dict[str, str | int | bool] = Field(default_factory=dict, description="extra sbatch flags")

    @model_validator(mode="after")
    def _sbatch_names(self) -> SlurmSpec:
        for name in self.additional:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
                raise ValueError(f"additional: {name!r} is not an sbatch long option name (e.g. constraint, exclude)")
        return self

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


class Axes(_Strict):
    # a teacher, or a list of teachers: an ensemble (each member merged with the base's teacher fields)
    teachers: list[dict[str, Any] | list[dict[str, Any]]] = Field(default_factory=lambda: [{}])
    students: list[dict[str, Any]]
    methods: dict[str, dict[str, DistillTerm]]
    selections: dict[str, SelectionSpec | None] = Field(
        default_factory=lambda: {NO_SELECTION: None}, description="name -> train.selection (null: none)")
    datasets: list[str | dict[str, Any]] = Field(default_factory=lambda: [{}])
    seeds: list[int] = Field(default_factory=lambda: [0])

    @model_validator(mode="before")
    @classmethod
    def _known_axes(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(AXES))
            if unknown:
                raise ValueError(f"unknown axis {', '.join(map(repr, unknown))}; accepted: {', '.join(AXES)}")
        return data


class Override(_Strict):
    match: dict[str, Any] = Field(description="axis values: teacher, student, method, dataset, seed")
    set: dict[str, Any]


class GridFile(_Strict):
    name: str
    output_dir: str = "runs"
    base: dict[str, Any] = Field(default_factory=dict)
    teachers: dict[str, dict[str, Any]] = Field(default_factory=dict, description="teachers the grid trains first")
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="runs trained before the axes, in order, each a config over `base`: "
        "a stage's student may start from an earlier stage (student.inherit.from: {stage: NAME}), TinyCLIP's "
        "pruning in stages; the axes' students may too")
    axes: Axes
    overrides: list[Override] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="axis values of cells to leave out")
    slurm: SlurmSpec = SlurmSpec()


RUN, TEACHER_CACHE = "run", "teacher-cache"


@dataclass
class Cell:
    """A run of the grid, or (kind teacher-cache) the building of a teacher-embedding cache that runs share."""
    name: str
    stage: int  # 0: teachers and stages, 1: teacher-embedding caches, 2: the axes' runs; past every cell it needs
    config: RunConfig  # a cache cell carries the config of the first run that reads the cache
    needs: list[str] = field(default_factory=list)  # names of the cells it waits for
    kind: str = RUN

    @functools.cached_property
    def run_id(self) -> str:
        """The run id, or for a cache cell the cache's key (both name the cell's job in the grid's records); read
        in every loop over a grid's cells, so hashed once."""
        if self.kind == TEACHER_CACHE:
            from harness.teachers.cache_key import CacheSpec

            return CacheSpec.of(self.config).key
        return self.config.run_id


@dataclass
class Grid:
    path: Path
    spec: GridFile
    cells: list[Cell]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state_dir(self) -> Path:
        """Where submitit's files and the record of submitted jobs live."""
        return Path(self.spec.output_dir) / ".grids" / re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)


def deep_merge(base: dict[str, Any], *updates: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "distill":
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
    return merged


def _teacher_label(ref: dict[str, Any] | list[dict[str, Any]]) -> str:
    if isinstance(ref, list):  # an ensemble
        return "+".join(_teacher_label(member) for member in ref)
    if not ref:
        return "-"
    if "cell" in ref:
        return ref["cell"]
    return ref.get("model") or Path(str(ref.get("run"))).stem


def _check_teacher_reachable(ref: dict[str, Any], where: str) -> None:
    """A teacher must be loadable without a download: a file, a finished run, or a tag open_clip knows."""
    import open_clip

    from harness.config.run_config import resolve_teacher_run
    from harness.models.names import is_config_file, known_model_names, names_a_file

    if ref.get("run") is not None:  # `run: null`, as a resolved config writes it, is no run
        try:
            resolve_teacher_run(ref["run"])
        except ClipkdError as error:
            raise GridError(f"{where}: teacher unreachable: {error}") from None
        return
    model, pretrained = ref.get("model"), ref.get("pretrained")
    if model is None or pretrained is None:
        raise GridError(f"{where}: a teacher needs `cell` (a teacher of this grid), `run`, or `model` + `pretrained`")
    if not (is_config_file(model) and Path(model).is_file()) and model not in known_model_names():
        raise GridError(f"{where}: unknown teacher model {model!r}")
    if names_a_file(pretrained):
        if not Path(pretrained).is_file():
            raise GridError(f"{where}: teacher unreachable: checkpoint file {pretrained!r} does not exist")
    elif pretrained not in open_clip.list_pretrained_tags_by_model(model):
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise GridError(f"{where}: teacher unreachable: {pretrained!r} is not an open_clip tag of {model!r}; "
                        f"tags: {', '.join(tags) or 'none'}")


def _matches(values: dict[str, Any], rule: dict[str, Any]) -> bool:
    """Whether a cell's axis values match a rule; a rule's value may be a list (any of them)."""
    unknown = set(rule) - {"teacher", "student", "method", "selection", "dataset", "seed"}
    if unknown:
        raise GridError(f"cannot match on {sorted(unknown)}; accepted: teacher, student, method, dataset, seed")
    return all(str(values.get(k)) in {str(x) for x in (v if isinstance(v, list) else [v])} for k, v in rule.items())


def _cell_config(data: dict[str, Any], source: str) -> RunConfig:
    try:
        return parse_config(data, source)
    except ConfigError as error:
        raise GridError(str(error)) from None


def expand(spec: GridFile, source: str) -> list[Cell]:
    base = {**spec.base, "output_dir": spec.output_dir}
    cells: list[Cell] = []
    dirs: dict[str, str] = {}  # "teacher/NAME" and "stage/NAME" -> the cell's run directory
    for name, partial in spec.teachers.items():
        config = _cell_config(deep_merge(base, partial, {"name": f"{spec.name}/teacher/{name}", "distill": {},
                                                         "teacher": None}), f"{source} teacher {name!r}")
        cells.append(Cell(f"teacher/{name}", 0, config))
        dirs[f"teacher/{name}"] = str(config.run_dir)
        plan_run(config)

    seen: dict[str, str] = {c.run_id: c.name for c in cells}
    checked: set[str] = set()
    caches: dict[str, str] = {}  # cache key -> the name of the cell that builds it
    for name, partial in spec.stages.items():  # each may start from an earlier one: they wait for each other
        where = f"{source}: stage {name}"
        data = deep_merge(base, partial, {"name": f"{spec.name}/stage/{name}"})
        teacher, needs = _resolved_teacher(data.get("teacher"), dirs, checked, where)
        student, inherited = _resolved_student(data.get("student") or {}, dirs, where)
        config = _cell_config({**data, "teacher": teacher, "student": student}, where)
        _add_run(Cell(f"stage/{name}", 0, config, needs + inherited), cells, seen, caches, source)
        dirs[f"stage/{name}"] = str(config.run_dir)
        plan_run(config)

    axes = spec.axes
    for teacher, student, (method, terms), (chosen, selection), dataset, seed in itertools.product(
        axes.teachers, axes.students, axes.methods.items(), axes.selections.items(), axes.datasets, axes.seeds
    ):
        dataset = {"dataset": dataset} if isinstance(dataset, str) else dataset
        taught = bool(terms) or (selection is not None and selection.needs_teacher)
        values = {"teacher": _teacher_label(teacher) if taught else "-", "student": _student_label(student),
                  "method": method, "selection": chosen,
                  "dataset": dataset.get("dataset", base.get("data", {}).get("dataset")), "seed": seed}
        shown = method if selection is None else f"{method}+{chosen}"
        name = "/".join(str(values[k]) for k in ("teacher", "student")) + f"/{shown}/{values['dataset']}/s{seed}"
        if any(_matches(values, rule) for rule in spec.exclude):
            continue
        teacher_spec, needs = _resolved_teacher(teacher, dirs, checked, f"{source}: cell {name}") if taught else (None, [])
        if isinstance(teacher_spec, list):
            teacher_spec = [deep_merge(base.get("teacher") or {}, member) for member in teacher_spec]
        student, inherited = _resolved_student(student, dirs, f"{source}: cell {name}")
        data = deep_merge(base, {"name": f"{spec.name}/{name}", "student": student, "teacher": teacher_spec,
                                 "distill": terms, "data": dataset, "seed": seed})
        if selection is not None:
            data = deep_merge(data, {"train": {"selection": selection.model_dump()}})
        for override in spec.overrides:
            if _matches(values, override.match):
                data = deep_merge(data, override.set)
        config = _cell_config(data, f"{source} cell {name}")
        if config.run_id in seen and not taught:  # the baseline has no teacher: one run serves every teacher
            continue
        _add_run(Cell(name, 2, config, needs + inherited), cells, seen, caches, source)
    return cells


def _resolved_teacher(teacher: dict[str, Any] | list[dict[str, Any]] | None, dirs: dict[str, str], checked: set[str],
                      where: str) -> tuple[dict[str, Any] | list[dict[str, Any]] | None, list[str]]:
    """A teacher (or an ensemble) with each ``cell`` of the grid's teachers made its run, and the cells it needs;
    any other teacher checked reachable once."""
    if teacher is None:
        return None, []
    resolved, needs = [], []
    for member in teacher if isinstance(teacher, list) else [teacher]:
        if "cell" in member:
            if f"teacher/{member['cell']}" not in dirs:
                taught = [d.split("/", 1)[1] for d in dirs if d.startswith("teacher/")]
                raise GridError(f"{where}: teacher cell {member['cell']!r} is not among the grid's teachers "
                                f"({', '.join(taught) or 'none'})")
            resolved.append({**{k: v for k, v in member.items() if k != "cell"},
                             "run": dirs[f"teacher/{member['cell']}"]})
            needs.append(f"teacher/{member['cell']}")
        else:
            key = repr(sorted(member.items()))
            if key not in checked:
                _check_teacher_reachable(member, where)
                checked.add(key)
            resolved.append(member)
    return (resolved if isinstance(teacher, list) else resolved[0]), needs


def _resolved_student(student: dict[str, Any], dirs: dict[str, str], where: str) -> tuple[dict[str, Any], list[str]]:
    """A student whose ``inherit.from: {stage: NAME}`` is made that stage's run, and the cells it needs."""
    source = (student.get("inherit") or {}).get("from")
    if not isinstance(source, dict):
        return student, []
    if set(source) != {"stage"} or f"stage/{source['stage']}" not in dirs:
        stages = [d.split("/", 1)[1] for d in dirs if d.startswith("stage/")]
        raise GridError(f"{where}: student.inherit.from {source!r}: name an earlier stage as {{stage: NAME}} "
                        f"(stages before it: {', '.join(stages) or 'none'}), `teacher`, or a run directory")
    needed = f"stage/{source['stage']}"
    return deep_merge(student, {"inherit": {"from": dirs[needed]}}), [needed]


def _student_label(student: dict[str, Any]) -> str:
    """A student as a cell's name shows it: its model, and how it inherits."""
    inherit = student.get("inherit")
    if inherit is None:
        return str(student.get("model"))
    source = inherit.get("from", "teacher")
    source = source.get("stage") if isinstance(source, dict) else Path(str(source)).name
    prune = inherit.get("prune")
    return f"{student.get('model')}+{'pruned' if prune else 'inherited'}-from-{source}"


def _add_run(cell: Cell, cells: list[Cell], seen: dict[str, str], caches: dict[str, str], source: str) -> None:
    """A run cell after the cells it needs: the caches of its cached teachers (added on first need), and its
    stage past theirs (a stage waits for the ones before, as arrays on SLURM and in turn locally)."""
    if cell.config.run_id in seen:
        raise GridError(f"{source}: duplicate cell: {cell.name} and {seen[cell.config.run_id]} resolve to the same "
                        f"run {cell.config.run_id}")
    seen[cell.config.run_id] = cell.name
    taught = [n for n in cell.needs if n.startswith("teacher/")]  # what a cache of its teachers waits for
    cell.needs = cell.needs + [_cache_cell(cell.config.with_teacher(member), taught, caches, cells)
                               for member in cell.config.teachers if member.embeddings == "cached"]
    stage_of = {c.name: c.stage for c in cells}
    cell.stage = max([cell.stage, *(stage_of[n] + 1 for n in cell.needs)])
    cells.append(cell)


def _cache_cell(config: RunConfig, needs: list[str], caches: dict[str, str], cells: list[Cell]) -> str:
    """The name of the cell that builds ``config``'s teacher-embedding cache, added on the first run needing it."""
    stage_of = {c.name: c.stage for c in cells}
    cache = Cell("", max([1, *(stage_of[n] + 1 for n in needs)]), config, needs, TEACHER_CACHE)
    if cache.run_id not in caches:
        cache.name = caches[cache.run_id] = f"teacher-cache/{cache.run_id}"
        cells.append(cache)
    return caches[cache.run_id]


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise GridError(f"{path}: cannot read grid file ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise GridError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid file is a YAML mapping")
    try:
        spec = GridFile.model_validate(data)
    except ValidationError as error:
        raise GridError(_format_validation_error(str(path), error, kind="grid file")) from None
    return Grid(path, spec, expand(spec, str(path)))
