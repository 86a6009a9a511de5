from methods.base import DistillBatch, DistillMethod, normalize
from methods.registry import register
from methods.relational import kl_to


@register("hrd")
class HorizontalRelationalDistillation(DistillMethod):
    """HRD (CLIP-RD): the student's image–text distributions pulled to the teacher's, each model at its own scale.

    L_HRD = ½ [KL(p_T^{I→T} ‖ p_S^{I→T}) + KL(p_T^{T→I} ‖ p_S^{T→I})],  p^{I→T} = softmax(s · v uᵀ) row-wise:
    CRD's relation, averaged over the two directions where CRD sums them (the released ``hrd_loss``;
    methods/relational.py says what is followed).
    A sigmoid (SigLIP) teacher: its pairwise logits s·v uᵀ + b read as contrastive distributions; the bias shifts
    every logit of a row alike, which the softmax ignores, so it is left out.
    """

    def forward(self, batch: DistillBatch):
        student = batch.student_logit_scale * normalize(batch.student_image) @ normalize(batch.student_text).T
        teacher = batch.teacher_logit_scale * batch.teacher_image @ batch.teacher_text.T
        return (kl_to(teacher, student) + kl_to(teacher.T, student.T)) / 2
