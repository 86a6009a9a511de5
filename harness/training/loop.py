"""The training loop: set up the student, its losses and its teachers; step; checkpoint; stop. Each part is a
module of this package (objective, accumulation, masking, checkpoint, progress, stops) or of ``teachers``."""
from __future__ import annotations

import contextlib
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
from open_clip_train.scheduler import cosine_lr
from torch import nn
from tqdm import tqdm

from core.distributed import (
    DistEnv,
    StepVote,
    average_gradients,
    broadcast_from_main,
    data_parallel,
    failures_shared,
    from_main,
    init_distributed,
)
from core.errors import worker_errors_unwrapped
from core.precision import autocast, parameter_dtype
from core.processes import started_at
from harness.config.run_config import RunConfig, resolve_teacher_run
from harness.config.specs import TeacherSpec
from harness.data.bad import BadSampleLog
from harness.data.batch import Batch
from harness.data.captions import CaptionChoice
from harness.data.inputs import ModelInput, OtherInputs
from harness.data.loaders import TrainData, build_source, build_train_data
from harness.data.views import Augmentation
from harness.models.build import ClipBundle, compile_repeated_blocks, create_clip
from harness.models.inherit import inherited_state
from harness.models.names import model_identity
from harness.models.prunable import make_dense, make_prunable
from harness.teachers.ensemble import run_teachers
from harness.teachers.live import create_teacher
from harness.training import checkpoint
from harness.training.accumulation import accumulated_step
from harness.training.masking import mask_noise, patch_grid
from harness.training.objective import Objective, StepModule, losses_from_embeddings, student_embeddings
from harness.training.optimizer import adamw, scheduled
from harness.training.progress import ProgressEvaluation
from harness.training.selection import BatchSelection
from harness.training.stops import FiniteWatch, StopSignals, TrainingError, TrainingInterrupted

MAX_LOGIT_SCALE_LOG = math.log(100)
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"  # accuracy and the §4.4 similarities during training (eval.every_steps)
EVENTS_LOG = "events.jsonl"


Observer = Callable[[str, dict[str, Any]], None]


@dataclass
class Trainer:
    config: RunConfig
    env: DistEnv
    device: torch.device

    def __post_init__(self):
        """Set up, in the order that draws the random initialisations: the student, its teachers, its losses, the
        optimiser, the data; then step 0."""
        cfg = self.config
        self._check_accumulation()
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":  # as open_clip_train at start-up: TF32 matmuls, cuDNN picks its kernels
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.dtype = parameter_dtype(cfg.train.precision)
        self.student: ClipBundle = create_clip(cfg.student.model, cfg.student.pretrained, self.device, self.dtype)
        self.input = ModelInput.of(cfg.student.model, cfg.student.pretrained)
        teachers = run_teachers(cfg, self.input, self.device, self.dtype, self.env)
        self.teacher, self.caches = teachers.teachers, teachers.caches
        self.masks, self.structure = None, None  # automatic inheritance's (student.inherit.prune)
        if cfg.student.inherit:
            self._inherit()
        self.objective = Objective(cfg.method_terms(), self.student.embed_dim, teachers.embed_dim,
                                   cfg.task_loss).to(self.device, self.dtype)
        self.compiled_blocks = self._recompute_and_compile()
        self.step_module = self._distributed(StepModule(self.student.model, self.objective))
        self.parameters = [p for m in (self.student.model, self.objective) for p in m.parameters() if p.requires_grad]
        prune = cfg.student.inherit.prune if cfg.student.inherit else None
        self.optimizer = adamw((self.student.model, self.objective), cfg.optim, self.device,
                               (self.masks, prune.lr) if prune else None)
        self.source, self.data = self._data(teachers.cached_rows, teachers.others)
        selection = cfg.train.selection
        self.selection = None if selection is None else BatchSelection(selection, cfg.train.batch_size, cfg.seed,
                                                                       self.device, cfg.train.precision)
        self.total_steps = cfg.train.steps or max(1, round(cfg.train.epochs * self.data.steps_per_epoch))
        self.schedule = scheduled(cosine_lr(self.optimizer, cfg.optim.lr, cfg.optim.warmup_steps, self.total_steps),
                                  self.optimizer, cfg.optim.warmup_steps)
        fp16_on_cuda = self.device.type == "cuda" and cfg.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16_on_cuda)
        self.step = self.first_step = 0  # first_step: where this process started (a resumed run's checkpoint)
        self.watch = FiniteWatch(self.term_names, self.step, self.device)

    def _check_accumulation(self) -> None:
        """Found before the models load, not at the first step."""
        train = self.config.train
        share = train.batch_size // self.env.world_size
        if train.batch_size % self.env.world_size:
            raise TrainingError(f"train.batch_size {train.batch_size} is not divisible by the {self.env.world_size} "
                                "processes")
        if train.loaded_batch_size % self.env.world_size:
            raise TrainingError(f"train.selection: the super-batch of {train.loaded_batch_size} samples (batch_size "
                                f"{train.batch_size} / ratio) is not divisible by the {self.env.world_size} processes")
        if train.accum_freq > share:
            raise TrainingError(f"train.accum_freq {train.accum_freq} is more micro-batches than this process's "
                                f"{share} samples per step (train.batch_size {train.batch_size} over "
                                f"{self.env.world_size} processes): use at most {share}")

    def _inherit(self) -> None:
        """TinyCLIP's weight inheritance from the student's source, which is built on a forked random stream (the
        losses then start as they would without it): manual (harness/models/inherit.py), the student's weights
        taken from the source's; automatic (harness/models/prunable.py), the student the source itself, masked."""
        cfg, spec = self.config, self.config.student.inherit
        source = cfg.teachers[0] if spec.source == "teacher" else TeacherSpec(run=spec.source)
        source_model = source.model or resolve_teacher_run(source.run)[0]
        with torch.random.fork_rng(devices=[]):
            model = create_teacher(source, "cpu").model
        if spec.prune is not None:
            if model_identity(source_model) != model_identity(cfg.student.model):
                raise TrainingError(f"student.inherit.prune: automatic inheritance prunes its source itself: the "
                                    f"student model must be the source's, {source_model}, not {cfg.student.model}")
            self.student.model = model.to(self.device, self.dtype).requires_grad_(True).train()
            self.masks = make_prunable(self.student.model, spec.prune.sparsity)
            said = f"is {spec.source}'s model, pruned to sparsity {spec.prune.sparsity} as it distils"
        else:
            by_norm = frozenset(t for t in ("image", "text") if spec.width_of(t) == "magnitude")
            state, layers = inherited_state(self.student.model, model, spec.layers, by_norm)
            self.student.model.load_state_dict(state)
            said = f"inherits blocks {layers} and widths {spec.width} from {spec.source}"
        if self.env.is_main:
            print(f"clipkd: {cfg.name}: student {cfg.student.model} {said}", file=sys.stderr)

    def _recompute_and_compile(self) -> list[str]:
        """open_clip's activation recomputation in backward, and the compiled blocks (the same math either way)."""
        cfg = self.config
        if cfg.train.grad_checkpointing:
            self.student.model.set_grad_checkpointing(True)
        if cfg.train.compile is None:
            return []
        compiled = compile_repeated_blocks(self.student.model, cfg.train.compile)
        if not compiled and self.env.is_main:
            print(f"clipkd: {cfg.name}: train.compile {cfg.train.compile}: {cfg.student.model} has no run of "
                  "like blocks to compile; it trains eagerly", file=sys.stderr)
        return compiled

    def _data(self, cached_rows, others: OtherInputs) -> tuple[object, TrainData]:
        """The training set as the student and its live teachers see it, and its loader; the teachers' cached rows
        ride with each batch."""
        cfg = self.config
        augmentation = Augmentation.of(cfg.data.augment, cfg.seed, cfg.views)
        source = build_source(cfg.data, self.input.view, self.student.tokenizer, augmentation, cfg.output_dir, others,
                              CaptionChoice(cfg.data.captions, cfg.seed))
        for rows in self.caches:
            if rows.samples != len(source):
                raise TrainingError(f"the teacher-embedding cache {rows.folder} has {rows.samples} samples, the "
                                    f"training set {len(source)}: delete the cache folder to rebuild it")
        data = build_train_data(cfg.data, source, cfg.train.loaded_batch_size, cfg.seed, self.env.rank, self.env.world_size,
                                cached_rows, pin_memory=self.device.type == "cuda")
        return source, data

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
            **({"structure": self.structure} if self.structure else {}),  # a pruned model's shape (models/prunable.py)
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
        self.step = self.first_step = state["step"]
        self.watch = FiniteWatch(self.term_names, self.step, self.device)

    # -- loop ------------------------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> tuple[float, torch.Tensor]:
        """One optimisation step on this rank's block ``batch`` (on the run's device and dtype; of the super-batch
        under ``train.selection``, whose kept samples it trains on): its learning rate, and its loss and terms
        stacked on the device. Nothing here waits for the device (a selection aside: the kept indices are read):
        the caller reads the values on log steps (``term_names`` names them)."""
        cfg = self.config
        teacher = self.teacher
        if self.selection is not None:  # the kept samples, and the teachers' embeddings of them from the scoring
            batch, teacher = self.selection(batch, self.student.model, self.teacher, self.step)
        lr = self.schedule(self.step)
        if self.masks is not None:
            self.masks.schedule(self.step, self.total_steps, cfg.student.inherit.prune.warmup)
        noise = None
        if self.objective.image_mask_ratio is not None:
            rows, cols = patch_grid(self.student.model.visual, batch.images.shape[-1])
            noise = mask_noise(cfg.train.batch_size, rows * cols, cfg.seed, self.step, self.env, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.train.accum_freq == 1:
            with autocast(self.device, cfg.train.precision):
                terms = self.step_module(batch, teacher, noise)
                loss = self.objective.total(terms)
            self.scaler.scale(loss).backward()  # under DDP the gradients' all-reduce runs as backward goes
        else:
            terms = self._accumulated(batch, noise, teacher)
            loss = self.objective.total(terms)
            average_gradients(self.parameters, cfg.train.grad_compression)
        if cfg.optim.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, cfg.optim.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.masks is not None:
            self.masks.hold()
        with torch.no_grad():
            self.student.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE_LOG)
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
        self.watch.observe(values)
        self.step += 1
        return lr, values

    def _accumulated(self, batch: Batch, noise: torch.Tensor | None, teacher) -> dict[str, torch.Tensor]:
        """This step's gradients in ``train.accum_freq`` micro-batches, every loss on the whole batch
        (harness/training/accumulation.py). The teacher embeds the whole block at once: without gradients it holds one
        layer's activations at a time."""
        precision, student = self.config.train.precision, self.student.model

        def embed(part: Batch, part_noise: torch.Tensor | None):
            with autocast(self.device, precision):
                return student_embeddings(student, part, part_noise, self.objective.image_mask_ratio)

        def losses(block: Batch, embeddings) -> dict[str, torch.Tensor]:
            with autocast(self.device, precision):
                return losses_from_embeddings(student, teacher, self.objective, block, embeddings)

        def backward(terms: dict[str, torch.Tensor]) -> None:
            self.scaler.scale(self.objective.total(terms)).backward()

        return accumulated_step(student, embed, batch, noise, self.config.train.accum_freq, losses, backward)

    @property
    def term_names(self) -> list[str]:
        """The names of ``train_step``'s values, in order."""
        return ["loss", "task", *self.objective.methods]

    def _sparsity(self) -> dict[str, float]:
        """A pruned student's sparsity on a log step, said on stderr too: expected under the masks, kept in
        evaluation (the dense model's), and the step's target."""
        if self.masks is None:
            return {}
        with torch.no_grad():
            values = {"sparsity": self.masks.expected_sparsity(), "sparsity_kept": self.masks.kept_sparsity(),
                      "sparsity_target": float(self.masks.target)}
        if self.env.is_main:
            print(f"clipkd: {self.config.name}: step {self.step}: sparsity {values['sparsity']:.3f} expected, "
                  f"{values['sparsity_kept']:.3f} kept, target {values['sparsity_target']:.3f}", file=sys.stderr)
        return values

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
                                  self.run_dir / EVAL_LOG if self.env.is_main else None,
                                  self.objective.student_projection)

    def fit(self, observe: Observer | None = None) -> None:
        """Train to ``total_steps``; ``observe(kind, record)`` sees each train_log record ("train", on rank 0) and
        each evaluation during training ("eval": ``zero-shot acc1 (BENCHMARK)`` and the §4.4 similarities)."""
        cfg = self.config
        observe = observe if self.env.is_main and observe is not None else (lambda kind, record: None)
        show_progress = self.env.is_main and sys.stderr.isatty()
        evaluate = self._progress()
        samples_per_step = cfg.train.batch_size
        vote, logged = StepVote(), (self.step, time.perf_counter())
        bad = BadSampleLog(self.run_dir, cfg.data.bad_samples, cfg.data.max_bad_fraction, len(self.source))
        with self._open_log() as log, StopSignals() as signals, tqdm(
            total=self.total_steps, initial=self.step, disable=not show_progress, desc=cfg.name
        ) as progress:
            if evaluate is not None and self.step == 0:
                observe("eval", {"step": 0, **evaluate(0, 0)})
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
                    record.update(self._sparsity())
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                    observe("train", {**record, "total_steps": self.total_steps})
                progress.update(1)
                if evaluate is not None and (self.step % cfg.eval.every_steps == 0 or self.step == self.total_steps):
                    observe("eval", {"step": self.step, **evaluate(self.step, self.step * samples_per_step)})
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
        if self.masks is not None:  # the final weights are the dense model (its shape stored with them)
            self.structure, self.masks = make_dense(self.student.model), None
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
        train = self.config.train
        scored = 0 if self.selection is None else self.selection.samples_embedded * self.env.world_size
        student = (self.step - self.first_step) * train.batch_size + scored  # by this process's attempt
        with (self.run_dir / EVENTS_LOG).open("a") as events:
            events.write(json.dumps({"event": name, "step": self.step, "time": time.time(),
                                     "teacher_forward_samples": embedded, "student_forward_samples": student,
                                     **fields}) + "\n")


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
        elif env.is_main and config.student.pretrained is None and config.student.inherit is None:
            print(f"clipkd: {config.name}: student {config.student.model} starts from random weights "
                  "(student.pretrained is not set)", file=sys.stderr)
        trainer.event("resume" if resumed else "start", host=os.uname().nodename, world_size=env.world_size,
                      slurm_job=os.environ.get("SLURM_JOB_ID"), process_started=started_at(),
                      compiled_blocks=trainer.compiled_blocks)
        trainer.fit(observe)
    return run_dir
