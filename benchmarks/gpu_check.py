"""clipkd on a GPU machine in one command: the CUDA paths checked and the step timed beside open_clip_train's.

    PYTHONPATH=build/gpu-site:. python3 benchmarks/gpu_check.py      # benchmarks/README.md: the install there

Prints a table and exits 1 when a check fails. Without CUDA it says so, runs the same parts at a CPU scale (the
benchmarks' small models) to show that they run, and exits 0 unless one of them crashes. On an H200 it should
take about 3 minutes (estimated from its parts' sizes; it has not run on one yet), so that it can run twice in a
15-minute slot with the machine's start.

1. step: ViT-B-16 teacher -> ViT-T-16 student, batch 256, bf16, on the un-augmented digits upscaled to 224 px:
   clipkd's no-KD, live-teacher and cached-teacher steps (CLIP-KD: task + FD + ICL + CRD) beside
   open_clip_train's own ``train_one_epoch`` (imported, not rewritten) on the same models, no-KD and
   ``--distill`` (open_clip's DistillClipLoss, live teacher): ms/step, images/s, peak memory, GPU utilisation.
2. syncs: 50 steps of clipkd's training loop (``Trainer.fit``, cached teacher) under
   ``torch.cuda.set_sync_debug_mode("error")`` on every step that is not a log step.
3. two ranks: a 2-process run through clipkd's process-group function on one GPU; CUDA tensors go over gloo there,
   since NCCL refuses two ranks on one GPU; its final weights against the 1-process run's (float64).
4. shards: a teacher-cache build (2 views) and a cached KD run fed by the loader over generated JPEG shards.
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
    ok: bool = True


class Report:
    def __init__(self):
        self.rows: list[Row] = []

    def add(self, part: str, what: str, figure: str, ok: bool = True) -> None:
        self.rows.append(Row(part, what, figure, ok))
        print(f"  {'ok ' if ok else 'FAIL'} {part:9s} {what:44s} {figure}", flush=True)

    def failed(self, part: str, error: BaseException) -> None:
        where = "".join(traceback.format_exception(error)[-4:]).strip().replace("\n", " | ")
        self.add(part, "crashed", f"{type(error).__name__}: {error} [{where[-600:]}]", ok=False)

    def table(self) -> str:
        widths = [max(len(getattr(r, f)) for r in self.rows) for f in ("part", "what")]
        lines = [f"| {'':4s} | {'part':{widths[0]}s} | {'check':{widths[1]}s} | figure |",
                 f"|------|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|--------|"]
        lines += [f"| {'ok' if r.ok else 'FAIL':4s} | {r.part:{widths[0]}s} | {r.what:{widths[1]}s} | {r.figure} |"
                  for r in self.rows]
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
    from harness.config import parse_config

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

    from harness.models import model_name

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


def part_step(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> dict[str, float]:
    from harness.distributed import DistEnv
    from harness.train import Trainer

    data = {"dataset": "digits", "augment": False}
    rates = {}
    # train.compile: inductor on a GPU only (on a CPU its code generation alone takes minutes); the warm-up steps
    # take the compile, the timed ones run the compiled blocks
    modes = [("no-KD", None, None), ("live", "live", None), ("cached", "cached", None)]
    if scale.device.type == "cuda":
        modes.append(("cached+inductor", "cached", "inductor"))
    for name, mode, compile_backend in modes:
        config = clipkd_config(scale, folder, teacher_file, mode, data, scale.warmup + scale.steps, f"step-{name}",
                               compile_backend)
        trainer = Trainer(config, DistEnv(device=scale.device), scale.device)  # a cached one builds its cache here
        loader = trainer.data.epoch_batches(0, 0)
        batches = [b.to(scale.device, trainer.dtype) for b in itertools.islice(loader, 4)]
        seconds, notes = timed_steps(trainer.train_step, batches, scale)
        rates[f"clipkd {name}"] = scale.batch / seconds
        report.add("1 step", f"clipkd {name}", f"{seconds * 1000:.1f} ms/step, {scale.batch / seconds:,.0f} images/s, "
                                                f"{notes}")
        if mode is None:
            peer_batches = [(b.images, b.texts) for b in batches]
        del trainer, batches
    for distill in (False, True):
        name = "open_clip_train " + ("--distill" if distill else "no-KD")
        seconds, notes = timed_steps(open_clip_train_step(scale, teacher_file, distill), peer_batches, scale)
        rates[name] = scale.batch / seconds
        report.add("1 step", name, f"{seconds * 1000:.1f} ms/step, {scale.batch / seconds:,.0f} images/s, {notes}")
    cached, no_kd, distill = rates["clipkd cached"], rates["open_clip_train no-KD"], rates["open_clip_train --distill"]
    gpu = scale.device.type == "cuda"
    report.add("1 step", "clipkd cached ÷ open_clip_train no-KD", f"{cached / no_kd:.2f}x images/s (target >= 0.95)",
               ok=not gpu or cached / no_kd >= 0.95)
    report.add("1 step", "clipkd cached ÷ open_clip_train --distill", f"{cached / distill:.2f}x images/s (target >= 3)",
               ok=not gpu or cached / distill >= 3)
    report.add("1 step", "clipkd live ÷ open_clip_train --distill", f"{rates['clipkd live'] / distill:.2f}x images/s")
    return rates


# -- 2. host syncs -----------------------------------------------------------------------------------------------
def part_syncs(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> None:
    from harness.distributed import DistEnv
    from harness.train import Trainer

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


# -- 3. two ranks on one GPU -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, config: dict) -> None:
    import torch.distributed as dist

    from harness.config import parse_config
    from harness.train import train

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init = dist.init_process_group
    # NCCL refuses two ranks on one GPU; gloo carries CUDA tensors for broadcast, all_reduce and all_gather
    dist.init_process_group = lambda backend, **kw: init(backend.replace("cuda:nccl", "cuda:gloo"), **kw)
    torch.set_num_threads(1)
    train(parse_config(config))


def part_two_ranks(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> None:
    from harness.config import parse_config
    from harness.distributed import plan_process_group
    from harness.models import create_clip
    from harness.train import train

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
    report.add("3 ranks", "2 processes = 1 process (fp64, 6 KD steps)", f"max difference {worst:.1e} of a tensor's "
               f"scale; {via}", ok=worst < 1e-9)


# -- 4. shards ---------------------------------------------------------------------------------------------------
def part_shards(scale: Scale, folder: Path, teacher_file: Path, report: Report) -> None:
    from jpeg_shards import write_jpeg_shards

    from harness import teacher_cache
    from harness.data import workers
    from harness.distributed import DistEnv
    from harness.train import Trainer

    started = time.perf_counter()
    shards = write_jpeg_shards(folder / "shards", scale.shard_samples, 8, size=scale.shard_size, dataset="digits")
    written = time.perf_counter() - started
    steps = scale.shard_samples // scale.batch
    data = {"dataset": "webdataset", "path": shards["pattern"], "num_samples": steps * scale.batch}
    config = clipkd_config(scale, folder, teacher_file, "cached", data, steps, "shards")
    started = time.perf_counter()
    teacher_cache.ensure(config, scale.device, DistEnv(device=scale.device))
    built = time.perf_counter() - started
    report.add("4 shards", f"cache build, 2 views, {scale.shard_samples} JPEGs of {scale.shard_size} px",
               f"{built:.1f} s ({2 * scale.shard_samples / built:,.0f} views/s); shards written in {written:.1f} s")
    trainer = Trainer(config, DistEnv(device=scale.device), scale.device)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trainer.fit()
    synchronize(scale.device)
    seconds = time.perf_counter() - started
    report.add("4 shards", f"cached KD run fed by the loader, {steps} steps", f"{steps * scale.batch / seconds:,.0f} "
               f"images/s with {workers(None)} loader workers, {peak_memory(scale.device)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="step,syncs,ranks,shards", help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="also write the table's rows as JSON here")
    args = parser.parse_args()
    import open_clip

    from harness.models import create_clip, register_model_configs

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
    parts = {"step": part_step, "syncs": part_syncs, "ranks": part_two_ranks, "shards": part_shards}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher_file = folder / "teacher.pt"
        torch.manual_seed(0)
        torch.save({"state_dict": create_clip(scale.teacher).model.state_dict()}, teacher_file)
        for name in args.parts.split(","):
            try:
                parts[name](scale, folder, teacher_file, report)
            except Exception as error:  # a crash is a failed check; the other parts still run
                report.failed(name, error)
            if cuda:
                torch.cuda.empty_cache()
    print(f"\n{report.table()}\n\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in report.rows], indent=1))
    failed = [row for row in report.rows if not row.ok]
    if failed:
        print(f"{len(failed)} check(s) failed")
    return 1 if failed and (cuda or any(row.what == "crashed" for row in failed)) else 0


if __name__ == "__main__":
    sys.exit(main())
