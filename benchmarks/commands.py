"""How long the quick commands take from a fresh process, against Python starting (target: under 2 s each).

    python benchmarks/commands.py [--repeats 3]

Each command runs in a new process, as a user types it, in a scratch folder: ``clipkd --help``, ``clipkd
methods``, ``clipkd leaderboard`` (an empty store) and ``clipkd grid status`` (grids/smoke.yaml, nothing run);
beside ``python -c pass``. Prints the median wall time of each and its ratio to the 2 s target.
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results.store import Store  # noqa: E402

TARGET_S = 2.0


def wall_seconds(command: list[str], cwd: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clipkd = [sys.executable, "-m", "harness.cli"]
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        shutil.copytree(ROOT / "grids", scratch / "grids")
        store = f"sqlite:///{scratch / 'store.db'}"
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "clipkd --help": [*clipkd, "--help"],
            "clipkd methods": [*clipkd, "methods"],
            "clipkd leaderboard": [*clipkd, "leaderboard", "--db", store],
            "clipkd grid status": [*clipkd, "grid", "status", "grids/smoke.yaml", "--db", store],
        }
        Store(store).engine.dispose()  # an empty store, as a new lab's
        print(f"median of {args.repeats} fresh processes each; target {TARGET_S:.0f} s")
        for name, command in commands.items():
            seconds = wall_seconds(command, scratch, args.repeats)
            print(f"{name:22s} {seconds:6.2f} s   {seconds / TARGET_S:5.2f}x the target")


if __name__ == "__main__":
    main()
