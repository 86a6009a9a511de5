"""The training loop: a student and its distillation losses trained together against a frozen teacher."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.loss import ClipLoss
from open_clip_train.scheduler import cosine_lr
from torch import nn
from tqdm import tqdm

import methods
from core.distributed import (
    DistEnv,
    StepVote,
    average_gradients,
    broadcast_from_main,
    data_parallel,
    failures_shared,
    from_main,
    gather,
    gather_with_grad,
    init_distributed,
)
from core.errors import ClipkdError, worker_errors_unwrapped
from core.precision import autocast, parameter_dtype
from harness import checkpoint, teacher_cache
from harness.accumulation import accumulated_step
from harness.config import RunConfig
from harness.data import Batch, build_source, build_train_data, workers
from harness.data.bad import BadSampleLog
from harness.data.views import Augmentation
from harness.masking import masked_image_features, patch_grid
from harness.models import ClipBundle, compile_repeated_blocks, create_clip
from harness.processes import started_at
from harness.teacher_cache import CachedRows
from harness.teachers import create_teacher
from results.queries import PROGRESS_TERM

MAX_LOGIT_SCALE_LOG = math.log(100)
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"  # zero-shot accuracy during training (eval.every_steps)
EVENTS_LOG = "events.jsonl"


class TrainingError(ClipkdError, RuntimeError):
    pass


class NonFiniteLossError(TrainingError):
    pass


class TrainingInterrupted(TrainingError):
    """A stop signal arrived; a checkpoint of the last completed step was written."""

    every_rank = True  # the ranks stop together (core/distributed.py StepVote)

    def __init__(self, step: int, signum: int):
        super().__init__(f"interrupted by signal {signum} after step {step}; checkpoint saved, continue with --resume")
        self.step, self.signum = step, signum


class Objective(nn.Module):
    """L = L_task + Σ_k w_k L_k, the task loss being CLIP's own InfoNCE on the student's embeddings."""

    def __init__(self, terms: dict[str, tuple[float, dict[str, Any]]], student_dim: int, teacher_dim: int | None):
        super().__init__()
        built = {}
        for name, (_, options) in terms.items():
            try:
                built[name] = methods.get(name)(student_dim, teacher_dim, **options)
            except TypeError as error:
                raise TrainingError(f"distill.{name}: bad options {options}: {error}") from None
        self.methods = nn.ModuleDict(built)
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.task = ClipLoss()
        ratios = {methods.image_mask_ratio(m) for m in self.methods.values()} - {None}
        if len(ratios) > 1:
            raise TrainingError(f"methods ask for different image mask ratios {sorted(ratios)}; use one")
        self.image_mask_ratio = ratios.pop() if ratios else None

    def forward(self, batch: methods.DistillBatch) -> dict[str, torch.Tensor]:
        """Every term in float32 at least, outside autocast, on embeddings cast up exactly: under bf16 a logit near
        100 is rounded to a multiple of 0.5, the size of the KD gradient p_S - p_T near convergence, so every
        softmax, KL and cross-entropy of the losses takes float32 logits."""
        with torch.autocast(batch.student_image.device.type, enabled=False):
            batch = _float32_at_least(batch)
            terms = {"task": self.task(methods.normalize(batch.student_image), methods.normalize(batch.student_text),
                                       batch.student_logit_scale)}
            terms.update({name: method(batch) for name, method in self.methods.items()})
        return terms

    def student_projection(self) -> nn.Module | None:
        """The first learned student→teacher projection among the methods, in config order."""
        return next((p for m in self.methods.values() if (p := methods.student_projection(m)) is not None), None)

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return terms["task"] + sum(self.weights[name] * terms[name] for name in self.methods)


def _float32_at_least(batch: methods.DistillBatch) -> methods.DistillBatch:
    """The batch's tensors in float32, or as they are when wider (an fp64 run)."""
    def up(x):
        return x.to(torch.promote_types(x.dtype, torch.float32)) if isinstance(x, torch.Tensor) else x

    fields = {f.name: up(getattr(batch, f.name)) for f in dataclasses.fields(batch) if f.name != "teachers"}
    teachers = tuple(methods.TeacherEmbeddings(up(t.image), up(t.text), up(t.logit_scale)) for t in batch.teachers)
    return dataclasses.replace(batch, **fields, teachers=teachers)


def mask_noise(global_batch: int, patches: int, seed: int, step: int, env: DistEnv,
               device: torch.device | None = None) -> torch.Tensor:
    """Per-step patch-selection noise for the global batch, drawn on the run's device (no copy from the host);
    this rank's rows only."""
    device = device or torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    noise = torch.rand(global_batch, patches, generator=generator, device=device)
    block = global_batch // env.world_size
    return noise[env.rank * block : (env.rank + 1) * block]


Observer = Callable[[str, dict[str, Any]], None]


def progress_term(benchmark: str) -> str:
    """The curve of zero-shot accuracy during training on ``benchmark``."""
    return f"{PROGRESS_TERM} ({benchmark})"


class LiveTeacher:
    """The frozen teacher run on every batch: its normalised embeddings and its temperature."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.samples_embedded = 0  # on this process, for benchmarks/grid.py

    def __call__(self, batch: Batch):
        self.samples_embedded += len(batch)
        return (methods.normalize(self.model.encode_image(batch.images)),
                methods.normalize(self.model.encode_text(batch.texts)), self.model.logit_scale.exp())


class CachedTeacher:
    """The teacher's embeddings of the batch's samples and views, read from its cache by the loader: it never runs.
    They reach the losses in the dtype the live teacher's would have (bf16 under bf16 autocast). In an ensemble
    its rows are the batch's ``columns`` of the caches' side-by-side rows (teacher_cache.EnsembleRows)."""

    def __init__(self, rows: CachedRows, device: torch.device, dtype: torch.dtype, columns: slice = slice(None)):
        self.dtype, self.columns = rows.embedding_dtype, columns
        # made here, before any step: a copy from the host inside a step would wait for the device
        self.logit_scale = torch.tensor(rows.logit_scale, device=device, dtype=dtype)

    def __call__(self, batch: Batch):
        image, text = batch.teacher_image[:, self.columns], batch.teacher_text[:, self.columns]
        return image.to(self.dtype), text.to(self.dtype), self.logit_scale


class Teachers:
    """A run's teachers in config order, live or cached each: one, or an ensemble."""

    def __init__(self, members: list[LiveTeacher | CachedTeacher]):
        self.members = members

    @property
    def samples_embedded(self) -> int:
        return sum(getattr(member, "samples_embedded", 0) for member in self.members)


def student_embeddings(student: nn.Module, batch: Batch, masked_noise: torch.Tensor | None,
                       mask_ratio: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's raw student embeddings of ``batch``: image, text, and the masked image when a method asks."""
    image, text = student.encode_image(batch.images), student.encode_text(batch.texts)
    masked = None if mask_ratio is None else masked_image_features(student, batch.images, masked_noise, mask_ratio)
    return image, text, masked


def losses_from_embeddings(student: nn.Module, teacher: Teachers | LiveTeacher | CachedTeacher | None,
                           objective: Objective,
                           batch: Batch, embeddings) -> dict[str, torch.Tensor]:
    """Every loss term on the global batch from this rank's student ``embeddings`` of ``batch``, gathered with all
    others' (and the teacher's of the same samples)."""
    image, text, masked = (gather_with_grad(e) if e is not None else None for e in embeddings)
    student_scale = student.logit_scale.exp()
    if teacher is None:  # the no-KD baseline: the task loss alone
        zero = torch.zeros(0, device=batch.images.device)
        return objective(methods.DistillBatch(image, text, zero, zero, student_scale, student_scale))
    with torch.no_grad():
        ensemble = []
        for member in teacher.members if isinstance(teacher, Teachers) else [teacher]:
            teacher_image, teacher_text, teacher_scale = member(batch)
            ensemble.append(methods.TeacherEmbeddings(gather(teacher_image), gather(teacher_text), teacher_scale))
    first = ensemble[0]  # what a method written for one teacher sees
    return objective(methods.DistillBatch(image, text, first.image, first.text, student_scale, first.logit_scale,
                                          masked, tuple(ensemble)))


def compute_losses(
    student: nn.Module,
    teacher: Teachers | LiveTeacher | CachedTeacher | None,
    objective: Objective,
    batch: Batch,
    masked_noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every loss term of one step on the global batch: this rank's embeddings gathered with all others'."""
    embeddings = student_embeddings(student, batch, masked_noise, objective.image_mask_ratio)
    return losses_from_embeddings(student, teacher, objective, batch, embeddings)


class StepModule(nn.Module):
    """The student and its losses as one module whose forward is a step's loss terms, every pass of the student
    included (image, text, masked image): the one forward per backward DistributedDataParallel asks for, so its
    all-reduce of the student's and the loss-side parameters' gradients overlaps backward (open_clip runs both
    towers inside one DDP forward likewise)."""

    def __init__(self, student: nn.Module, objective: Objective):
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, batch: Batch, teacher, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return compute_losses(self.student, teacher, self.objective, batch, noise)


class FiniteWatch:
    """Watches the loss terms for a non-finite value on the device: a step adds a comparison, no transfer to the
    host. ``check`` reads it (on log steps and before every checkpoint), so a run stops at the next log step
    naming the first bad step and term, its last good checkpoint kept."""

    def __init__(self, names: list[str], step: int, device: torch.device):
        self.names = names
        self.step = torch.full((), step, dtype=torch.long, device=device)
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)
        self.bad_values = torch.zeros(len(names), device=device)

    def observe(self, values: torch.Tensor) -> None:
        self.step.add_(1)
        first = (self.bad_step == 0) & ~torch.isfinite(values).all()
        self.bad_step = torch.where(first, self.step, self.bad_step)
        self.bad_values = torch.where(first, values, self.bad_values)

    def check(self, checkpoints: Path) -> None:
        bad_step = int(self.bad_step)
        if bad_step:
            values = dict(zip(self.names, self.bad_values.tolist()))
            # the term that went bad, before the total it made bad
            name = next(n for n in [*self.names[1:], self.names[0]] if not math.isfinite(values[n]))
            value = values[name]
            raise NonFiniteLossError(f"step {bad_step}: loss term {name!r} is {value}; training stopped, the last "
                                     f"good checkpoint is kept in {checkpoints}")


class ProgressEvaluation:
    """Zero-shot top-1 during training, every ``eval.every_steps`` steps, on the run's first benchmark (or its first
    ``eval.during_items`` items), logged with the samples seen so far: how many samples a method needs. Every rank
    embeds its share of the images (no rank waits for another's evaluation in the next step's gather); the
    student is evaluated as a checkpoint of that step would be (eval mode) and left as it was found (its modes,
    buffers and random streams), so a run trains to the same weights with or without it."""

    def __init__(self, config: RunConfig, student: ClipBundle, device: torch.device, log: Path | None):
        from evals.datasets import during_training, load_eval_set

        benchmarks = config.benchmarks()
        first = benchmarks[0] if benchmarks else None
        eval_set = load_eval_set(first.dataset, first.root, student.preprocess_eval, first.task) if first else None
        if eval_set is None or eval_set.classification is None:
            raise TrainingError("eval.every_steps evaluates zero-shot classification on the first of eval.benchmarks; "
                                "give a benchmark with classes (a built-in set, imagefolder or a clip_benchmark one)")
        self.benchmark = eval_set.benchmark
        self.term = progress_term(self.benchmark)
        self.dataset = during_training(eval_set.classification, config.eval.during_items,
                                       parameter_dtype(config.train.precision))
        self.student, self.device, self.log = student, device, log
        self.batch_size, self.workers = config.eval.batch_size, workers(config.eval.workers)

    def __call__(self, step: int, samples_seen: int) -> float:
        from evals.zeroshot import Classifiers, classification_metrics

        # the evaluation leaves the student's modes, buffers and random streams as it found them (evals/zeroshot.py)
        metrics = classification_metrics(self.student.model, self.student.tokenizer, self.dataset, self.device,
                                         self.batch_size, Classifiers(), self.workers).metrics
        if self.log is not None:
            with self.log.open("a") as log:
                log.write(json.dumps({"step": step, "samples_seen": samples_seen, "benchmark": self.benchmark,
                                      "acc1": metrics["acc1"]}) + "\n")
        return metrics["acc1"]


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


class _StopSignals:
    """Turns stop signals into a flag checked between steps: SIGTERM (scancel, preemption), SIGINT, and the
    pre-time-limit signals of SLURM (``--signal=USR1@…``) and of submitit (USR2)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Trainer:
    config: RunConfig
    env: DistEnv
    device: torch.device

    def __post_init__(self):
        cfg = self.config
        share = cfg.train.batch_size // self.env.world_size
        if cfg.train.accum_freq > share:  # found before the models load, not at the first step
            raise TrainingError(f"train.accum_freq {cfg.train.accum_freq} is more micro-batches than this process's "
                                f"{share} samples per step (train.batch_size {cfg.train.batch_size} over "
                                f"{self.env.world_size} processes): use at most {share}")
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":  # as open_clip_train at start-up: TF32 matmuls, cuDNN picks its kernels
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.dtype = parameter_dtype(cfg.train.precision)
        self.student: ClipBundle = create_clip(cfg.student.model, cfg.student.pretrained, self.device, self.dtype)
        self.teacher, teacher_dim = self._teacher()
        self.objective = Objective(cfg.method_terms(), self.student.embed_dim, teacher_dim).to(self.device, self.dtype)
        if cfg.train.grad_checkpointing:  # open_clip's: each tower's blocks recomputed in backward
            self.student.model.set_grad_checkpointing(True)
        self.compiled_blocks = []
        if cfg.train.compile is not None:
            self.compiled_blocks = compile_repeated_blocks(self.student.model, cfg.train.compile)
            if not self.compiled_blocks and self.env.is_main:
                print(f"clipkd: {cfg.name}: train.compile {cfg.train.compile}: {cfg.student.model} has no run of "
                      "like blocks to compile; it trains eagerly", file=sys.stderr)
        self.step_module = self._distributed(StepModule(self.student.model, self.objective))
        self.parameters = [p for m in (self.student.model, self.objective) for p in m.parameters() if p.requires_grad]
        optim = cfg.optim
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.student.model, self.objective, weight_decay=optim.weight_decay),
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            **({"fused": True} if self.device.type == "cuda" else {}),  # one kernel for all parameters
        )
        augmentation = Augmentation.of(cfg.data.augment, cfg.seed, cfg.views)
        self.source = source = build_source(cfg.data, cfg.student.model, self.student.tokenizer, augmentation,
                                            cfg.output_dir)
        for rows in self.caches:
            if rows.samples != len(source):
                raise TrainingError(f"the teacher-embedding cache {rows.folder} has {rows.samples} samples, the "
                                    f"training set {len(source)}: delete the cache folder to rebuild it")
        self.data = build_train_data(cfg.data, source, cfg.train.batch_size, cfg.seed, self.env.rank,
                                     self.env.world_size, self.cached_rows, pin_memory=self.device.type == "cuda")
        epochs = cfg.train.epochs
        self.total_steps = cfg.train.steps or max(1, round(epochs * self.data.steps_per_epoch))
        self.schedule = cosine_lr(self.optimizer, optim.lr, optim.warmup_steps, self.total_steps)
        use_cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and cfg.train.precision == "fp16")
        self.step = 0
        self.watch = FiniteWatch(self.term_names, self.step, self.device)

    def _distributed(self, module: StepModule) -> nn.Module:
        """Under torchrun, DistributedDataParallel (it starts every rank from rank 0's weights, loss-side
        parameters included); alone, the module itself. Accumulating steps take more backward passes than DDP's
        one per forward: they start from rank 0's weights likewise and average the gradients once per step."""
        if not self.env.distributed:
            return module
        if self.config.train.accum_freq > 1:
            broadcast_from_main(module)
            return module
        return data_parallel(module, self.device, self.config.train.grad_compression)

    def _teacher(self) -> tuple[Teachers | None, int | None]:
        """The run's teachers, and the first one's embedding dim (the one methods distil into). Each cached teacher
        reads its own cache; the loader reads them all side by side."""
        self.caches, self.cached_rows = [], None
        members, dims, columns = [], [], 0
        for spec in self.config.teachers:
            if spec.embeddings == "cached":
                rows = CachedRows(teacher_cache.ensure(self.config.with_teacher(spec), self.device, self.env))
                members.append(CachedTeacher(rows, self.device, self.dtype, slice(columns, columns + rows.embed_dim)))
                columns, dims = columns + rows.embed_dim, dims + [rows.embed_dim]
                self.caches.append(rows)
            else:
                bundle = create_teacher(spec, self.device, self.config.train.precision)
                members.append(LiveTeacher(bundle.model))
                dims.append(bundle.embed_dim)
        if self.caches:
            self.cached_rows = self.caches[0] if len(self.caches) == 1 else teacher_cache.EnsembleRows(self.caches)
        return (Teachers(members), dims[0]) if members else (None, None)

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    def state(self) -> dict[str, Any]:
        return {
            "state_dict": self.student.model.state_dict(),
            "methods": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"kind": "cosine", "step": self.step, "total_steps": self.total_steps},
            "rng": checkpoint.rng_state(self.device),
            "step": self.step,
            "model": self.config.student.model,
            "embed_dim": self.student.embed_dim,
            "config": self.config.resolved(),
        }

    def save(self, name: str) -> None:
        """A checkpoint of the last step, never of weights a non-finite loss has touched."""
        self.watch.check(self.run_dir / "checkpoints")
        if self.env.is_main:
            checkpoint.save_atomic(self.state(), self.run_dir / "checkpoints" / name)

    def restore(self, path: Path) -> None:
        state = checkpoint.load(path)
        self.student.model.load_state_dict(state["state_dict"])
        self.objective.load_state_dict(state["methods"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"], self.device)
        self.step = state["step"]
        self.watch = FiniteWatch(self.term_names, self.step, self.device)

    # -- loop ------------------------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> tuple[float, torch.Tensor]:
        """One optimisation step on this rank's block ``batch`` (on the run's device and dtype): its learning rate,
        and its loss and terms stacked on the device. Nothing here waits for the device: the caller reads the
        values on log steps (``term_names`` names them)."""
        cfg = self.config
        lr = self.schedule(self.step)
        noise = None
        if self.objective.image_mask_ratio is not None:
            rows, cols = patch_grid(self.student.model.visual, batch.images.shape[-1])
            noise = mask_noise(cfg.train.batch_size, rows * cols, cfg.seed, self.step, self.env, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.train.accum_freq == 1:
            with autocast(self.device, cfg.train.precision):
                terms = self.step_module(batch, self.teacher, noise)
                loss = self.objective.total(terms)
            self.scaler.scale(loss).backward()  # under DDP the gradients' all-reduce runs as backward goes
        else:
            terms = self._accumulated(batch, noise)
            loss = self.objective.total(terms)
            average_gradients(self.parameters, cfg.train.grad_compression)
        if cfg.optim.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, cfg.optim.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.student.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE_LOG)
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
        self.watch.observe(values)
        self.step += 1
        return lr, values

    def _accumulated(self, batch: Batch, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """This step's gradients in ``train.accum_freq`` micro-batches, every loss on the whole batch
        (harness/accumulation.py). The teacher embeds the whole block at once: without gradients it holds one
        layer's activations at a time."""
        precision, student = self.config.train.precision, self.student.model

        def embed(part: Batch, part_noise: torch.Tensor | None):
            with autocast(self.device, precision):
                return student_embeddings(student, part, part_noise, self.objective.image_mask_ratio)

        def losses(block: Batch, embeddings) -> dict[str, torch.Tensor]:
            with autocast(self.device, precision):
                return losses_from_embeddings(student, self.teacher, self.objective, block, embeddings)

        def backward(terms: dict[str, torch.Tensor]) -> None:
            self.scaler.scale(self.objective.total(terms)).backward()

        return accumulated_step(student, embed, batch, noise, self.config.train.accum_freq, losses, backward)

    @property
    def term_names(self) -> list[str]:
        """The names of ``train_step``'s values, in order."""
        return ["loss", "task", *self.objective.methods]

    def _open_log(self):
        if not self.env.is_main:
            return contextlib.nullcontext()
        for path in (self.run_dir / TRAIN_LOG, self.run_dir / EVAL_LOG):
            if path.exists():  # drop records past the checkpoint we resume from: they will be recomputed
                kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
                path.write_text("".join(line + "\n" for line in kept))
        return (self.run_dir / TRAIN_LOG).open("a")

    def _progress(self) -> ProgressEvaluation | None:
        if self.config.eval.every_steps is None:
            return None
        return ProgressEvaluation(self.config, self.student, self.device,
                                  self.run_dir / EVAL_LOG if self.env.is_main else None)

    def fit(self, observe: Observer | None = None) -> None:
        """Train to ``total_steps``; ``observe(kind, record)`` sees each train_log record ("train", on rank 0) and
        each accuracy during training ("eval", as ``zero-shot acc1 (BENCHMARK)``)."""
        cfg = self.config
        observe = observe if self.env.is_main and observe is not None else (lambda kind, record: None)
        show_progress = self.env.is_main and sys.stderr.isatty()
        evaluate = self._progress()
        samples_per_step = cfg.train.batch_size
        vote, logged = StepVote(), (self.step, time.perf_counter())
        bad = BadSampleLog(self.run_dir, cfg.data.bad_samples, cfg.data.max_bad_fraction, len(self.source))
        with self._open_log() as log, _StopSignals() as signals, tqdm(
            total=self.total_steps, initial=self.step, disable=not show_progress, desc=cfg.name
        ) as progress:
            if evaluate is not None and self.step == 0:
                observe("eval", {"step": 0, evaluate.term: evaluate(0, 0)})
            for batch in self.data.batches(self.step, self.total_steps):  # one loader for the whole run
                refused = bad.add(batch.bad)  # under data.bad_samples: error, or past data.max_bad_fraction
                lr, values = self.train_step(batch.to(self.device, self.dtype))
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    self.watch.check(self.run_dir / "checkpoints")
                    record = {"step": self.step, "lr": lr, **dict(zip(self.term_names, values.tolist())),
                              "logit_scale": float(self.student.model.logit_scale.detach().exp())}
                    # the mean step over the interval since the last record, the loader's waits included
                    record["seconds"] = round((time.perf_counter() - logged[1]) / (self.step - logged[0]), 4)
                    logged = (self.step, time.perf_counter())
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                    observe("train", {**record, "total_steps": self.total_steps})
                progress.update(1)
                if evaluate is not None and (self.step % cfg.eval.every_steps == 0 or self.step == self.total_steps):
                    observe("eval", {"step": self.step, evaluate.term: evaluate(self.step, self.step * samples_per_step)})
                checkpointing = self.step % cfg.train.checkpoint_every == 0
                # settled before a checkpoint and at the end: no rank's refusal of a step is left unheard
                decision = vote(signals.received is not None, refused,
                                settle=checkpointing or self.step == self.total_steps)
                if decision.failure is not None:  # every rank at once, with the words of the rank that refused
                    raise decision.failure
                if checkpointing:
                    self.save(checkpoint.LATEST)
                if decision.stop:
                    vote.close()
                    stopped_by = signal.Signals(signals.received or signal.SIGTERM)
                    self.save(checkpoint.LATEST)
                    self.event("stop", signal=stopped_by.name)
                    raise TrainingInterrupted(self.step, stopped_by)
        vote.close()
        self.save(checkpoint.FINAL)
        if self.env.is_main:  # the finished run is never resumed: a second copy of its state would only fill the disk
            (self.run_dir / "checkpoints" / checkpoint.LATEST).unlink(missing_ok=True)
        self.event("finish")
        if self.env.distributed:  # every rank evaluates from the final checkpoint rank 0 has just written
            torch.distributed.barrier()

    def event(self, name: str, **fields: Any) -> None:
        """A line of the run's events log (rank 0): start, resume, stop, finish, with the step and the time."""
        if not self.env.is_main:
            return
        embedded = getattr(self.teacher, "samples_embedded", 0) * self.env.world_size  # every rank its block
        with (self.run_dir / EVENTS_LOG).open("a") as events:
            events.write(json.dumps({"event": name, "step": self.step, "time": time.time(),
                                     "teacher_forward_samples": embedded, **fields}) + "\n")


def train(config: RunConfig, resume: bool = False, observe: Observer | None = None) -> Path:
    """Train one run to completion in ``config.run_dir``; with ``resume`` continue from its latest checkpoint;
    ``observe`` as for ``Trainer.fit``."""
    env = init_distributed(config.train.collective_timeout_s)
    run_dir = config.run_dir
    latest = run_dir / "checkpoints" / checkpoint.LATEST
    # seen by rank 0 for all: on a shared filesystem another node may not see a file yet (cached negative lookups)
    finished, unfinished = from_main(((run_dir / "checkpoints" / checkpoint.FINAL).exists(), latest.exists()))
    if finished:
        return run_dir  # the same resolved config has already been trained: nothing to do
    if unfinished and not resume:
        raise TrainingError(f"{run_dir} holds an unfinished run; continue it with --resume (or delete the directory)")
    # one rank's exception reaches the others with its own words (a loader worker's without torch's wrapping)
    with failures_shared(), worker_errors_unwrapped():
        trainer = Trainer(config, env, env.device)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(config.resolved(), indent=2) + "\n")
        resumed = resume and unfinished
        if resumed:
            trainer.restore(latest)
        elif env.is_main and config.student.pretrained is None:
            print(f"clipkd: {config.name}: student {config.student.model} starts from random weights "
                  "(student.pretrained is not set)", file=sys.stderr)
        trainer.event("resume" if resumed else "start", host=os.uname().nodename, world_size=env.world_size,
                      slurm_job=os.environ.get("SLURM_JOB_ID"), process_started=started_at(),
                      compiled_blocks=trainer.compiled_blocks)
        trainer.fit(observe)
    return run_dir
