"""clipkd on a GPU machine in one command: the CUDA and NCCL paths checked and the step timed beside open_clip_train's.

    PYTHONPATH=build/gpu-site:. python3 benchmarks/gpu_check.py      # benchmarks/README.md: the install there

One PASS, FAIL or SKIP line per check, then a table; exits 1 when a check fails. Without CUDA it says so, runs
the same parts at a CPU scale (the benchmarks' small models) to show that they run, and exits 0 unless one of
them crashes. Each mode and check is caught apart (a crash fails that line, the others still give theirs), and
inductor, whose build needs a C compiler and Python's headers, runs last, after its prerequisites are checked.
On one H100 it should take under 8 minutes (estimated from its parts' sizes; it has not run on one yet), so that
it can run twice in a 15-minute slot with the machine's start.

1. step: ViT-B-16 teacher -> ViT-T-16 student, batch 256, bf16, on the un-augmented digits upscaled to 224 px:
   clipkd's no-KD, live-teacher and cached-teacher steps (CLIP-KD: task + FD + ICL + CRD) beside
   open_clip_train's own ``train_one_epoch`` (imported, not rewritten) on the same models, no-KD and
   ``--distill`` (open_clip's DistillClipLoss, live teacher): ms/step, images/s, peak memory, GPU utilisation.
2. syncs: 50 steps of clipkd's training loop (``Trainer.fit``, cached teacher) under
   ``torch.cuda.set_sync_debug_mode("error")`` on every step that is not a log step.
3. group: this process alone in the process group clipkd plans (``cpu:gloo,cuda:nccl``; gloo without CUDA), so
   that NCCL itself runs: DDP with the bf16 compression hook, the step vote, a barrier and an object broadcast,
   the autograd gather, gathering rows, an ``accum_freq: 2`` step (the CUDA RNG replay, the gradient average),
   MFD, an fp16 step with its GradScaler and an evaluation sharded through the group.
4. two ranks: a 2-process run through clipkd's process-group function on one GPU; CUDA tensors go over gloo there,
   since NCCL refuses two ranks on one GPU; its final weights against the 1-process run's (float64).
5. shards: a teacher-cache build (2 views) and a cached KD run fed by the loader over generated JPEG shards.
6. inductor: the cached step with ``train.compile: inductor`` (GPU only), beside the eager one.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CLIP_KD = {"fd": 2000, "icl": 1, "crd": 1}


@dataclass(frozen=True)
class Scale:
    device: torch.device
    teacher: str
    student: str
    batch: int
    precision: str
    steps: int  # timed steps per mode
    warmup: int
    sync_steps: int
    log_every: int
    shard_samples: int
    shard_size: int  # px of the generated JPEGs


def gpu_scale() -> Scale:
    return Scale(torch.device("cuda", 0), "ViT-B-16", "ViT-T-16", 256, "bf16", steps=20, warmup=5, sync_steps=50,
                 log_every=10, shard_samples=4096, shard_size=224)


def cpu_scale() -> Scale:
    return Scale(torch.device("cpu"), "bench-teacher", "bench-student", 32, "fp32", steps=2, warmup=1, sync_steps=6,
                 log_every=3, shard_samples=128, shard_size=96)


@dataclass
class Row:
    part: str
    what: str
    figure: str
    verdict: str = "PASS"  # PASS, FAIL or SKIP (a prerequisite of the machine is missing)

    @property
    def ok(self) -> bool:
        return self.verdict != "FAIL"


class Report:
    def __init__(self):
        self.rows: list[Row] = []

    def add(self, part: str, what: str, figure: str, ok: bool = True, verdict: str | None = None) -> None:
        self.rows.append(Row(part, what, figure, verdict or ("PASS" if ok else "FAIL")))
        print(f"{self.rows[-1].verdict:4s} {part:9s} {what:44s} {figure}", flush=True)

    def failed(self, part: str, what: str, error: BaseException) -> None:
        where = "".join(traceback.format_exception(error)[-4:]).strip().replace("\n", " | ")
        self.add(part, what, f"crashed: {type(error).__name__}: {error} [{where[-600:]}]", ok=False)

    @contextlib.contextmanager
    def check(self, part: str, what: str):
        """A check of its own: a crash inside fails this line only, and the script goes on to the next."""
        try:
            yield
        except Exception as error:
            self.failed(part, what, error)

    def table(self) -> str:
        widths = [max(len(getattr(r, f)) for r in self.rows) for f in ("part", "what")]
        lines = [f"| {'':4s} | {'part':{widths[0]}s} | {'check':{widths[1]}s} | figure |",
                 f"|------|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|--------|"]
        lines += [f"| {r.verdict:4s} | {r.part:{widths[0]}s} | {r.what:{widths[1]}s} | {r.figure} |" for r in self.rows]
        return "\n".join(lines)


# -- measuring -------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Utilisation:
    """The GPU's utilisation (nvidia-smi), sampled every 0.1 s in a thread while the block runs."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.index, self.samples, self._stop = device.index or 0, [], threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  f"--id={self.index}"], capture_output=True, text=True)
            with contextlib.suppress(ValueError):
                self.samples.append(float(out.stdout.strip()))
            self._stop.wait(0.1)

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def describe(self) -> str:
        return f"GPU {statistics.mean(self.samples):.0f} % busy" if self.samples else "GPU utilisation n/a"


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "peak memory n/a on CPU"
    return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def timed_steps(step, batches: list, scale: Scale) -> tuple[float, str]:
    """Median seconds of ``step(batch)`` over scale.steps steps after scale.warmup, each step ended by a device
    synchronisation; with the GPU's utilisation and peak memory of those steps."""
    if scale.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(scale.device)
    cycle = itertools.cycle(batches)
    for _ in range(scale.warmup):
        step(next(cycle))
    seconds = []
    with Utilisation(scale.device) as busy:
        for _ in range(scale.steps):
            synchronize(scale.device)
            started = time.perf_counter()
            step(next(cycle))
            synchronize(scale.device)
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), f"{peak_memory(scale.device)}, {busy.describe()}"


# -- 1. the step beside open_clip_train -------------------------------------------------------------------------
def clipkd_config(scale: Scale, folder: Path, teacher_file: Path | None, embeddings: str | None, data: dict,
                  steps: int, name: str, compile_backend: str | None = None):
    from harness.config.run_config import parse_config

    return parse_config({
        "name": name, "output_dir": str(folder / "runs"), "seed": 0, "student": {"model": scale.student},
        **({"teacher": {"model": scale.teacher, "pretrained": str(teacher_file), "embeddings": embeddings,
                        "views": 2 if data["dataset"] == "webdataset" else 0},
            "distill": CLIP_KD} if embeddings else {}),
        "data": data, "optim": {"warmup_steps": 10},
        "train": {"batch_size": scale.batch, "steps": steps, "precision": scale.precision,
                  "log_every": scale.log_every, "checkpoint_every": 10**6, "compile": compile_backend},
        "eval": {"batch_size": scale.batch},
    })


class _Epoch(list):
    """Batches as open_clip_train's ``data["train"]`` (a DataInfo): its dataloader with num_batches/num_samples."""

    def __init__(self, batches):
        super().__init__(batches)
        self.dataloader, self.num_batches, self.num_samples = self, len(batches), sum(len(b[0]) for b in batches)

    def set_epoch(self, epoch: int) -> None:
        pass


def open_clip_train_step(scale: Scale, teacher_file: Path, distill: bool):
    """A function running open_clip_train's own ``train_one_epoch`` over one batch: one of its steps."""
    import open_clip
    from open_clip.loss import ClipLoss, DistillClipLoss
    from open_clip_train.train import train_one_epoch

    from harness.models.build import model_name

    device = scale.device
    model = open_clip.create_model(model_name(scale.student), output_dict=True, device=device)
    teacher = None
    if distill:
        teacher = open_clip.create_model(model_name(scale.teacher), pretrained=str(teacher_file), output_dict=True,
                                         device=device, weights_only=False)
    precision = {"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}[scale.precision]
    args = SimpleNamespace(device=str(device), precision=precision, distill=distill, accum_freq=1, skip_scheduler=True,
                           horovod=False, grad_clip_norm=1.0, log_every_n_steps=10**9, world_size=1, rank=0,
                           local_rank=0, batch_size=scale.batch, wandb=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    loss = DistillClipLoss() if distill else ClipLoss()
    scaler = torch.amp.GradScaler("cuda") if scale.precision == "fp16" else None

    def step(batch) -> None:
        train_one_epoch(model, {"train": _Epoch([batch])}, loss, 0, optimizer, scaler, None, teacher, args)

    return step


def time_clipkd_mode(scale: Scale, folder: Path, teacher_file: Path, name: str, embeddings: str | None,
                     compile_backend: str | None = None) -> tuple[float, str, list]:
    """Seconds per clipkd step of one mode (a cached one builds its cache first, untimed), and its batches."""
    from core.distributed import DistEnv
    from harness.training.loop import Trainer

    config = clipkd_config(scale, folder, teacher_file, embeddings, {"dataset": "digits", "augment": False},
                           scale.warmup + scale.steps, f"step-{name}", compile_backend)
    trainer = Trainer(config, DistEnv(device=scale.device), scale.device)
    batches = [b.to(scale.device, trainer.dtype) for b in itertools.islice(trainer.data.epoch_batches(0, 0), 4)]
    seconds, notes = timed_steps(trainer.train_step, batches, scale)
    return seconds, notes, batches


def part_step(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> dict[str, float]:
    rates, peer_batches = {}, None
    for name, mode in (("no-KD", None), ("live", "live"), ("cached", "cached")):
        with report.check("1 step", f"clipkd {name}"):
            seconds, notes, batches = time_clipkd_mode(scale, folder, teacher_file, name, mode)
            rates[f"clipkd {name}"] = scale.batch / seconds
            report.add("1 step", f"clipkd {name}", f"{seconds * 1000:.1f} ms/step, {scale.batch / seconds:,.0f} "
                                                    f"images/s, {notes}")
            if mode is None:
                peer_batches = [(b.images, b.texts) for b in batches]
    for distill in (False, True):
        name = "open_clip_train " + ("--distill" if distill else "no-KD")
        with report.check("1 step", name):
            if peer_batches is None:
                raise RuntimeError("no batches: clipkd's no-KD mode did not run")
            seconds, notes = timed_steps(open_clip_train_step(scale, teacher_file, distill), peer_batches, scale)
            rates[name] = scale.batch / seconds
            report.add("1 step", name, f"{seconds * 1000:.1f} ms/step, {scale.batch / seconds:,.0f} images/s, {notes}")
    gpu = scale.device.type == "cuda"
    for ours, theirs, target in (("clipkd cached", "open_clip_train no-KD", 0.95),
                                 ("clipkd cached", "open_clip_train --distill", 3.0),
                                 ("clipkd live", "open_clip_train --distill", None)):
        if ours in rates and theirs in rates:
            ratio = rates[ours] / rates[theirs]
            report.add("1 step", f"{ours} ÷ {theirs}", f"{ratio:.2f}x images/s" +
                       (f" (target >= {target:g})" if target else ""), ok=not gpu or target is None or ratio >= target)
    return rates


# -- 2. host syncs -----------------------------------------------------------------------------------------------
def part_syncs(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> None:
    from core.distributed import DistEnv
    from harness.training.loop import Trainer

    config = clipkd_config(scale, folder, teacher_file, "cached", {"dataset": "digits", "augment": False},
                           scale.sync_steps, "syncs")
    trainer = Trainer(config, DistEnv(device=scale.device), scale.device)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    train_step, reads = trainer.train_step, []

    def guarded(batch):
        log_step = (trainer.step + 1) % scale.log_every == 0
        if scale.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default" if log_step else "error")
        return train_step(batch)

    trainer.train_step = guarded
    with counting_host_reads(lambda: trainer.step, reads):
        try:
            trainer.fit()
        finally:
            if scale.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    outside = sorted({step for step in reads if step % scale.log_every})
    figure = f"{scale.sync_steps} steps, log every {scale.log_every}: "
    if scale.device.type == "cuda":
        report.add("2 syncs", 'no sync outside log steps (mode "error")', figure + "none")
    else:  # no CUDA: the host reads of tensor values that would be syncs on a GPU, counted
        report.add("2 syncs", "tensor reads outside log steps (CPU count)",
                   figure + (f"at steps {outside[:8]}" if outside else "none"), ok=True)


@contextlib.contextmanager
def counting_host_reads(current_step, reads: list):
    """Records the step of every ``Tensor.item``/``tolist``/``__float__`` call (each a sync on a GPU)."""
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__bool__")}

    def counted(name):
        def read(self, *args, **kwargs):
            reads.append(current_step())
            return saved[name](self, *args, **kwargs)
        return read

    for name in saved:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


# -- 3. the process group, NCCL included, with this one process ---------------------------------------------------
def _tiny_config(folder: Path, teacher_file: Path, name: str, precision: str = "fp32", **changes):
    from harness.config.run_config import parse_config

    train = {"batch_size": 32, "steps": 2, "precision": precision, "log_every": 1, **changes.pop("train", {})}
    return parse_config({
        "name": name, "output_dir": str(folder / "group"), "seed": 1, "student": {"model": "clipkd-tiny"},
        "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher_file)},
        "distill": CLIP_KD, "data": {"dataset": "digits", "workers": 0}, "optim": {"warmup_steps": 1},
        "train": train, "eval": {"workers": 0}, **changes})


def part_group(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> None:
    """This process alone in the group clipkd plans: every collective of clipkd's runs over its real backend (the
    functions skip none in a group, even of one), NCCL for CUDA tensors and gloo for the control messages."""
    import torch.distributed as dist

    from core.distributed import DistEnv, StepVote, from_main, gather_rows, gather_with_grad, plan_process_group
    from harness.models.build import create_clip

    device, cuda = scale.device, scale.device.type == "cuda"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    plan = plan_process_group(0, cuda, torch.cuda.device_count() if cuda else 0)
    dist.init_process_group(backend=plan.backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    env = DistEnv(0, 1, 0, device)
    tiny_teacher = folder / "group-teacher.pt"
    torch.manual_seed(3)
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, tiny_teacher)
    try:
        with report.check("3 group", "barrier, broadcast, step vote (gloo)"):
            dist.barrier()
            vote = StepVote()
            heard = [vote(False), vote(True), vote(False)]
            refused = vote(False, ValueError("rank 0 refused"), settle=True)
            ok = from_main({"step": 3}) == {"step": 3} and [d.stop for d in heard] == [False, False, True] \
                and str(refused.failure) == "rank 0 refused"
            report.add("3 group", "barrier, broadcast, step vote (gloo)", f"{plan.backend}: stop heard one step "
                       "later, a failure's message at once when settled", ok=ok)
        with report.check("3 group", "autograd gather, gather_rows"):
            x = torch.randn(8, 16, device=device, requires_grad=True)
            weights = torch.randn(8, 16, device=device)
            (gather_with_grad(x) * weights).sum().backward()
            rows = gather_rows(torch.arange(6, device=device).view(3, 2))
            ok = torch.equal(x.grad, weights) and torch.equal(rows, torch.arange(6, device=device).view(3, 2))
            report.add("3 group", "autograd gather, gather_rows", f"on {device.type} tensors: the gradient and the "
                       "rows as one process has them", ok=ok)
        with report.check("3 group", "DDP with the bf16 compression hook"):
            report.add("3 group", "DDP with the bf16 compression hook", *_ddp_bf16(folder, tiny_teacher, device, env))
        with report.check("3 group", "accum_freq 2 step = accum_freq 1 step"):
            report.add("3 group", "accum_freq 2 step = accum_freq 1 step",
                       *_accumulated(folder, tiny_teacher, device, env))
        for what, changes in (("MFD (masked pass)", {"distill": {**CLIP_KD, "mfd": 2000}}),
                              ("fp16 with its GradScaler", {"precision": "fp16"})):
            with report.check("3 group", what):
                if what.startswith("fp16") and not cuda:
                    report.add("3 group", what, "fp16 training is for GPUs", verdict="SKIP")
                    continue
                report.add("3 group", what, *_runs(folder, tiny_teacher, device, env, what, changes))
        with report.check("3 group", "evaluation sharded through the group"):
            report.add("3 group", "evaluation sharded through the group", *_evaluates(device))
    finally:
        dist.destroy_process_group()


def _ddp_bf16(folder: Path, teacher_file: Path, device: torch.device, env) -> tuple[str, bool]:
    """A step's gradients through DistributedDataParallel with the bf16 hook: in a group of one, each gradient
    is its own value rounded to bf16, and back."""
    from core.distributed import data_parallel
    from harness.data.batch import Batch
    from harness.training.loop import Trainer
    from harness.training.objective import StepModule

    grads = []
    for hooked in (False, True):
        trainer = Trainer(_tiny_config(folder, teacher_file, "ddp"), env, device)
        module = StepModule(trainer.student.model, trainer.objective)
        module = data_parallel(module, device, "bf16") if hooked else module
        batch: Batch = next(iter(trainer.data.batches(0, 1))).to(device)
        trainer.objective.total(module(batch, trainer.teacher, None)).backward()
        grads.append({n: p.grad.clone() for n, p in trainer.student.model.named_parameters() if p.grad is not None})
    plain, hooked = grads
    worst = max(float((hooked[n] - g.to(torch.bfloat16).float()).abs().max()) for n, g in plain.items())
    scale = max(float(g.abs().max()) for g in plain.values())
    return f"gradients = bf16(own) to {worst / scale:.1e} of the largest (bf16's step: 3.9e-3)", worst <= 2**-8 * scale


def _accumulated(folder: Path, teacher_file: Path, device: torch.device, env) -> tuple[str, bool]:
    """One step at accum_freq 2 (micro-batches replayed from their CPU and CUDA RNG states, the gradient averaged
    through the group) against one at accum_freq 1, in float64: the same gradients."""
    from harness.training.loop import Trainer

    grads = []
    for accum in (1, 2):
        trainer = Trainer(_tiny_config(folder, teacher_file, f"accum{accum}", "fp64", train={"accum_freq": accum}),
                          env, device)
        trainer.train_step(next(iter(trainer.data.batches(0, 1))).to(device, trainer.dtype))
        grads.append({n: p.grad.cpu() for n, p in trainer.student.model.named_parameters() if p.grad is not None})
    worst = max(float((grads[1][n] - g).abs().max() / g.abs().max().clamp_min(1e-300)) for n, g in grads[0].items())
    return f"float64 gradients equal to {worst:.1e} of a tensor's scale", worst < 1e-9


def _runs(folder: Path, teacher_file: Path, device: torch.device, env, what: str, changes: dict) -> tuple[str, bool]:
    from harness.training.loop import Trainer

    precision = changes.pop("precision", "fp32")
    trainer = Trainer(_tiny_config(folder, teacher_file, what.split()[0].lower(), precision, **changes), env, device)
    values = [trainer.train_step(batch.to(device, trainer.dtype))[1] for batch in trainer.data.batches(0, 3)]
    finite = all(bool(torch.isfinite(v).all()) for v in values)
    scaler = f", loss scale {trainer.scaler.get_scale():g}" if trainer.scaler.is_enabled() else ""
    return f"3 steps, losses {'finite' if finite else 'NOT finite'}: {values[-1].tolist()[:3]}{scaler}", finite


def _evaluates(device: torch.device) -> tuple[str, bool]:
    from evals.datasets import load_eval_set
    from evals.zeroshot import zero_shot_metrics
    from harness.models.build import create_clip

    bundle = create_clip("clipkd-tiny", device=device)
    result = zero_shot_metrics(bundle.model, bundle.tokenizer, load_eval_set("digits", None, bundle.preprocess_eval),
                               device, 128)
    return f"digits: top-1 {result.metrics['acc1']:.3f}, {len(result.items['acc1'])} items", \
        len(result.items["acc1"]) == len(load_eval_set("digits", None, bundle.preprocess_eval).classification)


# -- 3. two ranks on one GPU -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, config: dict) -> None:
    import torch.distributed as dist

    from harness.config.run_config import parse_config
    from harness.training.loop import train

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init = dist.init_process_group
    # NCCL refuses two ranks on one GPU; gloo carries CUDA tensors for broadcast, all_reduce and all_gather
    dist.init_process_group = lambda backend, **kw: init(backend.replace("cuda:nccl", "cuda:gloo"), **kw)
    torch.set_num_threads(1)
    train(parse_config(config))


def part_two_ranks(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> None:
    from core.distributed import plan_process_group
    from harness.config.run_config import parse_config
    from harness.models.build import create_clip
    from harness.training.loop import train

    cuda = scale.device.type == "cuda"
    plan = plan_process_group(0, cuda, torch.cuda.device_count() if cuda else 0)
    tiny_teacher = folder / "tiny-teacher.pt"
    torch.manual_seed(3)
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, tiny_teacher)
    configs = {}
    for world in (1, 2):
        configs[world] = parse_config({
            "name": f"ranks-{world}", "output_dir": str(folder / f"ranks-{world}"), "seed": 1,
            "student": {"model": "clipkd-tiny"},
            "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(tiny_teacher)},
            "distill": CLIP_KD, "data": {"dataset": "digits", "workers": 0}, "optim": {"warmup_steps": 2},
            "train": {"batch_size": 64, "steps": 6, "precision": "fp64"}})
    torch.multiprocessing.spawn(_rank, args=(_free_port(), configs[2].resolved()), nprocs=2)
    one = torch.load(train(configs[1]) / "checkpoints" / "final.pt", weights_only=False)["state_dict"]
    two = torch.load(configs[2].run_dir / "checkpoints" / "final.pt", weights_only=False)["state_dict"]
    # each tensor's greatest difference over its greatest entry: near-zero entries have no relative precision
    worst = max(float((two[k] - v).abs().max() / v.abs().max().clamp_min(1e-300)) for k, v in one.items()
                if v.is_floating_point())
    via = (f"planned {plan.backend}; on one GPU cuda:gloo instead (NCCL needs one GPU per rank)" if cuda
           else f"backend {plan.backend}")
    report.add("4 ranks", "2 processes = 1 process (fp64, 6 KD steps)", f"max difference {worst:.1e} of a tensor's "
               f"scale; {via}", ok=worst < 1e-9)


# -- 4. shards ---------------------------------------------------------------------------------------------------
def part_shards(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> None:
    from jpeg_shards import write_jpeg_shards

    from core.distributed import DistEnv
    from harness.data.loaders import workers
    from harness.teachers import cache_build
    from harness.training.loop import Trainer

    started = time.perf_counter()
    shards = write_jpeg_shards(folder / "shards", scale.shard_samples, 8, size=scale.shard_size, dataset="digits")
    written = time.perf_counter() - started
    steps = scale.shard_samples // scale.batch
    data = {"dataset": "webdataset", "path": shards["pattern"], "num_samples": steps * scale.batch}
    config = clipkd_config(scale, folder, teacher_file, "cached", data, steps, "shards")
    started = time.perf_counter()
    cache_build.ensure(config, scale.device, DistEnv(device=scale.device))
    built = time.perf_counter() - started
    report.add("5 shards", f"cache build, 2 views, {scale.shard_samples} JPEGs of {scale.shard_size} px",
               f"{built:.1f} s ({2 * scale.shard_samples / built:,.0f} views/s); shards written in {written:.1f} s")
    trainer = Trainer(config, DistEnv(device=scale.device), scale.device)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trainer.fit()
    synchronize(scale.device)
    seconds = time.perf_counter() - started
    report.add("5 shards", f"cached KD run fed by the loader, {steps} steps", f"{steps * scale.batch / seconds:,.0f} "
               f"images/s with {workers(None)} loader workers, {peak_memory(scale.device)}")


# -- 6. inductor, last: its build needs a C compiler and Python's headers ----------------------------------------------
def inductor_missing() -> str | None:
    """What the machine lacks for inductor's Triton kernels, or None."""
    import sysconfig

    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return "no C compiler (cc, gcc or clang; or $CC) to build Triton's launcher"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return f"no Python.h under {sysconfig.get_paths()['include']} (the python3-dev headers)"
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton cannot be imported ({error})"
    return None


def part_inductor(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> None:
    what = "clipkd cached, train.compile: inductor"
    if scale.device.type != "cuda":
        report.add("6 compile", what, "GPU only: inductor's code generation takes minutes on a CPU", verdict="SKIP")
        return
    missing = inductor_missing()
    if missing:
        report.add("6 compile", what, f"not run: {missing}", verdict="SKIP")
        return
    with report.check("6 compile", what):
        eager, _, _ = time_clipkd_mode(scale, folder, teacher_file, "cached", "cached")
        compiled, notes, _ = time_clipkd_mode(scale, folder, teacher_file, "cached+inductor", "cached", "inductor")
        report.add("6 compile", what, f"{compiled * 1000:.1f} ms/step against eager {eager * 1000:.1f} "
                                      f"({eager / compiled:.2f}x), {notes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="step,syncs,group,ranks,shards,inductor", help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="also write the table's rows as JSON here")
    args = parser.parse_args()
    import open_clip

    from harness.models.build import create_clip
    from harness.models.names import register_model_configs

    register_model_configs()
    open_clip.add_model_config(HERE / "model_configs")
    cuda = torch.cuda.is_available()
    scale = gpu_scale() if cuda else cpu_scale()
    device_name = torch.cuda.get_device_name(0) if cuda else f"no CUDA: CPU ({platform.processor() or 'cpu'})"
    print(f"clipkd gpu_check {datetime.date.today()}: {device_name}; torch {torch.__version__}, python "
          f"{platform.python_version()}; {scale.teacher} -> {scale.student}, batch {scale.batch}, {scale.precision}")
    if not cuda:
        print("There is no CUDA here: the parts run at a CPU scale to show that they run; their GPU targets are "
              "not judged.")
    if cuda:  # as open_clip_train sets them at start-up
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    report, started = Report(), time.perf_counter()
    parts = {"step": part_step, "syncs": part_syncs, "group": part_group, "ranks": part_two_ranks,
             "shards": part_shards, "inductor": part_inductor}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher_file = folder / "teacher.pt"
        torch.manual_seed(0)
        torch.save({"state_dict": create_clip(scale.teacher).model.state_dict()}, teacher_file)
        for name in args.parts.split(","):
            with report.check(name, "the part"):  # a crash outside its own checks fails it; the next part runs
                parts[name](scale, folder, teacher_file, report)
            if cuda:
                torch.cuda.empty_cache()
    print(f"\n{report.table()}\n\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps([{**row.__dict__, "ok": row.ok} for row in report.rows], indent=1))
    failed = [row for row in report.rows if not row.ok]
    if failed:
        print(f"{len(failed)} check(s) failed")
    return 1 if failed and (cuda or any(row.figure.startswith("crashed") for row in failed)) else 0


if __name__ == "__main__":
    sys.exit(main())
