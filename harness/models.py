"""Building students and teachers with open_clip, including the project's own model configs.

What names a model (and validates one) is ``harness/model_names.py``, which imports neither torch nor
open_clip. A config file is registered with open_clip under its stem and a hash of its content, so two files of
one name never collide, and a run's id follows the file's content, not its path (harness/config.py).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from harness.model_names import (  # noqa: F401  (re-exported: what names a model is model_names.py's)
    CONFIG_KEYS,
    FINAL_CHECKPOINT,
    MODEL_CONFIG_DIR,
    ModelLoadError,
    is_config_file,
    known_model_names,
    model_config_folders,
    model_identity,
    names_a_file,
    read_config_file,
    resolve_teacher_run,
    teacher_run_dir,
)


@functools.cache
def register_model_configs() -> None:
    """open_clip keeps added configs per process, so every process (and every job) registers them once: the
    project's and those plugin packages ship."""
    for folder in model_config_folders():
        open_clip.add_model_config(folder)


def model_name(model: str) -> str:
    """The name open_clip knows a model by; a config file is registered in this process first."""
    register_model_configs()
    if not is_config_file(model):
        return model
    config, digest = read_config_file(model)
    name = f"{Path(model).stem}-{digest}"
    if name not in open_clip.list_models():
        # open_clip names a config by its file's stem: register a copy named by content, kept in one folder
        # (content-addressed, so processes that write it at once write the same bytes).
        copy = Path(tempfile.gettempdir()) / "clipkd-model-configs" / f"{name}.json"
        if not copy.is_file():
            copy.parent.mkdir(exist_ok=True)
            partial = copy.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(config))
            partial.replace(copy)
        open_clip.add_model_config(copy)
    return name


@dataclass
class ClipBundle:
    model: nn.Module
    preprocess_eval: Callable  # training views come from harness/data/views.py
    tokenizer: Callable
    embed_dim: int


def _describe_load_failure(model_name: str, pretrained: str, error: Exception) -> str:
    """open_clip reports a file that is not a checkpoint and weights of another architecture alike; tell them apart."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not names_a_file(pretrained):
        return f"pretrained tag {pretrained!r} for model {model_name!r} could not be loaded ({reason})"
    mismatch = isinstance(error, (AssertionError, KeyError)) or "loading state_dict" in str(error)
    if mismatch:
        return f"weights in {pretrained!r} could not be loaded into model {model_name!r}: another architecture ({reason})"
    return f"checkpoint file {pretrained!r} is not a readable checkpoint ({reason})"


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


@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """``model``'s buffers as they were before, whatever a forward in between wrote to them (an evaluation must
    leave a training run as it found it). Only for passes whose backward, if any, runs inside: a restored buffer
    is a changed input to the autograd graph of a pass that read it."""
    kept = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


@contextlib.contextmanager
def running_statistics_frozen(model: nn.Module):
    """BatchNorm layers in training mode normalise by the batch's statistics without adding it to their running
    ones (nor to their count), for a pass that is not another sample of the data: MFD's mostly blank masked
    image, a replayed micro-batch. The running statistics then stay out of the pass's autograd graph."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


class _NoRandomInitNotice(logging.Filter):
    """open_clip logs "No pretrained weights loaded … initialized randomly" for every model built without weights,
    also one about to load a checkpoint; clipkd says once, at a run's start, when a student really starts from
    random weights (harness/train.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def no_random_init_notice():
    notice = _NoRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def compile_repeated_blocks(model: nn.Module, backend: str) -> list[str]:
    """Compile, in place, each block of every run of like blocks in ``model`` (a ModuleList or Sequential of two or
    more modules of one class, outermost first: a ViT's and a text transformer's residual blocks, a timm trunk's
    blocks, a ResNet stage's bottlenecks); returns the runs' names. This is PyTorch's regional compilation: the
    blocks of a run share one compiled graph, so the compile costs one block's time, not the model's, and the code
    around them (patch dropout, MFD's token mask, pooling) stays eager, free to change from step to step without a
    recompile. In place, the weights keep their names: checkpoints read as the uncompiled model's."""
    runs: list[str] = []
    for name, module in model.named_modules():
        like_blocks = isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1 \
            and len({type(block) for block in module}) == 1
        if like_blocks and not any(name.startswith(f"{outer}.") for outer in runs):
            runs.append(name)
            for block in module:
                block.compile(backend=backend)
    return runs


def create_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> ClipBundle:
    name = model_name(model)
    if pretrained is not None and names_a_file(pretrained) and not Path(pretrained).is_file():
        raise ModelLoadError(f"checkpoint file {pretrained!r} for model {model!r} does not exist")
    try:
        with no_random_init_notice():
            clip, _, preprocess_eval = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, weights_only=False
            )
    except Exception as error:
        if pretrained is None:
            raise
        raise ModelLoadError(_describe_load_failure(model, pretrained, error)) from None
    clip.to(dtype)
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    return ClipBundle(clip, preprocess_eval, open_clip.get_tokenizer(name), embed_dim)


def create_teacher(spec, device: str | torch.device = "cpu", precision: str = "fp32") -> ClipBundle:
    """The frozen teacher: eval mode, no grad, from a tag, a checkpoint file, or an earlier run, its weights in the
    run's parameter dtype. Under mixed precision they stay float32 and autocast casts them on each forward, as it
    does the student's: storing them in bf16 once (open_clip's ``convert_weights_to_lp``) moved embeddings by a
    bf16 ulp here, and the cast is about 1 % of a ViT-B/16 forward at batch 256 (86 M weights, read and written
    once, against ~10 TFLOP)."""
    model_name, pretrained = resolve_teacher_run(spec.run) if spec.run else (spec.model, spec.pretrained)
    bundle = create_clip(model_name, pretrained, device, parameter_dtype(precision))
    bundle.model.eval().requires_grad_(False)
    return bundle
