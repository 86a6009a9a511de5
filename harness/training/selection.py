"""Batch selection in a training step (``train.selection``; the selectors are in selection/): the student scores the
loaded super-batch without gradients, beside its teachers' embeddings of it; the selector keeps ``batch_size`` of
it; each rank then trains on its block of the kept samples, as without selection.

Selection is global and world-size invariant: every rank gathers the super-batch's embeddings, so every rank's
selector sees the one-process super-batch and returns the same indices, and the kept rows move to the rank whose
block they fall in (``core.distributed.Redistribution``, one all-to-all per tensor of the batch). A run on W processes
therefore trains on the batches one process would: kept samples keep their order in the super-batch. The teachers'
embeddings of the kept samples move with them, and the step reads those: a live teacher embeds each sample once.

The scoring forward runs in eval mode: it changes no BatchNorm statistic and draws no dropout, so a ratio of 1.0
(every sample kept) trains bit for bit as no selection does.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from core.distributed import Redistribution, gather
from core.precision import autocast
from harness.config.specs import SelectionSpec
from harness.data.batch import Batch
from harness.teachers.ensemble import Teachers
from harness.training.stops import TrainingError
from methods.base import TeacherEmbeddings
from selection.base import SuperBatch
from selection.registry import build


class Embedded:
    """A teacher as one step reads it: its embeddings of this rank's kept block, from the scoring pass."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        self.embeddings = image, text, scale, bias

    def __call__(self, batch: Batch):
        return self.embeddings


@contextlib.contextmanager
def evaluating(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class BatchSelection:
    """Keeps ``keep`` samples of each loaded global super-batch; counts the samples its scoring forward embedded on
    this process."""

    def __init__(self, spec: SelectionSpec, keep: int, seed: int, device: torch.device, precision: str):
        self.spec, self.keep, self.seed, self.device, self.precision = spec, keep, seed, device, precision
        self.selector = build(spec.method, spec.options)
        self.samples_embedded = 0

    def __call__(self, batch: Batch, student: nn.Module, teacher: Teachers | None, step: int
                 ) -> tuple[Batch, Teachers | None]:
        """This rank's block of the kept samples of the super-batch whose block ``batch`` is (on the device), and
        the teachers as the step reads them: their embeddings of that block, computed here."""
        with torch.no_grad(), evaluating(student), autocast(self.device, self.precision):
            image, text = student.encode_image(batch.images), student.encode_text(batch.texts)
            embedded = [member(batch) for member in ([] if teacher is None else teacher.members)]
            teachers = tuple(TeacherEmbeddings(gather(t_image), gather(t_text), scale, bias)
                             for t_image, t_text, scale, bias in embedded)
            scored = SuperBatch(gather(image), gather(text), student.logit_scale.exp(), teachers, self.seed, step)
        self.samples_embedded += len(batch)
        chosen = self._checked(self.selector.select(scored, self.keep), len(scored))
        redistribute = Redistribution(chosen, len(batch))  # the split sizes read once for every tensor
        kept = batch.map_tensors(lambda _, tensor: redistribute(tensor))
        if teacher is None:
            return kept, None
        return kept, Teachers([Embedded(redistribute(t_image), redistribute(t_text), scale, bias)
                               for t_image, t_text, scale, bias in embedded])

    def _checked(self, chosen, size: int) -> torch.Tensor:
        """The selector's indices, ascending on the batch's device; a wrong answer is named with the selector."""
        chosen = torch.as_tensor(chosen, device=self.device)
        problem = None
        if chosen.dtype not in (torch.int64, torch.int32) or chosen.dim() != 1 or len(chosen) != self.keep:
            problem = f"{len(chosen) if chosen.dim() == 1 else tuple(chosen.shape)} {chosen.dtype} indices"
        elif len(chosen.unique()) != self.keep or int(chosen.min()) < 0 or int(chosen.max()) >= size:
            problem = "repeated indices or indices outside the super-batch"
        if problem:
            raise TrainingError(f"train.selection: selector {self.spec.method!r} returned {problem}; it must return "
                                f"{self.keep} distinct indices of the {size}-sample super-batch")
        return chosen.long().sort().values
