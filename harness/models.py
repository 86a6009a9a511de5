"""Building students and teachers with open_clip, including the project's own model configs.

A model is an open_clip name, a config of ``harness/model_configs/`` or of a plugin package (entry-point group
``clipkd.model_configs``: a package or module whose folder holds open_clip model-config JSON files), or the path
of such a JSON file. A file is registered with open_clip under its stem and a hash of its content, so two files of
one name never collide, and a run's id follows the file's content, not its path (harness/config.py).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
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


MODEL_CONFIG_ENTRY_POINTS = "clipkd.model_configs"
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


@functools.cache
def register_model_configs() -> None:
    """open_clip keeps added configs per process, so every process (and every job) registers them once: the
    project's and those plugin packages ship."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    for entry_point in importlib.metadata.entry_points(group=MODEL_CONFIG_ENTRY_POINTS):
        package = entry_point.dist.name if entry_point.dist else "an unknown package"
        try:
            module = entry_point.load()
            folder = Path(module.__file__).parent
        except Exception as error:
            raise ModelLoadError(f"entry point {entry_point.name!r} = {entry_point.value!r} of {package} (group "
                                 f"{MODEL_CONFIG_ENTRY_POINTS}) is not an importable module with a folder of model "
                                 f"configs: {type(error).__name__}: {error}") from None
        open_clip.add_model_config(folder)


def known_model_names() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


def is_config_file(model: str) -> bool:
    return model.endswith(".json")


def read_config_file(model: str) -> tuple[dict[str, Any], str]:
    """An open_clip model-config JSON file's content and the hash that names it; errors name the file."""
    path = Path(model)
    try:
        text = path.read_text()
        config = json.loads(text)
    except OSError as error:
        raise ModelLoadError(f"model config {model!r} cannot be read ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"model config {model!r} is not valid JSON: {error}") from None
    missing = [key for key in CONFIG_KEYS if key not in (config if isinstance(config, dict) else {})]
    if missing:
        raise ModelLoadError(f"model config {model!r} is not an open_clip model config: no {', '.join(missing)}")
    return config, hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


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


def model_identity(model: str) -> str:
    """What a run id records of a model: its name, or a config file's content hash (a moved file is the same
    model, an edited one another)."""
    return f"json:{read_config_file(model)[1]}" if is_config_file(model) else model


@dataclass
class ClipBundle:
    model: nn.Module
    preprocess_eval: Callable  # training views come from harness/data/views.py
    tokenizer: Callable
    embed_dim: int


def names_a_file(pretrained: str) -> bool:
    """Whether a ``pretrained`` value is a weights file's path rather than an open_clip tag."""
    return "/" in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}


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
