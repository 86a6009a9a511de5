"""What the test suite spends starting Python processes: how many it starts and how long they spend importing.

    python benchmarks/startup.py [pytest arguments ...]

Runs the suite (``CI=true``, as ``.ci/run`` does) with a probe in this interpreter's site-packages: every Python
process of this environment, the suite's workers and every subprocess, SLURM job and torchrun rank it starts,
times its top-level imports and appends one line to a log when it exits. The probe is removed afterwards. Prints
the number of processes, the seconds spent importing in all of them, and the commands that spent the most.

Imports are timed where a statement imports (``builtins.__import__``); ``importlib.import_module`` is not seen,
so the count is a lower bound. Processes forked from a process (data-loader workers) inherit its imports and
are not counted.
"""
import collections
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "_clipkd_startup_probe"

PROBE_SOURCE = '''
import atexit, builtins, json, os, sys, threading, time

_log, _started, _real_import, _state = {log!r}, time.perf_counter(), builtins.__import__, threading.local()
_spent = [0.0]


def _timed_import(*args, **kwargs):
    if getattr(_state, "inside", False):
        return _real_import(*args, **kwargs)
    _state.inside, begun = True, time.perf_counter()
    try:
        return _real_import(*args, **kwargs)
    finally:
        _spent[0] += time.perf_counter() - begun
        _state.inside = False


def _report():
    line = json.dumps({{"argv": sys.argv[:3], "importing_s": _spent[0], "alive_s": time.perf_counter() - _started}})
    with open(_log, "a") as handle:
        handle.write(line + "\\n")


builtins.__import__ = _timed_import
atexit.register(_report)
'''


def command_kind(argv: list[str]) -> str:
    """A process's command, shortened to what tells the kinds apart."""
    words = [Path(argv[0]).name if argv else "?", *argv[1:3]]
    return " ".join(word if len(word) < 40 else "…" + word[-30:] for word in words)


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "processes.jsonl"
        (site / f"{PROBE}.py").write_text(PROBE_SOURCE.format(log=str(log)))
        (site / f"{PROBE}.pth").write_text(f"import {PROBE}\n")
        try:
            suite = subprocess.run([sys.executable, "-m", "pytest", *sys.argv[1:]], cwd=ROOT,
                                   env={**os.environ, "CI": "true"})
        finally:
            (site / f"{PROBE}.pth").unlink()
            (site / f"{PROBE}.py").unlink()
        processes = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    importing = sum(p["importing_s"] for p in processes)
    print(f"\nthe suite exited {suite.returncode}; {len(processes)} Python processes; {importing:,.0f} s importing "
          f"in all ({importing / max(1, len(processes)):.2f} s a process)")
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for p in processes:
        by_kind[command_kind(p["argv"])][0] += 1
        by_kind[command_kind(p["argv"])][1] += p["importing_s"]
    for kind, (count, seconds) in sorted(by_kind.items(), key=lambda item: -item[1][1])[:12]:
        print(f"{seconds:8.0f} s  {count:5d} processes  {kind}")
    return suite.returncode


if __name__ == "__main__":
    sys.exit(main())
