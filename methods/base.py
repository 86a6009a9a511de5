"""What every distillation method shares: the batch it sees, its base class, and the paper's building blocks."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# CLIP clamps its logit scale (1/τ) at 100; learnable scales in the losses obey the same clamp (DESIGN.md §1).
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class TeacherEmbeddings:
    """One teacher's L2-normalised embeddings of the global batch, its exponentiated logit scale and, for a sigmoid
    (SigLIP) teacher, its logit bias (None for a CLIP teacher): its pairwise logits are s·v uᵀ + b."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None


@dataclass
class DistillBatch:
    """Embeddings of one global batch (gathered across ranks), as a method sees them.

    Student embeddings are raw (not normalised) and carry grad; teacher embeddings are L2-normalised and
    carry none. Logit scales are exponentiated, as open_clip returns them; a logit bias is a sigmoid model's (the
    student's when it trains with the sigmoid loss), None for a CLIP model. A run with several teachers gives them
    all in ``teachers``, in config order, the first also as ``teacher_image``/``teacher_text``: a method written
    for one teacher sees the first.
    """

    student_image: torch.Tensor
    student_text: torch.Tensor
    teacher_image: torch.Tensor
    teacher_text: torch.Tensor
    student_logit_scale: torch.Tensor
    teacher_logit_scale: torch.Tensor
    student_image_masked: torch.Tensor | None = None
    teachers: tuple[TeacherEmbeddings, ...] = ()
    student_logit_bias: torch.Tensor | None = None
    teacher_logit_bias: torch.Tensor | None = None

    @property
    def ensemble(self) -> tuple[TeacherEmbeddings, ...]:
        """Every teacher of the run; the one teacher when the batch was made without ``teachers``."""
        return self.teachers or (TeacherEmbeddings(self.teacher_image, self.teacher_text, self.teacher_logit_scale,
                                                   self.teacher_logit_bias),)


class DistillMethod(nn.Module):
    """Base class of a distillation loss: ``Method(student_dim, teacher_dim, **options)(batch) -> scalar``.

    The returned loss is unweighted; the trainer applies the configured weight. Subclasses declare what the
    trainer must provide beyond the plain embeddings: ``image_mask_ratio`` asks for ``student_image_masked``,
    the student's embedding of an image with that fraction of its patches removed.
    """

    name: ClassVar[str] = ""
    image_mask_ratio: float | None = None

    @classmethod
    def teacher_problem(cls, sigmoid: dict[str, bool]) -> str | None:
        """Why this method cannot distil from these teachers (each teacher's label: whether it is a sigmoid teacher,
        one with a logit bias), or None. Asked when a config is read, before any model loads."""
        return None

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        raise NotImplementedError

    def student_projection(self) -> nn.Module | None:
        """The learned map P of student embeddings into the teacher's space, if this method learns one.

        By convention a method keeps P as ``self.project`` (see :func:`projection`); evaluation uses it to compare
        student and teacher features when their dims differ.
        """
        project = getattr(self, "project", None)
        return project if isinstance(project, nn.Linear) else None


def projection(student_dim: int, teacher_dim: int) -> nn.Module:
    """P: a learnable linear map into the teacher's space when the dims differ, the identity otherwise."""
    return nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()


class LogitScale(nn.Module):
    """A learnable 1/τ stored as log(1/τ), exponentiated and clamped like CLIP's own (the released code did neither)."""

    def __init__(self, init_temperature: float = 0.07):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)


class ProjectedContrastive(DistillMethod):
    """A method whose logits compare student embeddings, mapped by P into the teacher's space, with the teacher's,
    at one learnable scale 1/τ initialised at ``init_temperature`` (ICL, XRD)."""

    def __init__(self, student_dim: int, teacher_dim: int, init_temperature: float = 0.07):
        super().__init__(student_dim, teacher_dim)
        self.project = projection(student_dim, teacher_dim)
        self.logit_scale = LogitScale(init_temperature)


@functools.cache
def open_clip_loss(name: str) -> nn.Module:
    """One of open_clip's loss modules (``ClipLoss``, ``DistillClipLoss``: no parameters, so one is shared),
    imported on first use: importing open_clip takes seconds, and listing the methods needs none of it."""
    import open_clip.loss

    return getattr(open_clip.loss, name)()


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def diagonal_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against its diagonal entry: the positives of a paired batch."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))
