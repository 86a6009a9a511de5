from methods.base import DistillBatch, DistillMethod, normalize, open_clip_loss
from methods.registry import register


@register("open_clip_distill")
class OpenClipDistill(DistillMethod):
    """open_clip's --distill loss: soft cross-entropy from teacher to student logits, each at its own scale.

    open_clip's ``DistillClipLoss`` reused as is (its contrastive half is the trainer's task loss, so only its
    ``distill_loss`` is returned):  L = ½ Σ_{dir ∈ {I→T, T→I}} −mean_i Σ_j softmax(z_T)_ij log softmax(z_S)_ij.
    A sigmoid (SigLIP) teacher: its pairwise logits s·v uᵀ + b read as contrastive distributions; the bias shifts
    every logit of a row alike, which the softmax ignores, so it is left out.
    """

    def forward(self, batch: DistillBatch):
        return open_clip_loss("DistillClipLoss")(
            normalize(batch.student_image),
            normalize(batch.student_text),
            batch.student_logit_scale,
            batch.teacher_image,
            batch.teacher_text,
            batch.teacher_logit_scale,
            output_dict=True,
        )["distill_loss"]
