import torch

from selection.base import Selector, SuperBatch, per_example_contrastive
from selection.registry import register


@register("hard")
class Hard(Selector):
    """Hard learner: the examples with the highest student contrastive loss.

    JEST (Evans et al. 2024, arXiv 2406.17711, §2.1 "hard learner") and ACID's ablation (Udandarao et al., CVPR
    2025, arXiv 2411.18674):  s_i = ℓ_i(θ_S), ℓ_i the example's CLIP loss within the super-batch
    (``per_example_contrastive``).
    """

    def scores(self, batch: SuperBatch) -> torch.Tensor:
        return per_example_contrastive(batch.student_image, batch.student_text, batch.student_logit_scale)
