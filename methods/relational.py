"""What CLIP-RD's relational terms share (Chung et al., "CLIP-RD: Relational Distillation for Efficient CLIP
Knowledge Distillation", arXiv 2603.25383, 2026; code Rosieyang01/CLIP-RD @ 3b22493, ``src/open_clip/loss.py``).

Only the paper's abstract could be read here, not its equations, so hrd, vrd, xrd and clip_rd follow the released
code's definitions and name no equation numbers; where that code is defective clipkd does otherwise, as for
CLIP-KD (DESIGN.md §1): its learnable scales are multipliers initialised at log(1/0.07) ≈ 2.66 and never
exponentiated (an effective temperature of 0.38, not 0.07) nor clamped; here each is a ``LogitScale``
(exponentiated, clamped at 100). Its single-process path crashes when the dims differ (the projected features it
normalises are not defined there); its two projections (one per modality) are one P here, the convention of the
CLIP-KD methods.
"""
import torch
import torch.nn.functional as F


def kl_to(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) ‖ softmax(logits)) row-wise, averaged over rows (the released ``DistillKL`` at T = 1),
    the target a stopped gradient."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(target_logits.detach(), dim=1), reduction="batchmean",
                    log_target=True)
