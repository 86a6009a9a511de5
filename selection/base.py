"""What every selector shares: the super-batch it sees, its base class, and the per-example contrastive loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import TeacherEmbeddings


@dataclass(frozen=True)
class SuperBatch:
    """Embeddings of one global super-batch (gathered across ranks, in its order), as a selector sees them: the
    student's raw embeddings (no gradient), every teacher's L2-normalised ones, in config order (none for a run
    without a teacher), the student's exponentiated logit scale; ``seed`` and ``step`` for a selector that draws."""

    student_image: torch.Tensor
    student_text: torch.Tensor
    student_logit_scale: torch.Tensor
    teachers: tuple[TeacherEmbeddings, ...]
    seed: int
    step: int

    def __len__(self) -> int:
        return len(self.student_image)


def per_example_contrastive(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """ℓ_i = ½ [CE(s·v_i Uᵀ, i) + CE(s·u_i Vᵀ, i)]: each example's share of the CLIP loss within the super-batch
    (its image against every caption, its caption against every image), in float64 (a score decides a ranking)."""
    image, text = (F.normalize(x.double(), dim=-1) for x in (image, text))
    logits = logit_scale.double() * image @ text.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2


class Selector:
    """Base class of a selector: ``Selector(**options)``; ``scores(batch)`` rates each example of a ``SuperBatch``
    (higher: kept first); ``select(batch, keep)`` returns the ``keep`` kept indices in ascending order.

    The default ``select`` keeps the ``keep`` highest scores, ties to the earlier example. ``needs_teacher``: the
    selector reads ``batch.teachers`` (a run without a teacher is refused when its config is read)."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False

    def scores(self, batch: SuperBatch) -> torch.Tensor:
        raise NotImplementedError

    def select(self, batch: SuperBatch, keep: int) -> torch.Tensor:
        order = torch.sort(self.scores(batch), descending=True, stable=True).indices
        return order[:keep].sort().values
