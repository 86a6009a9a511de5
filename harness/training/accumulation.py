"""Exact gradient accumulation for batch-wide losses (``train.accum_freq``): the GradCache scheme (Gao et al.,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021), as open_clip_train's
``--accum-freq`` caches features.

Averaging the gradients of N small batches is not the same objective: InfoNCE, CRD, ICL, AFD and GD compare each
sample with the whole batch. So a step is taken in three passes over this rank's block, split into N micro-batches:

1. each micro-batch's student embeddings (image, text, masked image) without gradients, the RNG state before each
   micro-batch kept;
2. every loss term on the whole global batch from those embeddings, made leaves, and its backward: the loss-side
   parameters and the logit scale get their gradient once, the embeddings theirs;
3. each micro-batch embedded again with gradients, from the RNG state its first pass saw (the same dropout and
   patch dropout), and back-propagated from its rows of the embedding gradients.

The towers' gradients are the full batch's up to float rounding, with at most one micro-batch's activations held.
A tower with BatchNorm normalises by each micro-batch's statistics instead of the block's, which no caching can
undo (``accumulation_changes_weights``); its running statistics are updated once per micro-batch, by the first pass.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from harness.data.batch import Batch
from harness.models.build import running_statistics_frozen

EmbedFn = Callable[[Batch, "torch.Tensor | None"], tuple[torch.Tensor, ...]]


def micro_batches(batch: Batch, noise: torch.Tensor | None, count: int) -> list[tuple[Batch, torch.Tensor | None]]:
    """``batch`` (and its rows of mask noise) in ``count`` consecutive parts of sizes differing by one at most."""
    if count > len(batch):
        raise ValueError(f"train.accum_freq {count} is more than this process's {len(batch)} samples per step")
    tensors = {name: getattr(batch, name) for name in ("images", "texts", "samples", "views", "boxes",
                                                       "teacher_image", "teacher_text")}
    parts = {name: t.tensor_split(count) if t is not None else [None] * count for name, t in tensors.items()}
    noises = noise.tensor_split(count) if noise is not None else [None] * count
    return [(replace(batch, **{name: parts[name][i] for name in parts}), noises[i]) for i in range(count)]


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulated_step(model: nn.Module, embed: EmbedFn, batch: Batch, noise: torch.Tensor | None, count: int,
                     losses: Callable[[Batch, list[torch.Tensor | None]], dict[str, torch.Tensor]],
                     backward: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, torch.Tensor]:
    """One step's gradients in ``count`` micro-batches; returns the loss terms of the whole batch.

    ``embed(part, noise)`` gives a micro-batch's student embeddings (None where a pass is not asked for);
    ``losses(batch, embeddings)`` the terms on the block's embeddings; ``backward(terms)`` back-propagates them
    (through the gradient scaler)."""
    parts = micro_batches(batch, noise, count)
    device = batch.images.device
    states, cached = [], []
    with torch.no_grad():
        for part, part_noise in parts:
            states.append(_rng_state(device))
            cached.append(embed(part, part_noise))
    leaves = [torch.cat(column).requires_grad_() if column[0] is not None else None for column in zip(*cached)]
    after_first_pass = _rng_state(device)
    terms = losses(batch, leaves)
    backward(terms)
    grads = [leaf.grad.tensor_split(count) if leaf is not None else None for leaf in leaves]
    with running_statistics_frozen(model):  # the second pass must not count a micro-batch twice
        for i, (part, part_noise) in enumerate(parts):
            _set_rng_state(states[i], device)
            outputs = embed(part, part_noise)
            pairs = [(out, grad[i]) for out, grad in zip(outputs, grads) if out is not None]
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    _set_rng_state(after_first_pass, device)
    return terms
