"""Building students and teachers with open_clip, including the project's own model configs.

What names a model (and validates one) is ``harness/models/names.py``, which imports neither torch nor
open_clip. A config file is registered with open_clip under its stem and a hash of its content, so two files of
one name never collide, and a run's id follows the file's content, not its path (harness/config/run_config.py).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from harness.models.names import (
    ModelLoadError,
    image_input,
    is_config_file,
    names_a_file,
    open_clip_name,
    read_config_file,
    register_config,
    register_model_configs,
    text_input,
)


def model_name(model: str) -> str:
    """The name open_clip knows a model by; a config file is registered in this process first."""
    register_model_configs()
    name = open_clip_name(model)
    if is_config_file(model) and name not in open_clip.list_models():
        register_config(name, read_config_file(model)[0])
    return name


@dataclass
class ClipBundle:
    model: nn.Module
    preprocess_eval: Callable  # training views come from harness/data/views.py
    tokenizer: Callable
    embed_dim: int
    image_input: dict  # its preprocessing (names.image_input): what ``preprocess_eval`` and training views apply


def _describe_load_failure(model_name: str, pretrained: str, error: Exception) -> str:
    """open_clip reports a file that is not a checkpoint and weights of another architecture alike; tell them apart."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not names_a_file(pretrained):
        return f"pretrained tag {pretrained!r} for model {model_name!r} could not be loaded ({reason})"
    mismatch = isinstance(error, (AssertionError, KeyError)) or "loading state_dict" in str(error)
    if mismatch:
        return f"weights in {pretrained!r} could not be loaded into model {model_name!r}: another architecture ({reason})"
    return f"checkpoint file {pretrained!r} is not a readable checkpoint ({reason})"


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
    random weights (harness/training/loop.py)."""

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
                dtype: torch.dtype = torch.float32, input_of: tuple[str, str | None] | None = None) -> ClipBundle:
    """An open_clip model with its evaluation transform and tokenizer. Its preprocessing is ``names.image_input``
    of (model, pretrained), or of ``input_of`` where the weights were trained on another's input (a run's final
    weights, fed as that run's student was: from a tag, with the tag's normalisation); forced on open_clip, which
    would read neither a clipkd config's ``preprocess_cfg`` nor a tag a file of weights no longer names."""
    name = model_name(model)
    preprocess = image_input(*(input_of or (model, pretrained)))
    tokenizer = create_tokenizer(model)  # first: an HF text tower's files are named before its build fails on them
    if pretrained is not None and names_a_file(pretrained) and not Path(pretrained).is_file():
        raise ModelLoadError(f"checkpoint file {pretrained!r} for model {model!r} does not exist")
    structure = pruned_structure(pretrained) if pretrained is not None and names_a_file(pretrained) else None
    try:
        with no_random_init_notice():
            clip, _, preprocess_eval = open_clip.create_model_and_transforms(
                name, pretrained=None if structure else pretrained, device=device, weights_only=False,
                image_mean=preprocess["mean"], image_std=preprocess["std"],
                image_interpolation=preprocess["interpolation"], image_resize_mode=preprocess["resize_mode"])
            if structure:  # a pruned model's weights: its shape first (harness/models/prunable.py)
                from harness.models.prunable import narrow

                narrow(clip, structure)
                open_clip.load_checkpoint(clip, pretrained, weights_only=False, device=device)
    except Exception as error:
        if pretrained is None:
            raise
        raise ModelLoadError(_describe_load_failure(model, pretrained, error)) from None
    clip.to(dtype)
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    return ClipBundle(clip, preprocess_eval, tokenizer, embed_dim, preprocess)


def pruned_structure(path: str) -> dict | None:
    """The structure a pruned model's weights file records (automatic inheritance), read without loading its
    tensors (memory-mapped); None for any other file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # not a zip-format torch file (another format, or unreadable: open_clip then says which)
        return None
    return checkpoint.get("structure") if isinstance(checkpoint, dict) else None


def create_tokenizer(model: str) -> Callable:
    """``open_clip.get_tokenizer`` of a model; one that cannot be built here (an HF tokenizer neither on disk nor
    in the HF cache, offline) is one message naming the model and the tokenizer, not transformers' traceback."""
    name = model_name(model)
    try:
        return open_clip.get_tokenizer(name)
    except Exception as error:
        wanted = text_input(model)["tokenizer"] or "open_clip's CLIP tokenizer"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelLoadError(f"model {model!r}: its tokenizer {wanted!r} cannot be built here ({type(error).__name__}: "
                             f"{reason}); an HF tokenizer needs its files: a local folder as hf_tokenizer_name, or the "
                             "HF cache (HF_HOME) holding it") from None


def _random_rate(layer: nn.Module) -> float:
    """A layer's drop probability: nn.Dropout*, timm's DropPath, open_clip's PatchDropout, attention dropout."""
    if isinstance(layer, nn.MultiheadAttention):
        return layer.dropout
    if "drop" not in type(layer).__name__.lower():
        return 0.0
    return next((float(getattr(layer, a)) for a in ("p", "drop_prob", "prob")
                 if isinstance(getattr(layer, a, None), (int, float))), 0.0)


def changes_weights(model: nn.Module) -> str | None:
    """Why accumulation can change this model's trained weights beyond float rounding, or None."""
    for name, layer in model.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            return f"BatchNorm ({name}): each micro-batch is normalised by its own statistics"
        if _random_rate(layer) > 0:
            return f"{type(layer).__name__} ({name}): micro-batches draw other random masks than the whole batch"
    return None


@functools.cache
def accumulation_changes_weights(model: str) -> str | None:
    """Why ``train.accum_freq`` can change a student's trained weights beyond float rounding, or None. The model is
    built on the meta device (no memory, no weights); one that cannot be built so is taken to change them."""
    try:
        with no_random_init_notice():
            built = open_clip.create_model(model_name(model), device="meta")
    except Exception as error:  # conservative: accum_freq stays in the run id
        return f"the model could not be inspected ({type(error).__name__}: {error})"
    return changes_weights(built)
