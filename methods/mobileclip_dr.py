import torch

from methods.base import DistillBatch, DistillMethod, normalize
from methods.registry import register


@register("mobileclip_dr")
class EnsembleDistillation(DistillMethod):
    """MobileCLIP's dataset-reinforcement loss: the student's distributions pulled to the teachers' average.

    Vasu et al., CVPR 2024, §3 (apple/ml-mobileclip, ``training/open_clip_v2.patch``, ``DRClipLoss`` with
    ``average_after_softmax``):  p̄^{I→T} = (1/K) Σ_k softmax(s_k · v_k u_kᵀ) row-wise over the K teachers, s_k the
    distillation logit scale (``scale``; each teacher's own when None), p_S = softmax(s_S · v_S u_Sᵀ) at the
    student's scale;  L_DR = ½ [H(p̄^{I→T}, p_S^{I→T}) + H(p̄^{T→I}, p_S^{T→I})], H the cross-entropy. MobileCLIP mixes
    it with the CLIP loss as (1 − λ) L_CLIP + λ L_DR; here the trainer adds the task loss, so a weight w is
    λ = w / (1 + w) up to the scale of the sum. With one teacher it is open_clip's DistillClipLoss term.
    A sigmoid (SigLIP) teacher: its pairwise logits s·v uᵀ + b read as contrastive distributions; the bias shifts
    every logit of a row alike, which the softmax ignores, so it is left out.
    """

    def __init__(self, student_dim: int, teacher_dim: int, scale: float | None = None):
        super().__init__(student_dim, teacher_dim)
        self.scale = scale

    def forward(self, batch: DistillBatch):
        student = batch.student_logit_scale * normalize(batch.student_image) @ normalize(batch.student_text).T
        teachers = [(self.scale or t.logit_scale) * t.image @ t.text.T for t in batch.ensemble]
        losses = []
        for student_logits, teacher_logits in ((student, teachers), (student.T, [t.T for t in teachers])):
            average = torch.stack([t.softmax(dim=1) for t in teacher_logits]).mean(dim=0)
            losses.append(-(average * student_logits.log_softmax(dim=1)).sum(dim=1).mean())
        return sum(losses) / 2
