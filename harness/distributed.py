"""torch.distributed plumbing: the process group and device of a process, gathers, sharded evaluation, a stop vote.

Gradients are averaged by DistributedDataParallel around the student and its losses as one module (train.py:
``StepModule``), so their all-reduce overlaps backward. Every rank computes the same global loss from gathered
embeddings; the autograd all-gather sums the ranks' identical output gradients, so each rank's gradient is
world_size × its share and DDP's average over ranks is exactly the single-process gradient.

The group (``plan_process_group``): with CUDA it has two backends, ``cpu:gloo,cuda:nccl``. Embeddings, gradients
and weights are CUDA tensors and go over NCCL; the control messages (a stop flag, object broadcasts, barriers)
are CPU tensors and go over gloo. An NCCL-only group refuses CPU tensors ("No backend type associated with device
type cpu"); moving each control message to the GPU instead would make it a device round trip that waits for the
GPU's queue, where over gloo it never touches the GPU.

No collective waits on one rank's long work: the teacher cache's ranks meet only after they all embedded their
shares (teacher_cache.py), and evaluation during training is sharded over the ranks (evals/zeroshot.py). The
group keeps torch's default timeout (NCCL's watchdog: 10 minutes).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from harness.errors import ClipkdError

CPU_AND_CUDA_BACKENDS = "cpu:gloo,cuda:nccl"


class DistributedSetupError(ClipkdError, RuntimeError):
    pass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class GroupPlan:
    backend: str
    device: torch.device


def plan_process_group(local_rank: int, cuda_available: bool, visible_devices: int) -> GroupPlan:
    """The backend of the process group and this process's device.

    The device is chosen from the GPUs the task can see: ``cuda:LOCAL_RANK`` when it sees every GPU of its node,
    ``cuda:0`` when it sees one (a site that binds a GPU per task: ``--gpus-per-task``, ``--gpu-bind``; what
    open_clip_train's ``--no-set-device-rank`` is for)."""
    if not cuda_available:
        return GroupPlan("gloo", torch.device("cpu"))
    if visible_devices == 1:
        return GroupPlan(CPU_AND_CUDA_BACKENDS, torch.device("cuda", 0))
    if local_rank < visible_devices:
        return GroupPlan(CPU_AND_CUDA_BACKENDS, torch.device("cuda", local_rank))
    raise DistributedSetupError(
        f"LOCAL_RANK {local_rank}, but this process sees {visible_devices} GPUs (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give each task one GPU or every GPU of its node")


def init_distributed(timeout: datetime.timedelta | None = None) -> DistEnv:
    """This process's rank and device; joins the process group that RANK/WORLD_SIZE/LOCAL_RANK (torchrun,
    submitit) describe, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    plan = plan_process_group(local_rank, cuda, torch.cuda.device_count() if cuda else 0)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    if world_size == 1:
        return DistEnv(device=plan.device)
    if "RANK" not in os.environ:
        raise DistributedSetupError(f"WORLD_SIZE is {world_size} but RANK is not set: start the processes with "
                                    "torchrun or srun, or unset WORLD_SIZE")
    env = DistEnv(int(os.environ["RANK"]), world_size, local_rank, plan.device)
    if not dist.is_initialized():
        dist.init_process_group(backend=plan.backend, rank=env.rank, world_size=world_size,
                                **({"timeout": timeout} if timeout else {}))
    return env


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (equal row counts), concatenated in rank order; the gradient of each rank's rows is the
    sum of all ranks' output gradients for them.

    Deliberately not torch's functional ``all_gather_single`` (``_functional_collectives``): on gloo, two-process
    accumulated steps with it aborted with a corrupted heap in 2 of 6 runs (``malloc(): unaligned tcache chunk``,
    ``tests/test_accumulation.py``), none in 26 with these synchronous collectives; ``torch.distributed.nn``'s
    gather is deprecated and on gloo runs a scatter per rank in its backward."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return _Gather.apply(x)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return gather(x)

    @staticmethod
    @once_differentiable  # no method differentiates a gradient through the gather (GD's gradients are closed-form)
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)  # all-reduced in place: autograd's grad stays
        dist.all_reduce(total)
        return total.tensor_split(dist.get_world_size())[dist.get_rank()]


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def my_share(count: int) -> range:
    """This rank's contiguous share of ``count`` items (sizes differ by one at most)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return range(count)
    rank, world = dist.get_rank(), dist.get_world_size()
    return range(count * rank // world, count * (rank + 1) // world)


@torch.no_grad()
def gather_shares(x: torch.Tensor, count: int) -> torch.Tensor:
    """Every rank's rows of ``my_share(count)``, in order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    world = dist.get_world_size()
    sizes = [count * (r + 1) // world - count * r // world for r in range(world)]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x``, whatever their number, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    sizes = [torch.empty(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(size) for size in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def data_parallel(module: torch.nn.Module, device: torch.device, grad_compression: str = "none") -> torch.nn.Module:
    """``module`` under DistributedDataParallel, its gradients all-reduced as backward runs; with
    ``grad_compression`` "bf16" they cross as bfloat16 (torch's ``bf16_compress_hook``: half float32's bytes, for
    the links between nodes, at 8 bits of mantissa)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
    from torch.nn.parallel import DistributedDataParallel

    parallel = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       static_graph=True, gradient_as_bucket_view=True)
    if grad_compression == "bf16":
        parallel.register_comm_hook(None, bf16_compress_hook)
    return parallel


@torch.no_grad()
def average_gradients(parameters: list[torch.nn.Parameter], grad_compression: str = "none") -> None:
    """DistributedDataParallel's average of the ranks' gradients, for a step whose backward passes ran outside it
    (train.accum_freq): one all-reduce per dtype of every gradient flattened, after the step's last backward;
    with ``grad_compression`` "bf16", rounded as ``bf16_compress_hook`` rounds them (cast, divide, sum, cast back)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        if grad_compression == "bf16":
            flat = flat.to(torch.bfloat16)
        flat.div_(dist.get_world_size())
        dist.all_reduce(flat)
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))


@torch.no_grad()
def broadcast_from_main(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, as DistributedDataParallel starts."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor, src=0)


class StopVote:
    """Whether some rank wants to stop (a stop signal must stop all ranks at the same step), agreed without a wait:
    each step starts an all-reduce of this rank's wish (a CPU tensor, over the group's gloo backend) and reads the
    one started a step before, done by then. All ranks read the same votes in the same order, so they stop
    together, one step after the signal."""

    def __init__(self):
        self._pending = None

    def __call__(self, wish: bool) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return wish
        vote = torch.tensor([int(wish)])
        work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, async_op=True)
        previous, self._pending = self._pending, (work, vote)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1][0])

    def close(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def from_main(value):
    """Rank 0's ``value`` on every rank (over the group's CPU backend: it never waits for a GPU)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
