from methods.base import DistillBatch, ProjectedContrastive, normalize
from methods.registry import register
from methods.relational import kl_to


@register("xrd")
class CrossRelationalDistillation(ProjectedContrastive):
    """XRD (CLIP-RD): the two cross-modal teacher→student relations made symmetric.

    With v̂ = norm(P v_S), û = norm(P u_S) and a learnable scale s:
        A = s · v_T ûᵀ (teacher image → student text),  C = s · u_T v̂ᵀ (teacher text → student image);
        L_XRD = ¼ [KL(p(C) ‖ p(A)) + KL(p(A) ‖ p(C)) + KL(p(Aᵀ) ‖ p(Cᵀ)) + KL(p(Cᵀ) ‖ p(Aᵀ))],
    p = softmax row-wise, the first distribution of each KL a stopped target (the released ``XRD_loss``, whose
    student-anchored logits are the transposes Aᵀ, Cᵀ). The released code shares s with ICL; here XRD has its own.
    methods/relational.py says what is followed.
    A sigmoid (SigLIP) teacher: only its embeddings are read, not its scale or bias.
    """

    def forward(self, batch: DistillBatch):
        scale = self.logit_scale()
        image_to_text = scale * batch.teacher_image @ normalize(self.project(batch.student_text)).T
        text_to_image = scale * batch.teacher_text @ normalize(self.project(batch.student_image)).T
        pairs = ((text_to_image, image_to_text), (image_to_text.T, text_to_image.T))
        return sum(kl_to(a, b) + kl_to(b, a) for a, b in pairs) / 4
