"""The optimiser: AdamW over the student and the loss-side parameters, with open_clip's weight-decay rule."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.config.specs import OptimSpec


def parameter_groups(*modules: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms and logit scales (ndim < 2)."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def adamw(modules: tuple[nn.Module, ...], optim: OptimSpec, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(*modules, weight_decay=optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        **({"fused": True} if device.type == "cuda" else {}),  # one kernel for all parameters
    )
