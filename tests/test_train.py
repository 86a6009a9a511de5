"""Training end to end: resume equals uninterrupted, non-finite losses, plugins, the CLI."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_clipkd, write_shards

import methods
from harness.config.run_config import parse_config
from harness.models.build import create_clip
from harness.training.loop import train
from harness.training.stops import NonFiniteLossError


def write_config(directory: Path, name: str, **overrides) -> Path:
    config = {
        "name": name,
        "seed": 1,
        "student": {"model": "clipkd-tiny"},
        "data": {"dataset": "digits"},
        "optim": {"warmup_steps": 5},
        "train": {"batch_size": 64, "steps": 8, "checkpoint_every": 4},
    }
    for key, value in overrides.items():  # dicts merge into the defaults; a None value removes a default
        merged = {**config[key], **value} if isinstance(value, dict) and key in config else value
        config[key] = {k: v for k, v in merged.items() if v is not None} if isinstance(merged, dict) else merged
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)


@pytest.mark.parametrize("source", ["digits", "webdataset"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, teacher_checkpoint, source):
    data = {"workers": 2}  # augmentation is seeded per sample, so workers do not change the result
    if source == "webdataset":  # uneven shards read by two loader workers; stopped mid-epoch (6 steps an epoch)
        data.update(dataset="webdataset", path=write_shards(tmp_path / "shards", [150, 90, 160]), num_samples=384)
    kd = dict(
        teacher={"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
        distill={"fd": 2000, "mfd": 2000, "icl": 1, "crd": 1},
        data=data,
        train={"batch_size": 64, "steps": 30, "checkpoint_every": 3},
    )
    uninterrupted = write_config(tmp_path, "straight", output_dir=str(tmp_path / "a"), **kd)
    interrupted = write_config(tmp_path, "stopped", output_dir=str(tmp_path / "b"), **kd)
    run_clipkd("train", str(uninterrupted), cwd=tmp_path)

    run_id = parse_config(yaml.safe_load(interrupted.read_text())).run_id
    log = tmp_path / "b" / run_id / "train_log.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "train", str(interrupted)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 7):
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it could be stopped"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "continue with --resume" in stderr
    run_dir = tmp_path / "b" / run_id
    stopped_at = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)["step"]
    assert 7 <= stopped_at < 30 and not (run_dir / "checkpoints" / "final.pt").exists()

    if source == "digits":  # (the same refusal for any data)
        refused = run_clipkd("train", str(interrupted), cwd=tmp_path, check=False)
        assert refused.returncode == 2 and "--resume" in refused.stderr
    run_clipkd("train", str(interrupted), "--resume", cwd=tmp_path)

    expected, resumed = final_state(tmp_path / "a" / run_id), final_state(run_dir)
    assert resumed["step"] == expected["step"] == 30
    # a finished run keeps one copy of its state (40 MB for the tiny models): two filled the disk of a CI run
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["final.pt"]
    for part in ("state_dict", "methods"):
        assert expected[part].keys() == resumed[part].keys()
        for name, tensor in expected[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name} differs after resume"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 31))  # the log holds each step once, recomputed steps replaced

    from harness.run import training_cost

    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "stop", "resume", "finish"]
    cost = training_cost(run_dir)
    first, second = events[1]["time"] - events[0]["time"], events[3]["time"] - events[2]["time"]
    assert cost["train_seconds"] == pytest.approx(first + second) and min(first, second) > 0
    assert cost["teacher_forward_samples"] == 30 * 64  # the live teacher embedded each step's batch once


def test_the_loop_reads_no_tensor_value_between_log_steps(tmp_path, teacher_checkpoint, monkeypatch):
    """On a GPU reading a tensor's value waits for the device to finish its queue. Every call that reads one
    (item, tolist, float, int, bool) is recorded with the step: none inside a step, outside them only on log
    steps (every 4th; checkpoints every 8th), where the losses are written and checked. KD with MFD (its mask
    noise), a live teacher, the in-memory loader in this process. AdamW's step counters are not counted: off the
    fused path they are CPU tensors in a GPU run too (no sync), and the fused AdamW a GPU run uses reads none."""
    from core.distributed import DistEnv
    from harness.training.loop import Trainer

    path = write_config(tmp_path, "quiet", output_dir=str(tmp_path / "runs"),
                        teacher={"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
                        distill={"fd": 2000, "mfd": 2000, "icl": 1, "crd": 1}, data={"workers": 0},
                        train={"batch_size": 64, "steps": 12, "checkpoint_every": 8, "log_every": 4})
    config = parse_config(yaml.safe_load(path.read_text()))
    trainer = Trainer(config, DistEnv(), torch.device("cpu"))
    config.run_dir.mkdir(parents=True)
    reads, inside = [], [False]
    step = trainer.train_step

    def watched(batch):
        inside[0] = True
        try:
            return step(batch)
        finally:
            inside[0] = False

    trainer.train_step = watched
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def read(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            if not any(self is state.get("step") for state in trainer.optimizer.state.values()):
                reads.append((inside[0], trainer.step))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    trainer.fit()
    monkeypatch.undo()
    assert [s for within, s in reads if within] == []
    assert {s for _, s in reads} == {4, 8, 12}
    logged = [json.loads(line)["step"] for line in (config.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert logged == [4, 8, 12]


def test_gradient_checkpointing_and_compiled_blocks_train_the_same_weights(tmp_path, teacher_checkpoint):
    """train.grad_checkpointing recomputes each tower's blocks in backward instead of keeping their activations,
    train.compile runs them as torch.compile graphs (aot_eager here: dynamo's capture and AOTAutograd's forward
    and backward graphs, without inductor's code generation, minutes on a CPU): the same gradients (float64, MFD's
    masked pass included), so the same run, and its checkpoint names the weights as the uncompiled model does."""
    kd = dict(teacher={"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
              distill={"fd": 2000, "mfd": 2000, "icl": 1, "crd": 1}, data={"workers": 0},
              train={"batch_size": 64, "steps": 4, "checkpoint_every": 4, "precision": "fp64"})
    configs = {}
    for name, setting in {"plain": {}, "recomputed": {"grad_checkpointing": True}, "compiled": {"compile": "aot_eager"}}.items():
        kd["train"] = {**kd["train"], **setting}
        path = write_config(tmp_path, name, output_dir=str(tmp_path / name), **kd)
        configs[name] = parse_config(yaml.safe_load(path.read_text()))
        kd["train"] = {k: v for k, v in kd["train"].items() if k not in setting}
    assert len({config.run_id for config in configs.values()}) == 1
    from torch._dynamo.utils import counters

    from core.distributed import DistEnv
    from harness.training.loop import Trainer

    towers = Trainer(configs["recomputed"], DistEnv(), torch.device("cpu")).student.model
    assert towers.visual.transformer.grad_checkpointing and towers.transformer.grad_checkpointing
    a, b = (final_state(train(configs[name]))["state_dict"] for name in ("plain", "recomputed"))
    # dynamo's caches are per process: blocks another test of this worker compiled would be recompiled here, and
    # counted; from a clean cache the count is this run's own
    torch._dynamo.reset()
    counters.clear()
    compiled_by_step = {}
    compiled_run = train(configs["compiled"], observe=lambda kind, record: compiled_by_step.setdefault(
        record["step"], counters["frames"]["total"]))
    c = final_state(compiled_run)["state_dict"]
    # one graph for every block of a run of like blocks, per input it meets: the image's 17 tokens, the masked
    # image's 5 (MFD), the text's 16 — all compiled at the first step, none again after it
    assert counters["stats"]["unique_graphs"] == counters["frames"]["total"] == 3
    assert compiled_by_step == {1: 3, 2: 3, 3: 3, 4: 3}
    start = json.loads((compiled_run / "events.jsonl").read_text().splitlines()[0])
    assert start["compiled_blocks"] == ["visual.transformer.resblocks", "transformer.resblocks"]
    assert a.keys() == b.keys() == c.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(c[name], tensor, rtol=1e-12, atol=1e-14, msg=name)


def test_a_compile_backend_torch_does_not_know_is_a_config_error(tmp_path):
    path = write_config(tmp_path, "typo", train={"batch_size": 64, "steps": 4, "compile": "inductr"})
    result = run_clipkd("train", str(path), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.compile" in result.stderr and "'inductr' is not a torch.compile backend" in result.stderr
    assert "inductor" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2], ids=["SIGINT", "SIGUSR1", "SIGUSR2"])
def test_each_stop_signal_checkpoints_the_last_step_and_exits_like_the_signal(tmp_path, signum):
    """Ctrl-C, SLURM's --signal=USR1@… and submitit's USR2 stop training at a step boundary with a checkpoint
    (SIGTERM: the resume test above). checkpoint_every is larger than the run, so only the signal saves one."""
    config = write_config(tmp_path, "stop", train={"batch_size": 64, "steps": 400, "checkpoint_every": 1000})
    run_dir = tmp_path / "runs" / parse_config(yaml.safe_load(config.read_text())).run_id
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", "train", str(config)], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it could be stopped"
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert f"interrupted by signal {int(signum)}" in stderr and "continue with --resume" in stderr
    saved = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)["step"]
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert 3 <= saved < 400 and logged[-1] == saved  # the checkpoint is of the last step completed
    assert not (run_dir / "checkpoints" / "final.pt").exists()
    stop = json.loads((run_dir / "events.jsonl").read_text().splitlines()[-1])
    assert (stop["event"], stop["signal"], stop["step"]) == ("stop", signum.name, saved)


def test_operational_settings_leave_the_run_id_and_the_weights_alone(tmp_path):
    """Loader workers, checkpoint and log intervals cannot change what is trained: configs that differ only there
    are one run (and one setting), and train to the same weights."""
    shards = write_shards(tmp_path / "shards", [100, 60])
    runs = []
    for name, workers, every, log in (("a", 0, 2, 1), ("b", 2, 5, 3)):
        path = write_config(tmp_path, name, output_dir=str(tmp_path / name),
                            data={"dataset": "webdataset", "path": shards, "num_samples": 160, "workers": workers},
                            train={"batch_size": 32, "steps": 8, "checkpoint_every": every, "log_every": log})
        runs.append(parse_config(yaml.safe_load(path.read_text())))
    assert runs[0].run_id == runs[1].run_id and runs[0].setting_id == runs[1].setting_id
    changed = parse_config({**runs[0].resolved(), "data": {**runs[0].resolved()["data"], "shuffle_window": 7}})
    assert changed.run_id != runs[0].run_id  # the shuffle window does change the batches
    for config in runs:
        train(config)
    first, second = (final_state(config.run_dir) for config in runs)
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), name


def test_run_ids_of_earlier_versions_stand():
    """A field added later stays out of the id at the value earlier runs trained with: this config's id, computed
    at aa7bcd3 and 1e3ed0d (before train.compile and train.grad_compression), is still its id, so re-running an
    old grid after an upgrade trains nothing; bf16 gradient compression does change what is trained."""
    config = {"name": "pinned", "student": {"model": "clipkd-tiny"},
              "teacher": {"model": "clipkd-tiny-teacher", "pretrained": "/nonexistent/teacher.pt"},
              "distill": {"fd": 2000, "icl": 1, "crd": 1}, "data": {"dataset": "digits"},
              "train": {"batch_size": 64, "steps": 10}}
    assert parse_config(config).run_id == "76ca1ea51c0b"
    for change, same in (({"compile": "inductor"}, True), ({"grad_compression": "none"}, True),
                         ({"grad_compression": "bf16"}, False)):
        changed = parse_config({**config, "train": {**config["train"], **change}})
        assert (changed.run_id == "76ca1ea51c0b") is same, change


BN_STUDENT = ROOT / "tests" / "fixtures" / "bn-student.json"  # a timm ResNet tower: BatchNorm, and dropout in its head


def test_accuracy_during_training_is_logged_against_samples_seen_and_changes_nothing(tmp_path):
    """A student with BatchNorm and dropout, trained with and without evaluation during training: the same final
    weights and buffers to the bit (the evaluation leaves BatchNorm's running statistics, the modes and the random
    streams as it found them), and the accuracy at the last step is that of the final checkpoint evaluated on its
    own (eval mode: running statistics, no dropout). Before, the evaluation ran the student in train mode: 40 of
    a ResNet's tensors differed and the accuracy was measured with batch statistics."""
    from evals.datasets import DuringTraining, load_eval_set
    from evals.zeroshot import Classifiers, classification_metrics
    from harness.run import training_curves

    configs = []
    for name, evaluation in (("plain", {}), ("watched", {"every_steps": 3, "during_items": 100, "workers": 0})):
        path = write_config(tmp_path, name, output_dir=str(tmp_path / name), eval=evaluation,
                            student={"model": str(BN_STUDENT)}, train={"batch_size": 64, "steps": 7, "checkpoint_every": 5})
        configs.append(parse_config(yaml.safe_load(path.read_text())))
    assert configs[0].run_id == configs[1].run_id  # evaluation is not part of what is trained
    for config in configs:
        train(config)
    plain, watched = (final_state(config.run_dir) for config in configs)
    assert any("running_mean" in name for name in plain["state_dict"])
    for name, tensor in plain["state_dict"].items():
        assert torch.equal(tensor, watched["state_dict"][name]), name
    log = [json.loads(line) for line in (configs[1].run_dir / "eval_log.jsonl").read_text().splitlines()]
    assert [(p["step"], p["samples_seen"]) for p in log] == [(0, 0), (3, 192), (6, 384), (7, 448)]
    assert all(p["benchmark"] == "digits" and 0 <= p["acc1"] <= 1 for p in log)
    curve = [(step, value) for term, step, value in training_curves(configs[1].run_dir)
             if term == "zero-shot acc1 (digits)"]
    assert curve == [(p["step"], p["acc1"]) for p in log]
    assert not (configs[0].run_dir / "eval_log.jsonl").exists()

    student = create_clip(str(BN_STUDENT), str(configs[1].run_dir / "checkpoints" / "final.pt"))
    first_items = DuringTraining(load_eval_set("digits", None, student.preprocess_eval).classification, 100,
                                 torch.float32)
    alone = classification_metrics(student.model, student.tokenizer, first_items, torch.device("cpu"), 256,
                                   Classifiers())
    assert log[-1]["acc1"] == alone.metrics["acc1"]


def test_non_finite_loss_names_step_and_term_and_keeps_last_checkpoint(tmp_path, teacher_checkpoint):
    @methods.register("explodes_at_step_3")
    class ExplodesAtStep3(methods.DistillMethod):
        """A test method whose loss turns NaN on its third call."""

        def __init__(self, student_dim, teacher_dim):
            super().__init__(student_dim, teacher_dim)
            self.calls = 0

        def forward(self, batch):
            self.calls += 1
            value = batch.student_image.pow(2).mean()
            return value * float("nan") if self.calls == 3 else value

    path = write_config(
        tmp_path, "nan", output_dir=str(tmp_path / "runs"),
        teacher={"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
        distill={"explodes_at_step_3": 1.0}, train={"batch_size": 64, "steps": 8, "checkpoint_every": 2},
    )
    config = parse_config(yaml.safe_load(path.read_text()))
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss term 'explodes_at_step_3' is nan"):
        train(config)
    kept = torch.load(config.run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert kept["step"] == 2 and all(torch.isfinite(t).all() for t in kept["state_dict"].values())


def test_readme_plugin_installs_through_entry_points_and_trains(tmp_path, teacher_checkpoint):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", readme, flags=re.S)
    assert {name for name, _ in blocks} == {"my_kd_method.py", "pyproject.toml"}
    package, site = tmp_path / "plugin", tmp_path / "site"
    package.mkdir()
    for name, text in blocks:
        (package / name).write_text(text)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(package)],
        check=True, capture_output=True,
    )
    env = {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    assert "cosine_fd" in run_clipkd("methods", cwd=tmp_path, env=env).stdout
    path = write_config(
        tmp_path, "plugin", teacher={"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
        distill={"cosine_fd": 1.0, "fd": 2000},
    )
    run_clipkd("train", str(path), cwd=tmp_path, env=env)
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all("cosine_fd" in r and r["cosine_fd"] > 0 for r in records)
    assert "methods.cosine_fd.project.weight" in final_state(run_dir)["methods"]


def pip_install_package(tmp_path, name: str, files: dict[str, str], entry_points: dict[str, dict[str, str]]) -> dict:
    """A package of ``files`` with ``entry_points``, pip-installed into a folder: the PYTHONPATH that sees it."""
    package, site = tmp_path / name, tmp_path / f"{name}-site"
    for file, text in files.items():
        (package / file).parent.mkdir(parents=True, exist_ok=True)
        (package / file).write_text(text)
    groups = "".join(f'[project.entry-points."{group}"]\n' + "".join(f'{k} = "{v}"\n' for k, v in points.items())
                     for group, points in entry_points.items())
    modules = [f.removesuffix(".py") for f in files if f.endswith(".py") and "/" not in f]
    packages = sorted({f.split("/")[0] for f in files if f.endswith("/__init__.py")})
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "0.1.0"\n{groups}'
        f"[tool.setuptools]\npy-modules = {modules!r}\npackages = {packages!r}\n"
        '[tool.setuptools.package-data]\n"*" = ["*.json"]\n')
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(package)], check=True, capture_output=True)
    return {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}


PLAIN_MODULE_METHOD = '''import torch
from torch import nn


class PlainCosine(nn.Module):
    """Image cosine distance to the teacher, written as a plain nn.Module."""

    def __init__(self, student_dim, teacher_dim, scale=1.0):
        super().__init__()
        self.project = nn.Linear(student_dim, teacher_dim)
        self.register_buffer("scale", torch.tensor(float(scale)))  # saved with the run: the option it was given

    def forward(self, batch):
        student = nn.functional.normalize(self.project(batch.student_image), dim=-1)
        return self.scale * (1 - (student * batch.teacher_image).sum(-1)).mean()


def make_loss(student_dim, teacher_dim):
    return PlainCosine(student_dim, teacher_dim)


class NoDims(nn.Module):
    def forward(self, batch):
        return batch.student_image.sum()
'''


def test_a_plugin_of_any_module_that_meets_the_contract_is_listed_and_trains(tmp_path, teacher_checkpoint):
    """Not a DistillMethod subclass: an nn.Module built as (student_dim, teacher_dim, **options) and called with
    a DistillBatch is a method; image_mask_ratio and student_projection take the base class's defaults."""
    env = pip_install_package(tmp_path, "clipkd-plain", {"plain_kd.py": PLAIN_MODULE_METHOD},
                              {"clipkd.methods": {"plain_cosine": "plain_kd:PlainCosine"}})
    listed = run_clipkd("methods", cwd=tmp_path, env=env).stdout
    assert re.search(r"^plain_cosine\s+Image cosine distance to the teacher", listed, flags=re.M), listed
    path = write_config(tmp_path, "plain", teacher={"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
                        distill={"plain_cosine": {"weight": 1.0, "scale": 2.0}})
    run_clipkd("run", str(path), cwd=tmp_path, env=env)
    (run_dir,) = (p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(0 < r["plain_cosine"] <= 4 for r in records)
    saved = final_state(run_dir)["methods"]
    assert "methods.plain_cosine.project.weight" in saved
    assert float(saved["methods.plain_cosine.scale"]) == 2.0  # the option reached the plugin
    metrics = json.loads((run_dir / "record.json").read_text())["metrics"]["digits"]
    assert "feature_cosine_image" in metrics  # evaluation found its projection P by the default convention


@pytest.mark.parametrize("target, problem", [
    ("plain_kd:make_loss", "names <function make_loss"),
    ("plain_kd:NoDims", "which cannot be built as NoDims(student_dim, teacher_dim)"),
    ("plain_kd_missing", "failed to import: ModuleNotFoundError"),
])
def test_an_unusable_plugin_is_one_message_naming_it_and_its_package(tmp_path, target, problem):
    env = pip_install_package(tmp_path, "clipkd-broken", {"plain_kd.py": PLAIN_MODULE_METHOD},
                              {"clipkd.methods": {"broken": target}})
    result = run_clipkd("methods", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"entry point 'broken' = '{target}' of package clipkd-broken 0.1.0 (group clipkd.methods)" in result.stderr
    assert problem in result.stderr


def test_a_model_config_file_is_a_model_named_by_its_content(tmp_path):
    """student.model may be the path of an open_clip model-config JSON: the run id follows its content (a copy
    elsewhere is the same run; an edit is another), and a plugin package can ship configs by entry point."""
    config = json.loads((ROOT / "harness" / "models" / "configs" / "clipkd-tiny.json").read_text())
    first, moved = tmp_path / "mine" / "my-student.json", tmp_path / "elsewhere" / "copy.json"
    for file in (first, moved):
        file.parent.mkdir()
        file.write_text(json.dumps(config, indent=4))
    runs = [parse_config(yaml.safe_load(write_config(tmp_path, f"file{i}", student={"model": str(file)}).read_text()))
            for i, file in enumerate((first, moved))]
    assert runs[0].run_id == runs[1].run_id
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**config, "embed_dim": 48}))
    other = parse_config(yaml.safe_load(write_config(tmp_path, "edited", student={"model": str(edited)}).read_text()))
    assert other.run_id != runs[0].run_id
    run_clipkd("train", str(tmp_path / "file0.yaml"), cwd=tmp_path)
    assert final_state(tmp_path / runs[0].run_dir)["step"] == 8

    env = pip_install_package(tmp_path, "clipkd-zoo", {"zoo/__init__.py": "", "zoo/zoo-student.json": json.dumps(config)},
                              {"clipkd.model_configs": {"zoo": "zoo"}})
    path = write_config(tmp_path, "zoo", student={"model": "zoo-student"}, output_dir=str(tmp_path / "zoo"))
    run_clipkd("train", str(path), cwd=tmp_path, env=env)
    bad = write_config(tmp_path, "bad", student={"model": str(tmp_path / "missing.json")})
    result = run_clipkd("train", str(bad), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "missing.json' cannot be read" in result.stderr


def test_the_known_model_names_are_open_clips_read_without_importing_it():
    """Validating a config needs the model names open_clip knows once clipkd's configs are added, and a cache key
    each model's config and image input; they are read from the config files (harness/models/names.py), so a
    config, a grid's plan or status, imports no open_clip (seconds), and they are open_clip's exactly."""
    import subprocess
    import sys

    script = """
import sys, json
from harness.models import names
known = names.known_model_names()
configs = {name: names.model_config(name) for name in known}
inputs = {name: names.image_input(name) for name in known}
assert 'open_clip' not in sys.modules and 'torch' not in sys.modules
import open_clip
names.register_model_configs()
without = lambda config: {k: v for k, v in config.items() if k != 'preprocess_cfg'}  # open_clip's models take none
print(sorted(known) == sorted(open_clip.list_models()),
      all(without(configs[n]) == open_clip.get_model_config(n) for n in known),
      all(inputs[n] == names.image_input(n) for n in known), len(known))
"""
    listed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    same_names, same_configs, same_inputs, count = listed.stdout.split()
    assert (same_names, same_configs, same_inputs) == ("True", "True", "True") and int(count) > 100


def test_smoke_configs_train_teacher_then_student_and_rerun_is_a_no_op(project):
    run_clipkd("run", "configs/smoke_teacher.yaml", cwd=project)
    result = run_clipkd("run", "configs/smoke_kd.yaml", cwd=project)
    # random weights are said once, for the student that starts from them; building the teacher from its
    # checkpoint and the student again for evaluation says nothing
    assert "No pretrained weights loaded" not in result.stderr
    assert result.stderr.count("starts from random weights") == 1, result.stderr
    run_dir = project / result.stdout.split()[3]
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert {"task", "fd", "icl", "crd"} <= records[-1].keys()
    assert records[-1]["crd"] < records[0]["crd"] and records[-1]["icl"] < records[0]["icl"]
    mtime = (run_dir / "checkpoints" / "final.pt").stat().st_mtime_ns
    run_clipkd("train", "configs/smoke_kd.yaml", cwd=project)
    assert (run_dir / "checkpoints" / "final.pt").stat().st_mtime_ns == mtime

    lines = run_clipkd("leaderboard", "--format", "csv", "--method", "crd+fd+icl", cwd=project).stdout.splitlines()
    row = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert row["teacher"].startswith("clipkd-tiny-teacher@run:")
    for column in ("top1", "i2t_r1", "t2i_r1", "cos_img", "cos_txt", "cka_img", "cka_txt", "sim_gap"):
        assert row[column] not in ("", "nan"), column
    assert -1 <= float(row["cos_img"]) <= 1 and 0 <= float(row["cka_img"]) <= 1


def test_cli_methods_lists_every_builtin_with_a_description(tmp_path):
    out = run_clipkd("methods", cwd=tmp_path).stdout
    for name in ["crd", "fd", "mfd", "gd", "icl", "afd", "open_clip_distill", "tinyclip"]:
        assert re.search(rf"^{name}\s+\S", out, flags=re.M), out


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"distill": {"fdd": 1}}, "distill: unknown method 'fdd'; registered: afd, clip_rd, crd"),
        ({"distill": {"fd": 1}}, "need a `teacher`"),
        ({"student": {"model": "ViT-T-17"}}, "student.model: unknown model 'ViT-T-17'; did you mean ViT-T-16"),
        ({"data": {"dataset": "imagenet"}}, "unknown dataset 'imagenet'; accepted: digits, fashion-mnist, csv, webdataset"),
        ({"train": {"steps": None}}, "give exactly one of `epochs` or `steps`"),
        ({"optim": {"lr": -1}}, "optim.lr: Input should be greater than 0"),
        ({"teacher": {"model": "clipkd-tiny-teacher"}}, "a teacher needs weights"),
        ({"extra_field": 3}, "extra_field: unknown field"),
        ({"teacher": {"run": "configs/t.yaml"}, "distill": {"mfd": {"weight": 1, "mask": 0.5}}},
         "distill: mfd: unknown option 'mask'; accepted: weight, mask_ratio"),
        ({"teacher": {"model": "clipkd-tiny-teacher", "pretrained": "missing/teacher.pt"}, "distill": {"fd": 1}},
         "checkpoint file 'missing/teacher.pt' for model 'clipkd-tiny-teacher' does not exist"),
    ],
)
def test_bad_configs_give_one_clear_message(tmp_path, clipkd, overrides, message):
    path = write_config(tmp_path, "bad", **overrides)
    result = clipkd("train", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert str(path) in result.stderr or "does not exist" in result.stderr


def test_corrupt_teacher_checkpoint_is_one_clear_message(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": create_clip("clipkd-tiny").model.state_dict()}, wrong)
    for checkpoint, message in [(corrupt, "is not a readable checkpoint"), (wrong, "could not be loaded into model")]:
        path = write_config(tmp_path, "bad", distill={"fd": 1},
                            teacher={"model": "clipkd-tiny-teacher", "pretrained": str(checkpoint)})
        result = run_clipkd("train", str(path), cwd=tmp_path, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
