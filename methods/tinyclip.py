from methods.base import DistillBatch, DistillMethod, normalize
from methods.registry import register


@register("tinyclip")
class AffinityMimicking(DistillMethod):
    """TinyCLIP affinity mimicking: soft cross-entropy between teacher and student affinities at a fixed scale.

    Wu et al., ICCV 2023, §3.1 "Affinity Mimicking":  A = softmax(s · v uᵀ) per row (image→text) and per column
    (text→image), one fixed scale s for both models;  L = ½ [CE(A_T^{I→T}, A_S^{I→T}) + CE(A_T^{T→I}, A_S^{T→I})].
    A sigmoid (SigLIP) teacher: its embeddings at the fixed scale s, as any teacher's; its bias would shift every
    logit of a row alike, which the softmax ignores.
    """

    def __init__(self, student_dim: int, teacher_dim: int, scale: float = 100.0):
        super().__init__(student_dim, teacher_dim)
        self.scale = scale

    def forward(self, batch: DistillBatch):
        student_logits = self.scale * normalize(batch.student_image) @ normalize(batch.student_text).T
        teacher_logits = self.scale * batch.teacher_image @ batch.teacher_text.T
        return sum(
            -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1).mean()
            for student, teacher in ((student_logits, teacher_logits), (student_logits.T, teacher_logits.T))
        ) / 2
