"""The frozen teachers a run distils from, built from a tag, a checkpoint file or an earlier run of clipkd."""
from __future__ import annotations

import torch
from torch import nn

import methods
from core.precision import parameter_dtype
from harness.config.run_config import resolve_teacher_run, teacher_input
from harness.data.batch import Batch
from harness.data.inputs import TextSpec
from harness.data.views import ViewSpec
from harness.models.build import ClipBundle, create_clip


def create_teacher(spec, device: str | torch.device = "cpu", precision: str = "fp32") -> ClipBundle:
    """The frozen teacher: eval mode, no grad, from a tag, a checkpoint file, or an earlier run (fed as that run's
    student was), its weights in the run's parameter dtype. Under mixed precision they stay float32 and autocast
    casts them on each forward, as it does the student's: storing them in bf16 once (open_clip's
    ``convert_weights_to_lp``) moved embeddings by a bf16 ulp here, and the cast is about 1 % of a ViT-B/16 forward
    at batch 256 (86 M weights, read and written once, against ~10 TFLOP)."""
    model_name, pretrained = resolve_teacher_run(spec.run) if spec.run else (spec.model, spec.pretrained)
    bundle = create_clip(model_name, pretrained, device, parameter_dtype(precision), input_of=teacher_input(spec))
    bundle.model.eval().requires_grad_(False)
    return bundle


def logit_bias(model: nn.Module) -> torch.Tensor | None:
    """A sigmoid (SigLIP) model's learned logit bias; None for a CLIP model."""
    return getattr(model, "logit_bias", None)


class LiveTeacher:
    """The frozen teacher run on every batch: its normalised embeddings of its own input of the batch's samples,
    its temperature and its logit bias (None for a CLIP teacher). ``view`` and ``text`` name its input among the
    batch's other models' inputs; None where it is the student's (data/inputs.py)."""

    def __init__(self, model: nn.Module, view: ViewSpec | None = None, text: TextSpec | None = None):
        self.model, self.view, self.text = model, view, text
        self.samples_embedded = 0  # on this process, for benchmarks/grid.py

    def __call__(self, batch: Batch):
        self.samples_embedded += len(batch)
        images = batch.images if self.view is None else batch.other_images[self.view]
        texts = batch.texts if self.text is None else batch.other_texts[self.text]
        return (methods.normalize(self.model.encode_image(images)), methods.normalize(self.model.encode_text(texts)),
                self.model.logit_scale.exp(), logit_bias(self.model))
