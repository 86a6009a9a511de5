import torch
from torch import nn

from methods.base import DistillBatch, DistillMethod, LogitScale, normalize, open_clip_loss, projection
from methods.registry import register


@register("afd")
class AugmentedFeatureDistillation(DistillMethod):
    """AFD: CLIP's contrastive loss on a learned fusion of student and teacher embeddings.

    Paper §3.2 "Augmented Feature Distillation":
        f_v = norm(W_v [P v_S ; v_T]),  f_u = norm(W_u [P u_S ; u_T]),  L_AFD = L_CLIP(f_v, f_u; τ_AFD),
    τ_AFD learnable (exponentiated, clamped). P makes it work when d_S ≠ d_T, where the released code crashed.
    A sigmoid (SigLIP) teacher: only its embeddings are read, not its scale or bias.
    """

    def __init__(self, student_dim: int, teacher_dim: int, init_temperature: float = 0.07):
        super().__init__(student_dim, teacher_dim)
        self.project = projection(student_dim, teacher_dim)
        self.fuse_image = nn.Linear(2 * teacher_dim, teacher_dim)
        self.fuse_text = nn.Linear(2 * teacher_dim, teacher_dim)
        self.logit_scale = LogitScale(init_temperature)

    def forward(self, batch: DistillBatch):
        fused_image = self.fuse_image(torch.cat([normalize(self.project(batch.student_image)), batch.teacher_image], 1))
        fused_text = self.fuse_text(torch.cat([normalize(self.project(batch.student_text)), batch.teacher_text], 1))
        return open_clip_loss("ClipLoss")(normalize(fused_image), normalize(fused_text), self.logit_scale())
