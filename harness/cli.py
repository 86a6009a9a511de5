"""The ``clipkd`` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_methods(args: argparse.Namespace) -> int:
    import methods

    available = methods.available()
    width = max(map(len, available))
    for name, description in available.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.train import train

    run_dir = train(load_config(args.config), resume=args.resume)
    print(f"run {run_dir.name} finished: {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkd", description="CLIP knowledge distillation benchmark harness")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list the registered distillation methods").set_defaults(func=_cmd_methods)
    train = commands.add_parser("train", help="train one run from a YAML config")
    train.add_argument("config", help="run configuration (YAML)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its latest checkpoint")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from harness.config import ConfigError
    from harness.models import ModelLoadError
    from harness.builtin_data import DatasetUnavailableError
    from harness.train import TrainingError, TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingInterrupted as stop:
        print(f"clipkd: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except (ConfigError, ModelLoadError, DatasetUnavailableError, TrainingError, ValueError) as error:
        print(f"clipkd: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
