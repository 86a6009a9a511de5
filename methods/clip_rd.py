from torch import nn

from methods.base import DistillBatch, DistillMethod, projection
from methods.fd import FeatureDistillation
from methods.hrd import HorizontalRelationalDistillation
from methods.icl import InteractiveContrastiveLearning
from methods.registry import register
from methods.vrd import VerticalRelationalDistillation
from methods.xrd import CrossRelationalDistillation


@register("clip_rd")
class ClipRD(DistillMethod):
    """CLIP-RD's recipe: FD + ICL + HRD + VRD + XRD, weighted as in its released script, one projection shared.

    L = w_FD L_FD + w_ICL L_ICL + w_HRD L_HRD + w_VRD L_VRD + w_XRD L_XRD, the task loss added by the trainer.
    The weights default to the released script's (``script/ViT_B_16_Laion400M/ViT_T_16_RD.sh``: FD 2000, the others
    1); one projection P is shared by every term, as the released code shares its projections. Each term has its
    own scales; ``distill: {fd: 2000, icl: 1, hrd: 1, vrd: 1, xrd: 1}`` trains the same sum with a projection per
    term, and lets an ablation take it apart (methods/relational.py says what is followed).
    A sigmoid (SigLIP) teacher: as each of its terms says (HRD reads its softmax, where the bias cancels).
    """

    def __init__(self, student_dim: int, teacher_dim: int, fd: float = 2000.0, icl: float = 1.0, hrd: float = 1.0,
                 vrd: float = 1.0, xrd: float = 1.0):
        super().__init__(student_dim, teacher_dim)
        self.project = projection(student_dim, teacher_dim)
        self.weights = {"fd": fd, "icl": icl, "hrd": hrd, "vrd": vrd, "xrd": xrd}
        self.terms = nn.ModuleDict({
            "fd": FeatureDistillation(student_dim, teacher_dim), "icl": InteractiveContrastiveLearning(student_dim, teacher_dim),
            "hrd": HorizontalRelationalDistillation(student_dim, teacher_dim),
            "vrd": VerticalRelationalDistillation(student_dim, teacher_dim),
            "xrd": CrossRelationalDistillation(student_dim, teacher_dim),
        })
        for term in self.terms.values():
            if hasattr(term, "project"):
                term.project = self.project

    def forward(self, batch: DistillBatch):
        return sum(self.weights[name] * term(batch) for name, term in self.terms.items())
