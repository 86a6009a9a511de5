"""One run from config to store: resolved config → run id → train (checkpointing) → evaluate → store."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.distributed import failures_shared, from_main, init_distributed
from evals.cost import gflops_per_sample, images_per_second
from evals.datasets import benchmark_name, load_eval_set
from evals.similarity import feature_similarity
from evals.suites import averages, suite_benchmark
from evals.zeroshot import Classifiers, zero_shot_metrics
from harness.config.run_config import RunConfig, parse_config
from harness.data.bad import count_logged
from harness.data.loaders import workers
from harness.models.build import ClipBundle, create_clip, model_name
from harness.models.names import FINAL_CHECKPOINT, model_identity
from harness.models.prunable import narrow
from harness.run_rows import run_record
from harness.teachers.live import create_teacher
from harness.training import checkpoint
from harness.training.loop import EVAL_LOG, EVENTS_LOG, TRAIN_LOG, train
from harness.training.objective import Objective
from harness.training.progress import progress_term
from harness.training.stops import TrainingInterrupted
from harness.training.trackers import LiveProgress, Reporters
from results.queries import REFERENCE
from results.records import ingest, read_record, write_record
from results.store import Store, now

MAX_CURVE_POINTS = 500
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainedRun:
    config: RunConfig
    student: ClipBundle
    teachers: list[ClipBundle]
    objective: Objective


def load_trained_run(run_dir: Path, device: torch.device) -> TrainedRun:
    config = parse_config(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    state = checkpoint.load(run_dir / FINAL_CHECKPOINT)  # read once: student weights and loss-side modules
    student = create_clip(config.student.model, device=device, input_of=(config.student.model, config.student.pretrained))
    if "structure" in state:  # a pruned student's shape (harness/models/prunable.py)
        narrow(student.model, state["structure"])
    student.model.load_state_dict(state["state_dict"])
    teachers = [create_teacher(spec, device) for spec in config.teachers]
    objective = Objective(config.method_terms(), student.embed_dim, teachers[0].embed_dim if teachers else None,
                          config.task_loss)
    objective.load_state_dict(state["methods"])
    return TrainedRun(config, student, teachers, objective.to(device))


@dataclass
class Evaluation:
    metrics: dict[str, dict[str, float]]  # {benchmark: {metric: value}}
    items: dict[str, dict[str, np.ndarray]]  # {benchmark: {metric: a bit per test item}}


def evaluate(trained: TrainedRun, benchmarks, device: torch.device) -> Evaluation:
    """Zero-shot metrics with their per-item hits, and feature similarity against each teacher (fed the items in
    its own preprocessing): the first's under the metric's name, the k-th's as ``NAME@teacherK`` (compared without
    the projection P, which maps into the first teacher's space)."""
    evaluation, classifiers = Evaluation({}, {}), Classifiers()  # benchmarks sharing classes and prompts share one
    batch_size, loader_workers = trained.config.eval.batch_size, workers(trained.config.eval.workers)
    for spec in benchmarks:
        eval_set = load_eval_set(spec.dataset, spec.root, trained.student.preprocess_eval, spec.task)
        result = zero_shot_metrics(trained.student.model, trained.student.tokenizer, eval_set, device, batch_size,
                                   classifiers, loader_workers)
        for k, teacher in enumerate(trained.teachers, start=1):
            projection = trained.objective.student_projection() if k == 1 else None
            own_set = eval_set if teacher.image_input == trained.student.image_input else \
                load_eval_set(spec.dataset, spec.root, teacher.preprocess_eval, spec.task)  # the same items, its input
            similarity = feature_similarity(result.embedded, teacher, projection, own_set, device, batch_size,
                                            loader_workers, trained.config.train.precision)
            result.metrics.update(similarity if k == 1 else {f"{name}@teacher{k}": v for name, v in similarity.items()})
        evaluation.metrics[eval_set.benchmark], evaluation.items[eval_set.benchmark] = result.metrics, result.items
    for suite_spec in trained.config.eval.suites:  # the suite's averages, metrics of their own benchmark
        suite, specs = suite_spec.expand()
        benchmark_of = {task: benchmark_name(spec.dataset, spec.root) for task, spec in specs.items()}
        evaluation.metrics[suite_benchmark(suite.name)] = averages(suite, benchmark_of, evaluation.metrics)
    return evaluation


def cost(trained: TrainedRun, device: torch.device) -> dict[str, float]:
    """The student's inference cost (GFLOPs per image and per text, images/s on this device)."""
    gflops_image, gflops_text = gflops_per_sample(trained.student.model, trained.student.tokenizer, device)
    return {"gflops_image": gflops_image, "gflops_text": gflops_text,
            "images_per_second": images_per_second(trained.student.model, device, trained.config.eval.batch_size,
                                                   trained.config.train.precision)}


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return sha.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import version

    return version("clipkd")


def reference_record(model: str, pretrained: str) -> dict[str, Any]:
    """A public model evaluated here but not trained here (``clipkd eval --record``): its row in the store, with
    method and setting "reference" and its source named (an open_clip tag, or a weights file)."""
    weights = Path(pretrained)
    if weights.is_file():
        stat = weights.stat()
        source = {"file": str(weights.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns}
        label = weights.name
    else:
        source, label = {"tag": pretrained}, pretrained
    identity = json.dumps({"model": model_identity(model), **source}, sort_keys=True)
    name, run_id = model_name(model), "ref-" + hashlib.sha256(identity.encode()).hexdigest()[:12]
    return {"id": run_id, "setting_id": run_id, "name": f"{name}@{label}", "teacher": None, "student": name,
            "method": REFERENCE, "terms": "{}", "dataset": f"pretrained:{label}", "seed": 0, "status": "done",
            "error": None,
            "config": json.dumps({"reference": {"model": model, "pretrained": pretrained, **source}}),
            "run_dir": None, "finished_at": now(), "host": socket.gethostname(), "code_version": code_version()}


def training_curves(run_dir: Path) -> list[tuple[str, int, float]]:
    """Every loss term against step, thinned to at most MAX_CURVE_POINTS steps (the last one always kept), and what
    was measured during training (eval.every_steps): ``zero-shot acc1 (BENCHMARK)`` and the §4.4 similarities as
    ``METRIC (BENCHMARK)``."""
    records = [json.loads(line) for line in _complete_lines(run_dir / TRAIN_LOG)]
    stride = max(1, -(-len(records) // MAX_CURVE_POINTS))
    kept = records[::stride] + ([records[-1]] if records and (len(records) - 1) % stride else [])
    curves = [(term, r["step"], r[term]) for r in kept for term in r if term not in ("step", "seconds")]
    for line in _complete_lines(run_dir / EVAL_LOG):
        point = json.loads(line)
        curves.extend((progress_term(point["benchmark"], metric), point["step"], value)
                      for metric, value in point.items() if metric not in ("step", "samples_seen", "benchmark"))
    return curves


def _complete_lines(path: Path) -> list[str]:
    """A JSON-lines log's complete lines: a run still training may be writing its last one."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [line for line in text[: text.rfind("\n") + 1].splitlines() if line]


def parameter_count(*bundles: ClipBundle) -> int | None:
    """Parameters of the models given (an ensemble's teachers summed); None for none."""
    return sum(p.numel() for bundle in bundles for p in bundle.model.parameters()) if bundles else None


def training_cost(run_dir: Path) -> dict[str, Any]:
    """Wall time of training summed over its attempts (each from its start or resume to its stop or finish), the
    device-hours that took (wall × processes), the samples the live teacher embedded and those the student
    embedded (with and without gradients)."""
    events = [json.loads(line) for line in (run_dir / EVENTS_LOG).read_text().splitlines() if line]
    seconds, began, processes, embedded, student = 0.0, None, 1, 0, 0
    for event in events:
        if event["event"] in ("start", "resume"):
            began, processes = event["time"], event.get("world_size", 1)
        elif event["event"] in ("stop", "finish") and began is not None:
            seconds, began = seconds + event["time"] - began, None
            embedded += event.get("teacher_forward_samples", 0)
            student += event.get("student_forward_samples", 0)
    return {"train_seconds": seconds, "world_size": processes, "device_hours": seconds * processes / 3600,
            "teacher_forward_samples": embedded, "student_forward_samples": student}


class _Publisher:
    """Writes a run's status, metrics, per-item results and curves to its record file, and to the store when
    there is one."""

    def __init__(self, run_dir: Path, store: Store | None):
        self.run_dir, self.store = run_dir, store

    def __call__(self, run: dict[str, Any], metrics=None, curves=None, items=None) -> None:
        record = write_record(self.run_dir, run, metrics, curves, items)
        if self.store is not None:
            self.store.put_run(record["run"], metrics=metrics, curves=curves, items=items)


def run_notes(config: RunConfig) -> str | None:
    """What a reader of a run's numbers should know that its config does not say outright."""
    from harness.models.build import accumulation_changes_weights

    if config.train.accum_freq > 1 and (why := accumulation_changes_weights(config.student.model)):
        return f"train.accum_freq {config.train.accum_freq}: {why}; not the whole batch's (README, accumulation)"
    return None


class _Watch:
    """While a run trains (rank 0): its progress and curves to its record and store (where ``publish`` is given),
    its numbers to its trackers (``train.report_to``)."""

    def __init__(self, config: RunConfig, publish: _Publisher | None, grid: str | None):
        self.config = config
        self.live = None if publish is None else LiveProgress(
            lambda progress: publish(progress, curves=training_curves(config.run_dir)), config.train.live_every_s)
        self.reporters = Reporters.open(config.train.report_to, config.run_dir, config.resolved(), config.run_id,
                                        config.name, grid)

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k not in ("step", "seconds", "total_steps")}
        if kind == "train":
            step, total, seconds = record["step"], record["total_steps"], record["seconds"]
            values["samples_per_second"] = self.config.train.batch_size / seconds if seconds else None
            if self.live is not None:
                self.live({"id": self.config.run_id, "status": "running", "step": step, "total_steps": total,
                           "samples_per_second": values["samples_per_second"], "eta_seconds": (total - step) * seconds})
        self.reporters.log(record["step"], {k: v for k, v in values.items() if v is not None})

    def training_ended(self) -> None:
        if self.live is None:
            return
        self.live.close()
        if self.live.error is not None:
            print(f"clipkd: {self.config.name}: live progress could not be published ({self.live.error}); the run's "
                  "record and store get its final numbers as usual", file=sys.stderr)


@contextlib.contextmanager
def tracked(config: RunConfig) -> Iterator[_Watch | None]:
    """``clipkd train``'s observer: the run's trackers (``train.report_to``) on rank 0, as ``run`` has them while
    it trains, without a record or a store."""
    if not config.train.report_to or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    watch = _Watch(config, None, None)
    try:
        yield watch
    finally:
        watch.reporters.close()


def run(config: RunConfig, store: Store | None, grid: str | None = None) -> str:
    """Train, evaluate and record one run; returns its final status. Finished work is never redone."""
    wanted = {benchmark_name(spec.dataset, spec.root) for spec in config.benchmarks()}
    env = init_distributed(config.train.collective_timeout_s)
    record = read_record(config.run_dir)  # rank 0's reading for all: another node's view of the file may lag
    if from_main(bool(record and record["run"].get("status") == "done" and wanted <= set(record["metrics"]))):
        if store is not None and env.is_main:
            ingest(store, [config.run_dir])
        return "done"
    publish = _Publisher(config.run_dir, store if env.is_main else None)
    base = run_record(config, grid=grid)
    watch = None
    if env.is_main:
        publish({**base, "status": "running", "error": None, "started_at": now(), "host": socket.gethostname(),
                 "code_version": code_version(), "notes": run_notes(config)})
        watch = _Watch(config, publish, grid)
    try:
        return _train_and_evaluate(config, env, publish, base, watch)
    finally:
        if watch is not None:
            watch.reporters.close()


def _train_and_evaluate(config: RunConfig, env, publish: _Publisher, base: dict[str, Any], watch: _Watch | None) -> str:
    try:
        try:
            run_dir = train(config, resume=True, observe=watch)
        finally:
            if watch is not None:
                watch.training_ended()
    except TrainingInterrupted as stop:
        if env.is_main:
            publish({"id": config.run_id, "status": "queued",
                     "error": f"interrupted after step {stop.step}; resumes from its checkpoint"})
        raise
    except Exception as error:
        if env.is_main:
            publish({"id": config.run_id, "status": "failed", "error": f"training: {type(error).__name__}: {error}"})
        raise
    started, device = time.perf_counter(), env.device
    try:  # every rank embeds its share of each benchmark; rank 0 measures the cost and records
        with failures_shared():
            trained = load_trained_run(run_dir, device)
            evaluation = evaluate(trained, config.benchmarks(), device)
        eval_seconds = time.perf_counter() - started
        if not env.is_main:
            return "done"
        inference = cost(trained, device)
    except Exception as error:  # recorded as failed, with no metric of this attempt written
        if env.is_main:
            publish({"id": config.run_id, "status": "failed", "error": f"evaluation: {type(error).__name__}: {error}"})
        raise
    publish(
        {**base, "status": "done", "error": None, "finished_at": now(), **training_cost(run_dir),
         "eval_seconds": eval_seconds, "bad_samples": count_logged(run_dir), "student_params": parameter_count(trained.student),
         "teacher_params": parameter_count(*trained.teachers), **inference},
        metrics=evaluation.metrics,
        curves=training_curves(run_dir),
        items=evaluation.items,
    )
    watch.reporters.final(evaluation.metrics)
    return "done"
