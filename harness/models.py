"""Building students and teachers with open_clip, including the project's own model configs."""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from harness.errors import ClipkdError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
FINAL_CHECKPOINT = Path("checkpoints") / "final.pt"


class ModelLoadError(ClipkdError, RuntimeError):
    """A model or its weights could not be built; the message names the model and the file."""


@functools.cache
def register_model_configs() -> None:
    """open_clip keeps added configs per process, so every process (and every job) registers them once."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def known_model_names() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


@dataclass
class ClipBundle:
    model: nn.Module
    preprocess_eval: Callable  # training views come from harness/data/views.py
    tokenizer: Callable
    embed_dim: int


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}


def _describe_load_failure(model_name: str, pretrained: str, error: Exception) -> str:
    """open_clip reports a file that is not a checkpoint and weights of another architecture alike; tell them apart."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not _looks_like_path(pretrained):
        return f"pretrained tag {pretrained!r} for model {model_name!r} could not be loaded ({reason})"
    mismatch = isinstance(error, (AssertionError, KeyError)) or "loading state_dict" in str(error)
    if mismatch:
        return f"weights in {pretrained!r} could not be loaded into model {model_name!r}: another architecture ({reason})"
    return f"checkpoint file {pretrained!r} is not a readable checkpoint ({reason})"


def parameter_dtype(precision: str) -> torch.dtype:
    """The dtype a run keeps its models in: float64 for ``fp64``; mixed precision autocasts float32 weights."""
    return torch.float64 if precision == "fp64" else torch.float32


class _NoRandomInitNotice(logging.Filter):
    """open_clip logs "No pretrained weights loaded … initialized randomly" for every model built without weights,
    also one about to load a checkpoint; clipkd says once, at a run's start, when a student really starts from
    random weights (harness/train.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_clip(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> ClipBundle:
    register_model_configs()
    if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise ModelLoadError(f"checkpoint file {pretrained!r} for model {model_name!r} does not exist")
    notice = _NoRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        model, _, preprocess_eval = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, weights_only=False
        )
    except Exception as error:
        if pretrained is None:
            raise
        raise ModelLoadError(_describe_load_failure(model_name, pretrained, error)) from None
    finally:
        logging.getLogger().removeFilter(notice)
    model.to(dtype)
    embed_dim = open_clip.get_model_config(model_name)["embed_dim"]
    return ClipBundle(model, preprocess_eval, open_clip.get_tokenizer(model_name), embed_dim)


def teacher_run_dir(run: str) -> Path:
    """A teacher given as a run directory, or as the YAML config of that run."""
    from harness.config import load_config

    path = Path(run)
    return load_config(path).run_dir if path.suffix in {".yaml", ".yml"} else path


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


def create_teacher(spec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ClipBundle:
    """The frozen teacher: eval mode, no grad, from a tag, a checkpoint file, or an earlier run."""
    model_name, pretrained = resolve_teacher_run(spec.run) if spec.run else (spec.model, spec.pretrained)
    bundle = create_clip(model_name, pretrained, device, dtype)
    bundle.model.eval().requires_grad_(False)
    return bundle
