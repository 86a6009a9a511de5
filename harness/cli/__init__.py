"""The ``clipkd`` command line: its parser and entry point; the commands are in ``runs``, ``grids`` and
``results``, each importing what it needs when it runs (``clipkd --help`` imports no torch)."""
from __future__ import annotations

import argparse
import sys

from core.errors import ClipkdError
from harness.cli import grids, results, runs
from results import FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkd", description="CLIP knowledge distillation benchmark harness")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list the registered distillation methods").set_defaults(func=runs.cmd_methods)
    commands.add_parser("selectors", help="list the registered batch selectors (train.selection)").set_defaults(
        func=runs.cmd_selectors)

    train = commands.add_parser("train", help="train one run from a YAML config")
    train.add_argument("config", help="run configuration (YAML)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its latest checkpoint")
    train.set_defaults(func=runs.cmd_train)

    db_help = ("results store: any SQLAlchemy URL or a SQLite file path (default $CLIPKD_DB, else "
               "sqlite:///results/clipkd.db)")
    run = commands.add_parser("run", help="train, evaluate and store one run (resumes; skips finished work)")
    run.add_argument("config")
    run.add_argument("--db", help=db_help)
    run.set_defaults(func=runs.cmd_run)

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
    evaluate.set_defaults(func=runs.cmd_eval)

    for name, func, text in (("leaderboard", results.cmd_leaderboard, "runs ranked, with the delta against the baseline"),
                             ("ablation", results.cmd_ablation, "the paper's ablation table: methods x benchmarks")):
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

    findings = commands.add_parser("findings", help="the paper's findings (§4.2-§4.4) tested on the store: each with "
                                   "its statistic, interval and verdict")
    findings.add_argument("--db", help=db_help)
    findings.add_argument("--grid", help="a grid (its file or its name): only its cells' runs")
    findings.add_argument("--benchmark", help="the zero-shot benchmark (default: imagenet1k where stored, else the "
                          "one with the most runs)")
    findings.add_argument("--margin", type=float, default=1.0,
                          help="points of top-1 the report counts as a notable difference (default 1)")
    findings.add_argument("--similarity", default="cka_img",
                          help="the feature similarity of finding 5: cka_img, cka_txt, cos_img, cos_txt, sim_gap")
    findings.add_argument("--format", default="table", choices=("table", "markdown", "csv", "json"))
    findings.set_defaults(func=results.cmd_findings)

    grid = commands.add_parser("grid", help="plan, submit, follow and cancel a grid of runs")
    grid_commands = grid.add_subparsers(dest="grid_command", required=True)
    for name, text in (("plan", "list the cells with their run ids and state"),
                       ("submit", "submit the cells not done as one job array (local or SLURM)"),
                       ("status", "the state of every cell"), ("cancel", "cancel the grid's queued and running jobs")):
        sub = grid_commands.add_parser(name, help=text)
        sub.add_argument("grid", help="grid file (YAML)")
        sub.add_argument("--db", help=db_help)
        sub.set_defaults(func=grids.cmd_grid)
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
            for flag, kind in grids.SLURM_FLAGS.items():
                sub.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help="overrides the grid's slurm:")
            sub.add_argument("--sbatch", action="append", metavar="KEY=VALUE", help="an extra sbatch flag (repeatable)")

    app = commands.add_parser("app", help="serve the leaderboard dashboard (Streamlit) over the store, read-only")
    app.add_argument("--db", help=db_help)
    app.add_argument("--port", type=int, default=8501, help="default 8501")
    app.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 serves every interface)")
    app.set_defaults(func=results.cmd_app)

    data = commands.add_parser("data", help="training data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_check = data_commands.add_parser("check", help="decode every training sample and report the bad ones "
                                          "(per shard and in all), for the runs' loaders to replace without decoding")
    data_check.add_argument("config", help="a run config or a grid (YAML): each distinct training set once")
    data_check.add_argument("--workers", type=int, help="decoding processes (default: this process's CPUs less one)")
    data_check.set_defaults(func=grids.cmd_data_check)
    caption = data_commands.add_parser("caption", help="write synthetic captions for a shard set with an open_clip CoCa "
                                       "(DataCompDR's syn.json), one output shard per input shard; run again, it "
                                       "skips the shards it finished")
    caption.add_argument("shards", help="the input shards, a brace pattern")
    caption.add_argument("out", help="the folder of output shards (each named as its input)")
    caption.add_argument("--model", default="coca_ViT-L-14", help="an open_clip CoCa model (default coca_ViT-L-14, "
                         "MobileCLIP's captioner)")
    caption.add_argument("--pretrained", help="its weights: a tag (mscoco_finetuned_laion2b_s13b_b90k) or a file")
    caption.add_argument("--captions", type=int, default=5, help="captions per image (default 5, as DataCompDR)")
    caption.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling's p (default 0.9)")
    caption.add_argument("--temperature", type=float, default=1.0)
    caption.add_argument("--max-tokens", type=int, default=30, help="tokens per caption, start and end included")
    caption.add_argument("--batch-size", type=int, default=32)
    caption.add_argument("--seed", type=int, default=0, help="the draws of shard n come from (seed, n)")
    caption.add_argument("--device", default="cuda" if _cuda_visible() else "cpu")
    caption.set_defaults(func=runs.cmd_data_caption)

    cache = commands.add_parser("cache", help="teacher-embedding caches")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_info = cache_commands.add_parser("info", help="what a cache holds: samples, views, bytes per sample and in all")
    cache_info.add_argument("cache", help="a cache folder, or the YAML config of a run that reads one")
    cache_info.add_argument("--json", action="store_true")
    cache_info.set_defaults(func=runs.cmd_cache_info)

    export = commands.add_parser("export", help="write a student as an open_clip local-dir model")
    export.add_argument("checkpoint", help="a run directory or a checkpoint file")
    export.add_argument("out")
    export.add_argument("--model")
    export.set_defaults(func=runs.cmd_export)

    export_dataset = commands.add_parser("export-dataset", help="write a built-in test split in clip_benchmark's wds "
                                         "layout, or its training split as webdataset shards (--split train)")
    export_dataset.add_argument("dataset", choices=["digits", "fashion-mnist"])
    export_dataset.add_argument("out")
    export_dataset.add_argument("--shards", type=int, default=1, help="shards of consecutive samples per set")
    export_dataset.add_argument("--split", choices=["test", "train"], default="test",
                                help="test: clip_benchmark's layout; train: training shards a run reads")
    export_dataset.add_argument("--subset", type=int, help="train: the first N samples (as data.subset takes them)")
    export_dataset.add_argument("--synthetic", type=int, default=0,
                                help="train: paraphrases of each caption in a syn.json (data.captions: sample)")
    export_dataset.set_defaults(func=runs.cmd_export_dataset)
    return parser


def _cuda_visible() -> bool:
    """Whether a GPU is visible, without importing torch (``clipkd --help``)."""
    import os

    return bool(os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip()) and os.path.exists("/dev/nvidia0")


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

