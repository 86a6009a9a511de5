import torch.nn.functional as F

from methods.base import DistillBatch, DistillMethod, normalize
from methods.registry import register


@register("crd")
class ContrastiveRelationalDistillation(DistillMethod):
    """CRD: KL(p_T || p_S) between the teacher's and student's image-text contrastive distributions.

    Paper §3.2 "Contrastive Relational Distillation":
        p^{I→T} = softmax(v uᵀ / τ) row-wise, p^{T→I} = softmax(u vᵀ / τ) row-wise, each model with its own τ;
        L_CRD = KL(p_T^{I→T} ‖ p_S^{I→T}) + KL(p_T^{T→I} ‖ p_S^{T→I}), averaged over the batch.
    The distributions compare within each model, so no projection is needed when the dims differ.
    A sigmoid (SigLIP) teacher: its pairwise logits s·v uᵀ + b read as contrastive distributions; the bias shifts
    every logit of a row alike, which the softmax ignores, so it is left out.
    """

    def forward(self, batch: DistillBatch):
        student_image, student_text = normalize(batch.student_image), normalize(batch.student_text)
        student_logits = batch.student_logit_scale * student_image @ student_text.T
        teacher_logits = batch.teacher_logit_scale * batch.teacher_image @ batch.teacher_text.T
        return sum(
            F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="batchmean", log_target=True)
            for student, teacher in ((student_logits, teacher_logits), (student_logits.T, teacher_logits.T))
        )
