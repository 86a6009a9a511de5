"""Grids on a real SLURM cluster (scripts/slurm_cluster.sh; .ci/run installs and starts it): one job array per
stage, every cell done with its metrics stored, interrupted cells resuming from their checkpoints."""
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, require, run_clipkd

pytestmark = pytest.mark.xdist_group("slurm_cluster")  # pyproject.toml: one worker runs the group

SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"


def _cluster_up() -> bool:
    return subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    if not _cluster_up() and os.geteuid() == 0 and shutil.which("slurmctld"):
        subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, timeout=180)
    require(_cluster_up(), "no SLURM cluster is running: `sudo scripts/slurm_cluster.sh install && "
                           "sudo scripts/slurm_cluster.sh start` (needs root)")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "grids", tmp_path / "grids")
    return tmp_path


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _wait_until(condition, seconds: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def test_cells_killed_mid_training_resume_from_their_checkpoints(slurm, workdir):
    grid = {
        "name": "interrupt", "output_dir": "runs",
        "base": {"data": {"dataset": "digits"}, "optim": {"warmup_steps": 5},
                 "train": {"batch_size": 64, "steps": 120, "checkpoint_every": 25}},
        "axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"baseline": {}}, "seeds": [0, 1]},
        "slurm": {"cpus_per_task": 1, "timeout_min": 20},
    }
    (workdir / "grids" / "interrupt.yaml").write_text(yaml.safe_dump(grid))
    run_clipkd("grid", "submit", "grids/interrupt.yaml", "--executor", "slurm", cwd=workdir)
    jobs = json.loads((workdir / "runs" / ".grids" / "interrupt" / "jobs.json").read_text())
    (timed_out, timed_out_job), (cancelled, cancelled_job) = sorted(
        ((workdir / "runs" / run_id, job["job_id"]) for run_id, job in jobs.items()), key=lambda item: item[1])
    # signalled as soon as both have trained 10 of their 120 steps (watched every 20 ms): however fast the node,
    # neither can finish before its signal
    _wait_until(lambda: len(_steps(timed_out)) >= 10 and len(_steps(cancelled)) >= 10, 240, "both cells to train",
                poll=0.02)

    # the time-limit signal submitit asks SLURM for (--signal=USR2@90): checkpoint, requeue, resume
    subprocess.run(["scancel", "--signal=USR2", timed_out_job], check=True)
    # a plain scancel: the job checkpoints on SIGTERM and ends; resubmitting the grid resumes it
    subprocess.run(["scancel", cancelled_job], check=True)
    _wait_until(lambda: (json.loads((timed_out / "record.json").read_text())["run"]["status"] == "done"), 300,
                "the requeued cell to finish")
    events = _events(timed_out)
    assert [e["event"] for e in events] == ["start", "stop", "resume", "finish"]
    assert events[1]["signal"] == "SIGUSR2" and events[2]["step"] == events[1]["step"] >= 10
    assert events[0]["slurm_job"] == events[2]["slurm_job"]  # the same job, requeued

    status = run_clipkd("grid", "status", "grids/interrupt.yaml", cwd=workdir).stdout
    assert "1 queued" in status and "1 done" in status  # interrupted, not failed
    out = run_clipkd("grid", "submit", "grids/interrupt.yaml", "--executor", "slurm", "--wait", cwd=workdir).stdout
    assert "1 cells to submit, 1 skipped" in out and out.strip().endswith("2 done, 0 failed")
    events = _events(cancelled)
    assert [e["event"] for e in events] == ["start", "stop", "resume", "finish"]
    assert events[1]["signal"] == "SIGTERM" and events[2]["step"] == events[1]["step"] >= 10
    assert events[0]["slurm_job"] != events[2]["slurm_job"]  # a new job resumed the run
    for run_dir in (timed_out, cancelled):
        assert _steps(run_dir) == list(range(1, 121))  # every step exactly once across the interruption


def test_a_grid_runs_as_one_job_array_per_stage_and_resubmitting_it_is_a_no_op(slurm, workdir):
    """The smoke grid's teacher with a cached teacher's students: three stages (teacher, cache, students), each one
    job array, every cell done with its metrics stored; a second submission submits nothing."""
    from test_grid import cached_teacher_grid

    cached_teacher_grid(workdir)
    out = run_clipkd("grid", "submit", "grids/cached.yaml", "--executor", "slurm", "--wait", cwd=workdir).stdout
    assert "5 cells to submit" in out and out.strip().endswith("0 new, 0 queued, 0 running, 5 done, 0 failed")
    again = run_clipkd("grid", "submit", "grids/cached.yaml", "--executor", "slurm", cwd=workdir).stdout
    assert "0 cells to submit, 5 skipped" in again and "submitted" not in again
    jobs = json.loads((workdir / "runs" / ".grids" / "cached" / "jobs.json").read_text())
    arrays: dict[int, list[str]] = {}
    for job in jobs.values():
        arrays.setdefault(int(job["job_id"].split("_")[0]), []).append(job["cell"].split("/")[0])
    # three arrays in submission order: the teacher, the cache, then the students (the baseline among them)
    assert [sorted(cells) for _, cells in sorted(arrays.items())][:2] == [["teacher"], ["teacher-cache"]]
    assert len(arrays) == 3 and sum(map(len, arrays.values())) == 5
    (cache,) = [p for p in (workdir / "runs" / ".teacher-embeddings").iterdir() if p.is_dir()]
    built = (cache / "meta.json").stat().st_mtime
    db = sqlite3.connect(workdir / "results" / "clipkd.db")
    assert db.execute("select count(*) from runs where status = 'done'").fetchone()[0] == 4  # caches are no runs
    assert db.execute("select count(distinct run_id) from metrics where metric = 'acc1'").fetchone()[0] == 4
    assert db.execute("select count(*) from metrics where metric = 'feature_cka_image'").fetchone()[0] == 2
    started = [row[0] for row in db.execute("select run_dir from runs where teacher is not null")]
    assert len(started) == 2
    for run_dir in started:  # the distilled students started after the cache was complete (afterok)
        assert json.loads((Path(run_dir) / "events.jsonl").read_text().splitlines()[0])["time"] >= built


def _file_state(path: Path) -> tuple[bytes, int]:
    """The store's bytes, its write-ahead log included, and its modification time."""
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b""), path.stat().st_mtime_ns


def _squeue(job_ids) -> list[str]:
    """The listed jobs still queued or running, one line per array task (-r: a pending array is not one line)."""
    result = subprocess.run(["squeue", "-r", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    return result.stdout.split()


def _node_cpus() -> int:
    """The node's CPU count as slurmctld reports it; asked again while a busy controller times the query out."""
    deadline = time.monotonic() + 60
    while not (result := subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True)).stdout.split():
        assert time.monotonic() < deadline, f"sinfo answered nothing for a minute: {result.stderr}"
        time.sleep(1)
    return int(result.stdout.split()[0])


def _small_grid(workdir: Path, name: str, steps: int, cpus: int = 1) -> str:
    grid = {"name": name, "output_dir": "runs",
            "base": {"data": {"dataset": "digits"}, "optim": {"warmup_steps": 2},
                     "train": {"batch_size": 64, "steps": steps, "checkpoint_every": 10}},
            "axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"baseline": {}}, "seeds": [0, 1]},
            "slurm": {"cpus_per_task": cpus, "timeout_min": 20}}
    (workdir / "grids" / f"{name}.yaml").write_text(yaml.safe_dump(grid))
    return f"grids/{name}.yaml"


def test_jobs_never_write_the_head_nodes_store_file(slurm, workdir):
    """Jobs write their records; the store file changes only when the head node ingests them."""
    grid = _small_grid(workdir, "untouched", steps=10)
    run_clipkd("grid", "submit", grid, "--executor", "slurm", cwd=workdir)
    store = workdir / "results" / "clipkd.db"
    before = _file_state(store)
    jobs = json.loads((workdir / "runs" / ".grids" / "untouched" / "jobs.json").read_text())
    run_dirs = [workdir / "runs" / run_id for run_id in jobs]
    _wait_until(lambda: not _squeue([j["job_id"] for j in jobs.values()]), 300, "both jobs to end")
    assert [json.loads((d / "record.json").read_text())["run"]["status"] for d in run_dirs] == ["done", "done"]
    assert _file_state(store) == before  # two jobs trained, evaluated and recorded: the file is as submit left it
    assert "2 done" in run_clipkd("grid", "status", grid, cwd=workdir).stdout
    assert _file_state(store) != before  # ingested by the head node
    db = sqlite3.connect(store)
    assert db.execute("select count(*) from runs where status = 'done' and grid = 'untouched'").fetchone()[0] == 2


def test_queued_cells_are_not_submitted_twice_and_cancel_cancels_them(slurm, workdir):
    cpus = _node_cpus()
    grid = _small_grid(workdir, "queued", steps=5000, cpus=cpus)  # each job takes the whole node: one waits
    first = run_clipkd("grid", "submit", grid, "--executor", "slurm", cwd=workdir).stdout
    assert "2 cells to submit" in first
    jobs_file = workdir / "runs" / ".grids" / "queued" / "jobs.json"
    jobs = json.loads(jobs_file.read_text())
    job_ids = sorted(job["job_id"] for job in jobs.values())
    assert len(_squeue(job_ids)) == 2
    again = run_clipkd("grid", "submit", grid, "--executor", "slurm", cwd=workdir).stdout
    assert "0 cells to submit, 2 skipped" in again and "submitted" not in again
    assert json.loads(jobs_file.read_text()) == jobs and len(_squeue(job_ids)) == 2  # no third job
    plan = run_clipkd("grid", "plan", grid, cwd=workdir).stdout
    assert plan.count("*") >= 2  # both cells marked in flight

    out = run_clipkd("grid", "cancel", grid, cwd=workdir).stdout
    assert "cancelled 2 cells" in out
    _wait_until(lambda: not _squeue(job_ids), 60, "the cancelled jobs to leave the queue")
    states = sqlite3.connect(workdir / "results" / "clipkd.db").execute(
        "select status, error from runs where grid = 'queued'").fetchall()
    assert [status for status, _ in states] == ["queued", "queued"]  # resumable, not failed
    assert all("cancelled" in error for _, error in states)
    status = run_clipkd("grid", "status", grid, cwd=workdir).stdout
    assert "2 queued" in status and "*" not in status.split("\n", 1)[1]  # nothing in flight any more


def test_jobs_write_a_postgresql_store_directly(slurm, workdir, postgres_store):
    """With a server database the jobs themselves write the store: the runs reach it done, with their metrics,
    while the head node ingests nothing (no `grid status`, no `--wait`)."""
    from results.store import Store

    grid = _small_grid(workdir, "direct", steps=10)
    run_clipkd("grid", "submit", grid, "--executor", "slurm", "--db", postgres_store, cwd=workdir)
    store = Store(postgres_store, readonly=True)

    def done() -> list[str]:
        with store.engine.connect() as connection:
            return list(connection.exec_driver_sql("select id from runs where grid = 'direct' and status = 'done'")
                        .scalars())

    _wait_until(lambda: len(done()) == 2, 300, "both jobs to store their runs")
    for run_id in done():
        assert store.metrics(run_id)["digits"]["acc1"] > 0
        assert store.get_run(run_id)["host"]  # written by the job, which names its host


def test_a_two_stage_pruning_grid_runs_one_array_after_the_other(slurm, workdir, teacher_checkpoint):
    """TinyCLIP's automatic inheritance in stages on the cluster: the second stage's array waits (afterok) for the
    first's, and starts from its dense model."""
    from test_prune import assert_the_stages_ran_in_turn, two_stage_grid

    grid = two_stage_grid(workdir, teacher_checkpoint)
    out = run_clipkd("grid", "submit", grid, "--executor", "slurm", "--wait", cwd=workdir).stdout
    assert "2 cells to submit" in out and out.strip().endswith("0 new, 0 queued, 0 running, 2 done, 0 failed"), out
    jobs = json.loads((workdir / "runs" / ".grids" / "stages" / "jobs.json").read_text())
    arrays = sorted((int(job["job_id"].split("_")[0]), job["cell"]) for job in jobs.values())
    assert arrays[0][1] == "stage/half" and "+pruned-from-half/" in arrays[1][1] and arrays[0][0] != arrays[1][0]
    assert_the_stages_ran_in_turn(workdir)
