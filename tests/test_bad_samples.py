"""Bad samples in shards and CSVs: a corrupt PNG, a truncated JPEG, a missing file, a missing and an empty caption.

With ``data.bad_samples: skip`` each is replaced by the next good sample (data/bad.py) and logged once; the batches
are the same at 0 and 2 loader workers, a resumed run ends as an uninterrupted one, a cached teacher agrees with
the live one (float64). With ``error``, or past ``data.max_bad_fraction``, the run stops with one message naming
the samples (exit 2, no traceback) and keeps its last good checkpoint. ``clipkd data check`` lists the same.
"""
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from conftest import resumed_equals_straight, run_clipkd
from PIL import Image
from test_teacher_cache import CPU, assert_close_at_scale, kd_config

from core.builtin import load_builtin
from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.training.loop import Trainer, train
from harness.training.objective import compute_losses

DIGITS = load_builtin("digits", "train")


def png(i: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(DIGITS.images[i]).save(out, format="PNG")
    return out.getvalue()


def truncated_jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(DIGITS.images[i]).convert("RGB").resize((64, 64)).save(out, format="JPEG", quality=90)
    return out.getvalue()[: len(out.getvalue()) // 2]


CORRUPT = b"this is not an image"  # 20 bytes of text where a PNG should be


def bad_shards(folder: Path) -> tuple[str, dict[str, str]]:
    """Two shards of 18 samples; four bad ones (key -> the reason clipkd gives): returns the pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {"00003": "cannot be decoded", "00007": "cannot be decoded", "00021": "no caption", "00030": "an empty caption"}
    for shard in range(2):
        with wds.TarWriter(str(folder / f"bad-{shard:02d}.tar")) as sink:
            for i in range(shard * 18, (shard + 1) * 18):
                key, sample = f"{i:05d}", {"__key__": f"{i:05d}", "png": png(i), "txt": DIGITS.captions[i]}
                if key == "00003":
                    sample["png"] = CORRUPT
                elif key == "00007":
                    del sample["png"]
                    sample["jpg"] = truncated_jpeg(i)
                elif key == "00021":
                    del sample["txt"]
                elif key == "00030":
                    sample["txt"] = "   "
                sink.write(sample)
    return str(folder / "bad-{00..01}.tar"), bad


def bad_csv(folder: Path) -> tuple[Path, dict[int, str]]:
    """A TSV of 36 rows (open_clip's filepath/title) with five bad ones (row index -> reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, bad = [], {4: "cannot be decoded", 9: "cannot be decoded", 13: "No such file", 20: "no caption",
                     27: "an empty caption"}
    for i in range(36):
        path = folder / f"{i:03d}.png"
        path.write_bytes(CORRUPT if i == 4 else png(i))
        if i == 9:
            path = path.with_suffix(".jpg")
            path.write_bytes(truncated_jpeg(i))
        caption = "" if i == 20 else "   " if i == 27 else DIGITS.captions[i]
        rows.append(f"{folder / 'missing.png' if i == 13 else path}\t{caption}")
    table = folder / "train.tsv"
    table.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return table, bad


def shard_run(tmp_path: Path, teacher: Path, embeddings: str = "live", **data) -> dict:
    pattern, _ = bad_shards(tmp_path / "shards")
    config = kd_config(tmp_path / "runs", teacher, embeddings, augment=True, views=2,
                       data={"dataset": "webdataset", "path": pattern, "num_samples": 36, "workers": 0,
                             "shuffle_window": 8, "max_bad_fraction": 0.2, **data}, batch_size=12, steps=6)
    return config.resolved()


def csv_run(tmp_path: Path, teacher: Path, **data) -> dict:
    table, _ = bad_csv(tmp_path / "csv")
    config = kd_config(tmp_path / "runs", teacher, "live", augment=True,
                       data={"dataset": "csv", "path": str(table), "workers": 0, "max_bad_fraction": 0.2, **data},
                       batch_size=12, steps=6)
    return config.resolved()


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "bad_samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["shards", "csv"])
def test_skip_replaces_each_bad_sample_logs_it_once_and_trains(tmp_path, teacher_checkpoint, kind):
    """Two epochs: every bad sample met twice, logged once, counted in the run's record."""
    resolved = shard_run(tmp_path, teacher_checkpoint) if kind == "shards" else csv_run(tmp_path, teacher_checkpoint)
    config = parse_config(resolved)
    run_dir = train(config)
    entries = logged(run_dir)
    expected = bad_shards(tmp_path / "shards")[1] if kind == "shards" else bad_csv(tmp_path / "csv")[1]
    if kind == "shards":
        assert sorted(e["where"].rsplit(" key ", 1)[1] for e in entries) == sorted(expected)
    else:
        assert sorted(int(e["where"].split(" row ")[1].split(" ")[0]) - 2 for e in entries) == sorted(expected)
    by_place = {e["where"]: e["reason"] for e in entries}
    for key, reason in expected.items():
        place = f" key {key}" if kind == "shards" else f" row {key + 2} "
        assert any(place in where and reason in why for where, why in by_place.items()), (key, by_place)
    assert (run_dir / "checkpoints" / "final.pt").is_file()


def batches(config_dict: dict, workers: int) -> list:
    config = parse_config({**config_dict, "data": {**config_dict["data"], "workers": workers}})
    trainer = Trainer(config, DistEnv(), CPU)
    return [(b.samples.tolist(), b.images.clone(), [e["sample"] for e in b.bad]) for b in trainer.data.epoch_batches(0, 0)]


@pytest.mark.parametrize("kind", ["shards", "csv"])
def test_batches_with_bad_samples_are_the_same_at_0_and_2_loader_workers(tmp_path, teacher_checkpoint, kind):
    resolved = shard_run(tmp_path, teacher_checkpoint) if kind == "shards" else csv_run(tmp_path, teacher_checkpoint)
    alone, split = batches(resolved, 0), batches(resolved, 2)
    assert len(alone) == len(split) == 3 and sum(len(bad) for _, _, bad in alone) >= 4  # every bad sample met
    for (ids, images, bad), (ids2, images2, bad2) in zip(alone, split):
        assert ids == ids2 and bad == bad2 and torch.equal(images, images2)


def test_resumed_run_with_bad_samples_ends_as_the_uninterrupted_one(tmp_path, teacher_checkpoint, monkeypatch):
    straight, resumed = resumed_equals_straight(shard_run(tmp_path, teacher_checkpoint), tmp_path, monkeypatch)
    assert sorted(e["sample"] for e in logged(resumed)) == sorted(e["sample"] for e in logged(straight))


def test_cached_teacher_replaces_bad_samples_as_the_live_one(tmp_path, teacher_checkpoint):
    """One step takes all 36 samples, the four bad ones among them: the cached run reads the rows of the same
    replacements the live teacher embeds (float64), and the cache's manifest lists the bad samples."""
    from harness.teachers import cache_key

    def first_terms(embeddings: str, like=None):
        config = parse_config({**shard_run(tmp_path, teacher_checkpoint, embeddings), "train": {
            "batch_size": 36, "steps": 1, "checkpoint_every": 1, "precision": "fp64"}})
        trainer = Trainer(config, DistEnv(), CPU)
        if like is not None:
            trainer.student.model.load_state_dict(like.student.model.state_dict())
            trainer.objective.load_state_dict(like.objective.state_dict())
        batch = next(iter(trainer.data.epoch_batches(0, 0)))
        assert len(batch.bad) == 4
        terms = compute_losses(trainer.student.model, trainer.teacher, trainer.objective, batch.to(CPU, trainer.dtype))
        return terms, trainer, config

    live_terms, live, _ = first_terms("live")
    cached_terms, _, config = first_terms("cached", like=live)
    for name, value in live_terms.items():
        assert_close_at_scale(cached_terms[name].detach(), value.detach(), name)
    meta = cache_key.read_meta(cache_key.cache_dir(config))
    assert len(meta["bad_samples"]) == 4


def _stop_step(resolved: dict, sample_key: str) -> int:
    """The step of epoch 0 whose block holds the given shard key (the loader's own plan)."""
    config = parse_config(resolved)
    trainer = Trainer(config, DistEnv(), CPU)
    for step, batch in enumerate(trainer.data.epoch_batches(0, 0), start=1):
        if any(e["where"].endswith(f"key {sample_key}") for e in batch.bad):
            return step
    raise AssertionError("not met")


def test_error_policy_stops_at_the_first_bad_sample_naming_it(tmp_path, teacher_checkpoint):
    for seed in range(20):  # a seed whose first bad sample comes after a checkpoint (every step here)
        resolved = {**shard_run(tmp_path, teacher_checkpoint, bad_samples="error", shuffle_window=36), "seed": seed,
                    "train": {"batch_size": 12, "steps": 6, "checkpoint_every": 1, "precision": "fp64"}}
        first = min(_stop_step(resolved, key) for key in ("00003", "00007", "00021", "00030"))
        if first > 1:
            break
    config_file = tmp_path / "error.yaml"
    config_file.write_text(yaml.safe_dump(resolved))
    result = run_clipkd("train", str(config_file), cwd=tmp_path, check=False)
    assert first > 1 and result.returncode == 2 and "Traceback" not in result.stderr, (first, result.stderr)
    assert "bad sample" in result.stderr and "key 000" in result.stderr and "data.bad_samples: error" in result.stderr
    kept = torch.load(parse_config(resolved).run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert kept["step"] == first - 1


def test_past_the_bound_the_run_stops_naming_the_count_and_the_setting(tmp_path, teacher_checkpoint):
    table, _ = bad_csv(tmp_path / "csv")
    config_file = tmp_path / "bound.yaml"
    config_file.write_text(yaml.safe_dump(csv_run(tmp_path, teacher_checkpoint, max_bad_fraction=0.05)))
    result = run_clipkd("train", str(config_file), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "more than data.max_bad_fraction 0.05 of the 36 samples" in result.stderr
    assert f"{table} row" in result.stderr
    run_dir = parse_config(yaml.safe_load(config_file.read_text())).run_dir
    assert not (run_dir / "checkpoints" / "final.pt").exists() and len(logged(run_dir)) > 0.05 * 36


def test_a_loader_workers_error_is_its_own_message_counted_within_the_set(tmp_path, clipkd):
    """A CSV whose one row names a missing image, read by a loader worker: one line naming the file and the set's
    size. Before, torch's wrapping (\"Caught BadSampleError in DataLoader worker process 0. Original Traceback\"
    and 20 lines of frames) came first, and the message said 1000 bad samples in a row of a set of one."""
    table = tmp_path / "one.tsv"
    table.write_text(f"filepath\ttitle\n{tmp_path / 'gone.png'}\ta digit\n")
    config = {"name": "one", "output_dir": str(tmp_path / "runs"), "student": {"model": "clipkd-tiny"},
              "data": {"dataset": "csv", "path": str(table), "workers": 1}, "train": {"batch_size": 1, "steps": 1}}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(config))
    result = clipkd("train", str(tmp_path / "one.yaml"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "error" in line]  # after the random-init notice
    assert error.startswith("clipkd: error: all 1 samples of the set are bad: is this the data you meant?")
    assert "gone.png" in error and "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr


def test_a_finished_runs_record_counts_its_bad_samples(tmp_path, teacher_checkpoint):
    config_file = tmp_path / "counted.yaml"
    config_file.write_text(yaml.safe_dump({**csv_run(tmp_path, teacher_checkpoint), "eval": {"workers": 0}}))
    run_clipkd("run", str(config_file), cwd=tmp_path)
    run_dir = parse_config(yaml.safe_load(config_file.read_text())).run_dir
    assert json.loads((run_dir / "record.json").read_text())["run"]["bad_samples"] == 5


def test_data_check_lists_exactly_the_bad_samples_and_the_loaders_read_its_findings(tmp_path, teacher_checkpoint):
    from harness.data.loaders import build_source
    from harness.data.views import Augmentation, ViewSpec
    from harness.models.build import create_clip

    for resolved, expected in ((shard_run(tmp_path, teacher_checkpoint), 4), (csv_run(tmp_path, teacher_checkpoint), 5)):
        config_file = tmp_path / "check.yaml"
        config_file.write_text(yaml.safe_dump(resolved))
        out = run_clipkd("data", "check", str(config_file), cwd=tmp_path).stdout
        assert f"{expected} bad samples of 36" in out, out
        config = parse_config(resolved)
        source = build_source(config.data, ViewSpec.of("clipkd-tiny"), create_clip("clipkd-tiny").tokenizer, Augmentation("none"),
                              Path(config.output_dir))
        assert len(source.known_bad) == expected  # a run replaces these without decoding them again
        listed = {int(sample) for sample in source.known_bad}
        assert all(source.where(sample) in out for sample in listed)


def test_a_bad_benchmark_image_is_one_message_naming_the_file(tmp_path):
    folder = tmp_path / "bench"
    for label in ("zero", "one"):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            (folder / label / f"{i}.png").write_bytes(png(i))
    (folder / "one" / "3.png").write_bytes(CORRUPT)
    result = run_clipkd("eval", "--model", "clipkd-tiny", "--pretrained", str(_weights(tmp_path)), "--dataset",
                        "imagefolder", "--root", str(folder), "--workers", "2", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{folder / 'one' / '3.png'}: the image cannot be decoded" in result.stderr


def _weights(folder: Path) -> Path:
    from harness.models.build import create_clip

    path = folder / "student.pt"
    torch.manual_seed(0)
    torch.save({"state_dict": create_clip("clipkd-tiny").model.state_dict()}, path)
    return path


def test_known_bad_samples_are_not_decoded_again(tmp_path, teacher_checkpoint):
    """After a data check the loader replaces them from its findings: the epoch decodes one image per slot."""
    resolved = shard_run(tmp_path, teacher_checkpoint)
    config_file = tmp_path / "check.yaml"
    config_file.write_text(yaml.safe_dump(resolved))
    run_clipkd("data", "check", str(config_file), cwd=tmp_path)
    epoch = batches(resolved, 0)
    trainer = Trainer(parse_config(resolved), DistEnv(), CPU)
    decoded = sum(b.decoded for b in trainer.data.epoch_batches(0, 0))
    assert decoded == sum(len(ids) for ids, _, _ in epoch) == 36 and any(bad for _, _, bad in epoch)


def test_grid_plan_checks_the_images_of_each_distinct_training_set(tmp_path, teacher_checkpoint):
    resolved = csv_run(tmp_path, teacher_checkpoint)
    grid = {"name": "checked", "output_dir": str(tmp_path / "runs"),
            "base": {key: resolved[key] for key in ("data", "optim", "train")},
            "axes": {"teachers": [resolved["teacher"]], "students": [{"model": "clipkd-tiny"}],
                     "methods": {"fd": {"fd": 1}, "icl": {"icl": 1}}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    out = run_clipkd("grid", "plan", "grid.yaml", "--check-images", cwd=tmp_path).stdout
    assert out.count("5 bad samples of 36") == 1  # two cells, one training set


def _refusing_rank(rank: int, world: int, meeting: dict, resolved: dict, out: str, fails_alone: bool = False) -> None:
    """Train; write what this rank raised and when. ``fails_alone``: rank 1 raises an error of its own inside its
    third step (as an out-of-memory on one GPU would), outside any vote."""
    import time

    from harness.training.loop import Trainer

    torch.set_num_threads(1)
    os.environ.update(meeting, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if fails_alone and rank == 1:
        step = Trainer.train_step

        def failing(self, batch):
            if self.step == 2:
                raise RuntimeError("CUDA out of memory (simulated on rank 1)")
            return step(self, batch)

        Trainer.train_step = failing
    started = time.monotonic()
    try:
        train(parse_config(resolved))
        raised = None
    except Exception as error:  # noqa: BLE001 (what each rank says is the test's subject)
        raised = f"{type(error).__name__}: {error}"
    Path(out, f"rank{rank}.json").write_text(json.dumps({"raised": raised, "seconds": time.monotonic() - started}))
    if torch.distributed.is_initialized():  # as every spawned test: no live group at the interpreter's exit, where
        torch.distributed.destroy_process_group()  # gloo's threads once aborted a rank that had failed (SIGABRT)


def one_bad_row_csv(folder: Path) -> Path:
    """24 rows of digits, row 13's image corrupt."""
    rows = []
    for i in range(24):
        path = folder / f"{i:02d}.png"
        path.write_bytes(CORRUPT if i == 13 else png(i))
        rows.append(f"{path}\t{DIGITS.captions[i]}")
    (folder / "train.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return folder / "train.tsv"


def test_a_bad_sample_in_one_ranks_block_stops_every_rank_with_its_message(tmp_path):
    """2 processes, data.bad_samples: error, the one bad sample in rank 1's block only: both stop at once with the
    message naming it, long before the group's 60-second timeout, and the checkpoint before that step is kept.
    Before, rank 1 raised alone and rank 0 waited in the next all-gather: a gloo error naming no sample (on NCCL,
    the timeout)."""
    import torch.multiprocessing as spawn_mp
    from conftest import rendezvous

    from harness.data.memory import rank_blocks

    table = one_bad_row_csv(tmp_path)
    seed = next(s for s in range(50) if any(13 in block for _, block in rank_blocks(24, 12, s, 1, 2, 1, 2)))
    resolved = {"name": "refused", "seed": seed, "output_dir": str(tmp_path / "runs"),
                "student": {"model": "clipkd-tiny"},
                "data": {"dataset": "csv", "path": str(table), "workers": 0, "bad_samples": "error"},
                "train": {"batch_size": 12, "steps": 4, "checkpoint_every": 1, "collective_timeout_s": 60}}
    with rendezvous() as meeting:
        spawn_mp.spawn(_refusing_rank, args=(2, meeting, resolved, str(tmp_path)), nprocs=2, join=True)
    said = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert said[0]["raised"] == said[1]["raised"], said
    assert said[0]["raised"].startswith("BadSampleError: bad sample") and "13.png" in said[0]["raised"], said
    assert max(rank["seconds"] for rank in said) < 45, said  # the group's timeout (60 s) never came into it
    kept = torch.load(parse_config(resolved).run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert kept["step"] == 1  # the step that held the bad sample (step 2) was refused by both ranks


def test_an_error_on_one_rank_reaches_the_other_in_its_words(tmp_path):
    """Rank 1 fails inside a step on its own (no vote can carry it: rank 0 is already in the step's collectives).
    It posts its message to the group's store before its process ends; rank 0's collective fails at once and
    rank 0 raises that message, not the transport's. Before, rank 0 reported a gloo connection error."""
    import torch.multiprocessing as spawn_mp
    from conftest import rendezvous

    resolved = {"name": "alone", "output_dir": str(tmp_path / "runs"), "student": {"model": "clipkd-tiny"},
                "data": {"dataset": "digits", "workers": 0},
                "train": {"batch_size": 12, "steps": 4, "collective_timeout_s": 60}}
    with rendezvous() as meeting:
        spawn_mp.spawn(_refusing_rank, args=(2, meeting, resolved, str(tmp_path), True), nprocs=2, join=True)
    said = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert said[1]["raised"] == "RuntimeError: CUDA out of memory (simulated on rank 1)", said
    assert said[0]["raised"].startswith("RankFailed: rank 1: RuntimeError: CUDA out of memory (simulated on rank 1)")
    assert said[0]["seconds"] < 45, said


def test_a_bad_sample_is_replaced_by_the_next_good_one_across_a_shards_end_and_the_sets(tmp_path):
    """Each bad sample's slot holds the next good sample in the shards' own order, its id and its very pixels and
    tokens: within a shard, from a shard's last sample to the next shard's first, and from the set's last sample
    round to its first (runs of bad samples skipped)."""
    import open_clip
    import webdataset as wds

    from harness.config.specs import DataSpec
    from harness.data.batch import make_block
    from harness.data.loaders import build_source
    from harness.data.views import Augmentation, ViewSpec

    bad = {(0, 5), (1, 2), (1, 3), (1, 5)}  # shard 0's last, two in a row, the set's last
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"s-{shard}.tar")) as sink:
            for position in range(6):
                i = 6 * shard + position
                sink.write({"__key__": f"{i:04d}", "png": CORRUPT if (shard, position) in bad else png(i),
                            "txt": DIGITS.captions[i]})
    spec = DataSpec(dataset="webdataset", path=str(tmp_path / "s-{0..1}.tar"), num_samples=12)
    source = build_source(spec, ViewSpec.of("clipkd-tiny"), open_clip.get_tokenizer("clipkd-tiny"), Augmentation("none"),
                          tmp_path)
    ident = lambda shard, position: (shard << 32) | position  # noqa: E731
    asked = [ident(0, 5), ident(1, 2), ident(1, 3), ident(1, 5), ident(0, 1)]
    replaced = make_block(source, None, 0, np.array(asked, dtype=np.int64))
    expected = [ident(1, 0), ident(1, 4), ident(1, 4), ident(0, 0), ident(0, 1)]
    assert replaced.samples.tolist() == expected
    direct = make_block(source, None, 0, np.array(expected, dtype=np.int64))
    assert torch.equal(replaced.images, direct.images) and torch.equal(replaced.texts, direct.texts)
    assert {entry["sample"] for entry in replaced.bad} == {ident(*where) for where in bad}
