"""Why a run stops before its last step: a non-finite loss, a stop signal, an error of the run's own."""
from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path

import torch

from core.errors import ClipkdError


class TrainingError(ClipkdError, RuntimeError):
    pass


class NonFiniteLossError(TrainingError):
    pass


class TrainingInterrupted(TrainingError):
    """A stop signal arrived; a checkpoint of the last completed step was written."""

    every_rank = True  # the ranks stop together (core/distributed.py StepVote)

    def __init__(self, step: int, signum: int):
        super().__init__(f"interrupted by signal {signum} after step {step}; checkpoint saved, continue with --resume")
        self.step, self.signum = step, signum


class FiniteWatch:
    """Watches the loss terms for a non-finite value on the device: a step adds a comparison, no transfer to the
    host. ``check`` reads it (on log steps and before every checkpoint), so a run stops at the next log step
    naming the first bad step and term, its last good checkpoint kept."""

    def __init__(self, names: list[str], step: int, device: torch.device):
        self.names = names
        self.step = torch.full((), step, dtype=torch.long, device=device)
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)
        self.bad_values = torch.zeros(len(names), device=device)

    def observe(self, values: torch.Tensor) -> None:
        self.step.add_(1)
        first = (self.bad_step == 0) & ~torch.isfinite(values).all()
        self.bad_step = torch.where(first, self.step, self.bad_step)
        self.bad_values = torch.where(first, values, self.bad_values)

    def check(self, checkpoints: Path) -> None:
        bad_step = int(self.bad_step)
        if bad_step:
            values = dict(zip(self.names, self.bad_values.tolist()))
            # the term that went bad, before the total it made bad
            name = next(n for n in [*self.names[1:], self.names[0]] if not math.isfinite(values[n]))
            value = values[name]
            raise NonFiniteLossError(f"step {bad_step}: loss term {name!r} is {value}; training stopped, the last "
                                     f"good checkpoint is kept in {checkpoints}")


class StopSignals:
    """Turns stop signals into a flag checked between steps: SIGTERM (scancel, preemption), SIGINT, and the
    pre-time-limit signals of SLURM (``--signal=USR1@…``) and of submitit (USR2)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
