"""A grid you can watch: the trackers (TensorBoard, W&B offline) get a run's numbers, a running run's progress and
curves reach the store while it trains, `grid status` shows them, and none of it changes what is trained."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, require, run_clipkd

from harness.config.run_config import parse_config
from harness.config.specs import ConfigError
from harness.grids.expansion import load_grid
from harness.run import run
from results.store import Store


def _config(tmp_path, teacher, tag: str, **train):
    return parse_config({
        "name": f"watched-{tag}", "seed": 2, "output_dir": str(tmp_path / tag),
        "student": {"model": "clipkd-tiny"},
        "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher)},
        "distill": {"fd": 2000, "icl": 1, "crd": 1}, "data": {"dataset": "digits", "workers": 0},
        "optim": {"warmup_steps": 2},
        "train": {"batch_size": 32, "steps": 6, "log_every": 1, **train},
        "eval": {"every_steps": 3, "during_items": 100, "workers": 0},
    })


def require_trackers() -> None:
    """The test extra installs both: in CI a missing one fails the test rather than skipping it."""
    for name in ("tensorboard", "wandb"):
        require(importlib.util.find_spec(name) is not None, f"{name} is not installed (pip install '.[test]')")


def test_clipkd_train_reports_to_its_trackers_as_clipkd_run_does(tmp_path, teacher_checkpoint, clipkd):
    """The README's single-run command honours train.report_to. Before, only `clipkd run` opened the trackers:
    `clipkd train` wrote no event file and said nothing."""
    require_trackers()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path, teacher_checkpoint, "single", report_to=["tensorboard"], steps=2)
    (tmp_path / "single.yaml").write_text(yaml.safe_dump({**config.resolved(), "eval": {}}))
    result = clipkd("train", str(tmp_path / "single.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(config.run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in (config.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx({r["step"]: r["loss"] for r in records})


def test_trackers_get_the_runs_numbers_and_nothing_trained_changes(tmp_path, teacher_checkpoint, monkeypatch):
    require_trackers()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracked = _config(tmp_path, teacher_checkpoint, "tracked", report_to=["tensorboard", "wandb"], live_every_s=0)
    plain = _config(tmp_path, teacher_checkpoint, "plain")
    assert tracked.run_id == plain.run_id  # trackers and live publishing are not part of the run id
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    assert run(tracked, store) == run(plain, None) == "done"
    weights = [torch.load(c.run_dir / "checkpoints" / "final.pt", weights_only=False) for c in (tracked, plain)]
    for part in ("state_dict", "methods"):
        for name, tensor in weights[0][part].items():
            assert torch.equal(tensor, weights[1][part][name]), name

    run_dir = tracked.run_dir
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for term in ("loss", "task", "fd", "icl", "crd", "lr", "logit_scale"):
        points = {e.step: e.value for e in events.Scalars(term)}  # float32 in the event file
        assert points == pytest.approx({r["step"]: r[term] for r in records}, rel=1e-6, abs=1e-12), term
    assert [e.step for e in events.Scalars("samples_per_second")] == [r["step"] for r in records]
    during = [json.loads(line) for line in (run_dir / "eval_log.jsonl").read_text().splitlines()]
    assert {e.step: e.value for e in events.Scalars("zero-shot acc1 (digits)")} == pytest.approx(
        {p["step"]: p["acc1"] for p in during}, abs=1e-7)
    metrics = json.loads((run_dir / "record.json").read_text())["metrics"]["digits"]
    final = events.Scalars("final/digits/acc1")
    assert [e.step for e in final] == [6] and final[0].value == pytest.approx(metrics["acc1"], abs=1e-7)

    (offline,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # W&B's own folder of an offline run
    config, summary = wandb_config_and_summary(offline)
    assert config["train"]["batch_size"] == 32 and config["distill"] == {"fd": 2000, "icl": 1, "crd": 1}
    assert summary["final/digits/acc1"] == pytest.approx(metrics["acc1"])
    assert summary["loss"] == pytest.approx(records[-1]["loss"])
    assert store.get_run(tracked.run_id)["status"] == "done"  # the live publisher closed before the final write


def wandb_config_and_summary(path):
    """The run config and final summary an offline W&B run holds: its .wandb file is a LevelDB-format log
    (32 KiB blocks; records of 4-byte CRC, 2-byte length, 1-byte type: 1 whole, 2-4 first/middle/last) of
    W&B's protobuf Records, after a 7-byte header (":W&B", magic, version). wandb 0.31 ships no reader of it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, pending, config, summary = path.read_bytes(), 7, b"", {}, {}
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):
            continue
        record, pending = wandb_internal_pb2.Record.FromString(pending), b""
        if record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif record.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return config, summary


def test_a_tracker_that_is_not_installed_is_refused_at_plan_time(tmp_path, teacher_checkpoint, monkeypatch):
    from harness.training import trackers

    monkeypatch.setitem(trackers.TRACKERS, "wandb", ("clipkd_no_such_module", "clipkd[wandb]"))
    with pytest.raises(ConfigError, match=r"train.report_to: wandb is not installed here: pip install 'clipkd\[wandb\]'"):
        _config(tmp_path, teacher_checkpoint, "refused", report_to=["wandb"])


def _poll(until, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = until()
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"after {timeout:.0f} s: {what}")


def test_a_running_cell_shows_its_progress_and_curves(tmp_path):
    """A long run submitted to the local executor: while it trains, `grid status` ingests its record and prints its
    step of total, samples/s and ETA, and the store holds its curve points; `grid cancel` stops it."""
    grid = tmp_path / "watch.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "watch", "output_dir": "runs",
        "base": {"data": {"dataset": "digits", "workers": 0}, "optim": {"warmup_steps": 5},
                 "train": {"batch_size": 16, "steps": 100_000, "log_every": 5, "live_every_s": 0.5}},
        "axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"baseline": {}}, "seeds": [0]},
        "slurm": {"cpus_per_task": 1},
    }))
    submitted = subprocess.Popen([sys.executable, "-m", "harness.cli", "grid", "submit", str(grid), "--executor",
                                  "local"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def progress_line():
            out = run_clipkd("grid", "status", str(grid), cwd=tmp_path).stdout
            line = next((row for row in out.splitlines() if "running" in row and "step " in row), None)
            return line if line and int(line.split("step ")[1].split("/")[0]) >= 10 else None

        line = _poll(progress_line, 240, "grid status never showed the running cell's step")
        assert "/100000" in line and "samples/s" in line and "ETA" in line
        store = Store(f"sqlite:///{tmp_path / 'results' / 'clipkd.db'}", readonly=True)
        (cell,) = load_grid(grid).cells
        run_id = cell.run_id
        row = store.get_run(run_id)
        assert row["status"] == "running" and row["step"] >= 10 and row["total_steps"] == 100_000
        assert row["samples_per_second"] > 0 and row["eta_seconds"] > 0
        with store.engine.connect() as connection:
            points = connection.exec_driver_sql("select term, step from curves where run_id = ?", (run_id,)).all()
        assert {"loss", "task", "lr"} <= {term for term, _ in points} and max(step for _, step in points) >= 10
    finally:
        run_clipkd("grid", "cancel", str(grid), cwd=tmp_path, check=False)
        submitted.terminate()
        submitted.wait(timeout=60)


def test_grid_status_shows_a_failed_cells_error_first_line(tmp_path):
    grid = tmp_path / "failing.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "failing", "output_dir": "runs",
        "base": {"data": {"dataset": "digits"}, "train": {"batch_size": 16, "steps": 1}},
        "axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"baseline": {}}},
    }))
    (cell,) = load_grid(grid).cells
    store = Store(f"sqlite:///{tmp_path / 'results' / 'clipkd.db'}")
    store.put_run({"id": cell.run_id, "setting_id": "s", "name": cell.config.name, "teacher": None,
                   "student": "clipkd-tiny", "method": "baseline", "terms": "{}", "dataset": "digits", "seed": 0,
                   "status": "failed", "config": "{}", "updated_at": "2026-12-01T00:00:00+00:00",
                   "error": "training: NonFiniteLossError: step 3: loss term 'task' is nan\nTraceback (most recent…"})
    out = run_clipkd("grid", "status", str(grid), cwd=tmp_path).stdout
    row = next(line for line in out.splitlines() if cell.run_id in line)
    assert row.split()[2] == "failed" and row.endswith("training: NonFiniteLossError: step 3: loss term 'task' is nan")
