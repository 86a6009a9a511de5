"""Where a run's numbers go while it trains, besides its own logs: the trackers researchers use
(``train.report_to``), and the run's live progress in its record and the store.

TensorBoard (``runs/<id>/tensorboard/``) and Weights & Biases get every loss term, the learning rate, the logit
scale, samples/s, the zero-shot accuracy during training and, at the end, every metric of the evaluation. Neither
is a dependency of the base install (extras ``[tensorboard]``, ``[wandb]``); W&B honours its own environment
(``WANDB_MODE=offline`` without a network, ``WANDB_PROJECT``, ``WANDB_ENTITY``). Only rank 0 reports.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRACKERS = {"tensorboard": ("tensorboard", "clipkd[tensorboard]"), "wandb": ("wandb", "clipkd[wandb]")}
TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT = "clipkd"


def missing_tracker(name: str) -> str | None:
    """Why a tracker cannot be used in this environment, or None."""
    module, extra = TRACKERS[name]
    if importlib.util.find_spec(module) is None:
        return f"{name} is not installed here: pip install '{extra}'"
    return None


class TensorBoard:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str, name: str, grid: str | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), group=grid, name=name,
                              id=run_id, resume="allow", config=config, dir=str(run_dir), reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """The run's trackers: scalars by step while it trains, the evaluation's metrics once at the end."""

    def __init__(self, trackers: list):
        self.trackers = trackers
        self.last_step = 0

    @classmethod
    def open(cls, names: list[str], run_dir: Path, config: dict[str, Any], run_id: str, name: str,
             grid: str | None) -> Reporters:
        made = {"tensorboard": lambda: TensorBoard(run_dir), "wandb": lambda: WandB(run_dir, config, run_id, name, grid)}
        return cls([made[tracker]() for tracker in names])

    def log(self, step: int, values: dict[str, float]) -> None:
        self.last_step = max(self.last_step, step)
        for tracker in self.trackers:
            tracker.log(step, values)

    def final(self, metrics: dict[str, dict[str, float]]) -> None:
        """The evaluation's metrics as ``final/BENCHMARK/METRIC``, at the last step (and W&B's run summary)."""
        values = {f"final/{benchmark}/{metric}": value for benchmark, by_metric in metrics.items()
                  for metric, value in by_metric.items() if value is not None}
        for tracker in self.trackers:
            tracker.log(self.last_step, values)
            if hasattr(tracker, "summary"):
                tracker.summary(values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


class LiveProgress:
    """A running run's progress (step of total, samples/s, ETA) and curves so far, published from a thread at most
    every ``every_s`` seconds: the training loop hands over its latest log record and never waits for a write (a
    rank held up by a slow store would hold the others up in the next step's all-gather)."""

    def __init__(self, publish: Callable[[dict[str, Any]], None], every_s: float):
        self._publish, self._every_s = publish, every_s
        self._latest: dict[str, Any] | None = None
        self._closed = False
        self._ready = threading.Condition()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="clipkd-live-progress", daemon=True)
        self._thread.start()

    def __call__(self, progress: dict[str, Any]) -> None:
        with self._ready:
            self._latest = progress
            self._ready.notify()

    def _loop(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._latest is not None or self._closed)
                if self._closed:
                    return
                progress, self._latest = self._latest, None
            published = time.monotonic()
            try:
                self._publish(progress)
            except Exception as error:  # a store that went away must not stop training; said once, at the end
                self.error = error
            with self._ready:  # the rate bound: wait out the interval unless closed
                self._ready.wait_for(lambda: self._closed, timeout=max(0.0, published + self._every_s - time.monotonic()))

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()
