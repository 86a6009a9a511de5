"""Two gloo processes on halves of a global batch give the single-process loss and gradients.

Both sides run in float64. The claim is that sharding is the same math; in float32 splitting the batch reorders
the sums, and how far that moves a gradient depends on the CPU's kernels (1.6e-5 on an Intel Xeon where an AMD
EPYC stayed below 1e-6). In float64 reordering moves a value by about n·2⁻⁵³ of the summed magnitudes, far below
the tolerances here, while a wrong gather or a missing average moves gradients by a factor (e.g. 2x).
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import rendezvous

from core.builtin import load_builtin
from core.distributed import average_gradients, data_parallel, init_distributed
from harness.data.batch import Batch
from harness.data.memory import InMemorySource
from harness.data.views import Augmentation, ViewSpec
from harness.models.build import create_clip
from harness.teachers.ensemble import Teachers
from harness.teachers.live import LiveTeacher
from harness.training.masking import mask_noise, patch_grid
from harness.training.objective import Objective, StepModule

TERMS = {name: (1.0, {}) for name in ["fd", "mfd", "gd", "icl", "afd", "crd", "open_clip_distill", "tinyclip", "hrd",
                                      "vrd", "xrd", "clip_rd", "mobileclip_dr"]}
GLOBAL_BATCH, SEED, STEP = 8, 3, 5


RTOL, ATOL = 1e-9, 1e-12


# a CLIP student and teachers; a sigmoid (SigLIP-config) student with the sigmoid loss and sigmoid teachers, and
# siglip_kd besides every other method
KINDS = {"clip": ("clipkd-tiny", "clipkd-tiny-teacher", "clipkd-tiny", TERMS, "clip"),
         "siglip": ("clipkd-tiny-sigmoid", "clipkd-tiny-sigmoid", "clipkd-tiny-sigmoid",
                    {**TERMS, "siglip_kd": (1.0, {})}, "siglip")}


def _setup(kind: str = "clip"):
    """A student and an ensemble of two teachers (every method sees the first, mobileclip_dr both)."""
    student_model, teacher_model, second_model, terms, task_loss = KINDS[kind]
    torch.manual_seed(0)
    student = create_clip(student_model, dtype=torch.float64)
    teacher = create_clip(teacher_model, dtype=torch.float64)
    teacher.model.eval().requires_grad_(False)
    second = create_clip(second_model, dtype=torch.float64)  # another width: 2 teachers need not share a dim
    second.model.eval().requires_grad_(False)
    objective = Objective(terms, student.embed_dim, teacher.embed_dim, task_loss).double()
    source = InMemorySource.of(load_builtin("digits", "train"), student.tokenizer, ViewSpec.of(student_model),
                               Augmentation("none"))
    batch = source.render(0, np.arange(GLOBAL_BATCH), None)
    return student, (teacher, second), objective, batch.images.double(), batch.texts


def _losses_and_grads(rank_env, images, texts, grad_compression: str | None = "none", kind: str = "clip"):
    """One step's terms and gradients through what the trainer runs: the student and its losses as one module,
    under DistributedDataParallel when there are ranks (it averages the gradients as backward runs, compressed
    by ``grad_compression``; None: no DDP, this rank's own gradients)."""
    student, (teacher, second), objective, _, _ = _setup(kind)
    rows, cols = patch_grid(student.model.visual, images.shape[-1])
    noise = mask_noise(GLOBAL_BATCH, rows * cols, SEED, STEP, rank_env)
    batch = Batch(images, texts, torch.arange(len(images)))
    step = StepModule(student.model, objective)
    if rank_env.distributed and grad_compression is not None:
        step = data_parallel(step, torch.device("cpu"), grad_compression)
    terms = step(batch, Teachers([LiveTeacher(teacher.model), LiveTeacher(second.model)]), noise)
    objective.total(terms).backward()
    named = [*student.model.named_parameters(), *(("loss." + n, p) for n, p in objective.named_parameters())]
    return {k: float(v.detach()) for k, v in terms.items()}, {n: p.grad.clone() for n, p in named if p.grad is not None}


def _join(rank, world_size, meeting, kind="clip"):
    """This rank's process group, and its block of the global batch."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), **meeting)
    torch.set_num_threads(1)
    env = init_distributed()
    _, _, _, images, texts = _setup(kind)
    block = GLOBAL_BATCH // world_size
    mine = slice(rank * block, (rank + 1) * block)
    return env, images[mine], texts[mine]


def _worker(rank, world_size, meeting, out_dir, kind):
    env, images, texts = _join(rank, world_size, meeting, kind)
    reduced, all_reduce = [], dist.all_reduce
    dist.all_reduce = lambda tensor, *args, **kwargs: reduced.append(tensor.numel()) or all_reduce(tensor, *args, **kwargs)
    result = _losses_and_grads(env, images, texts, kind=kind)
    dist.all_reduce = all_reduce
    torch.save((*result, reduced), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", KINDS)
def test_two_process_gloo_equals_single_process(tmp_path, kind):
    from core.distributed import DistEnv

    torch.set_num_threads(1)
    _, _, _, images, texts = _setup(kind)
    single_terms, single_grads = _losses_and_grads(DistEnv(), images, texts, kind=kind)
    if kind == "siglip":  # the sigmoid loss and siglip_kd are computed, the bias gets its gradient
        assert {"task", "siglip_kd"} <= single_terms.keys() and "logit_bias" in single_grads

    with rendezvous() as meeting:
        mp.spawn(_worker, args=(2, meeting, str(tmp_path), kind), nprocs=2, join=True)
    for rank in range(2):
        terms, grads, reduced = torch.load(tmp_path / f"rank{rank}.pt")
        # DDP's own all-reduce of the gradients is its reducer's; the embeddings' gather sends nothing back: each
        # rank's gradient for its rows is world_size x its slice of the gathered gradient, every rank computing the
        # same loss (before: an all-reduce of each whole gathered gradient, image, text and masked image)
        assert reduced == [], reduced
        assert terms.keys() == single_terms.keys()
        for name, value in single_terms.items():
            assert abs(terms[name] - value) <= RTOL * abs(value) + ATOL, (rank, name, terms[name], value)
        assert grads.keys() == single_grads.keys()
        for name, grad in single_grads.items():
            assert grad.dtype == torch.float64
            torch.testing.assert_close(grads[name], grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"rank {rank} {name}: {m}")


def test_torchrun_two_processes_train_like_one(tmp_path):
    """The whole run under torchrun (DDP, sharded loading, rank-0 files, evaluation sharded over the ranks) ends
    where one process ends: in float64 (train.precision: fp64), so that it is the same math on any CPU, to a
    tolerance a missing average or a wrong gather could not meet; the evaluation gives the same numbers and the
    same per-item hits."""
    import subprocess
    import sys

    from conftest import ROOT, run_clipkd
    from test_train import write_config

    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(7)
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, teacher)
    kd = dict(teacher={"model": "clipkd-tiny-teacher", "pretrained": str(teacher)},
              distill={"fd": 2000, "mfd": 2000, "icl": 1, "crd": 1},
              train={"steps": 6, "checkpoint_every": 3, "precision": "fp64"},
              eval={"every_steps": 3, "workers": 0})  # each rank embeds its share of the test images
    one = write_config(tmp_path, "one", output_dir=str(tmp_path / "one"), **kd)
    two = write_config(tmp_path, "two", output_dir=str(tmp_path / "two"), **kd)
    run_clipkd("run", str(one), cwd=tmp_path)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "harness.cli", "run",
         str(two)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, f"torchrun exited {launched.returncode}:\n{launched.stderr[-6000:]}"
    (run_one,), (run_two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    assert run_one.name == run_two.name  # output_dir and name do not change the run id
    records = [json.loads((run / "record.json").read_text()) for run in (run_one, run_two)]
    metrics = [record["metrics"]["digits"] for record in records]
    assert metrics[0].keys() == metrics[1].keys() and {"acc1", "image_retrieval_recall@1", "feature_cka_image"} <= set(metrics[0])
    for name, value in metrics[0].items():  # float32 embeddings of the same images, in batches of other shapes
        assert metrics[1][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert records[0]["items"] == records[1]["items"]
    from harness.run import training_cost

    cost = training_cost(run_two)  # two processes: twice the wall time in device-hours
    assert cost["world_size"] == 2 and cost["device_hours"] == pytest.approx(2 * cost["train_seconds"] / 3600)
    assert cost["teacher_forward_samples"] == 6 * 64  # each rank embedded its block; the event counts both
    progress = [[json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()] for run in (run_one, run_two)]
    assert [p["step"] for p in progress[0]] == [0, 3, 6] and progress[0] == progress[1]
    a = torch.load(run_one / "checkpoints" / "final.pt", weights_only=False)
    b = torch.load(run_two / "checkpoints" / "final.pt", weights_only=False)
    for part in ("state_dict", "methods"):
        for name, tensor in a[part].items():
            assert tensor.dtype in (torch.float64, torch.int64), f"{part}.{name} is {tensor.dtype}"
            torch.testing.assert_close(b[part][name], tensor, rtol=1e-9, atol=1e-11, msg=lambda m: f"{part}.{name}: {m}")


def _compressed_worker(rank, world_size, meeting, out_dir):
    """This rank's gradients three ways: its own (no DDP), DDP's with train.grad_compression bf16, and its own
    averaged by average_gradients (train.accum_freq's path) with bf16; and every rank's own, gathered."""
    env, images, texts = _join(rank, world_size, meeting)
    _, own = _losses_and_grads(env, images, texts, grad_compression=None)
    _, hooked = _losses_and_grads(env, images, texts, grad_compression="bf16")
    accumulated = {name: torch.nn.Parameter(torch.empty_like(grad)) for name, grad in own.items()}
    for name, parameter in accumulated.items():
        parameter.grad = own[name].clone()
    average_gradients(list(accumulated.values()), "bf16")
    everyone = [None] * world_size
    dist.all_gather_object(everyone, own)
    torch.save({"hooked": hooked, "accumulated": {n: p.grad for n, p in accumulated.items()}, "own": everyone},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_bf16_gradient_compression_rounds_each_ranks_share_as_torchs_hook_on_both_paths(tmp_path):
    """train.grad_compression: bf16. Under DDP (torch's bf16_compress_hook) and on the accumulation path
    (average_gradients) every gradient element is exactly bf16(bf16(x0) / 2 + bf16(x1) / 2) of the ranks' own
    gradients x0, x1 (two ranks: the division is exact); so not the float64 average, which it misses by bf16's
    rounding (2⁻⁸ of the ranks' shares at most), and the two paths train the same."""
    with rendezvous() as meeting:
        mp.spawn(_compressed_worker, args=(2, meeting, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    own = results[0]["own"]
    assert own[0].keys() == results[0]["hooked"].keys() == results[0]["accumulated"].keys()
    rounded_anywhere = False
    for name in own[0]:
        x0, x1 = (grads[name] for grads in own)
        expected = (x0.to(torch.bfloat16) / 2 + x1.to(torch.bfloat16) / 2).double()
        exact = (x0 + x1) / 2
        for rank, result in enumerate(results):
            for path in ("hooked", "accumulated"):
                assert result[path][name].dtype == torch.float64
                assert torch.equal(result[path][name], expected), (rank, path, name)
        assert ((expected - exact).abs() <= 2 ** -8 * (1 + 2 ** -8) * (x0.abs() + x1.abs()) + 1e-37).all(), name
        rounded_anywhere |= not torch.equal(expected, exact)
    assert rounded_anywhere


def test_the_trainer_hands_grad_compression_to_ddp_and_to_the_accumulation_average(tmp_path, monkeypatch):
    """train.grad_compression: bf16 reaches both places that average gradients across ranks, through the Trainer
    as a run builds it: DistributedDataParallel's hook (accum_freq 1) and average_gradients after an accumulated
    step. (The rounding each applies is the test above's; a Trainer that dropped the setting trained uncompressed
    without a word.)"""
    from core.distributed import DistEnv
    from harness.config.run_config import parse_config
    from harness.training import loop as train_module

    handed = []
    monkeypatch.setattr(train_module, "data_parallel", lambda module, device, compression: handed.append(
        ("ddp", compression)) or module)
    monkeypatch.setattr(train_module, "average_gradients", lambda parameters, compression: handed.append(
        ("average", compression)))
    monkeypatch.setattr(train_module, "broadcast_from_main", lambda module: None)  # no group in this process
    for accum in (1, 2):
        config = parse_config({"name": f"bf16-{accum}", "output_dir": str(tmp_path), "student": {"model": "clipkd-tiny"},
                               "data": {"dataset": "digits", "workers": 0},
                               "train": {"batch_size": 8, "steps": 1, "accum_freq": accum, "grad_compression": "bf16"}})
        trainer = train_module.Trainer(config, DistEnv(rank=0, world_size=2), torch.device("cpu"))  # rank 0 of 2
        trainer.train_step(next(iter(trainer.data.batches(0, 1))).to(torch.device("cpu")))
    assert handed == [("ddp", "bf16"), ("average", "bf16")]
