import torch

from selection.base import Selector, SuperBatch, per_example_contrastive
from selection.registry import register


@register("learnability")
class Learnability(Selector):
    """Learnability: hard for the student, easy for the teacher (ACID, Udandarao et al., CVPR 2025).

    JEST's learnability score (Evans et al. 2024, Eq. 1: s = ℓ(θ_learner) − ℓ(θ_reference)) with the teacher as the
    reference, as ACID distils through it:  s_i = ℓ_i(θ_S) − (1/K) Σ_k ℓ_i(θ_T_k), ℓ_i the example's CLIP loss
    within the super-batch (``per_example_contrastive``), each model at its own logit scale. Per example, where
    JEST scores sub-batches jointly for its sigmoid loss: the softmax loss of an example already reads every other
    example of the super-batch.
    """

    needs_teacher = True

    def scores(self, batch: SuperBatch) -> torch.Tensor:
        student = per_example_contrastive(batch.student_image, batch.student_text, batch.student_logit_scale)
        teacher = torch.stack([per_example_contrastive(t.image, t.text, t.logit_scale) for t in batch.teachers])
        return student - teacher.mean(dim=0)
