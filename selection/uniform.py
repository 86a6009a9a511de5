import torch

from selection.base import Selector, SuperBatch
from selection.registry import register


@register("uniform")
class Uniform(Selector):
    """Uniform: a random subset of the super-batch, drawn from (seed, step).

    The control of every other selector: the same super-batch and the same extra forward, no preference.
    """

    def scores(self, batch: SuperBatch) -> torch.Tensor:
        generator = torch.Generator().manual_seed(batch.seed * 1_000_003 + batch.step)
        return torch.rand(len(batch), generator=generator, dtype=torch.float64).to(batch.student_image.device)
