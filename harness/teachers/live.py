"""The frozen teachers a run distils from, built from a tag, a checkpoint file or an earlier run of clipkd."""
from __future__ import annotations

import torch
from torch import nn

import methods
from core.precision import parameter_dtype
from harness.config.run_config import resolve_teacher_run
from harness.data.batch import Batch
from harness.models.build import ClipBundle, create_clip


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


class LiveTeacher:
    """The frozen teacher run on every batch: its normalised embeddings and its temperature."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.samples_embedded = 0  # on this process, for benchmarks/grid.py

    def __call__(self, batch: Batch):
        self.samples_embedded += len(batch)
        return (methods.normalize(self.model.encode_image(batch.images)),
                methods.normalize(self.model.encode_text(batch.texts)), self.model.logit_scale.exp())
