"""Atomic training checkpoints, loadable as open_clip weights (``{"state_dict": …}``)."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest.pt"
FINAL = "final.pt"


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random streams a run draws from: the CPU's, this process's device's (on a GPU), numpy's and Python's."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """``state`` restored, its CUDA stream onto this process's device, whatever GPUs the saving process saw: a
    run checkpointed where each task saw all 8 GPUs resumes where each is bound to one, and the other way round.
    Checkpoints written before that kept a list of every visible GPU's state; the saving process (rank 0) drew
    from the first."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
