"""Peak memory and time of a CLIP-KD step (task + FD + ICL + CRD, live teacher) at train.accum_freq 1, 2 and 4 for
the same global batch: what exact accumulation (harness/training/accumulation.py) saves, and what its second pass costs.

    python benchmarks/accumulation.py                                # CPU scale (the defaults)
    python benchmarks/accumulation.py --teacher ViT-B-16 --student ViT-T-16 --batch 512 --precision bf16 \\
        --device cuda                                                # a GPU: torch.cuda.max_memory_allocated

After a warm-up step (the optimiser's state made), the peak of each step above what the process holds before it:
on the CPU its peak resident set (Linux's VmHWM, reset before the step through /proc/self/clear_refs, the heap's
free pages handed back first), on a GPU the allocator's peak above what is allocated. Each setting runs in a fresh
process.
"""
import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.models.build import create_clip
from harness.training.loop import Trainer

SETTINGS = (1, 2, 4)
CLIP_KD = {"fd": 2000, "icl": 1, "crd": 1}


def _resident(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) * 1024


def _step_start(device: torch.device) -> int:
    """What the process holds now; the peak counted from here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _resident("VmRSS")


def _step_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _resident("VmHWM")


def measure(args, accum: int) -> dict:
    open_clip.add_model_config(Path(__file__).with_name("model_configs"))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        teacher = Path(folder) / "teacher.pt"
        torch.save({"state_dict": create_clip(args.teacher).model.state_dict()}, teacher)
        config = parse_config({
            "name": f"accum-{accum}", "output_dir": folder, "student": {"model": args.student},
            "teacher": {"model": args.teacher, "pretrained": str(teacher)}, "distill": CLIP_KD,
            "data": {"dataset": "digits", "augment": False, "workers": 0},
            "train": {"batch_size": args.batch, "steps": 100, "precision": args.precision, "accum_freq": accum},
        })
        trainer = Trainer(config, DistEnv(), device)
        batch = next(iter(trainer.data.epoch_batches(0, 0))).to(device, trainer.dtype)
        trainer.train_step(batch)  # warm-up: AdamW's state
        peaks, seconds = [], []
        for _ in range(args.steps):
            before = _step_start(device)
            started = time.perf_counter()
            trainer.train_step(batch)
            peaks.append(_step_peak(device) - before)
            seconds.append(time.perf_counter() - started)
    return {"peak_bytes": statistics.median(peaks), "seconds": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="bench-teacher")
    parser.add_argument("--student", default="bench-student")
    parser.add_argument("--batch", type=int, default=256, help="global batch, the same at every accum_freq")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    results = {}
    for accum in SETTINGS:  # each in a fresh process: a peak resident set only grows
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", str(accum)],
                               capture_output=True, text=True, check=True)
        results[accum] = json.loads(child.stdout.strip().splitlines()[-1])
    whole = results[1]
    print(f"{args.teacher} -> {args.student}, CLIP-KD, global batch {args.batch}, {args.precision}, {args.device}; "
          f"median of {args.steps} steps")
    print("accum_freq  micro-batch  peak memory of the step  vs accum 1  ms/step  vs accum 1")
    for accum, result in results.items():
        print(f"{accum:10d}  {args.batch // accum:11d}  {result['peak_bytes'] / 2**20:19.1f} MiB  "
              f"{result['peak_bytes'] / whole['peak_bytes']:9.2f}x  {result['seconds'] * 1000:7.1f}  "
              f"{result['seconds'] / whole['seconds']:9.2f}x")


if __name__ == "__main__":
    main()
