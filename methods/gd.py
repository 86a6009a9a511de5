import torch
import torch.nn.functional as F

from methods.base import DistillBatch, DistillMethod, normalize, projection
from methods.registry import register


def clip_loss_gradients(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor):
    """Closed-form ∂L/∂v and ∂L/∂u of the symmetric CLIP loss L = ½[CE(Z, I) + CE(Zᵀ, I)], Z = s·v uᵀ.

    With G = ½[(softmax_rows(Z) − I) + (softmax_rows(Zᵀ) − I)ᵀ] / B:  ∂L/∂v = s·G u,  ∂L/∂u = s·Gᵀ v.
    Memory is O(B² + B·D); the released code materialised a B×D×B tensor instead.
    """
    batch_size = image.shape[0]
    logits = logit_scale * image @ text.T
    identity = torch.eye(batch_size, device=image.device, dtype=image.dtype)
    residual = ((logits.softmax(dim=1) - identity) + (logits.T.softmax(dim=1) - identity).T) / (2 * batch_size)
    return logit_scale * residual @ text, logit_scale * residual.T @ image


def sigmoid_loss_gradients(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor):
    """Closed-form ∂L/∂v and ∂L/∂u of SigLIP's loss L = −(1/B) Σ_ij log σ(y_ij z_ij), z = s·v uᵀ + b, y = 2I − 1
    (open_clip's ``SigLipLoss``): with G_ij = −y_ij σ(−y_ij z_ij) / B,  ∂L/∂v = s·G u,  ∂L/∂u = s·Gᵀ v."""
    batch_size = image.shape[0]
    labels = 2 * torch.eye(batch_size, device=image.device, dtype=image.dtype) - 1
    logits = logit_scale * image @ text.T + logit_bias
    residual = -labels * torch.sigmoid(-labels * logits) / batch_size
    return logit_scale * residual @ text, logit_scale * residual.T @ image


def own_loss_gradients(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor | None):
    """The gradients of a model's own contrastive loss: SigLIP's where it has a logit bias, else CLIP's."""
    if logit_bias is None:
        return clip_loss_gradients(image, text, logit_scale)
    return sigmoid_loss_gradients(image, text, logit_scale, logit_bias)


@register("gd")
class GradientDistillation(DistillMethod):
    """GD: match the gradients of each model's own contrastive loss with respect to its embeddings.

    Paper §3.2 "Gradient Distillation":  L_GD = ‖∂L_T/∂v_T − ∂L_S/∂v_S‖² + ‖∂L_T/∂u_T − ∂L_S/∂u_S‖², each model's
    gradient taken at its own temperature (the released code inverted it), student embeddings after P and
    normalisation. Same element-mean convention as FD.
    A sigmoid (SigLIP) model's own loss is SigLIP's (a teacher with a logit bias; a student training with the
    sigmoid loss): its gradient, ∂L/∂v = s·G u with G_ij = −y_ij σ(−y_ij z_ij) / B, z = s·v uᵀ + b, y = 2I − 1.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__(student_dim, teacher_dim)
        self.project = projection(student_dim, teacher_dim)

    def forward(self, batch: DistillBatch):
        student_image = normalize(self.project(batch.student_image))
        student_text = normalize(self.project(batch.student_text))
        student_grads = own_loss_gradients(student_image, student_text, batch.student_logit_scale,
                                           batch.student_logit_bias)
        teacher_grads = own_loss_gradients(batch.teacher_image, batch.teacher_text, batch.teacher_logit_scale,
                                           batch.teacher_logit_bias)
        return sum(F.mse_loss(student, teacher) for student, teacher in zip(student_grads, teacher_grads))
