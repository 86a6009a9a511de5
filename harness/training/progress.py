"""Evaluation during training: how many samples a method needs, and the paper's §4.4 curves."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from core.precision import parameter_dtype
from harness.config.run_config import RunConfig
from harness.data.loaders import workers
from harness.models.build import ClipBundle
from harness.training.stops import TrainingError
from results.queries import PROGRESS_TERM


def progress_term(benchmark: str, metric: str = "acc1") -> str:
    """The curve of ``metric`` during training on ``benchmark``: zero-shot accuracy, or a §4.4 similarity."""
    return f"{PROGRESS_TERM if metric == 'acc1' else metric} ({benchmark})"


class ProgressEvaluation:
    """Every ``eval.every_steps`` steps, on the run's first benchmark (or its first ``eval.during_items`` items),
    logged with the samples seen so far:

    - zero-shot top-1: how many samples a method needs;
    - the CLIP-KD paper's §4.4 curves: the student's positive − negative pair similarity and, against the run's
      first teacher, linear CKA and cosine of the features (evals/similarity.py), on the benchmark's image-caption
      pairs (a set without captions pairs each image with its class prompt). The frozen teacher's embeddings of
      those pairs are computed once, here, in its own preprocessing, for a cached teacher too.

    Every rank embeds its share of the images (no rank waits for another's evaluation in the next step's gather);
    the student is evaluated as a checkpoint of that step would be (eval mode) and left as it was found (its modes,
    buffers and random streams), so a run trains to the same weights with or without it."""

    def __init__(self, config: RunConfig, student: ClipBundle, device: torch.device, log: Path | None,
                 projection: Callable[[], nn.Module | None] = lambda: None):
        from evals.datasets import during_training, load_eval_set

        benchmarks = config.benchmarks()
        self.first = benchmarks[0] if benchmarks else None
        eval_set = load_eval_set(self.first.dataset, self.first.root, student.preprocess_eval, self.first.task) \
            if self.first else None
        if eval_set is None or eval_set.classification is None:
            raise TrainingError("eval.every_steps evaluates zero-shot classification on the first of eval.benchmarks; "
                                "give a benchmark with classes (a built-in set, imagefolder or a clip_benchmark one)")
        self.benchmark, self.config = eval_set.benchmark, config
        self.dtype = parameter_dtype(config.train.precision)
        self.dataset = during_training(eval_set.classification, config.eval.during_items, self.dtype)
        self.student, self.device, self.log, self.projection = student, device, log, projection
        self.batch_size, self.workers = config.eval.batch_size, workers(config.eval.workers)
        self.pairs = self._pairs(eval_set)
        self.teacher = self._teacher_pairs() if self.pairs is not None and config.teachers else None

    def _pairs(self, eval_set):
        from evals.datasets import during_training, image_caption_pairs
        from evals.streams import StreamedBenchmark

        if eval_set.retrieval is None and isinstance(eval_set.classification, StreamedBenchmark):
            print(f"clipkd: {self.config.name}: {self.benchmark} is a stream without captions: the pair similarity "
                  "curves during training need captions or random access; only accuracy is drawn", file=sys.stderr)
            return None
        return during_training(image_caption_pairs(eval_set), self.config.eval.during_items, self.dtype)

    def _teacher_pairs(self):
        """The first teacher's embeddings of the pairs, built on a forked random stream and then let go."""
        from evals.datasets import during_training, image_caption_pairs, load_eval_set
        from evals.similarity import pair_embeddings
        from harness.teachers.live import create_teacher

        with torch.random.fork_rng(devices=[]):
            teacher = create_teacher(self.config.teachers[0], self.device, self.config.train.precision)
        own = load_eval_set(self.first.dataset, self.first.root, teacher.preprocess_eval, self.first.task)
        pairs = during_training(image_caption_pairs(own), self.config.eval.during_items, self.dtype)
        return pair_embeddings(teacher, pairs, self.device, self.batch_size, self.workers,
                               self.config.train.precision)

    def __call__(self, step: int, samples_seen: int) -> dict[str, float]:
        """The metrics at ``step``, by their curves' names."""
        from evals.similarity import pair_embeddings, similarity_metrics
        from evals.zeroshot import Classifiers, classification_metrics

        # the evaluation leaves the student's modes, buffers and random streams as it found them (evals/zeroshot.py)
        metrics = {"acc1": classification_metrics(self.student.model, self.student.tokenizer, self.dataset,
                                                  self.device, self.batch_size, Classifiers(), self.workers
                                                  ).metrics["acc1"]}
        if self.pairs is not None:
            student = pair_embeddings(self.student, self.pairs, self.device, self.batch_size, self.workers,
                                      self.config.train.precision)
            with torch.no_grad():
                metrics.update(similarity_metrics(student, self.teacher, self.projection()))
        if self.log is not None:
            with self.log.open("a") as log:
                log.write(json.dumps({"step": step, "samples_seen": samples_seen, "benchmark": self.benchmark,
                                      **metrics}) + "\n")
        return {progress_term(self.benchmark, metric): value for metric, value in metrics.items()}
