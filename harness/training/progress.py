"""Zero-shot accuracy during training: how many samples a method needs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.precision import parameter_dtype
from harness.config.run_config import RunConfig
from harness.data.loaders import workers
from harness.models.build import ClipBundle
from harness.training.stops import TrainingError
from results.queries import PROGRESS_TERM


def progress_term(benchmark: str) -> str:
    """The curve of zero-shot accuracy during training on ``benchmark``."""
    return f"{PROGRESS_TERM} ({benchmark})"


class ProgressEvaluation:
    """Zero-shot top-1 during training, every ``eval.every_steps`` steps, on the run's first benchmark (or its first
    ``eval.during_items`` items), logged with the samples seen so far: how many samples a method needs. Every rank
    embeds its share of the images (no rank waits for another's evaluation in the next step's gather); the
    student is evaluated as a checkpoint of that step would be (eval mode) and left as it was found (its modes,
    buffers and random streams), so a run trains to the same weights with or without it."""

    def __init__(self, config: RunConfig, student: ClipBundle, device: torch.device, log: Path | None):
        from evals.datasets import during_training, load_eval_set

        benchmarks = config.benchmarks()
        first = benchmarks[0] if benchmarks else None
        eval_set = load_eval_set(first.dataset, first.root, student.preprocess_eval, first.task) if first else None
        if eval_set is None or eval_set.classification is None:
            raise TrainingError("eval.every_steps evaluates zero-shot classification on the first of eval.benchmarks; "
                                "give a benchmark with classes (a built-in set, imagefolder or a clip_benchmark one)")
        self.benchmark = eval_set.benchmark
        self.term = progress_term(self.benchmark)
        self.dataset = during_training(eval_set.classification, config.eval.during_items,
                                       parameter_dtype(config.train.precision))
        self.student, self.device, self.log = student, device, log
        self.batch_size, self.workers = config.eval.batch_size, workers(config.eval.workers)

    def __call__(self, step: int, samples_seen: int) -> float:
        from evals.zeroshot import Classifiers, classification_metrics

        # the evaluation leaves the student's modes, buffers and random streams as it found them (evals/zeroshot.py)
        metrics = classification_metrics(self.student.model, self.student.tokenizer, self.dataset, self.device,
                                         self.batch_size, Classifiers(), self.workers).metrics
        if self.log is not None:
            with self.log.open("a") as log:
                log.write(json.dumps({"step": step, "samples_seen": samples_seen, "benchmark": self.benchmark,
                                      "acc1": metrics["acc1"]}) + "\n")
        return metrics["acc1"]
