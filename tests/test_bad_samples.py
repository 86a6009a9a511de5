"""Bad samples in shards and CSVs: a corrupt PNG, a truncated JPEG, a missing file, a missing and an empty caption.

With ``data.bad_samples: skip`` each is replaced by the next good sample (data/bad.py) and logged once; the batches
are the same at 0 and 2 loader workers, a resumed run ends as an uninterrupted one, a cached teacher agrees with
the live one (float64). With ``error``, or past ``data.max_bad_fraction``, the run stops with one message naming
the samples (exit 2, no traceback) and keeps its last good checkpoint. ``clipkd data check`` lists the same.
"""
import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from conftest import run_clipkd
from PIL import Image
from test_teacher_cache import CPU, assert_close_at_scale, kd_config

from harness.config import parse_config
from harness.data.builtin import load_builtin
from harness.distributed import DistEnv
from harness.train import Trainer, compute_losses, train

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
    resolved = shard_run(tmp_path, teacher_checkpoint)
    straight = train(parse_config({**resolved, "output_dir": str(tmp_path / "straight")}))
    stopped = parse_config({**resolved, "output_dir": str(tmp_path / "stopped")})
    step = Trainer.train_step

    def stop_after_step_3(self, batch):  # a stop signal arrives during step 3 (as scancel's SIGTERM would)
        result = step(self, batch)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(Trainer, "train_step", stop_after_step_3)
    from harness.train import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        train(stopped)
    monkeypatch.undo()
    resumed = train(stopped, resume=True)
    a, b = (torch.load(d / "checkpoints" / "final.pt", weights_only=False)["state_dict"] for d in (straight, resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert sorted(e["sample"] for e in logged(resumed)) == sorted(e["sample"] for e in logged(straight))


def test_cached_teacher_replaces_bad_samples_as_the_live_one(tmp_path, teacher_checkpoint):
    """One step takes all 36 samples, the four bad ones among them: the cached run reads the rows of the same
    replacements the live teacher embeds (float64), and the cache's manifest lists the bad samples."""
    from harness import teacher_cache

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
    meta = teacher_cache.read_meta(teacher_cache.cache_dir(config))
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


def test_a_finished_runs_record_counts_its_bad_samples(tmp_path, teacher_checkpoint):
    config_file = tmp_path / "counted.yaml"
    config_file.write_text(yaml.safe_dump({**csv_run(tmp_path, teacher_checkpoint), "eval": {"workers": 0}}))
    run_clipkd("run", str(config_file), cwd=tmp_path)
    run_dir = parse_config(yaml.safe_load(config_file.read_text())).run_dir
    assert json.loads((run_dir / "record.json").read_text())["run"]["bad_samples"] == 5


def test_data_check_lists_exactly_the_bad_samples_and_the_loaders_read_its_findings(tmp_path, teacher_checkpoint):
    from harness.data import build_source
    from harness.data.views import Augmentation
    from harness.models import create_clip

    for resolved, expected in ((shard_run(tmp_path, teacher_checkpoint), 4), (csv_run(tmp_path, teacher_checkpoint), 5)):
        config_file = tmp_path / "check.yaml"
        config_file.write_text(yaml.safe_dump(resolved))
        out = run_clipkd("data", "check", str(config_file), cwd=tmp_path).stdout
        assert f"{expected} bad samples of 36" in out, out
        config = parse_config(resolved)
        source = build_source(config.data, "clipkd-tiny", create_clip("clipkd-tiny").tokenizer, Augmentation("none"),
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
    from harness.models import create_clip

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
