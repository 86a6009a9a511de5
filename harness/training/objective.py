"""A step's loss: the student's embeddings of the global batch against its teachers', through every method."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

import methods
from core.distributed import gather, gather_with_grad
from harness.data.batch import Batch
from harness.teachers.cached import CachedTeacher
from harness.teachers.ensemble import Teachers
from harness.teachers.live import LiveTeacher
from harness.training.masking import masked_image_features
from harness.training.stops import TrainingError


class Objective(nn.Module):
    """L = L_task + Σ_k w_k L_k, the task loss being the student's own on its embeddings of the global batch: CLIP's
    InfoNCE, or SigLIP's sigmoid loss (open_clip's ``SigLipLoss`` on the gathered batch: the ranks' share of the
    sum, averaged by DDP, is its distributed form's)."""

    def __init__(self, terms: dict[str, tuple[float, dict[str, Any]]], student_dim: int, teacher_dim: int | None,
                 task_loss: str = "clip"):
        super().__init__()
        built = {}
        for name, (_, options) in terms.items():
            try:
                built[name] = methods.get(name)(student_dim, teacher_dim, **options)
            except TypeError as error:
                raise TrainingError(f"distill.{name}: bad options {options}: {error}") from None
        self.methods = nn.ModuleDict(built)
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.task_loss = task_loss
        self.task = SigLipLoss() if task_loss == "siglip" else ClipLoss()
        ratios = {methods.image_mask_ratio(m) for m in self.methods.values()} - {None}
        if len(ratios) > 1:
            raise TrainingError(f"methods ask for different image mask ratios {sorted(ratios)}; use one")
        self.image_mask_ratio = ratios.pop() if ratios else None

    def forward(self, batch: methods.DistillBatch) -> dict[str, torch.Tensor]:
        """Every term in float32 at least, outside autocast, on embeddings cast up exactly: under bf16 a logit near
        100 is rounded to a multiple of 0.5, the size of the KD gradient p_S - p_T near convergence, so every
        softmax, KL and cross-entropy of the losses takes float32 logits."""
        with torch.autocast(batch.student_image.device.type, enabled=False):
            batch = _float32_at_least(batch)
            bias = () if batch.student_logit_bias is None else (batch.student_logit_bias,)
            terms = {"task": self.task(methods.normalize(batch.student_image), methods.normalize(batch.student_text),
                                       batch.student_logit_scale, *bias)}
            terms.update({name: method(batch) for name, method in self.methods.items()})
        return terms

    def student_projection(self) -> nn.Module | None:
        """The first learned student→teacher projection among the methods, in config order."""
        return next((p for m in self.methods.values() if (p := methods.student_projection(m)) is not None), None)

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return terms["task"] + sum(self.weights[name] * terms[name] for name in self.methods)


def _float32_at_least(batch: methods.DistillBatch) -> methods.DistillBatch:
    """The batch's tensors in float32, or as they are when wider (an fp64 run)."""
    def up(x):
        return x.to(torch.promote_types(x.dtype, torch.float32)) if isinstance(x, torch.Tensor) else x

    fields = {f.name: up(getattr(batch, f.name)) for f in dataclasses.fields(batch) if f.name != "teachers"}
    teachers = tuple(methods.TeacherEmbeddings(*(up(getattr(t, f.name)) for f in dataclasses.fields(t)))
                     for t in batch.teachers)
    return dataclasses.replace(batch, **fields, teachers=teachers)


def student_embeddings(student: nn.Module, batch: Batch, masked_noise: torch.Tensor | None,
                       mask_ratio: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's raw student embeddings of ``batch``: image, text, and the masked image when a method asks."""
    image, text = student.encode_image(batch.images), student.encode_text(batch.texts)
    masked = None if mask_ratio is None else masked_image_features(student, batch.images, masked_noise, mask_ratio)
    return image, text, masked


def losses_from_embeddings(student: nn.Module, teacher: Teachers | LiveTeacher | CachedTeacher | None,
                           objective: Objective,
                           batch: Batch, embeddings) -> dict[str, torch.Tensor]:
    """Every loss term on the global batch from this rank's student ``embeddings`` of ``batch``, gathered with all
    others' (and the teacher's of the same samples)."""
    image, text, masked = (gather_with_grad(e) if e is not None else None for e in embeddings)
    student_scale = student.logit_scale.exp()
    student_bias = student.logit_bias if objective.task_loss == "siglip" else None
    if teacher is None:  # the no-KD baseline: the task loss alone
        zero = torch.zeros(0, device=batch.images.device)
        return objective(methods.DistillBatch(image, text, zero, zero, student_scale, student_scale,
                                              student_logit_bias=student_bias))
    with torch.no_grad():
        ensemble = []
        for member in teacher.members if isinstance(teacher, Teachers) else [teacher]:
            teacher_image, teacher_text, teacher_scale, teacher_bias = member(batch)
            ensemble.append(methods.TeacherEmbeddings(gather(teacher_image), gather(teacher_text), teacher_scale,
                                                      teacher_bias))
    first = ensemble[0]  # what a method written for one teacher sees
    return objective(methods.DistillBatch(image, text, first.image, first.text, student_scale, first.logit_scale,
                                          masked, tuple(ensemble), student_bias, first.logit_bias))


def compute_losses(
    student: nn.Module,
    teacher: Teachers | LiveTeacher | CachedTeacher | None,
    objective: Objective,
    batch: Batch,
    masked_noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every loss term of one step on the global batch: this rank's embeddings gathered with all others'."""
    embeddings = student_embeddings(student, batch, masked_noise, objective.image_mask_ratio)
    return losses_from_embeddings(student, teacher, objective, batch, embeddings)


class StepModule(nn.Module):
    """The student and its losses as one module whose forward is a step's loss terms, every pass of the student
    included (image, text, masked image): the one forward per backward DistributedDataParallel asks for, so its
    all-reduce of the student's and the loss-side parameters' gradients overlaps backward (open_clip runs both
    towers inside one DDP forward likewise)."""

    def __init__(self, student: nn.Module, objective: Objective):
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, batch: Batch, teacher, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return compute_losses(self.student, teacher, self.objective, batch, noise)
