from methods.base import DistillBatch, DistillMethod, LogitScale, diagonal_cross_entropy, normalize, projection
from methods.registry import register
from methods.relational import kl_to


@register("vrd")
class VerticalRelationalDistillation(DistillMethod):
    """VRD (CLIP-RD): teacher↔student relations within each modality, the image side held to the text side's.

    With v̂ = norm(P v_S), û = norm(P u_S) and one learnable scale per modality (s_v, s_u):
        Z_v = s_v · v_T v̂ᵀ (teacher image i against student image j),  Z_u = s_u · u_T ûᵀ;
        L_VRD = ½ [KL(p(Z_u) ‖ p(Z_v)) + KL(p(Z_uᵀ) ‖ p(Z_vᵀ))]                       (the text side a stopped target)
              + ½ [CE(Z_v, I) + CE(Z_vᵀ, I)] + ½ [CE(Z_u, I) + CE(Z_uᵀ, I)],
    p = softmax row-wise. The cross-entropy terms pair each sample's teacher and student embeddings of one modality;
    the released code weights them with VRD's weight (``alpha_VRD_loss``), so they are part of this term here.
    methods/relational.py says what is followed.
    A sigmoid (SigLIP) teacher: only its embeddings are read, not its scale or bias.
    """

    def __init__(self, student_dim: int, teacher_dim: int, init_temperature: float = 0.07):
        super().__init__(student_dim, teacher_dim)
        self.project = projection(student_dim, teacher_dim)
        self.image_scale = LogitScale(init_temperature)
        self.text_scale = LogitScale(init_temperature)

    def forward(self, batch: DistillBatch):
        image = self.image_scale() * batch.teacher_image @ normalize(self.project(batch.student_image)).T
        text = self.text_scale() * batch.teacher_text @ normalize(self.project(batch.student_text)).T
        consistency = (kl_to(text, image) + kl_to(text.T, image.T)) / 2
        pairing = sum((diagonal_cross_entropy(z) + diagonal_cross_entropy(z.T)) / 2 for z in (image, text))
        return consistency + pairing
