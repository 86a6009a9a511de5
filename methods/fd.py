import torch.nn.functional as F

from methods.base import DistillBatch, DistillMethod, normalize, projection
from methods.registry import register


def feature_mse(student_image, student_text, batch: DistillBatch, project):
    """MSE(v_T, norm(P v_S)) + MSE(u_T, norm(P u_S)), each a mean over the B·D elements."""
    return F.mse_loss(normalize(project(student_image)), batch.teacher_image) + F.mse_loss(
        normalize(project(student_text)), batch.teacher_text
    )


@register("fd")
class FeatureDistillation(DistillMethod):
    """FD: mean squared error between teacher and (projected) student embeddings.

    Paper §3.2 "Feature Distillation":  L_FD = ‖v_T − P v_S‖² + ‖u_T − P u_S‖².
    Convention: like the released code's ``F.mse_loss``, the squared norm is averaged over the D_T dims as well as
    the batch, so the released weight 2000 is used as is (it is 2000/D_T in the sum-over-dims form).
    A sigmoid (SigLIP) teacher: only its embeddings are read, not its scale or bias.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__(student_dim, teacher_dim)
        self.project = projection(student_dim, teacher_dim)

    def forward(self, batch: DistillBatch):
        return feature_mse(batch.student_image, batch.student_text, batch, self.project)
