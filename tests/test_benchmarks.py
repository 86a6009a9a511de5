"""The benchmark scripts run (at a toy scale: their figures come from running them as benchmarks/README.md says)."""
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.xdist_group("benchmark_scripts")  # pyproject.toml: one worker runs the group


@pytest.mark.parametrize("script, args, prints", [
    ("train_step.py", ["--batch", "64", "--steps", "2", "--warmup", "1", "--threads", "1"], "cached/baseline"),
    ("train_step.py", ["--batch", "32", "--steps", "2", "--warmup", "1", "--threads", "1", "--data", "webdataset",
                       "--views", "2"], "cached/baseline"),
    ("data_throughput.py", ["--samples", "512", "--shards", "8", "--sizes", "96", "--size", "64", "--batch", "32", "--skip-kd",
                            "--repeats", "1", "--share-steps", "3", "--share-dataset", "digits"],
     "clipkd decoded per epoch ÷ dataset at world size 2: 1.00"),
    ("store.py", ["--runs", "800", "--repeats", "1"], "leaderboard (imagenet1k, top1)"),
    ("gd_memory.py", ["--batch", "64", "--dim", "32"], "released code's B×D×B"),
    ("cache_size.py", ["--views", "2", "--batches", "1"], "GB float16"),
    ("eval.py", ["--dataset", "digits", "--repeats", "1", "--skip-command-line"], "numbers identical"),
    ("gpu_check.py", [], "There is no CUDA here"),
    ("commands.py", ["--repeats", "1"], "clipkd grid status"),
    ("accumulation.py", ["--batch", "16", "--steps", "1"], "peak memory of the step"),  # and every part ran: a crash exits 1
    ("cache_build.py", ["--samples", "128", "--shards", "2", "--size", "512"], "1.00 per sample"),
    ("teacher_inputs.py", ["--batch", "16", "--steps", "1", "--warmup", "1", "--repeats", "1", "--threads", "1"],
     "twice/same: step"),
])
def test_benchmark_runs_and_prints_its_ratios(script, args, prints):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert prints in result.stdout and "DIFFER" not in result.stdout  # speed is for the README, not a test
