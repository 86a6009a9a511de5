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
shares (harness/teachers/), and evaluation during training is sharded over the ranks (evals/zeroshot.py). The
group's timeout is set explicitly (``train.collective_timeout_s``, 10 minutes by default): torch's own default for
a ``cpu:gloo,cuda:nccl`` group is gloo's 30 minutes, not NCCL's 10.

No rank decides alone. A decision one rank can take between steps (a bad sample under ``data.bad_samples: error``,
a stop signal) travels in the step's vote (``StepVote``) and every rank acts on it at the same step with the same
message. An exception anywhere else on one rank is posted to the group's store before it ends that process
(``failures_shared``): a rank whose collective then fails raises that message, not the transport's.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from core.errors import ClipkdError

CPU_AND_CUDA_BACKENDS = "cpu:gloo,cuda:nccl"
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # train.collective_timeout_s's default: a collective that waits longer fails
FAILURE_KEY = "clipkd/failure"  # in the group's store: the first message of a rank that failed


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


def init_distributed(timeout_s: float | None = None) -> DistEnv:
    """This process's rank and device; joins the process group that RANK/WORLD_SIZE/LOCAL_RANK (torchrun,
    submitit) describe, if any, whose collectives fail after ``timeout_s`` seconds (DEFAULT_COLLECTIVE_TIMEOUT_S
    when None; the first call in a process sets it)."""
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
        timeout = datetime.timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S if timeout_s is None else timeout_s)
        dist.init_process_group(backend=plan.backend, rank=env.rank, world_size=world_size, timeout=timeout)
    return env


def grouped() -> bool:
    """Whether this process is in a process group: then every collective below runs, even in a group of one
    (benchmarks/gpu_check.py runs NCCL's and gloo's paths so on one GPU); alone, each is its one-process result."""
    return dist.is_initialized()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (equal row counts), concatenated in rank order. Every rank computes the same loss from
    the same gathered rows, so the sum over ranks of their output gradients for this rank's rows is world_size
    times this rank's own: the backward takes that product, exactly, instead of an all-reduce of the whole
    gathered gradient (one collective a step fewer, and in bf16 no ring sum of W equal values to round).

    Deliberately not torch's functional ``all_gather_single`` (``_functional_collectives``): on gloo, two-process
    accumulated steps with it aborted with a corrupted heap in 2 of 6 runs (``malloc(): unaligned tcache chunk``,
    ``tests/test_accumulation.py``), none in 26 with these synchronous collectives; ``torch.distributed.nn``'s
    gather is deprecated and on gloo runs a scatter per rank in its backward."""
    if not grouped():
        return x
    return _Gather.apply(x)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return gather(x)

    @staticmethod
    @once_differentiable  # no method differentiates a gradient through the gather (GD's gradients are closed-form)
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        return grad.tensor_split(world)[dist.get_rank()] * world


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    if not grouped():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class Redistribution:
    """Deals the rows ``chosen`` (the same ascending global indices on every rank) of a global array whose
    rank-ordered, equal blocks of ``held`` rows the ranks hold: rank r takes the r-th equal block of ``chosen``, so
    that gathering the results gives the global array's rows ``chosen``, as one process's ``x[chosen]``. Each row
    crosses once (``all_to_all_single``), from the rank that holds it to the rank that takes it. The split sizes are
    read to the host once, here, and serve every tensor of a batch."""

    def __init__(self, chosen: torch.Tensor, held: int):
        self.chosen = chosen
        if not grouped():
            return
        world, rank = dist.get_world_size(), dist.get_rank()
        self.share = len(chosen) // world
        source = torch.div(chosen, held, rounding_mode="floor")  # the rank holding each chosen row
        taker = torch.arange(len(chosen), device=chosen.device) // self.share
        sent = source == rank  # in ascending order: grouped by taker
        self.rows = chosen[sent] - rank * held
        counts = torch.stack([torch.bincount(taker[sent], minlength=world),
                              torch.bincount(source[taker == rank], minlength=world)]).tolist()
        self.send_counts, self.receive_counts = counts

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's block of the chosen rows, ``x`` being its block of the global array."""
        if not grouped():
            return x[self.chosen]
        received = x.new_empty((self.share, *x.shape[1:]))
        dist.all_to_all_single(received, x[self.rows].contiguous(), self.receive_counts, self.send_counts)
        return received


def my_share(count: int) -> range:
    """This rank's contiguous share of ``count`` items (sizes differ by one at most; empty for some ranks when
    there are fewer items than ranks: ``gather_rows`` takes an empty share as None)."""
    if not grouped():
        return range(count)
    rank, world = dist.get_rank(), dist.get_world_size()
    return range(count * rank // world, count * (rank + 1) // world)


class NothingToGather(ValueError):
    """No rank had rows for ``gather_rows``: what was to be gathered is empty everywhere."""


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
           torch.bool)
_MAX_DIMS = 4


@torch.no_grad()
def gather_rows(x: torch.Tensor | None, device: torch.device | None = None) -> torch.Tensor:
    """Every rank's rows of ``x``, whatever their number, concatenated in rank order, on every rank. A rank with
    nothing to contribute (an empty share: fewer classes or items than ranks) passes None and takes its shape and
    dtype from the others, so no rank has to run a library on an empty list to learn them. The shapes cross as a
    small CPU tensor (over gloo in a ``cpu:gloo,cuda:nccl`` group: no wait on a GPU); the rows on ``x``'s device
    (``device`` where ``x`` is None)."""
    if not grouped():
        if x is None:
            raise NothingToGather("gather_rows: no rows in one process")
        return x
    if x is not None and (x.dim() > _MAX_DIMS or x.dtype not in _DTYPES):
        raise ValueError(f"gather_rows: {x.dim()} dims of {x.dtype}; at most {_MAX_DIMS} of {_DTYPES}")
    world = dist.get_world_size()
    mine = torch.full((3 + _MAX_DIMS,), -1, dtype=torch.long)  # rows (-1: none), dtype, dims, trailing shape
    if x is not None:
        mine[:3] = torch.tensor([len(x), _DTYPES.index(x.dtype), x.dim()])
        mine[3:3 + x.dim() - 1] = torch.tensor(x.shape[1:], dtype=torch.long)
    shapes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine)
    known = next((s for s in shapes if s[0] >= 0), None)
    if known is None:  # every rank sees the same shapes: all raise together
        raise NothingToGather("gather_rows: no rank has rows to gather")
    dtype, trailing = _DTYPES[int(known[1])], [int(d) for d in known[3:3 + int(known[2]) - 1]]
    sizes = [max(0, int(s[0])) for s in shapes]
    device = x.device if x is not None else device or torch.device("cpu")
    padded = torch.zeros((max(sizes), *trailing), dtype=dtype, device=device)
    if x is not None:
        padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
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
    if not grouped():
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


@dataclass(frozen=True)
class Decision:
    """What the ranks agreed at a step: stop (a signal reached some rank), or raise ``failure`` (a rank took a stop
    decision of its own, such as a bad sample under ``data.bad_samples: error``: every rank raises that rank's
    exception, marked ``every_rank``)."""
    stop: bool = False
    failure: Exception | None = None


class StepVote:
    """Each step, every rank's wish to stop and any failure it found, agreed without a wait: each step starts an
    all-reduce of this rank's flags (a CPU tensor, over the group's gloo backend) and reads the one started a
    step before, done by then. All ranks read the same votes in the same order, so they stop or fail together,
    one step after the rank that asked; a failure's message then crosses in one object gather, so every rank
    raises the same words. ``settle`` also waits for this step's vote: before a checkpoint, so that no
    checkpoint holds a step some rank had already refused."""

    def __init__(self):
        self._pending = None
        self._failure: Exception | None = None  # this rank's, until the ranks have heard it

    def __call__(self, stop: bool, failure: Exception | None = None, settle: bool = False) -> Decision:
        self._failure = self._failure or failure
        if not grouped():
            return Decision(stop, _every_rank(self._failure))
        flags = torch.tensor([int(stop), int(self._failure is not None)])
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
        previous, self._pending = self._pending, (work, flags)
        heard = [previous] if previous is not None else []
        if settle:
            heard.append(self._pending)
            self._pending = None
        agreed = torch.zeros(2, dtype=torch.long)
        for pending_work, pending_flags in heard:
            pending_work.wait()
            agreed = torch.maximum(agreed, pending_flags)
        if not agreed[1]:
            return Decision(bool(agreed[0]))
        self.close()
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, self._failure)
        return Decision(bool(agreed[0]), _every_rank(next(m for m in messages if m is not None)))

    def close(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def _every_rank(error: Exception | None) -> Exception | None:
    if error is not None:
        error.every_rank = True  # raised by all ranks at once: failures_shared has nothing to tell the others
    return error


class RankFailed(ClipkdError, RuntimeError):
    """Another rank of this run failed; its message, which the group's store carried."""


def _group_store():
    """The store the process group met on (torchrun's agent, or rank 0's TCPStore), or None. A private torch
    function: torch.distributed has no public accessor for the default group's store."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


@contextlib.contextmanager
def failures_shared() -> Iterator[None]:
    """An exception on this rank is posted to the group's store (the first rank's message is kept) before it ends
    the process; when this rank's own exception is a collective failing because a peer is gone (its process
    ended: gloo fails at once; under NCCL, srun's ``--kill-on-bad-exit`` and torchrun stop the others), the
    peer's message is raised instead of the transport's, so every rank reports what went wrong."""
    try:
        yield
    except Exception as error:
        alone = grouped() and not getattr(error, "every_rank", False)
        store = _group_store() if alone else None
        if store is None:
            raise
        try:
            mine = f"rank {dist.get_rank()}: {type(error).__name__}: {error}".encode()
            posted = store.compare_set(FAILURE_KEY, b"", mine)  # set when unset; the value now stored
        except Exception:  # the store has gone with its host (rank 0): this rank's own error stands
            raise error from None
        if posted != mine:
            raise RankFailed(f"{posted.decode()} (this rank stopped with it: {type(error).__name__})") from None
        raise


def from_main(value):
    """Rank 0's ``value`` on every rank (over the group's CPU backend: it never waits for a GPU)."""
    if not grouped():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
