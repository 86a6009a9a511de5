"""The teacher-embedding cache: cached losses and gradients equal the live teacher's for the same views (the
un-augmented one, or K stored augmented views, on a built-in set and on webdataset shards), concurrent builders
leave one whole cache, a killed builder's partial folder is cleaned up, and a cached run never builds the teacher.

Runs here are float64 (train.precision: fp64), so live teachers compute their embeddings to ~1e-16 whatever the
CPU's kernels. The cache stores float32, so a cached embedding is the float64 one rounded once: relative error at
most 2⁻²⁴ per element. Tolerances below follow from that; a wrong row or a wrong view moves values by O(1).
"""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, rendezvous, run_clipkd, write_shards

from core.distributed import DistEnv
from core.precision import autocast
from harness.config.run_config import parse_config
from harness.models.build import create_clip
from harness.teachers import cache_build, cache_key, cache_lock
from harness.teachers.cached import CachedRows, CachedTeacher
from harness.teachers.cached import info as cache_info
from harness.teachers.live import LiveTeacher
from harness.training.loop import Trainer, train
from harness.training.objective import compute_losses

CPU = torch.device("cpu")
FLOAT32_ROUNDING = 2.0**-24  # relative error of storing a float64 value as float32
# A loss or a gradient computed from embeddings each off by at most FLOAT32_ROUNDING moves by that times the
# loss's sensitivity (logit scales ~14-100, FD's weight 2000): measured 4e-8 of the value at most. A gradient
# entry that is nearly zero has no relative precision, so gradients are compared to the size of their tensor.
CACHED_RELATIVE = 1e-6  # a wrong row or view changes a batch's losses by 1e-2 and more


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=CACHED_RELATIVE * scale, msg=what)


def kd_config(output_dir: Path, teacher: Path, embeddings: str, augment: bool = False, name: str = "kd",
              views: int = 0, data: dict | None = None, **train):
    return parse_config({
        "name": name, "seed": 3, "output_dir": str(output_dir), "student": {"model": "clipkd-tiny"},
        "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher), "embeddings": embeddings,
                    "views": views},
        "distill": {"fd": 2000, "icl": 1, "crd": 1, "gd": 1000, "afd": 1},
        "data": {"dataset": "digits", "augment": augment, **(data or {})},
        "optim": {"warmup_steps": 2},
        "train": {"batch_size": 64, "steps": 4, "checkpoint_every": 2, "precision": "fp64", **train},
    })


def first_step(config, like: Trainer | None = None, epoch: int = 0) -> tuple[dict, dict, Trainer]:
    """Loss terms and student gradients of the epoch's first batch; ``like``'s student and loss parameters if
    given (a live run builds its teacher before the loss modules, which moves the random init of their
    projections)."""
    trainer = Trainer(config, DistEnv(), CPU)
    if like is not None:
        trainer.student.model.load_state_dict(like.student.model.state_dict())
        trainer.objective.load_state_dict(like.objective.state_dict())
    batch = next(iter(trainer.data.epoch_batches(epoch, 0))).to(CPU, trainer.dtype)
    with autocast(CPU, config.train.precision):  # as the training step
        terms = compute_losses(trainer.student.model, trainer.teacher, trainer.objective, batch)
    trainer.objective.total(terms).backward()
    grads = {n: p.grad.clone() for n, p in trainer.student.model.named_parameters() if p.grad is not None}
    trainer.first_batch = batch
    return {k: v.detach() for k, v in terms.items()}, grads, trainer


def assert_cached_equals_live(live_config, cached_config, epoch: int = 0) -> tuple[Trainer, Trainer]:
    live_terms, live_grads, live = first_step(live_config, epoch=epoch)
    cached_terms, cached_grads, cached = first_step(cached_config, like=live, epoch=epoch)
    assert isinstance(live.teacher.members[0], LiveTeacher) and isinstance(cached.teacher.members[0], CachedTeacher)
    assert torch.equal(live.first_batch.samples, cached.first_batch.samples)
    assert torch.equal(live.first_batch.images, cached.first_batch.images)  # the same views
    assert live_terms.keys() == cached_terms.keys() == {"task", "fd", "icl", "crd", "gd", "afd"}
    for name in live_terms:
        assert live_terms[name].dtype == torch.float64
        assert_close_at_scale(cached_terms[name], live_terms[name], name)
    assert live_grads.keys() == cached_grads.keys()
    for name in live_grads:
        assert_close_at_scale(cached_grads[name], live_grads[name], name)
    return live, cached


def test_cached_losses_and_gradients_equal_the_live_teachers(tmp_path, teacher_checkpoint):
    assert_cached_equals_live(kd_config(tmp_path, teacher_checkpoint, "live"),
                              kd_config(tmp_path, teacher_checkpoint, "cached"))


def test_stored_augmented_views_replay_exactly(tmp_path, teacher_checkpoint):
    """K = 3 views on a built-in set: the run trains on augmented views the cache holds, equal to live KD on the
    same views; each epoch draws one view per sample, and the boxes stored are the boxes trained on."""
    def config(embeddings):
        return kd_config(tmp_path, teacher_checkpoint, embeddings, augment=True, views=3)

    for epoch in (0, 1):
        live, cached = assert_cached_equals_live(config("live"), config("cached"), epoch)
        batch = cached.first_batch
        stored = stored_rows(cache_key.cache_dir(config("cached")), "boxes")
        np.testing.assert_array_equal(stored[batch.samples.numpy(), batch.views.numpy()], batch.boxes.numpy())
        assert set(batch.views.tolist()) == {0, 1, 2}
        assert (stored[:, 0] != stored[:, 1]).any(axis=1).mean() > 0.5  # the views differ
    choice = Trainer(config("cached"), DistEnv(), CPU).source.augmentation.choose
    samples = np.arange(1257)
    assert (choice(0, samples) != choice(1, samples)).mean() > 0.5  # each epoch draws the views afresh
    info = cache_info(cache_key.cache_dir(config("cached")))
    assert info["views"] == 3 and info["samples"] == 1257 and info["embed_dim"] == 96


def test_cache_holds_the_live_teachers_embeddings_of_the_unaugmented_view(tmp_path, teacher_checkpoint):
    config = kd_config(tmp_path, teacher_checkpoint, "cached")
    rows = CachedRows(cache_build.ensure(config, CPU))
    trainer = Trainer(kd_config(tmp_path, teacher_checkpoint, "live"), DistEnv(), CPU)
    source = trainer.source  # the in-memory training set, un-augmented (augment: false)
    samples = np.array([0, 5, len(source) - 1])
    batch = source.render(0, samples, None).to(CPU, torch.float64)
    with torch.no_grad():
        image, text, scale, _ = LiveTeacher(trainer.teacher.members[0].model)(batch)
    cached_image, cached_text = rows.lookup(samples, None)
    # the float64 embeddings rounded once to float32 (1e-15: other batches, other sums)
    np.testing.assert_allclose(cached_image.numpy(), image.numpy(), rtol=FLOAT32_ROUNDING + 1e-12, atol=0)
    np.testing.assert_allclose(cached_text.numpy(), text.numpy(), rtol=FLOAT32_ROUNDING + 1e-12, atol=0)
    assert rows.logit_scale == pytest.approx(float(scale)) and rows.samples == len(source)


def _build(output_dir: str, teacher: str, locks_work: bool, hold_until: str | None = None) -> None:
    if not locks_work:  # a filesystem where flock does nothing: both builders run, the rename decides
        cache_lock._try_lock = lambda handle: True
    if hold_until:  # stop after creating the partial folder's arrays until the file ``hold_until`` exists
        embed = cache_build._Builder.embed

        def held_embed(self, folder, share):
            while not Path(hold_until).exists():
                time.sleep(0.05)
            embed(self, folder, share)

        cache_build._Builder.embed = held_embed
    torch.set_num_threads(1)
    cache_build.ensure(kd_config(Path(output_dir), Path(teacher), "cached", data={"workers": 0}), CPU)


def _start_builder(output_dir: Path, teacher: Path, locks_work: bool = True, hold_until: Path | None = None):
    """A builder process on one thread, so that every build runs the same kernels."""
    builder = mp.get_context("spawn").Process(target=_build, args=(str(output_dir), str(teacher), locks_work,
                                                                   hold_until and str(hold_until)), daemon=True)
    builder.start()
    return builder


def _finish(*builders) -> None:
    for builder in builders:
        builder.join(timeout=300)
        assert builder.exitcode == 0


def _run_builders(*output_dirs: Path, teacher: Path, locks_work: bool = True) -> None:
    _finish(*[_start_builder(folder, teacher, locks_work) for folder in output_dirs])


def stored_rows(folder: Path, name: str) -> np.ndarray:
    """A map-style cache's array over all its samples: each building rank's part, in order."""
    parts = sorted((folder / "parts").glob(f"*.{name}.npy"), key=lambda path: int(path.name.split(".")[0]))
    return np.concatenate([np.load(path) for path in parts])


def assert_one_whole_cache(output_dir: Path, teacher: Path) -> None:
    root = output_dir / cache_key.CACHE_DIR
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    config = kd_config(output_dir, teacher, "cached", data={"workers": 0})
    assert folders == [cache_key.cache_dir(config).name]  # no partial folder left behind
    reference = output_dir / "reference"  # a lone builder, in a process like theirs: the same kernels, the same bits
    _run_builders(reference, teacher=teacher)
    reference_folder = cache_key.cache_dir(kd_config(reference, teacher, "cached", data={"workers": 0}))
    for name in ("image", "text"):
        np.testing.assert_array_equal(stored_rows(root / folders[0], name), stored_rows(reference_folder, name))


def test_two_builders_at_once_leave_one_whole_cache(tmp_path, teacher_checkpoint):
    _run_builders(tmp_path, tmp_path, teacher=teacher_checkpoint)
    assert_one_whole_cache(tmp_path, teacher_checkpoint)


def test_without_a_working_lock_a_late_builder_leaves_a_live_builders_folder_alone(tmp_path, teacher_checkpoint):
    """Forced order, on a filesystem whose lock does nothing: builder A has made its partial folder and is held;
    builder B starts, finds A's folder (A is alive: not abandoned), builds and publishes its own; then A finishes,
    finds the cache published and drops its copy."""
    go = tmp_path / "go"
    first = _start_builder(tmp_path, teacher_checkpoint, locks_work=False, hold_until=go)
    root = tmp_path / cache_key.CACHE_DIR
    deadline = time.monotonic() + 120
    while not any(root.glob("*.partial-*/parts/0.image.npy")):
        assert first.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    (held,) = root.glob("*.partial-*")
    _finish(_start_builder(tmp_path, teacher_checkpoint, locks_work=False))
    assert held.is_dir() and first.is_alive()  # B neither deleted A's folder nor waited for A
    go.touch()
    _finish(first)
    assert_one_whole_cache(tmp_path, teacher_checkpoint)


def test_a_killed_builders_partial_folder_is_removed_by_the_next_builder(tmp_path, teacher_checkpoint):
    config = kd_config(tmp_path, teacher_checkpoint, "cached", augment=True, views=4)  # slow enough to be caught
    config_file = tmp_path / "kd.yaml"
    config_file.write_text(json.dumps(config.resolved()))
    builder = subprocess.Popen([sys.executable, "-m", "harness.cli", "train", str(config_file)], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    root = tmp_path / cache_key.CACHE_DIR
    deadline = time.monotonic() + 120
    while not any(root.glob("*.partial-*/parts/0.image.npy")):
        assert builder.poll() is None and time.monotonic() < deadline, "the builder ended before it could be killed"
        time.sleep(0.05)
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=60)
    (partial,) = root.glob("*.partial-*")
    assert not cache_key.is_built(config)
    folder = cache_build.ensure(config, CPU)
    assert cache_key.is_built(config) and not partial.exists()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [folder.name]


def test_runs_share_one_cache_and_never_build_the_teacher(tmp_path, teacher_checkpoint, monkeypatch):
    first = kd_config(tmp_path, teacher_checkpoint, "cached", name="first")
    folder = cache_build.ensure(first, CPU)
    built = (folder / "parts" / "0.image.npy").stat().st_mtime_ns

    def no_teacher(*args, **kwargs):
        raise AssertionError("a cached run built the teacher")

    monkeypatch.setattr("harness.teachers.ensemble.create_teacher", no_teacher)
    monkeypatch.setattr("harness.teachers.cache_build.create_teacher", no_teacher)
    for config in (first, kd_config(tmp_path, teacher_checkpoint, "cached", augment=True, name="augmented")):
        assert (train(config) / "checkpoints" / "final.pt").is_file()
    assert (folder / "parts" / "0.image.npy").stat().st_mtime_ns == built


def test_float16_storage_halves_the_cache_and_moves_losses_as_the_readme_says(tmp_path, teacher_checkpoint):
    """The README's claim, in its setting (benchmarks/cache_size.py: 5 views of digits, 5 batches of 128): float16
    moves CRD by less than 2e-4 of its value and the other terms by less than 3e-5. float16 keeps 11 significant
    bits; bfloat16 storage, with 8, would move them about 8 times as far."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cache_size import config, loss_terms

    terms, sizes = {}, {}
    for storage in ("float32", "float16"):
        cfg = config(tmp_path, teacher_checkpoint, storage, views=5)
        sizes[storage] = cache_info(cache_build.ensure(cfg, CPU))["bytes"]
        torch.manual_seed(0)
        terms[storage] = loss_terms(Trainer(cfg, DistEnv(), CPU), batches=5)
    assert 0.45 < sizes["float16"] / sizes["float32"] < 0.6  # the crop boxes stay int32
    for name in terms["float32"][0]:
        change = max(abs(h[name] - f[name]) / abs(f[name]) for f, h in zip(terms["float32"], terms["float16"]))
        assert change < (2e-4 if name == "crd" else 3e-5), (name, change)


# -- webdataset shards ---------------------------------------------------------------------------------------------
def shard_config(tmp_path: Path, teacher: Path, embeddings: str, shards: str, workers: int = 0, views: int = 3,
                 **train):
    return kd_config(tmp_path / "runs", teacher, embeddings, augment=True, views=views,
                     data={"dataset": "webdataset", "path": shards, "num_samples": 96, "workers": workers,
                           "shuffle_window": 32}, **{"batch_size": 32, **train})


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_cache_replays_views_like_the_live_teacher(tmp_path, teacher_checkpoint, workers):
    """With loader workers, each reads the cached rows of the samples it yields (in its own process): the first
    batch's losses and gradients, then every batch of two epochs (with 2 workers, worker 1 makes every other
    batch, which the first batch alone never shows) — the same samples and pixels, and teacher rows equal to the
    live teacher's embeddings of them."""
    shards = write_shards(tmp_path / "shards", [40, 60])
    live, cached = assert_cached_equals_live(shard_config(tmp_path, teacher_checkpoint, "live", shards, workers),
                                             shard_config(tmp_path, teacher_checkpoint, "cached", shards, workers))
    pairs = zip(live.data.batches(0, 6), cached.data.batches(0, 6), strict=True)
    with torch.no_grad():
        for step, (live_batch, cached_batch) in enumerate(pairs):
            live_batch, cached_batch = live_batch.to(CPU, torch.float64), cached_batch.to(CPU, torch.float64)
            assert torch.equal(live_batch.samples, cached_batch.samples), step
            assert torch.equal(live_batch.images, cached_batch.images), step
            for embedded, stored in zip(live.teacher.members[0](live_batch), cached.teacher.members[0](cached_batch)):
                torch.testing.assert_close(stored, embedded, rtol=2 * FLOAT32_ROUNDING, atol=1e-30, msg=f"step {step}")
    folder = cache_key.cache_dir(shard_config(tmp_path, teacher_checkpoint, "cached", shards))
    meta = json.loads((folder / "meta.json").read_text())
    assert [s["samples"] for s in meta["shards"]] == [40, 60] and meta["spec"]["views"] == 3
    assert np.load(folder / "shards" / "1.image.npy").shape == (60, 3, 96)


def _rank(rank: int, meeting: dict, config: dict, forbid_teacher: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", **meeting)
    torch.set_num_threads(1)
    if forbid_teacher:
        def no_teacher(*args, **kwargs):
            raise AssertionError("training from a cache built the teacher")

        from harness.teachers import ensemble

        ensemble.create_teacher = cache_build.create_teacher = no_teacher
    from core.distributed import init_distributed

    env = init_distributed()
    config = parse_config(config)
    if forbid_teacher:
        train(config)
    else:
        cache_build.ensure(config, CPU, env)


def test_two_processes_build_a_k3_shard_cache_then_two_ranks_train_from_it(tmp_path, teacher_checkpoint):
    shards = write_shards(tmp_path / "shards", [40, 60])
    config = shard_config(tmp_path, teacher_checkpoint, "cached", shards, steps=3)
    for forbid_teacher in (False, True):  # build with two processes, then train two ranks without a teacher
        with rendezvous() as meeting:
            torch.multiprocessing.spawn(_rank, args=(meeting, config.resolved(), forbid_teacher), nprocs=2)
    folder = cache_key.cache_dir(config)
    assert cache_key.read_meta(folder)["embedded_by_rank"] == [40, 60]  # whole shards: rank 0 the first
    one = tmp_path / "one"  # the same cache built by one process
    single = cache_build.ensure(shard_config(one, teacher_checkpoint, "cached", shards, steps=3), CPU)
    for shard in (0, 1):
        for name in ("image", "text"):
            np.testing.assert_allclose(np.load(folder / "shards" / f"{shard}.{name}.npy"),
                                       np.load(single / "shards" / f"{shard}.{name}.npy"), rtol=2 * FLOAT32_ROUNDING)
        np.testing.assert_array_equal(np.load(folder / "shards" / f"{shard}.boxes.npy"),
                                      np.load(single / "shards" / f"{shard}.boxes.npy"))
    assert (config.run_dir / "checkpoints" / "final.pt").is_file()
    events = [json.loads(line) for line in (config.run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "finish" and events[-1]["teacher_forward_samples"] == 0


def test_torchrun_builds_the_cache_with_every_process(tmp_path, teacher_checkpoint):
    """Two processes embed one half of the samples each into one cache, equal to the single-process one."""
    two = kd_config(tmp_path / "two", teacher_checkpoint, "cached")
    config_file = tmp_path / "two.yaml"
    config_file.write_text(json.dumps(two.resolved()))  # JSON is YAML
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "harness.cli", "train",
         str(config_file)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        check=True, capture_output=True, timeout=600,
    )
    folders = [p for p in (tmp_path / "two" / cache_key.CACHE_DIR).iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [cache_key.cache_dir(two).name]
    assert cache_key.read_meta(folders[0])["embedded_by_rank"] == [628, 629]  # each rank its half of 1257
    one = cache_build.ensure(kd_config(tmp_path / "one", teacher_checkpoint, "cached"), CPU)
    # float64 embeddings stored as float32: the two may round a value differing in its last float64 bits apart
    for name in ("image", "text"):
        np.testing.assert_allclose(stored_rows(folders[0], name), stored_rows(one, name),
                                   rtol=2 * FLOAT32_ROUNDING, atol=0)
    assert (tmp_path / "two" / two.run_id / "checkpoints" / "final.pt").is_file()


def test_new_teacher_weights_a_rewritten_shard_or_other_views_build_a_new_cache(tmp_path, teacher_checkpoint):
    """In one output_dir: each change names another cache, which is built anew and holds other numbers; the old
    one is never read for the new data."""
    shards = write_shards(tmp_path / "shards", [40, 60])
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(teacher_checkpoint.read_bytes())

    def built(**changes) -> Path:
        return cache_build.ensure(shard_config(tmp_path, teacher, "cached", shards, **changes), CPU)

    def embeddings(folder: Path, shard: int = 1) -> np.ndarray:
        return np.load(folder / "shards" / f"{shard}.image.npy")

    first = built()
    torch.manual_seed(99)  # the teacher file rewritten with other weights
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, teacher)
    retrained = built()
    assert retrained != first and not np.allclose(embeddings(retrained), embeddings(first))

    write_shards(tmp_path / "other", [40, 60], offset=500)  # shard 1 rewritten: the same keys, other images
    (tmp_path / "shards" / "shard-01.tar").write_bytes((tmp_path / "other" / "shard-01.tar").read_bytes())
    rewritten = built()
    assert rewritten not in (first, retrained)
    assert np.array_equal(embeddings(rewritten, 0), embeddings(retrained, 0))
    assert not np.allclose(embeddings(rewritten), embeddings(retrained))

    fewer_views = built(views=2)
    assert fewer_views not in (first, retrained, rewritten) and embeddings(fewer_views).shape[1] == 2
    assert len([p for p in (tmp_path / "runs" / cache_key.CACHE_DIR).iterdir() if p.is_dir()]) == 4


def test_an_edited_csv_or_an_image_downloaded_again_names_another_cache(tmp_path, teacher_checkpoint):
    """A CSV set is keyed by what its samples are: the table's bytes and each image file. Before, by the table's
    path alone: a cached run read teacher rows of other pixels after either change, silently."""
    from PIL import Image

    from core.builtin import load_builtin

    digits = load_builtin("digits", "train")
    rows = []
    for i in range(8):
        Image.fromarray(digits.images[i]).save(tmp_path / f"{i}.png")
        rows.append(f"{tmp_path / f'{i}.png'}\t{digits.captions[i]}")
    table = tmp_path / "train.tsv"
    table.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    config = kd_config(tmp_path, teacher_checkpoint, "cached", data={"dataset": "csv", "path": str(table)})
    keys = [cache_key.cache_dir(config).name]
    Image.fromarray(digits.images[9]).save(tmp_path / "3.png")  # image 3 downloaded again: other pixels
    keys.append(cache_key.cache_dir(config).name)
    table.write_text(table.read_text().replace(digits.captions[5], digits.captions[5].upper()))  # same rows
    keys.append(cache_key.cache_dir(config).name)
    assert len(set(keys)) == 3, keys


def test_a_cache_written_before_parts_is_read_as_before(tmp_path, teacher_checkpoint):
    """A map-style cache is built as each rank's own files (parts/); one built before, a single array per kind by
    sample index, still reads the same rows."""
    config = kd_config(tmp_path, teacher_checkpoint, "cached", augment=True, views=2, data={"subset": 200})
    folder = cache_build.ensure(config, CPU)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("image", "text", "boxes"):
        np.save(old / f"{name}.npy", stored_rows(folder, name))
    meta = cache_key.read_meta(folder)
    del meta["parts"]
    (old / cache_key.META).write_text(json.dumps(meta))
    samples, views = np.arange(200)[::-3], np.arange(200)[::-3] % 2
    for new, before in zip(CachedRows(folder).lookup(samples, views),
                           CachedRows(old).lookup(samples, views)):
        assert torch.equal(new, before)


def test_cache_info_reports_bytes_per_sample(tmp_path, teacher_checkpoint):
    config = kd_config(tmp_path, teacher_checkpoint, "cached", augment=True, views=2)
    folder = cache_build.ensure(config, CPU)
    out = run_clipkd("cache", "info", str(folder), "--json", cwd=tmp_path).stdout
    facts = json.loads(out)
    arrays = sum(p.stat().st_size for p in folder.rglob("*.npy"))
    assert facts["bytes"] == arrays and facts["samples"] == 1257 and facts["views"] == 2
    # per sample: 2 views + 1 caption of 96 float32, and 2 boxes of 4 int32 (plus the arrays' headers)
    assert (2 + 1) * 96 * 4 + 2 * 4 * 4 <= facts["bytes_per_sample"] < (2 + 1) * 96 * 4 + 2 * 4 * 4 + 1
    bad = run_clipkd("cache", "info", str(tmp_path), cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "is not a finished teacher-embedding cache" in bad.stderr


@pytest.mark.parametrize(("config", "run_id", "key"), [
    ({"student": {"model": "clipkd-tiny"}, "distill": {"fd": 1}, "data": {"dataset": "digits"},
      "teacher": {"model": "clipkd-tiny-teacher", "pretrained": "openai", "embeddings": "cached"}},
     "9a2da60daf22", "3727ea9b9a11635c"),
    ({"student": {"model": "ViT-B-32"}, "distill": {"crd": 1}, "data": {"dataset": "digits", "augment": True},
      "teacher": {"model": "ViT-L-14-336", "pretrained": "openai", "embeddings": "cached", "views": 2},
      "train": {"precision": "bf16"}},
     # the run's id as before; the cache's key moved when teachers got their own input (issue 31): a ViT-L-14-336
     # teacher's cache held its embeddings of the student's 224 px view, and now holds those of its own 336 px one
     "2868909944a4", "23d6f44708e079dd"),
])
def test_caches_and_runs_from_before_the_move_into_packages_are_found(config, run_id, key):
    """The keys of caches built and the ids of runs trained before issue 30 split the harness into packages (taken
    at 3f86d8f): the key is now read from the same facts without torch (open_clip only for a pretrained tag's
    preprocessing); a teacher that preprocesses like its student keeps its cache's key."""
    config = parse_config({**config, "train": {"batch_size": 8, "steps": 1, **config.get("train", {})}})
    assert (config.run_id, cache_key.cache_dir(config).name) == (run_id, key)
