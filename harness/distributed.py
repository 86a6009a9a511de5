"""torch.distributed plumbing: the environment torchrun or submitit exports, gathers, gradient averaging.

Gradients are averaged by hand (one flat all-reduce after backward) rather than through DistributedDataParallel:
a step runs the student several times (image, text, masked image) and the losses own parameters too, which
DDP's one-forward-per-backward contract does not fit. Every rank computes the same global loss from gathered
embeddings; the autograd all-gather sums the ranks' identical output gradients, so each rank's gradient is
world_size × its share and the average over ranks is exactly the single-process gradient.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK (torchrun, submitit), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, rank=env.rank, world_size=world_size)
    return env


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return collectives.all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def average_gradients(parameters) -> None:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights, loss-side parameters included."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank (a stop signal must stop all ranks together)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
