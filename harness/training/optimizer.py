"""The optimiser: AdamW over the student and the loss-side parameters, with open_clip's weight-decay rule."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from harness.config.specs import OptimSpec


def parameter_groups(*modules: nn.Module, weight_decay: float, apart: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms and logit scales (ndim < 2); parameters in
    ``apart`` (by id) are left to a group of their own."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in apart:
                continue
            exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def adamw(modules: tuple[nn.Module, ...], optim: OptimSpec, device: torch.device,
          own_rate: tuple[nn.Module, float] | None = None) -> torch.optim.AdamW:
    """AdamW; ``own_rate`` (module, learning rate) gives a module's parameters a constant rate of their own after
    the warmup, without weight decay (``scheduled``): the masks of automatic inheritance, which keep choosing
    the units to prune while the weights' rate decays."""
    groups = parameter_groups(*modules, weight_decay=optim.weight_decay,
                              apart=frozenset(map(id, own_rate[0].parameters())) if own_rate else frozenset())
    if own_rate is not None:
        groups.append({"params": list(own_rate[0].parameters()), "weight_decay": 0.0, "own_lr": own_rate[1]})
    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        **({"fused": True} if device.type == "cuda" else {}),  # one kernel for all parameters
    )


def scheduled(schedule: Callable[[int], float], optimizer: torch.optim.Optimizer,
              warmup_steps: int) -> Callable[[int], float]:
    """open_clip's schedule, which sets one rate on every group; a group with ``own_lr`` warms up as open_clip's
    does ((step + 1) / warmup of it) and then holds it."""
    def step(n: int) -> float:
        lr = schedule(n)
        for group in optimizer.param_groups:
            if "own_lr" in group:
                group["lr"] = group["own_lr"] * min(1.0, (n + 1) / warmup_steps if warmup_steps else 1.0)
        return lr
    return step
