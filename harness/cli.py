"""The ``clipkd`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from core.errors import ClipkdError
from results import FORMATS


def _cmd_methods(args: argparse.Namespace) -> int:
    import methods

    available = methods.available()
    width = max(map(len, available))
    for name, description in available.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.pipeline import tracked
    from harness.train import train

    config = load_config(args.config)
    with tracked(config) as observe:  # train.report_to, as `clipkd run` reports while it trains
        run_dir = train(config, resume=args.resume, observe=observe)
    print(f"run {run_dir.name} finished: {run_dir}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.pipeline import run
    from results.store import Store

    config = load_config(args.config)
    store = Store(args.db)
    status = run(config, store)
    print(f"run {config.run_id} {status}: {config.run_dir} (store: {store.url})")
    return 0


def _checkpoint_model(checkpoint: Path, model: str | None) -> str:
    from harness import checkpoint as checkpoints

    if model:
        return model
    try:
        saved = checkpoints.load(checkpoint)
    except Exception as error:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not name its model (not a clipkd checkpoint): pass --model")
    return saved["model"]


def _cmd_eval(args: argparse.Namespace) -> int:
    """One benchmark or a suite; under torchrun every rank embeds its share and rank 0 prints (and records)."""
    from core.distributed import init_distributed
    from evals.datasets import load_eval_set
    from evals.zeroshot import zero_shot_metrics
    from harness.data import workers
    from harness.models import FINAL_CHECKPOINT, create_clip

    if args.checkpoint:
        path = Path(args.checkpoint)
        checkpoint = path / FINAL_CHECKPOINT if path.is_dir() else path
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not exist")
        model, pretrained = _checkpoint_model(checkpoint, args.model), str(checkpoint)
    elif args.model and args.pretrained:
        model, pretrained = args.model, args.pretrained
    else:
        raise ValueError("give a run directory or checkpoint file, or --model NAME with --pretrained TAG|FILE "
                         "(an open_clip tag or a weights file)")
    if (args.suite is None) == (args.dataset is None):
        raise ValueError("give --dataset (one benchmark) or --suite (a named suite of them)")
    staged = _staged_suite(args) if args.suite is not None else None  # before the model: a missing task is seconds
    bundle = create_clip(model, pretrained)
    env = init_distributed()
    device = env.device
    if staged is not None:
        return _eval_suite(args, *staged, bundle, env)
    eval_set = load_eval_set(args.dataset, args.root, bundle.preprocess_eval, args.task)
    result = zero_shot_metrics(bundle.model.to(device), bundle.tokenizer, eval_set, device, args.batch_size,
                               workers=workers(args.workers))
    if not env.is_main:
        return 0
    print(json.dumps({"benchmark": eval_set.benchmark, "metrics": result.metrics}, indent=2))
    if args.record:
        from evals.cost import gflops_per_sample, images_per_second
        from harness.pipeline import parameter_count, reference_record
        from results.store import Store

        store = Store(args.db)
        row = reference_record(model, pretrained)
        gflops_image, gflops_text = gflops_per_sample(bundle.model, bundle.tokenizer, device)
        store.put_run({**row, "student_params": parameter_count(bundle), "gflops_image": gflops_image,
                       "gflops_text": gflops_text, "images_per_second": images_per_second(bundle.model, device,
                                                                                          args.batch_size)},
                      metrics={eval_set.benchmark: result.metrics}, items={eval_set.benchmark: result.items})
        print(f"recorded reference model {row['name']} ({row['id']}) in {store.url}")
    return 0


def _staged_suite(args: argparse.Namespace):
    """A named suite and its tasks' benchmarks, every task's data checked (all missing ones named at once)."""
    from pydantic import ValidationError

    from harness import checks
    from harness.config import SuiteSpec

    if args.record:
        raise ValueError("--record stores one benchmark's numbers; give --dataset, or leave --record out")
    try:
        suite, specs = SuiteSpec(name=args.suite, root=args.root).expand()
    except ValidationError as error:
        raise ValueError(f"--suite: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    missing = [problem for spec in specs.values() if (problem := checks.benchmark(spec))]
    if missing:
        raise ValueError(f"suite {suite.name!r}: {len(missing)} of {len(specs)} tasks are not staged under "
                         f"{args.root!r}:\n  " + "\n  ".join(missing))
    return suite, specs


def _eval_suite(args: argparse.Namespace, suite, specs, bundle, env) -> int:
    """Every task of a named suite, then its averages, printed as JSON ({benchmark: metrics}) by rank 0."""
    from evals.datasets import benchmark_name, load_eval_set
    from evals.suites import averages, suite_benchmark
    from evals.zeroshot import zero_shot_metrics
    from harness.data import workers

    device, metrics = env.device, {}
    for spec in specs.values():
        eval_set = load_eval_set(spec.dataset, spec.root, bundle.preprocess_eval, spec.task)
        metrics[eval_set.benchmark] = zero_shot_metrics(bundle.model.to(device), bundle.tokenizer, eval_set, device,
                                                        args.batch_size, workers=workers(args.workers)).metrics
    benchmark_of = {task: benchmark_name(spec.dataset, spec.root) for task, spec in specs.items()}
    metrics[suite_benchmark(suite.name)] = averages(suite, benchmark_of, metrics)
    if env.is_main:
        print(json.dumps(metrics, indent=2))
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from results.queries import leaderboard, render
    from results.store import Store

    frame = leaderboard(Store(args.db, readonly=True), args.metric, args.benchmark, args.teacher, args.student,
                        args.dataset, args.method)
    sys.stdout.write(render(frame, args.format))
    return 0


def _cmd_ablation(args: argparse.Namespace) -> int:
    from results.queries import ablation, render
    from results.store import Store

    frame = ablation(Store(args.db, readonly=True), args.teacher, args.student, args.dataset)
    if args.paper and not frame.empty:
        from results.paper import table1_by_method

        paper = table1_by_method(frame) / 100  # fractions, shown as percentages like every accuracy
        frame = frame.join(paper.rename(columns={"paper top1": "paper ImageNet top1",
                                                 "paper Δ": "paper ImageNet top1_delta"}))
    sys.stdout.write(render(frame, args.format))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from harness.export import export_open_clip_dir
    from harness.models import FINAL_CHECKPOINT

    path = Path(args.checkpoint)
    checkpoint = path / FINAL_CHECKPOINT if path.is_dir() else path
    out = export_open_clip_dir(_checkpoint_model(checkpoint, args.model), checkpoint, Path(args.out))
    print(f"open_clip model written to {out}: load it as 'local-dir:{out}'")
    return 0


def _cmd_export_dataset(args: argparse.Namespace) -> int:
    from harness.export import export_clip_benchmark_wds

    classification, retrieval = export_clip_benchmark_wds(args.dataset, Path(args.out), args.shards)
    print(f"clip_benchmark datasets: --dataset wds/{args.dataset} --dataset_root {classification} "
          f"(classification), --dataset_root {retrieval} (retrieval)")
    return 0


def _cmd_cache_info(args: argparse.Namespace) -> int:
    from harness import teacher_cache
    from harness.config import load_config

    path = Path(args.cache)
    if path.suffix in (".yaml", ".yml"):  # an ensemble's run reads one cache per cached teacher
        config = load_config(path)
        folders = [teacher_cache.cache_dir(config.with_teacher(t)) for t in config.teachers if t.embeddings == "cached"]
    else:
        folders = [path]
    for folder in folders or [path]:
        if not (folder / teacher_cache.META).is_file():
            raise ValueError(f"{folder} is not a finished teacher-embedding cache (no {teacher_cache.META}); give a "
                             "cache folder (<output_dir>/.teacher-embeddings/<key>) or the YAML config of a run that "
                             "reads one")
        facts = teacher_cache.info(folder)
        if args.json:
            print(json.dumps(facts, indent=2))
            continue
        print(f"cache      {facts['folder']}\nteacher    {facts['teacher']}\ndataset    {facts['dataset']}\n"
              f"samples    {facts['samples']:,}\nviews      {facts['views']} (0: the un-augmented view)\n"
              f"embedding  {facts['embed_dim']} dims, {facts['storage']}\n"
              f"size       {facts['bytes_per_sample']:,.0f} bytes per sample, {facts['bytes'] / 2**20:,.1f} MiB in all")
    return 0


SLURM_FLAGS = {  # CLI flag -> grid file's slurm field
    "partition": str, "account": str, "qos": str, "nodes": int, "gpus_per_node": int, "tasks_per_node": int,
    "cpus_per_task": int, "mem_gb": float, "timeout_min": int, "array_parallelism": int, "max_parallel": int,
}


def _slurm_spec(grid, args: argparse.Namespace):
    from pydantic import ValidationError

    from harness.grid import GridError, SlurmSpec

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
    from harness import checks
    from harness.grid import GridError

    if args.no_check_data:
        return None
    found = {cell.name: checks.problems(cell.config) for cell in grid.cells}
    missing = {name: problems for name, problems in found.items() if problems}
    if missing:
        lines = [f"  {name}: {'; '.join(problems)}" for name, problems in missing.items()]
        raise GridError(f"{args.grid}: {len(missing)} of {len(found)} cells would not find their data:\n"
                        + "\n".join(lines) + "\n(--no-check-data skips this check, for a head node that cannot "
                        "see the compute nodes' filesystems)")
    return found


def _cmd_data_check(args: argparse.Namespace) -> int:
    import yaml

    from harness.config import ConfigError, load_config
    from harness.data.check import check_configs
    from harness.grid import RUN, load_grid

    path = Path(args.config)
    try:
        is_grid = "axes" in (yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read it as a run config or a grid ({error})") from None
    configs = [c.config for c in load_grid(path).cells if c.kind == RUN] if is_grid else [load_config(path)]
    return 0 if check_configs(configs, args.workers, progress=sys.stderr.isatty()) else 2


def _cmd_grid(args: argparse.Namespace) -> int:
    from harness import dispatch
    from harness.grid import load_grid
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
            from harness.grid import RUN

            if not check_configs([c.config for c in grid.cells if c.kind == RUN], progress=sys.stderr.isatty()):
                return 2
        caches = sum(c.kind == "teacher-cache" for c in grid.cells)
        print(f"{len(grid.cells)} cells ({sum(c.stage == 0 for c in grid.cells)} teachers trained first"
              + (f", {caches} teacher-embedding caches built next" if caches else "") + ")")
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
            dispatch.run_local(grid, store, todo, spec)
        states = dispatch.cell_states(grid, store)
        print(dispatch.summarize(states))
        if any(states[c.name] == "failed" for c in todo) and (args.wait or args.executor == "local"):
            return 1
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    """Serve the dashboard; a store that does not exist yet shows what to run, so it is not an error here."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from results.store import resolve_url

    url = resolve_url(args.db)
    try:
        make_url(url)
    except ArgumentError:
        raise ClipkdError(f"--db {url!r} is not an SQLAlchemy URL (e.g. sqlite:///results/clipkd.db, "
                          "postgresql+psycopg://host/clipkd) or a SQLite file path") from None
    if not 0 < args.port < 65536:
        raise ClipkdError(f"--port {args.port}: a TCP port is 1-65535")
    main_script = Path(__file__).resolve().parents[1] / "app" / "main.py"
    print(f"clipkd dashboard on http://{args.host}:{args.port} (store {url}, read-only); Ctrl-C stops it", flush=True)
    command = [sys.executable, "-m", "streamlit", "run", str(main_script), "--server.address", args.host,
               "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer"]
    os.execve(sys.executable, command, {**os.environ, "CLIPKD_DB": url})  # Ctrl-C and signals go to streamlit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkd", description="CLIP knowledge distillation benchmark harness")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list the registered distillation methods").set_defaults(func=_cmd_methods)

    train = commands.add_parser("train", help="train one run from a YAML config")
    train.add_argument("config", help="run configuration (YAML)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its latest checkpoint")
    train.set_defaults(func=_cmd_train)

    db_help = ("results store: any SQLAlchemy URL or a SQLite file path (default $CLIPKD_DB, else "
               "sqlite:///results/clipkd.db)")
    run = commands.add_parser("run", help="train, evaluate and store one run (resumes; skips finished work)")
    run.add_argument("config")
    run.add_argument("--db", help=db_help)
    run.set_defaults(func=_cmd_run)

    evaluate = commands.add_parser("eval", help="zero-shot classification / retrieval of a checkpoint or any open_clip "
                                                "model; --record stores it as a reference model")
    evaluate.add_argument("checkpoint", nargs="?", help="a run directory or a checkpoint file")
    evaluate.add_argument("--suite", help="a named suite (imagenet-shifts, datacomp) staged under --root: every task "
                          "and the suite's averages (evals/suites.py)")
    evaluate.add_argument("--dataset",
                          help="digits, fashion-mnist, imagefolder, csv, or a clip_benchmark dataset name")
    evaluate.add_argument("--root", help="where a clip_benchmark dataset is staged; the folder or CSV for local sets")
    evaluate.add_argument("--task", choices=("zeroshot_classification", "zeroshot_retrieval"),
                          help="clip_benchmark's task; by default the one it gives the name (a wds set's "
                          "dataset_type.txt where it says retrieval)")
    evaluate.add_argument("--model", help="the open_clip model (name or config file), for a checkpoint that does not "
                          "name it or with --pretrained")
    evaluate.add_argument("--pretrained", metavar="TAG|FILE", help="an open_clip pretrained tag or a weights file")
    evaluate.add_argument("--record", action="store_true", help="store the model as a reference row (no teacher, no "
                          "method), shown apart on the leaderboard and in the ablation")
    evaluate.add_argument("--db", help=db_help)
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--workers", type=int, help="loader workers (default: this process's CPUs less one)")
    evaluate.set_defaults(func=_cmd_eval)

    for name, func, text in (("leaderboard", _cmd_leaderboard, "runs ranked, with the delta against the baseline"),
                             ("ablation", _cmd_ablation, "the paper's ablation table: methods x benchmarks")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--db", help=db_help)
        sub.add_argument("--teacher")
        sub.add_argument("--student")
        sub.add_argument("--dataset", help="the training dataset")
        if name == "leaderboard":
            sub.add_argument("--benchmark", help="an evaluation benchmark (default: all)")
            sub.add_argument("--method", help="e.g. baseline, crd+fd+icl")
            sub.add_argument("--metric", default="top1", help="rank by: top1, top5, i2t_r1, t2i_r1, ... (default top1)")
        else:
            sub.add_argument("--paper", action="store_true",
                             help="beside every method, the paper's Table 1 number and Δ (ViT-B/16 → ViT-T/16)")
        sub.add_argument("--format", default="table", choices=FORMATS)
        sub.set_defaults(func=func)

    grid = commands.add_parser("grid", help="plan, submit, follow and cancel a grid of runs")
    grid_commands = grid.add_subparsers(dest="grid_command", required=True)
    for name, text in (("plan", "list the cells with their run ids and state"),
                       ("submit", "submit the cells not done as one job array (local or SLURM)"),
                       ("status", "the state of every cell"), ("cancel", "cancel the grid's queued and running jobs")):
        sub = grid_commands.add_parser(name, help=text)
        sub.add_argument("grid", help="grid file (YAML)")
        sub.add_argument("--db", help=db_help)
        sub.set_defaults(func=_cmd_grid)
        if name in ("plan", "submit"):
            sub.add_argument("--no-check-data", action="store_true",
                             help="do not check that each cell's data, benchmarks and teacher weights exist (for a "
                                  "head node that cannot see the compute nodes' filesystems)")
        if name == "plan":
            sub.add_argument("--check-images", action="store_true",
                             help="also decode every training image of each distinct training set (clipkd data check)")
        if name == "submit":
            sub.add_argument("--executor", choices=["local", "slurm"], default="local")
            sub.add_argument("--wait", action="store_true", help="follow the SLURM jobs until every cell has ended")
            sub.add_argument("--retry-failed", action="store_true", help="submit failed cells again")
            sub.add_argument("--dry-run", action="store_true", help="print the sbatch script of one cell and stop")
            for flag, kind in SLURM_FLAGS.items():
                sub.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help="overrides the grid's slurm:")
            sub.add_argument("--sbatch", action="append", metavar="KEY=VALUE", help="an extra sbatch flag (repeatable)")

    app = commands.add_parser("app", help="serve the leaderboard dashboard (Streamlit) over the store, read-only")
    app.add_argument("--db", help=db_help)
    app.add_argument("--port", type=int, default=8501, help="default 8501")
    app.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 serves every interface)")
    app.set_defaults(func=_cmd_app)

    data = commands.add_parser("data", help="training data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_check = data_commands.add_parser("check", help="decode every training sample and report the bad ones "
                                          "(per shard and in all), for the runs' loaders to replace without decoding")
    data_check.add_argument("config", help="a run config or a grid (YAML): each distinct training set once")
    data_check.add_argument("--workers", type=int, help="decoding processes (default: this process's CPUs less one)")
    data_check.set_defaults(func=_cmd_data_check)

    cache = commands.add_parser("cache", help="teacher-embedding caches")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_info = cache_commands.add_parser("info", help="what a cache holds: samples, views, bytes per sample and in all")
    cache_info.add_argument("cache", help="a cache folder, or the YAML config of a run that reads one")
    cache_info.add_argument("--json", action="store_true")
    cache_info.set_defaults(func=_cmd_cache_info)

    export = commands.add_parser("export", help="write a student as an open_clip local-dir model")
    export.add_argument("checkpoint", help="a run directory or a checkpoint file")
    export.add_argument("out")
    export.add_argument("--model")
    export.set_defaults(func=_cmd_export)

    export_dataset = commands.add_parser("export-dataset", help="write a built-in test split in clip_benchmark's wds layout")
    export_dataset.add_argument("dataset", choices=["digits", "fashion-mnist"])
    export_dataset.add_argument("out")
    export_dataset.add_argument("--shards", type=int, default=1, help="shards of consecutive samples per set")
    export_dataset.set_defaults(func=_cmd_export_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ClipkdError as error:
        signum = getattr(error, "signum", None)  # an interrupted run: checkpointed, exits like the signal
        print(f"clipkd: {'' if signum else 'error: '}{error}", file=sys.stderr)
        return 128 + signum if signum else 2
    except ValueError as error:  # bad values found below the config layer (data files, columns, sizes)
        print(f"clipkd: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
