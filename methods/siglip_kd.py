import torch
import torch.nn.functional as F
from torch import nn

from methods import sigmoid_teachers_only
from methods.base import DistillBatch, DistillMethod, normalize
from methods.registry import register


@register("siglip_kd")
class SigmoidDistillation(DistillMethod):
    """SigLIP-KD: the teachers' pairwise sigmoid probabilities distilled into the student's, pair by pair.

    SigLIP (Zhai et al., ICCV 2023, §3.2) scores every image-text pair of the batch on its own: z_ij = s·v_i·u_jᵀ + b.
    With p̄_ij = (1/K) Σ_k σ(s_k v_k,i · u_k,jᵀ + b_k), the K teachers' probabilities averaged after the sigmoid, and
    the student's q_ij = σ(s_S v̂_S,i · û_S,jᵀ + b_S):
        L = (1/B) Σ_ij KL(Bern(p̄_ij) ‖ Bern(q_ij)),
    normalised per row as SigLIP's loss is. The student's bias is its own where it trains with the sigmoid loss, else
    one this method learns (initialised at ``init_bias``, SigLIP's -10). MobileCLIP2's ``DistillSigLipLoss``
    (apple/ml-mobileclip, ``training/open_clip_v2.patch``) uses −log σ((2p̄ − 1)·z) instead, which no finite z
    minimises for 0 < p̄ < 1; the KL is the cross-entropy less the teachers' entropy, zero where q = p̄.
    Teachers without a logit bias (CLIP teachers) have no sigmoid probabilities: refused.
    """

    def __init__(self, student_dim: int, teacher_dim: int, init_bias: float = -10.0):
        super().__init__(student_dim, teacher_dim)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    @classmethod
    def teacher_problem(cls, sigmoid: dict[str, bool]) -> str | None:
        return sigmoid_teachers_only("siglip_kd", sigmoid)

    def forward(self, batch: DistillBatch):
        if any(t.logit_bias is None for t in batch.ensemble):
            raise ValueError(sigmoid_teachers_only("siglip_kd", {"of this batch": False}))
        teacher = torch.stack([torch.sigmoid(t.logit_scale * t.image @ t.text.T + t.logit_bias)
                               for t in batch.ensemble]).mean(dim=0)
        bias = self.logit_bias if batch.student_logit_bias is None else batch.student_logit_bias
        student = batch.student_logit_scale * normalize(batch.student_image) @ normalize(batch.student_text).T + bias
        cross_entropy = F.binary_cross_entropy_with_logits(student, teacher, reduction="sum")
        entropy = -(torch.special.xlogy(teacher, teacher) + torch.special.xlogy(1 - teacher, 1 - teacher)).sum()
        return (cross_entropy - entropy) / student.shape[0]
