"""A run's precision: the dtype its models are kept in, the autocast of its passes, the dtype of its embeddings."""
from __future__ import annotations

import contextlib

import torch


def parameter_dtype(precision: str) -> torch.dtype:
    """The dtype a run keeps its models in: float64 for ``fp64``; mixed precision autocasts float32 weights."""
    return torch.float64 if precision == "fp64" else torch.float32


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A run's mixed precision (``train.precision`` bf16 or fp16) for every model pass that stands for the run:
    training, the teacher cache's build, the teacher's evaluation pass, the student's measured throughput."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def output_dtype(precision: str) -> torch.dtype:
    """The dtype of a model's embeddings in a run of this precision (autocast's, under mixed precision)."""
    return AUTOCAST_DTYPES.get(precision, parameter_dtype(precision))
