"""Grid files: planning (with every error found before anything is submitted) and local dispatch."""
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, require, run_clipkd

pytestmark = pytest.mark.xdist_group("smoke_grid")  # pyproject.toml: one worker runs the group

HF_OFFLINE = {"HF_HUB_OFFLINE": "1"}  # planning must never download


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "grids", tmp_path / "grids")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path


def test_plan_lists_the_papers_cells_without_downloading(workdir):
    out = run_clipkd("grid", "plan", "grids/paper_ablation.yaml", "--no-check-data", cwd=workdir, env=HF_OFFLINE).stdout
    assert "12 cells (1 teachers trained first)" in out
    for method in ["baseline", "crd", "fd", "mfd", "gd", "icl", "afd", "fd+icl", "clip-kd", "clip-kd+gd", "clip-kd+afd"]:
        assert f"/ViT-T-16/{method}/" in out
    assert "teacher/vit-b-16" in out and "new" in out


@pytest.mark.parametrize("name", ["paper_students", "paper_laion", "paper_ensemble", "paper_tinyclip", "demo", "demo_field",
                                  "demo_tinyclip", "demo_findings", "smoke"])
def test_every_shipped_grid_loads_and_the_built_in_ones_find_their_data(name, monkeypatch):
    """In this process (the command line is tested above): every shipped grid validates, offline."""
    from harness.grids import checks
    from harness.grids.expansion import load_grid

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    grid = load_grid(ROOT / "grids" / f"{name}.yaml")
    assert grid.cells
    if name in ("demo", "demo_field", "demo_tinyclip", "demo_findings"):
        require(checks.FASHION_MNIST_DIR.is_dir(),
                "Debian's dataset-fashion-mnist is not installed (scripts/install_debian.sh fashion-mnist)")
    if name in ("demo", "demo_field", "demo_tinyclip", "demo_findings", "smoke"):  # their data is here: checked, and found
        assert all(checks.problems(cell.config) == [] for cell in grid.cells)


def test_the_reinforced_grids_cross_losses_with_selectors_and_find_a_teacher_for_each_selector_that_scores(
        tmp_path, monkeypatch):
    """grids/demo_reinforced.yaml on the shards `clipkd export-dataset --split train --synthetic 2` writes (each
    sample's caption and two paraphrases, which a run reads), and grids/paper_reinforced.yaml on stand-in shards:
    3 losses × 3 selections; a selector that scores with the teacher (learnability) gets one without a loss, the
    uniform control does not; each cell's stored method names its selector; the demo shares the demo's teacher."""
    from harness.data.captions import CaptionChoice
    from harness.data.loaders import build_source
    from harness.data.views import Augmentation, ViewSpec
    from harness.export import export_training_shards
    from harness.grids import checks
    from harness.grids.expansion import load_grid

    require(checks.FASHION_MNIST_DIR.is_dir(),
            "Debian's dataset-fashion-mnist is not installed (scripts/install_debian.sh fashion-mnist)")
    monkeypatch.chdir(tmp_path)
    pattern = export_training_shards("fashion-mnist", tmp_path / "runs" / "demo-reinforced-shards", 5, 5000, 2)
    demo = load_grid(ROOT / "grids" / "demo_reinforced.yaml")
    cells = {cell.name: cell for cell in demo.cells}
    assert len(cells) == 29 and all(checks.problems(cell.config) == [] for cell in demo.cells)
    uniform, learnability = cells["-/clipkd-tiny/baseline+uniform/webdataset/s0"], cells[
        "tiny-teacher/clipkd-tiny/baseline+learnability/webdataset/s0"]
    assert uniform.config.teacher is None and uniform.config.method_label == "uniform@0.5"
    assert learnability.config.teacher is not None and learnability.config.method_label == "learnability@0.5"
    assert cells["tiny-teacher/clipkd-tiny/dr+learnability/webdataset/s2"].config.method_label == "mobileclip_dr+learnability@0.5"
    teacher_of_demo = next(c for c in load_grid(ROOT / "grids" / "demo.yaml").cells if c.name == "teacher/tiny-teacher")
    assert cells["teacher/tiny-teacher"].config.run_id == teacher_of_demo.config.run_id
    config = cells["tiny-teacher/clipkd-tiny/clip-kd/webdataset/s0"].config
    source = build_source(config.data, ViewSpec.of("clipkd-tiny"), lambda texts: texts, Augmentation("none"), tmp_path,
                          captions=CaptionChoice("all"))
    _, captions = source.load(0)
    assert len(source) == 5000 and len(captions) == 3 and captions[1].startswith("a photo of a ")

    paper = yaml.safe_load((ROOT / "grids" / "paper_reinforced.yaml").read_text())
    paper["base"]["data"]["path"] = paper["teachers"]["vit-b-16"]["data"]["path"] = pattern  # stand-ins, here
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(paper))
    names = {cell.name for cell in load_grid(tmp_path / "paper.yaml").cells}
    assert "-/ViT-T-16/baseline+uniform/webdataset/s0" in names and "vit-b-16/ViT-T-16/dr+learnability/webdataset/s0" in names
    assert len(names) == 1 + 1 + 9  # the teacher, its cache of views and captions, 3 losses × 3 selections


def test_plan_and_submit_check_every_cells_data_before_anything_queues(workdir):
    """Planned on a machine without /datasets, the paper's grid is one error naming what each cell would miss:
    its shards, its benchmarks' roots. Nothing is submitted."""
    for command in (["plan"], ["submit", "--executor", "slurm"]):
        result = run_clipkd("grid", *command, "grids/paper_ablation.yaml", cwd=workdir, check=False, env=HF_OFFLINE)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "12 of 12 cells would fail before they train" in result.stderr
        assert "1380 of 1380 training shards do not exist, e.g. '/datasets/cc3m_cc12m/00000.tar'" in result.stderr
        assert "benchmark 'imagenet1k': root '/datasets/imagenet' does not exist" in result.stderr
        assert "--no-check-data" in result.stderr
    assert not (workdir / "runs" / ".grids").exists()
    grid = yaml.safe_load((workdir / "grids" / "smoke.yaml").read_text())
    grid["base"]["eval"] = {"benchmarks": [{"dataset": "digits"}, {"dataset": "csv", "root": "nowhere.csv"}]}
    (workdir / "grids" / "bench.yaml").write_text(yaml.safe_dump(grid))
    result = run_clipkd("grid", "plan", "grids/bench.yaml", cwd=workdir, check=False)
    assert result.returncode == 2 and "benchmark 'csv': root 'nowhere.csv' does not exist" in result.stderr


def test_dry_run_shows_the_sbatch_script_with_the_grids_resources(workdir):
    out = run_clipkd("grid", "submit", "grids/paper_ablation.yaml", "--executor", "slurm", "--dry-run",
                     cwd=workdir).stdout
    for line in ["#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --time=2880",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@90", "#SBATCH --requeue"]:
        assert line in out, line
    out = run_clipkd("grid", "submit", "grids/paper_ablation.yaml", "--executor", "slurm", "--dry-run",
                     "--partition", "a100", "--timeout-min", "60", "--sbatch", "constraint=h100", cwd=workdir).stdout
    assert "#SBATCH --partition=a100" in out and "#SBATCH --time=60" in out and "#SBATCH --constraint=h100" in out
    assert not (workdir / "runs").exists()  # nothing submitted


def _grid(workdir: Path, **changes) -> Path:
    grid = yaml.safe_load((workdir / "grids" / "smoke.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            grid.pop(key, None)
        else:
            grid[key] = value
    path = workdir / "grids" / "bad.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"fd": {"fd": 1}}, "tasks": [1]}},
         "unknown axis 'tasks'; accepted: teachers, students, methods, selections, datasets, seeds"),
        ({"axes": {"teachers": [{"cell": "tiny-teacher"}], "students": [{"model": "clipkd-tiny"}],
                   "methods": {"fd": {"fd": 1}, "fd-again": {"fd": 1}}}}, "duplicate cell"),
        ({"axes": {"teachers": [{"model": "clipkd-tiny-teacher", "pretrained": "missing/teacher.pt"}],
                   "students": [{"model": "clipkd-tiny"}], "methods": {"fd": {"fd": 1}}}},
         "teacher unreachable: checkpoint file 'missing/teacher.pt' does not exist"),
        ({"axes": {"teachers": [{"model": "ViT-B-16", "pretrained": "laion5000m"}],
                   "students": [{"model": "clipkd-tiny"}], "methods": {"fd": {"fd": 1}}}},
         "'laion5000m' is not an open_clip tag of 'ViT-B-16'; tags: "),
        ({"axes": {"teachers": [{"cell": "huge-teacher"}], "students": [{"model": "clipkd-tiny"}],
                   "methods": {"fd": {"fd": 1}}}}, "teacher cell 'huge-teacher' is not among the grid's teachers"),
        ({"axes": {"teachers": [{"run": "runs/never-trained"}], "students": [{"model": "clipkd-tiny"}],
                   "methods": {"fd": {"fd": 1}}}}, "teacher unreachable"),
        ({"slurm": {"gpus_per_node": -1}}, "slurm.gpus_per_node: Input should be greater than or equal to 0"),
        ({"slurm": {"gpu": 8}}, "slurm.gpu: unknown field"),
        ({"slurm": {"additional": {"Bad Flag": 1}}}, "'Bad Flag' is not an sbatch long option name"),
        ({"axes": {"teachers": [{"cell": "tiny-teacher"}], "students": [{"model": "clipkd-tiny"}],
                   "methods": {"x": {"kd": 1}}}}, "distill: unknown method 'kd'"),
        ({"axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"fd": {"fd": 1}}}},
         "a teacher needs `cell` (a teacher of this grid), `run`, or `model` + `pretrained`"),
    ],
)
def test_bad_grids_fail_at_plan_time_with_one_message(workdir, clipkd, changes, message):
    path = _grid(workdir, **changes)
    for command in (["plan"], ["submit", "--executor", "slurm"]):
        result = clipkd("grid", *command, str(path), cwd=workdir)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (workdir / "runs" / ".grids").exists()  # nothing was submitted


def test_bad_slurm_flag_on_the_command_line(workdir, clipkd):
    result = clipkd("grid", "submit", "grids/smoke.yaml", "--executor", "slurm", "--gpus-per-node", "-2", cwd=workdir)
    assert result.returncode == 2 and "bad SLURM option: gpus_per_node" in result.stderr
    result = clipkd("grid", "submit", "grids/smoke.yaml", "--sbatch", "exclusive", cwd=workdir)
    assert result.returncode == 2 and "expected KEY=VALUE" in result.stderr


def test_local_executor_runs_the_grid_and_resubmitting_submits_nothing(smoke_grid):
    workdir, out = smoke_grid
    assert "9 cells to submit" in out and "9 done" in out
    assert re.search(r"^9 cells ran in \d+ min \d+ s on this machine$", out, re.MULTILINE)
    db = sqlite3.connect(workdir / "results" / "clipkd.db")
    assert db.execute("select count(*) from runs where status = 'done' and grid = 'smoke'").fetchone()[0] == 9
    assert db.execute("select count(distinct run_id) from metrics join runs on runs.id = run_id where metric = 'acc1' "
                      "and grid = 'smoke'").fetchone()[0] == 9  # (the store also holds a reference model)
    # students started only after their teacher finished
    teacher_end = db.execute("select finished_at from runs where name = 'smoke/teacher/tiny-teacher'").fetchone()[0]
    first_student = db.execute("select min(started_at) from runs where teacher is not null").fetchone()[0]
    assert first_student >= teacher_end
    again = run_clipkd("grid", "submit", "grids/smoke.yaml", "--executor", "local", cwd=workdir).stdout
    assert "0 cells to submit, 9 skipped" in again
    ablation = run_clipkd("ablation", cwd=workdir).stdout
    for method in ["baseline", "crd", "fd", "mfd", "gd", "icl", "afd", "crd+fd+icl"]:
        assert f" {method} " in ablation


def test_local_jobs_write_a_postgresql_store_directly(workdir, postgres_store):
    """With a server database each job writes the store itself: while a cell runs, its row already names the
    job's host and start (only the job knows them; the dispatcher's own row for a running cell has neither)."""
    from results.store import Store, StoreError

    grid = {"name": "direct", "output_dir": "runs",
            "base": {"data": {"dataset": "digits"}, "optim": {"warmup_steps": 1},
                     "train": {"batch_size": 64, "steps": 30, "checkpoint_every": 10}},
            "axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"baseline": {}}, "seeds": [0, 1]}}
    (workdir / "grids" / "direct.yaml").write_text(yaml.safe_dump(grid))
    submit = subprocess.Popen([sys.executable, "-m", "harness.cli", "grid", "submit", "grids/direct.yaml", "--db",
                               postgres_store], cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_running = set()
    while submit.poll() is None:
        with contextlib.suppress(StoreError):  # until the dispatcher has created the store's tables
            with Store(postgres_store, readonly=True).engine.connect() as connection:
                seen_running |= set(connection.exec_driver_sql(
                    "select id from runs where grid = 'direct' and status = 'running' and host is not null "
                    "and started_at is not null").scalars())
        time.sleep(0.05)
    assert submit.returncode == 0, submit.stdout.read()
    assert len(seen_running) == 2
    final = Store(postgres_store, readonly=True)
    for run_id in seen_running:
        assert final.get_run(run_id)["status"] == "done" and final.metrics(run_id)["digits"]["acc1"] > 0


def cached_teacher_grid(workdir: Path) -> Path:
    """The smoke grid's teacher, with the baseline and two distilled students reading its cached embeddings."""
    grid = yaml.safe_load((workdir / "grids" / "smoke.yaml").read_text())
    grid["name"] = "cached"
    grid["base"]["teacher"] = {"embeddings": "cached"}
    grid["base"]["data"]["augment"] = False
    grid["axes"]["methods"] = {"baseline": {}, "fd": {"fd": 2000}, "clip-kd": {"fd": 2000, "icl": 1, "crd": 1}}
    path = workdir / "grids" / "cached.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_cached_teacher_grid_builds_the_cache_as_a_step_the_students_wait_for(workdir):
    from core.builtin import load_builtin
    from harness.grids.expansion import load_grid

    grid = load_grid(cached_teacher_grid(workdir))
    cells = {c.name: c for c in grid.cells}
    (cache,) = [c for c in grid.cells if c.kind == "teacher-cache"]
    assert cache.stage == 1 and cache.needs == ["teacher/tiny-teacher"]
    distilled = [c for c in grid.cells if c.kind == "run" and c.config.distill]
    assert len(distilled) == 2 and all(c.needs == ["teacher/tiny-teacher", cache.name] for c in distilled)
    assert [c.needs for c in cells.values() if c.kind == "run" and c.stage == 2 and not c.config.distill] == [[]]
    out = run_clipkd("grid", "submit", "grids/cached.yaml", "--executor", "local", cwd=workdir).stdout
    assert "5 cells to submit" in out and "5 done" in out
    assert out.index(f"done     {cache.name}") < min(out.index(f"started  {c.name}") for c in distilled)
    caches = [p for p in (workdir / "runs" / ".teacher-embeddings").iterdir() if p.is_dir()]
    assert [p.name for p in caches] == [cache.run_id]
    assert json.loads((caches[0] / "meta.json").read_text())["samples"] == len(load_builtin("digits", "train").labels)
    db = sqlite3.connect(workdir / "results" / "clipkd.db")
    assert db.execute("select count(*) from runs where status = 'done'").fetchone()[0] == 4  # caches are no runs
    again = run_clipkd("grid", "submit", "grids/cached.yaml", "--executor", "local", cwd=workdir).stdout
    assert "0 cells to submit, 5 skipped" in again


def job_intervals(run_dirs) -> list[tuple[float, float]]:
    """Each run's job from its process's start (before it imported torch) to its record's last write (evaluated,
    stored); the executor starts the next job only after one has exited."""
    intervals = []
    for run_dir in run_dirs:
        start = json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])
        assert start["process_started"] < start["time"]
        intervals.append((start["process_started"], (run_dir / "record.json").stat().st_mtime))
    return intervals


def most_at_once(intervals) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in edges:  # at equal times an end sorts before a start
        running += change
        peak = max(peak, running)
    return peak


def test_the_smoke_grids_students_ran_at_most_two_at_once(smoke_grid):
    workdir = smoke_grid[0]
    students = [p for p in (workdir / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")
                and json.loads((p / "config.json").read_text())["name"] != "smoke/teacher/tiny-teacher"]
    assert len(students) == 8 and most_at_once(job_intervals(students)) == 2  # slurm.max_parallel: 2


def test_retry_failed_reruns_the_failed_cells_and_only_those(workdir):
    grid = {"name": "retry", "output_dir": "runs",
            "base": {"data": {"dataset": "digits"}, "optim": {"warmup_steps": 1},
                     "train": {"batch_size": 64, "steps": 6, "checkpoint_every": 3}},
            "axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"baseline": {}}, "seeds": [0, 1]},
            # seed 1 diverges at its second step (NonFiniteLossError), before any checkpoint
            "overrides": [{"match": {"seed": 1}, "set": {"optim": {"lr": 1.0e30}}}]}
    (workdir / "grids" / "retry.yaml").write_text(yaml.safe_dump(grid))
    first = run_clipkd("grid", "submit", "grids/retry.yaml", "--max-parallel", "1", cwd=workdir, check=False)
    assert first.returncode == 1 and "2 cells to submit" in first.stdout and "1 done, 1 failed" in first.stdout
    run_dirs = {json.loads((p / "config.json").read_text())["seed"]: p for p in (workdir / "runs").iterdir()
                if p.is_dir() and not p.name.startswith(".")}
    assert most_at_once(job_intervals(run_dirs.values())) == 1  # --max-parallel 1: one cell after the other
    stored = sqlite3.connect(workdir / "results" / "clipkd.db").execute(
        "select seed, status, error from runs order by seed").fetchall()
    assert [(seed, status) for seed, status, _ in stored] == [(0, "done"), (1, "failed")]
    assert "loss term 'task' is nan" in stored[1][2]
    records = {seed: (d / "record.json").stat().st_mtime_ns for seed, d in run_dirs.items()}

    again = run_clipkd("grid", "submit", "grids/retry.yaml", cwd=workdir)
    assert "0 cells to submit, 2 skipped" in again.stdout  # a failed cell waits for --retry-failed
    retried = run_clipkd("grid", "submit", "grids/retry.yaml", "--retry-failed", cwd=workdir, check=False)
    assert "1 cells to submit, 1 skipped" in retried.stdout and "1 done, 1 failed" in retried.stdout
    for seed, run_dir in run_dirs.items():
        starts = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
        assert starts.count("start") == (2 if seed == 1 else 1), (seed, starts)
        assert ((run_dir / "record.json").stat().st_mtime_ns == records[seed]) == (seed != 1)


def test_rules_match_any_of_a_list(workdir):
    """More seeds where the claim is (baseline and CLIP-KD), fewer for the rest: exclude takes lists."""
    from harness.grids.expansion import load_grid

    grid = yaml.safe_load((workdir / "grids" / "smoke.yaml").read_text())
    grid["axes"]["seeds"] = [0, 1, 2, 3]
    grid["exclude"] = [{"method": ["crd", "fd", "mfd", "gd", "icl", "afd"], "seed": [2, 3]}]
    path = workdir / "grids" / "lists.yaml"
    path.write_text(yaml.safe_dump(grid))
    runs = [c for c in load_grid(path).cells if c.stage == 2]
    per_method = {}
    for cell in runs:
        per_method.setdefault(cell.config.method_label, set()).add(cell.config.seed)
    assert per_method["baseline"] == per_method["crd+fd+icl"] == {0, 1, 2, 3}
    assert all(seeds == {0, 1} for method, seeds in per_method.items() if method not in ("baseline", "crd+fd+icl"))
    assert len(runs) == 2 * 4 + 6 * 2


def test_local_cells_share_the_cores_this_process_may_use(monkeypatch):
    """Inside a SLURM allocation or under taskset a process may use fewer cores than the machine has: the local
    executor shares those (a 128-core node's count would give each of two cells 64 threads on 8 allowed cores)."""
    from harness.grids.dispatch import cell_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [cell_threads(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice per process
    assert cell_threads(2) == 3


def test_a_job_that_finishes_before_its_submitter_marks_it_started_is_done(workdir, clipkd, monkeypatch):
    """The submitter writes a cell's "running" (local) or "queued" (SLURM) after starting its job; a quick job can
    write its record first (a submitter that imports less than its job starts it sooner). The mark is as of the
    time the job was started, so the job's own record, written later, is the one the store keeps."""
    from harness.grids import dispatch

    grid = {"name": "quick", "output_dir": "runs",
            "base": {"data": {"dataset": "digits", "workers": 0}, "optim": {"warmup_steps": 1},
                     "train": {"batch_size": 32, "steps": 2}},
            "axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"baseline": {}}, "seeds": [0]}}
    (workdir / "grids" / "quick.yaml").write_text(yaml.safe_dump(grid))
    save_jobs = dispatch._save_jobs

    def save_then_wait_for_the_record(grid, jobs):  # between starting the job and marking it running
        save_jobs(grid, jobs)
        deadline = time.monotonic() + 300
        while not any(json.loads(r.read_text())["run"]["status"] == "done" for r in workdir.glob("runs/*/record.json")):
            assert time.monotonic() < deadline, "the job wrote no final record"
            time.sleep(0.2)

    monkeypatch.setattr(dispatch, "_save_jobs", save_then_wait_for_the_record)
    result = clipkd("grid", "submit", "grids/quick.yaml", "--executor", "local", cwd=workdir)
    assert result.returncode == 0, result.stderr
    stored = sqlite3.connect(workdir / "results" / "clipkd.db").execute("select status from runs").fetchall()
    assert stored == [("done",)]


def test_local_cells_start_once_what_they_need_is_done_not_when_their_stage_is(monkeypatch):
    """The findings grid's two teachers train side by side; once the demo's teacher is done, its cache and then
    its students take the freed core while the larger teacher still trains (before, the whole first stage had
    to end). No cell starts before the cells it needs are done, never more than max_parallel cells or the cores'
    threads at once, and each cell gets the threads its stage's width gives it (its numbers do not depend on
    what runs beside it)."""
    from harness.grids import dispatch
    from harness.grids.expansion import load_grid

    grid = load_grid(ROOT / "grids" / "demo_findings.yaml")
    clock, started, done, busy = [0], {}, {}, []
    ticks = {"teacher/tiny-teacher": 3, "teacher/small-teacher": 12}

    class Job:
        def __init__(self, cell, threads):
            self.cell, self.threads, self.job_id, self._process = cell, threads, cell.name, type("P", (), {"pid": 0})
            self.ends = clock[0] + ticks.get(cell.name, 1)

        def done(self):
            return clock[0] >= self.ends

        def exception(self):
            return None

    class Executor:
        def submit(self, job):
            cell, threads = job
            assert all(need in done for need in cell.needs), f"{cell.name} started before {cell.needs}"
            started[cell.name] = (clock[0], threads)
            running.append(job := Job(cell, threads))
            return job

    running = []

    def tick(_seconds):
        live = [j for j in running if j.cell.name not in done]
        busy.append((len(live), sum(j.threads for j in live)))
        clock[0] += 1
        for job in live:
            if job.done():
                done[job.cell.name] = clock[0]

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dispatch.os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(dispatch, "make_executor", lambda *args: Executor())
    monkeypatch.setattr(dispatch, "_job", lambda cell, grid, url, threads: (cell, threads))
    for name in ("_record", "ingest", "_save_jobs", "_direct_store_url"):
        monkeypatch.setattr(dispatch, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(dispatch, "load_jobs", lambda grid: {})
    monkeypatch.setattr(dispatch.time, "sleep", tick)
    dispatch.run_local(grid, None, grid.cells, grid.spec.slurm, report=lambda line: None)
    assert set(started) == {c.name for c in grid.cells} and max(busy) <= (2, 2)
    tiny_cache = next(c.name for c in grid.cells if c.kind == "teacher-cache" and c.needs == ["teacher/tiny-teacher"])
    assert started[tiny_cache][0] < done["teacher/small-teacher"]  # the freed core did not wait for the stage
    assert {started[t][1] for t in ticks} == {1} and {threads for _, threads in started.values()} == {1}
