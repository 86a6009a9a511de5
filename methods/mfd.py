from methods.base import DistillBatch, DistillMethod, projection
from methods.fd import feature_mse
from methods.registry import register


@register("mfd")
class MaskedFeatureDistillation(DistillMethod):
    """MFD: feature distillation where the student sees a masked image and the teacher the full one.

    Paper §3.2 "Masked Feature Distillation":  L_MFD = ‖v_T − P v_S^mask‖² + ‖u_T − P u_S‖², where v_S^mask embeds
    the image with ``mask_ratio`` of its patch tokens dropped (MAE-style, no mask token). Same element-mean
    convention as FD. Unlike the released code, the masked embedding is really the one distilled.
    A sigmoid (SigLIP) teacher: only its embeddings are read, not its scale or bias.
    """

    def __init__(self, student_dim: int, teacher_dim: int, mask_ratio: float = 0.75):
        super().__init__(student_dim, teacher_dim)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mfd: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.image_mask_ratio = mask_ratio
        self.project = projection(student_dim, teacher_dim)

    def forward(self, batch: DistillBatch):
        if batch.student_image_masked is None:
            raise ValueError("mfd needs batch.student_image_masked (the trainer provides it when image_mask_ratio is set)")
        return feature_mse(batch.student_image_masked, batch.student_text, batch, self.project)
