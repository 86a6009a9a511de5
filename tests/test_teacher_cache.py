"""The teacher-embedding cache: cached losses and gradients equal the live teacher's on un-augmented data,
concurrent builders leave one whole cache, and a cached run never builds the teacher.

Runs here are float64 (train.precision: fp64), so live teachers compute their embeddings to ~1e-16 whatever the
CPU's kernels. The cache stores float32, so a cached embedding is the float64 one rounded once: relative error at
most 2⁻²⁴ per element. Tolerances below follow from that; a wrong row or a wrong view moves values by O(1).
"""
import contextlib
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import teacher_cache
from harness.config import parse_config
from harness.distributed import DistEnv
from harness.train import CachedTeacher, LiveTeacher, Trainer, compute_losses, train

CPU = torch.device("cpu")
FLOAT32_ROUNDING = 2.0**-24  # relative error of storing a float64 value as float32
# A loss or a gradient computed from embeddings each off by at most FLOAT32_ROUNDING moves by that times the
# loss's sensitivity (logit scales ~14-100, FD's weight 2000): measured 4e-8 of the value at most. A gradient
# entry that is nearly zero has no relative precision, so gradients are compared to the size of their tensor.
CACHED_RELATIVE = 1e-6  # a wrong row or view changes a batch's losses by 1e-2 and more


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=CACHED_RELATIVE * scale, msg=what)


def kd_config(output_dir: Path, teacher: Path, embeddings: str, augment: bool = False, name: str = "kd"):
    return parse_config({
        "name": name, "seed": 3, "output_dir": str(output_dir), "student": {"model": "clipkd-tiny"},
        "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher), "embeddings": embeddings},
        "distill": {"fd": 2000, "icl": 1, "crd": 1, "gd": 1000, "afd": 1}, "data": {"dataset": "digits", "augment": augment},
        "optim": {"warmup_steps": 2}, "train": {"batch_size": 64, "steps": 4, "checkpoint_every": 2, "precision": "fp64"},
    })


def first_step(config, like: Trainer | None = None) -> tuple[dict, dict, Trainer]:
    """Loss terms and student gradients of the first batch; ``like``'s student and loss parameters if given (a
    live run builds its teacher before the loss modules, which moves the random init of their projections)."""
    trainer = Trainer(config, DistEnv(), CPU)
    if like is not None:
        trainer.student.model.load_state_dict(like.student.model.state_dict())
        trainer.objective.load_state_dict(like.objective.state_dict())
    images, texts, indices = next(iter(trainer.data.loader_for(0, 0)))
    terms = compute_losses(trainer.student.model, trainer.teacher, trainer.objective, images.to(trainer.dtype), texts,
                           indices)
    trainer.objective.total(terms).backward()
    grads = {n: p.grad.clone() for n, p in trainer.student.model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads, trainer


def test_cached_losses_and_gradients_equal_the_live_teachers(tmp_path, teacher_checkpoint):
    live_terms, live_grads, live = first_step(kd_config(tmp_path, teacher_checkpoint, "live"))
    cached_terms, cached_grads, cached = first_step(kd_config(tmp_path, teacher_checkpoint, "cached"), like=live)
    assert isinstance(live.teacher, LiveTeacher) and isinstance(cached.teacher, CachedTeacher)
    assert live_terms.keys() == cached_terms.keys() == {"task", "fd", "icl", "crd", "gd", "afd"}
    for name in live_terms:
        assert live_terms[name].dtype == torch.float64
        assert_close_at_scale(cached_terms[name], live_terms[name], name)
    assert live_grads.keys() == cached_grads.keys()
    for name in live_grads:
        assert_close_at_scale(cached_grads[name], live_grads[name], name)


def test_cache_holds_the_live_teachers_embeddings_of_the_unaugmented_view(tmp_path, teacher_checkpoint):
    config = kd_config(tmp_path, teacher_checkpoint, "cached")
    cached = teacher_cache.TeacherEmbeddings.open(teacher_cache.ensure(config, CPU))
    trainer = Trainer(kd_config(tmp_path, teacher_checkpoint, "live"), DistEnv(), CPU)
    samples = trainer.data.loader_for(0, 0).dataset.dataset  # the training set, un-augmented (augment: false)
    rows = [0, 5, len(samples) - 1]
    images = torch.stack([samples[i][0] for i in rows]).double()
    texts = torch.stack([samples[i][1] for i in rows])
    with torch.no_grad():
        image, text, scale = LiveTeacher(trainer.teacher.model)(images, texts, None)
    # the float64 embeddings rounded once to float32 (1e-15: other batches, other sums)
    np.testing.assert_allclose(cached.image[rows], image.numpy(), rtol=FLOAT32_ROUNDING + 1e-12, atol=0)
    np.testing.assert_allclose(cached.text[rows], text.numpy(), rtol=FLOAT32_ROUNDING + 1e-12, atol=0)
    assert cached.logit_scale == pytest.approx(float(scale)) and cached.image.shape == (len(samples), 96)


def _build(output_dir: str, teacher: str, locks_work: bool) -> None:
    if not locks_work:  # a filesystem where flock does nothing: both builders run, the rename decides
        teacher_cache._exclusive = lambda path: contextlib.nullcontext()
    torch.set_num_threads(1)
    teacher_cache.ensure(kd_config(Path(output_dir), Path(teacher), "cached"), CPU)


def _run_builders(*output_dirs: Path, teacher: Path, locks_work: bool = True) -> None:
    """A builder process per folder, at once; each on one thread, so every build runs the same kernels."""
    context = mp.get_context("spawn")
    builders = [context.Process(target=_build, args=(str(folder), str(teacher), locks_work)) for folder in output_dirs]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(timeout=300)
        assert builder.exitcode == 0


@pytest.mark.parametrize("locks_work", [True, False], ids=["flock", "no-lock"])
def test_two_builders_at_once_leave_one_whole_cache(tmp_path, teacher_checkpoint, locks_work):
    _run_builders(tmp_path, tmp_path, teacher=teacher_checkpoint, locks_work=locks_work)
    root = tmp_path / teacher_cache.CACHE_DIR
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    config = kd_config(tmp_path, teacher_checkpoint, "cached")
    assert folders == [teacher_cache.cache_dir(config).name]  # no partial folder left behind
    cached = teacher_cache.TeacherEmbeddings.open(root / folders[0])
    reference = tmp_path / "reference"  # a lone builder, in a process like theirs: the same kernels, the same bits
    _run_builders(reference, teacher=teacher_checkpoint)
    expected = teacher_cache.TeacherEmbeddings.open(teacher_cache.cache_dir(kd_config(reference, teacher_checkpoint,
                                                                                      "cached")))
    np.testing.assert_array_equal(cached.image, expected.image)
    np.testing.assert_array_equal(cached.text, expected.text)


def test_runs_share_one_cache_and_never_build_the_teacher(tmp_path, teacher_checkpoint, monkeypatch):
    first = kd_config(tmp_path, teacher_checkpoint, "cached", name="first")
    folder = teacher_cache.ensure(first, CPU)
    built = (folder / "image.npy").stat().st_mtime_ns

    def no_teacher(*args, **kwargs):
        raise AssertionError("a cached run built the teacher")

    monkeypatch.setattr("harness.train.create_teacher", no_teacher)
    monkeypatch.setattr("harness.teacher_cache.create_teacher", no_teacher)
    for config in (first, kd_config(tmp_path, teacher_checkpoint, "cached", augment=True, name="augmented")):
        assert (train(config) / "checkpoints" / "final.pt").is_file()
    assert (folder / "image.npy").stat().st_mtime_ns == built


def test_a_webdataset_cannot_be_cached(tmp_path):
    with pytest.raises(Exception, match="teacher.embeddings: cached reads embeddings by sample index"):
        parse_config({"student": {"model": "clipkd-tiny"},
                      "teacher": {"model": "clipkd-tiny-teacher", "pretrained": "x.pt", "embeddings": "cached"},
                      "distill": {"fd": 1}, "data": {"dataset": "webdataset", "path": "a.tar", "num_samples": 10},
                      "train": {"batch_size": 8, "steps": 1}})


def test_torchrun_builds_the_cache_with_every_process(tmp_path, teacher_checkpoint):
    """Two processes embed one half of the samples each into one cache, equal to the single-process one."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    two = kd_config(tmp_path / "two", teacher_checkpoint, "cached")
    config_file = tmp_path / "two.yaml"
    config_file.write_text(json.dumps(two.resolved()))  # JSON is YAML
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "harness.cli", "train",
         str(config_file)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        check=True, capture_output=True, timeout=600,
    )
    folders = [p for p in (tmp_path / "two" / teacher_cache.CACHE_DIR).iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [teacher_cache.cache_dir(two).name]
    both = teacher_cache.TeacherEmbeddings.open(folders[0])
    one = teacher_cache.TeacherEmbeddings.open(teacher_cache.ensure(kd_config(tmp_path / "one", teacher_checkpoint,
                                                                              "cached"), CPU))
    # float64 embeddings stored as float32: the two may round a value differing in its last float64 bits apart
    np.testing.assert_allclose(both.image, one.image, rtol=2 * FLOAT32_ROUNDING, atol=0)
    np.testing.assert_allclose(both.text, one.text, rtol=2 * FLOAT32_ROUNDING, atol=0)
    assert (tmp_path / "two" / two.run_id / "checkpoints" / "final.pt").is_file()
