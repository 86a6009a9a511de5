"""The commands of a grid and its data: grid plan/submit/status/cancel, data check."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SLURM_FLAGS = {  # CLI flag -> grid file's slurm field
    "partition": str, "account": str, "qos": str, "nodes": int, "gpus_per_node": int, "tasks_per_node": int,
    "cpus_per_task": int, "mem_gb": float, "timeout_min": int, "array_parallelism": int, "max_parallel": int,
}


def _slurm_spec(grid, args: argparse.Namespace):
    from pydantic import ValidationError

    from harness.grids.expansion import GridError, SlurmSpec

    updates = {k: getattr(args, k) for k in SLURM_FLAGS if getattr(args, k, None) is not None}
    extra = {}
    for flag in args.sbatch or []:
        key, sep, value = flag.partition("=")
        if not sep:
            raise GridError(f"--sbatch {flag!r}: expected KEY=VALUE, e.g. --sbatch constraint=a100")
        extra[key] = value
    try:
        return SlurmSpec.model_validate({**grid.spec.slurm.model_dump(), **updates,
                                         "additional": {**grid.spec.slurm.additional, **extra}})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'slurm'}: {e['msg']}" for e in error.errors())
        raise GridError(f"bad SLURM option: {problems}") from None


def _print_cells(grid, states, live=(), data=None, progress=None) -> None:
    """The cells, their run ids and states, what they wait for and (when checked) whether their data is there;
    with ``progress`` (grid status) a running cell's step, samples/s and ETA, a failed one's error."""
    width = max(len(c.name) for c in grid.cells)
    header = f"{'cell':<{width}}  {'run id':<12}  {'state':<8}  "
    print(header + ("progress" if progress is not None else f"{'data':<7}  waits for"))
    for cell in grid.cells:
        state = states[cell.name] + ("*" if cell.run_id in live else "")
        row = f"{cell.name:<{width}}  {cell.run_id:<12}  {state:<8}  "
        if progress is not None:
            waits = f"waits for {', '.join(cell.needs)}" if cell.needs and states[cell.name] in ("new", "queued") else "-"
            print(row + (progress.get(cell.name) or waits))
            continue
        checked = "-" if data is None else "MISSING" if data[cell.name] else "ok"
        print(row + f"{checked:<7}  {', '.join(cell.needs) or '-'}")


def _duration(seconds: float) -> str:
    minutes, hours = round(seconds / 60), seconds / 3600
    return f"{hours:.1f} h" if hours >= 2 else f"{minutes} min" if minutes >= 1 else f"{round(seconds)} s"


def _cell_progress(grid, states, store) -> dict[str, str]:
    """A running cell's step of total, samples/s and time left (as its job last published them, and how long
    ago); a failed cell's error, its first line."""
    from datetime import UTC, datetime

    shown = {}
    for cell in grid.cells:
        run = store.get_run(cell.run_id) if states[cell.name] in ("running", "failed") else None
        if run is None:
            continue
        if run["status"] == "failed":
            shown[cell.name] = (run["error"] or "failed").splitlines()[0]
        elif run["step"] is not None:
            age = (datetime.now(UTC) - datetime.fromisoformat(run["updated_at"])).total_seconds()
            speed = f", {run['samples_per_second']:.1f} samples/s" if run["samples_per_second"] else ""
            eta = f", ETA {_duration(run['eta_seconds'])}" if run["eta_seconds"] is not None else ""
            shown[cell.name] = (f"step {run['step']}/{run['total_steps']}{speed}{eta} "
                                f"(reported {_duration(max(age, 0))} ago)")
    return shown


def _check_data(grid, args: argparse.Namespace) -> dict[str, list[str]] | None:
    """Each cell's missing data (None with --no-check-data); an error naming them unless there are none."""
    from harness.grids import checks
    from harness.grids.expansion import GridError

    if args.no_check_data:
        return None
    found = {cell.name: checks.problems(cell.config) for cell in grid.cells}
    missing = {name: problems for name, problems in found.items() if problems}
    if missing:
        lines = [f"  {name}: {'; '.join(problems)}" for name, problems in missing.items()]
        raise GridError(f"{args.grid}: {len(missing)} of {len(found)} cells would fail before they train:\n"
                        + "\n".join(lines) + "\n(--no-check-data skips this check, for a head node that cannot "
                        "see the compute nodes' filesystems)")
    return found


def cmd_data_check(args: argparse.Namespace) -> int:
    import yaml

    from harness.config.run_config import load_config
    from harness.config.specs import ConfigError
    from harness.data.check import check_configs
    from harness.grids.expansion import RUN, load_grid

    path = Path(args.config)
    try:
        is_grid = "axes" in (yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read it as a run config or a grid ({error})") from None
    configs = [c.config for c in load_grid(path).cells if c.kind == RUN] if is_grid else [load_config(path)]
    return 0 if check_configs(configs, args.workers, progress=sys.stderr.isatty()) else 2


def cmd_grid(args: argparse.Namespace) -> int:
    from harness.grids import dispatch
    from harness.grids.expansion import load_grid
    from results.store import Store

    grid = load_grid(args.grid)
    spec = _slurm_spec(grid, args) if args.grid_command == "submit" else grid.spec.slurm
    if args.grid_command == "submit" and args.dry_run:
        print(dispatch.sbatch_script(grid, spec))
        return 0
    data = _check_data(grid, args) if args.grid_command in ("plan", "submit") else None
    store = Store(args.db)
    if args.grid_command == "plan":
        _print_cells(grid, dispatch.cell_states(grid, store), dispatch.in_flight(grid), data)
        if args.check_images:  # every image of each distinct training set decoded, as the runs will
            from harness.data.check import check_configs
            from harness.grids.expansion import RUN

            if not check_configs([c.config for c in grid.cells if c.kind == RUN], progress=sys.stderr.isatty()):
                return 2
        caches = sum(c.kind == "teacher-cache" for c in grid.cells)
        stages = sum(c.name.startswith("stage/") for c in grid.cells)
        print(f"{len(grid.cells)} cells ({sum(c.name.startswith('teacher/') for c in grid.cells)} teachers trained "
              "first" + (f", {caches} teacher-embedding caches built next" if caches else "")
              + (f", {stages} stages before the axes" if stages else "") + ")")
    elif args.grid_command == "status":
        dispatch.reconcile(grid, store)
        states = dispatch.cell_states(grid, store)
        _print_cells(grid, states, dispatch.in_flight(grid), progress=_cell_progress(grid, states, store))
        print(dispatch.summarize(states))
    elif args.grid_command == "cancel":
        cancelled = dispatch.cancel(grid, store)
        print(f"cancelled {len(cancelled)} cells" + "".join(f"\n  {c}" for c in cancelled))
    else:
        todo, skipped, states = dispatch.plan_submission(grid, store, args.retry_failed)
        print(f"{len(todo)} cells to submit, {len(skipped)} skipped ({dispatch.summarize(states)})")
        if todo and args.executor == "slurm":
            job_ids = dispatch.submit_slurm(grid, store, todo, spec)
            print(f"submitted {len(todo)} cells to SLURM: jobs {', '.join(sorted(set(job_ids.values())))}")
            if args.wait:
                dispatch.wait(grid, store)
        elif todo:
            started = time.monotonic()
            dispatch.run_local(grid, store, todo, spec)
            minutes, seconds = divmod(round(time.monotonic() - started), 60)
            print(f"{len(todo)} cells ran in {minutes} min {seconds} s on this machine")
        states = dispatch.cell_states(grid, store)
        print(dispatch.summarize(states))
        if any(states[c.name] == "failed" for c in todo) and (args.wait or args.executor == "local"):
            return 1
    return 0
