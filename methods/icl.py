from methods.base import DistillBatch, ProjectedContrastive, diagonal_cross_entropy, normalize
from methods.registry import register


@register("icl")
class InteractiveContrastiveLearning(ProjectedContrastive):
    """ICL: InfoNCE with the student's embedding as anchor against the teacher's embeddings of the other modality.

    Paper §3.2 "Interactive Contrastive Learning":
        L_ICL = CE(P v_S · u_Tᵀ / τ_ICL, I) + CE(P u_S · v_Tᵀ / τ_ICL, I),
    τ_ICL learnable, initialised at ``init_temperature``, exponentiated and clamped like CLIP's.
    A sigmoid (SigLIP) teacher: only its embeddings are read, not its scale or bias.
    """

    def forward(self, batch: DistillBatch):
        scale = self.logit_scale()
        student_image = normalize(self.project(batch.student_image))
        student_text = normalize(self.project(batch.student_text))
        return diagonal_cross_entropy(scale * student_image @ batch.teacher_text.T) + diagonal_cross_entropy(
            scale * student_text @ batch.teacher_image.T
        )
