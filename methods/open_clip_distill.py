from open_clip.loss import DistillClipLoss

from methods.base import DistillBatch, DistillMethod, normalize
from methods.registry import register


@register("open_clip_distill")
class OpenClipDistill(DistillMethod):
    """open_clip's --distill loss: soft cross-entropy from teacher to student logits, each at its own scale.

    open_clip's ``DistillClipLoss`` reused as is (its contrastive half is the trainer's task loss, so only its
    ``distill_loss`` is returned):  L = ½ Σ_{dir ∈ {I→T, T→I}} −mean_i Σ_j softmax(z_T)_ij log softmax(z_S)_ij.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__(student_dim, teacher_dim)
        self.loss = DistillClipLoss()

    def forward(self, batch: DistillBatch):
        return self.loss(
            normalize(batch.student_image),
            normalize(batch.student_text),
            batch.student_logit_scale,
            batch.teacher_image,
            batch.teacher_text,
            batch.teacher_logit_scale,
            output_dict=True,
        )["distill_loss"]
