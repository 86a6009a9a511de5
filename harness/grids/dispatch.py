"""Dispatching grid cells through submitit: one job array per stage, on SLURM or on this machine.

SLURM: teachers the grid trains form a first array, teacher-embedding caches a second, the students a third;
each depends on the arrays of the cells it needs (``afterok``) and all are submitted at once, so ``submit``
returns immediately. Local: submitit's local executor has no queue, so cells run
in the foreground, at most ``max_parallel`` at a time, each once the cells it needs are done. Either way a cell's job is a
:class:`CellJob`, which checkpoints and requeues on SLURM's time-limit signal, and records its result in its
run directory; the store ingests those records (see ``results/records.py``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from core.errors import ClipkdError
from core.processes import pid_alive
from harness.grids.expansion import RUN, TEACHER_CACHE, Cell, Grid, SlurmSpec
from harness.run_rows import run_record
from results.records import ingest, read_record
from results.store import Store, now

EXECUTORS = ("local", "slurm")
JOBS_FILE = "jobs.json"


class DispatchError(ClipkdError, RuntimeError):
    pass


class CellJob:
    """What one cell's job runs: train, evaluate and record the run. submitit calls ``checkpoint`` to requeue."""

    def __init__(self, config: dict[str, Any], grid: str, store_url: str | None, threads: int | None):
        self.config, self.grid, self.store_url, self.threads = config, grid, store_url, threads

    def __call__(self) -> str:
        import torch

        from harness.config.run_config import parse_config

        if self.threads:
            torch.set_num_threads(self.threads)
        if submitit.JobEnvironment().num_tasks > 1:  # one task per GPU: export RANK, WORLD_SIZE, MASTER_ADDR…
            for replaced in export_task_environment():
                print(f"clipkd: {replaced}", file=sys.stderr)
        return self.work(parse_config(self.config, f"grid {self.grid}"))

    def work(self, config) -> str:
        from harness.run import run
        from harness.training.stops import TrainingInterrupted

        try:
            return run(config, Store(self.store_url) if self.store_url else None, grid=self.grid)
        except TrainingInterrupted as stop:
            # The trainer saved a checkpoint at a step boundary. Hand the signal back to submitit: on its
            # time-limit/preemption signal it calls checkpoint() below and requeues the job, which resumes.
            signal.raise_signal(stop.signum)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)


def export_task_environment(environ=os.environ) -> list[str]:
    """torch.distributed's variables for this task of a SLURM job, as submitit derives them: the rank, the sizes
    and MASTER_ADDR (the job's first node) overwrite any a site's ``setup:`` line or module already exported, since
    a stale RANK would join another rank's place; a preset MASTER_PORT is the site's choice of port and is kept
    (submitit reads it too). submitit's own ``export()`` raises when any of them is set. CUDA_VISIBLE_DEVICES is
    left as SLURM set it: the device is chosen from what the task sees (core/distributed.py). Returns a line
    per value replaced, for the job's log."""
    task = submitit.helpers.TorchDistributedEnvironment()
    values = {"MASTER_ADDR": task.master_addr, "MASTER_PORT": str(task.master_port), "RANK": str(task.rank),
              "WORLD_SIZE": str(task.world_size), "LOCAL_RANK": str(task.local_rank),
              "LOCAL_WORLD_SIZE": str(task.local_world_size)}
    replaced = [f"{name}={environ[name]} was set; this task's {name} is {value}" for name, value in values.items()
                if environ.get(name, value) != value]
    environ.update(values)
    return replaced


class CacheJob(CellJob):
    """A teacher-cache cell's job: build the cache (on every GPU of the job), or find it built. A requeued job
    starts the build again; a failure leaves its reason beside the cache folder for ``grid status``."""

    def work(self, config) -> str:
        from core.distributed import init_distributed
        from harness.teachers import cache_build, cache_key

        failed = cache_key.failure_file(config)
        failed.unlink(missing_ok=True)
        try:
            env = init_distributed(config.train.collective_timeout_s)
            cache_build.ensure(config, env.device, env)
        except Exception as error:
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(error).__name__}: {error}")
            raise
        return "done"


def _jobs_path(grid: Grid) -> Path:
    return grid.state_dir / JOBS_FILE


def load_jobs(grid: Grid) -> dict[str, dict[str, Any]]:
    path = _jobs_path(grid)
    return json.loads(path.read_text()) if path.exists() else {}


def _save_jobs(grid: Grid, jobs: dict[str, dict[str, Any]]) -> None:
    path = _jobs_path(grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jobs, indent=1))
    os.replace(tmp, path)


def _slurm_in_flight(job_ids: list[str]) -> set[str]:
    if not job_ids:
        return set()
    result = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    listed = set(result.stdout.split())
    # squeue shows a pending array as 123_[0-4]: count every task of a listed array as in flight
    arrays = {i.split("_")[0] for i in listed if "[" in i}
    return {j for j in job_ids if j in listed or j.split("_")[0] in arrays}


def in_flight(grid: Grid) -> set[str]:
    """Run ids whose recorded job is still pending or running."""
    jobs = load_jobs(grid)
    slurm = {rid: j["job_id"] for rid, j in jobs.items() if j["executor"] == "slurm"}
    live = _slurm_in_flight(list(slurm.values())) if slurm else set()
    return {rid for rid, jid in slurm.items() if jid in live} | {
        rid for rid, j in jobs.items() if j["executor"] == "local" and j.get("pid") and pid_alive(j["pid"])
    }


def cell_states(grid: Grid, store: Store) -> dict[str, str]:
    """new / queued / running / done / failed for every cell, after ingesting the runs' records. A cache cell is
    done when its cache is complete and failed when its last build left a reason."""
    from harness.teachers import cache_key

    runs = [c for c in grid.cells if c.kind == RUN]
    store.register_grid(grid.name, {c.run_id: c.name for c in runs})  # the dashboard counts "new" cells
    ingest(store, [c.config.run_dir for c in runs])
    states = {}
    for cell in grid.cells:
        if cell.kind == TEACHER_CACHE:
            done, failed = cache_key.is_built(cell.config), cache_key.failure_file(cell.config).is_file()
            states[cell.name] = "done" if done else "failed" if failed else "new"
        else:
            run = store.get_run(cell.run_id)
            states[cell.name] = run["status"] if run else "new"
    return states


def _record(store: Store, cell: Cell, grid: Grid, status: str, error: str | None = None, at: str | None = None) -> None:
    """Write a run cell's state to the store (a cache cell is not a run: its state is its folder). ``at``: the time
    the state began, for a state written after its job was started: a job may finish, and write its record, before
    the submitter writes "queued" or "running", and the store keeps whichever is newer."""
    if cell.kind == RUN:
        store.put_run({**_queued(cell, grid), "status": status, "error": error, "updated_at": at or now()})


def executor_parameters(spec: SlurmSpec, kind: str, grid_name: str) -> dict[str, Any]:
    common = {"timeout_min": spec.timeout_min, "nodes": spec.nodes, "tasks_per_node": spec.tasks,
              "cpus_per_task": spec.cpus_per_task, "name": f"clipkd-{grid_name}"}
    if spec.gpus_per_node:
        common["gpus_per_node"] = spec.gpus_per_node
    if kind == "local":
        return common
    slurm = {"slurm_partition": spec.partition, "slurm_account": spec.account, "slurm_qos": spec.qos,
             "mem_gb": spec.mem_gb, "slurm_array_parallelism": spec.array_parallelism,
             "slurm_setup": list(spec.setup) or None,
             "slurm_additional_parameters": {"kill-on-invalid-dep": "yes", **spec.additional},
             # one task that exits with an error ends its job's other tasks at once, instead of leaving them in a
             # collective until its timeout (a rank's failure also reaches them: core/distributed.py)
             "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    return {**common, **{k: v for k, v in slurm.items() if v is not None}}


def make_executor(grid: Grid, kind: str, spec: SlurmSpec) -> submitit.AutoExecutor:
    if kind not in EXECUTORS:
        raise DispatchError(f"unknown executor {kind!r}; accepted: {', '.join(EXECUTORS)}")
    # cluster= always: AutoExecutor would otherwise pick SLURM whenever srun is on PATH
    executor = submitit.AutoExecutor(folder=grid.state_dir / "jobs" / "%j", cluster=kind)
    executor.update_parameters(**executor_parameters(spec, kind, grid.name))
    return executor


def _job(cell: Cell, grid: Grid, store_url: str | None, threads: int | None) -> CellJob:
    job = CacheJob if cell.kind == TEACHER_CACHE else CellJob
    return job(cell.config.resolved(), grid.name, store_url, threads)


def _direct_store_url(store: Store) -> str | None:
    """Jobs write the store directly only when it is a server database (see results/records.py)."""
    return None if store.engine.dialect.name == "sqlite" else store.url


def plan_submission(grid: Grid, store: Store, retry_failed: bool) -> tuple[list[Cell], dict[str, str], dict[str, str]]:
    """The cells to submit, the skipped ones with the reason, and every cell's state."""
    states, live = cell_states(grid, store), in_flight(grid)
    todo, skipped = [], {}
    for cell in grid.cells:
        state = states[cell.name]
        failed_teachers = [n for n in cell.needs if states[n] == "failed" and not retry_failed]
        if state == "done":
            skipped[cell.name] = "done"
        elif state == "failed" and not retry_failed:
            skipped[cell.name] = "failed (resubmit with --retry-failed)"
        elif cell.run_id in live:
            skipped[cell.name] = f"{state}: its job is still in the queue"
        elif failed_teachers:
            skipped[cell.name] = f"its teacher {failed_teachers[0]} failed (resubmit with --retry-failed)"
        else:
            todo.append(cell)
    return todo, skipped, states


def sbatch_script(grid: Grid, spec: SlurmSpec) -> str:
    """The sbatch file submitit would write for one cell (submitit renders it only internally)."""
    executor = make_executor(grid, "slurm", spec)._executor
    return executor._make_submission_file_text(executor._submitit_command_str, uid="<uid>")


def submit_slurm(grid: Grid, store: Store, cells: list[Cell], spec: SlurmSpec) -> dict[str, str]:
    """Submit ``cells`` as one array per stage; returns run id -> job id."""
    job_ids: dict[str, str] = {}
    jobs, live = load_jobs(grid), in_flight(grid)
    # a cell waits for the jobs of the cells it needs, whether submitted now or queued from an earlier submission
    needed_jobs = {c.name: jobs[c.run_id]["job_id"] for c in grid.cells if c.run_id in live}
    for stage in sorted({c.stage for c in cells}):
        stage_cells = [c for c in cells if c.stage == stage]
        executor = make_executor(grid, "slurm", spec)
        waits = sorted({needed_jobs[n] for c in stage_cells for n in c.needs if n in needed_jobs})
        if waits:
            additional = executor_parameters(spec, "slurm", grid.name)["slurm_additional_parameters"]
            executor.update_parameters(slurm_additional_parameters={**additional,
                                                                     "dependency": "afterok:" + ":".join(waits)})
        submitted_at = now()
        with executor.batch():
            submitted = [executor.submit(_job(c, grid, _direct_store_url(store), spec.cpus_per_task)) for c in stage_cells]
        for cell, job in zip(stage_cells, submitted):
            jobs[cell.run_id] = {"executor": "slurm", "job_id": job.job_id, "cell": cell.name}
            job_ids[cell.run_id] = needed_jobs[cell.name] = job.job_id
            _record(store, cell, grid, "queued", at=submitted_at)
    _save_jobs(grid, jobs)
    return job_ids


def _queued(cell: Cell, grid: Grid) -> dict[str, Any]:
    return {**run_record(cell.config, grid=grid.name), "status": "queued", "error": None}


def cell_threads(side_by_side: int) -> int:
    """Threads for each of ``side_by_side`` local cells: the cores this process may use (its affinity: inside a
    SLURM allocation or under taskset, not the machine's count) shared between them, a lone teacher getting them
    all; an OMP_NUM_THREADS the user set is taken as the threads each process should have."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) // max(1, side_by_side))


def run_local(grid: Grid, store: Store, cells: list[Cell], spec: SlurmSpec,
              report: Callable[[str], None] = print) -> None:
    """Run cells on this machine, ``spec.max_parallel`` at a time, in stage order. Each cell gets the threads it
    would have in a stage run alone (``cell_threads`` of its stage's width: the numbers do not depend on what runs
    beside it), and starts as soon as the cells it needs are done and its threads fit the cores left: a grid's
    second, larger teacher does not hold a core idle that the first one's students can use."""
    jobs = load_jobs(grid)
    executor = make_executor(grid, "local", spec)
    widths = {stage: sum(c.stage == stage for c in cells) for stage in {c.stage for c in cells}}
    threads = {c.name: cell_threads(min(spec.max_parallel, widths[c.stage])) for c in cells}
    user_threads = os.environ.get("OMP_NUM_THREADS", "").isdigit()  # then only max_parallel bounds the cells
    cores = len(os.sched_getaffinity(0))
    queue = sorted(cells, key=lambda c: c.stage)
    waiting_on = {c.name for c in cells}  # the cells of this submission not done yet
    failed: set[str] = set()
    running: dict[Any, Cell] = {}
    try:
        while queue or running:
            busy = sum(threads[c.name] for c in running.values())
            for cell in list(queue):
                if len(running) >= spec.max_parallel:
                    break
                blocked = [n for n in cell.needs if n in failed]
                if blocked:
                    queue.remove(cell)
                    _record(store, cell, grid, "failed", f"cell {blocked[0]}, which it needs, failed")
                    failed.add(cell.name)
                    waiting_on.discard(cell.name)
                    continue
                fits = user_threads or not running or busy + threads[cell.name] <= cores
                if any(n in waiting_on for n in cell.needs) or not fits:
                    continue
                queue.remove(cell)
                started = now()
                job = executor.submit(_job(cell, grid, _direct_store_url(store), threads[cell.name]))
                running[job] = cell
                busy += threads[cell.name]
                jobs[cell.run_id] = {"executor": "local", "job_id": job.job_id, "cell": cell.name,
                                     "pid": job._process.pid}
                _save_jobs(grid, jobs)
                _record(store, cell, grid, "running", at=started)
                report(f"started  {cell.name}")
            time.sleep(0.5)
            for job in [j for j in running if j.done()]:
                cell = running.pop(job)
                waiting_on.discard(cell.name)
                if cell.kind == RUN:
                    ingest(store, [cell.config.run_dir])
                error = job.exception()  # LocalJob.state says FINISHED for failed jobs too
                if error is not None:
                    failed.add(cell.name)
                    _mark_failed_without_record(store, cell, grid, f"{type(error).__name__}: {error}")
                report(f"{'failed ' if error else 'done    '} {cell.name}")
    except KeyboardInterrupt:
        for job, cell in running.items():
            job.cancel()
            _record(store, cell, grid, "queued", "interrupted: resubmit to resume from its checkpoint")
        raise


def _mark_failed_without_record(store: Store, cell: Cell, grid: Grid, reason: str) -> None:
    record = read_record(cell.config.run_dir)
    if record is None or record["run"].get("status") != "failed":
        _record(store, cell, grid, "failed", reason[-2000:])


def reconcile(grid: Grid, store: Store) -> None:
    """Cells whose job ended before a final record (scancel, a killed process, node failure, a teacher that
    failed) stay queued with the reason: resubmitting the grid resumes them from their last checkpoint."""
    jobs, live, states = load_jobs(grid), in_flight(grid), cell_states(grid, store)
    for cell in grid.cells:
        job = jobs.get(cell.run_id)
        if not job or cell.run_id in live or states[cell.name] in ("done", "failed") or cell.kind != RUN:
            continue
        record = read_record(cell.config.run_dir)
        why = (record or {}).get("run", {}).get("error") or "it never started"
        log = grid.state_dir / "jobs" / job["job_id"] / f"{job['job_id']}_0_log.err"
        store.set_status(cell.run_id, "queued", f"{job['executor']} job {job['job_id']} ended before finishing "
                                                f"({why}); resubmit the grid to resume it; log: {log}")


def wait(grid: Grid, store: Store, report: Callable[[str], None] = print, poll_s: float = 2.0) -> dict[str, str]:
    """Follow a SLURM submission until no cell of the grid is in flight."""
    last = None
    while True:
        live = in_flight(grid)
        states = cell_states(grid, store)
        summary = summarize(states)
        if summary != last:
            report(summary)
            last = summary
        if not live:
            reconcile(grid, store)
            return cell_states(grid, store)
        time.sleep(poll_s)


def summarize(states: dict[str, str]) -> str:
    counts = {s: 0 for s in ("new", "queued", "running", "done", "failed")}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def cancel(grid: Grid, store: Store) -> list[str]:
    jobs, live = load_jobs(grid), in_flight(grid)
    cancelled = []
    for run_id in live:
        job = jobs[run_id]
        if job["executor"] == "slurm":
            subprocess.run(["scancel", job["job_id"]], check=False)
        else:
            os.kill(job["pid"], signal.SIGTERM)
        if store.get_run(run_id):  # a cache cell has no run
            store.set_status(run_id, "queued", "cancelled by `clipkd grid cancel`; resubmit the grid to resume it")
        cancelled.append(job["cell"])
    return cancelled

