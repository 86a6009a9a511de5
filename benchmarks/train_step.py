"""Time per training step of a CLIP-KD student (task + FD + ICL + CRD) with the live teacher and with the
teacher-embedding cache, each divided by the no-KD baseline's step (target: cached ≤ 1.05×).

    python benchmarks/train_step.py                                   # CPU scale (the defaults)
    python benchmarks/train_step.py --data webdataset --views 3       # JPEG shards, 3 stored views per sample
    python benchmarks/train_step.py --teacher ViT-B-16 --student ViT-T-16 --batch 256 --precision bf16 \\
        --device cuda --steps 30                                      # the paper's scale, on a GPU

``--data digits`` trains on the un-augmented view (the cache then holds exactly what the live teacher sees);
``--data webdataset`` on generated JPEG shards (benchmarks/jpeg_shards.py) with ``--views`` stored augmented
views, which the live teacher embeds as they come and the cached run reads from per-shard arrays.

The CPU defaults scale ViT-B/16 : ViT-T/16 down (benchmarks/model_configs/): the teacher's image tower is 4x as
wide as the student's (768 vs 192 in the paper's pair), its text tower 1.33x (512 vs 384), same depth and tokens.
Batches are loaded before timing, so the figures are the step itself: forward, losses, backward, optimiser.
"""
import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from jpeg_shards import write_jpeg_shards

from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.models.build import create_clip
from harness.training.loop import Trainer

TARGET = 1.05  # issue 20: with the sync-free loop
CLIP_KD = {"fd": 2000, "icl": 1, "crd": 1}


def config(args, output_dir: Path, teacher_file: Path | None, embeddings: str | None, data: dict):
    return parse_config({
        "name": f"bench-{embeddings or 'baseline'}", "output_dir": str(output_dir), "seed": 0,
        "student": {"model": args.student},
        **({"teacher": {"model": args.teacher, "pretrained": str(teacher_file), "embeddings": embeddings,
                        "views": args.views if args.data == "webdataset" else 0},
            "distill": CLIP_KD} if embeddings else {}),
        "data": data,
        "train": {"batch_size": args.batch, "steps": args.warmup + args.steps, "precision": args.precision},
        "eval": {"batch_size": args.batch},
    })


def epochs(trainer: Trainer):
    """The run's batches (with the cached teacher's rows, for a cached run), epoch after epoch, on its device."""
    for epoch in itertools.count():
        for batch in trainer.data.epoch_batches(epoch, 0):
            yield batch.to(trainer.device, trainer.dtype)


def seconds_per_step(trainers: dict[str, Trainer], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each trainer, their steps interleaved so that drift hits all alike."""
    batches = {mode: list(itertools.islice(epochs(trainer), warmup + steps)) for mode, trainer in trainers.items()}
    times = {mode: [] for mode in trainers}
    for step in range(warmup + steps):
        for mode, trainer in trainers.items():
            started = time.perf_counter()
            trainer.train_step(batches[mode][step])
            if trainer.device.type == "cuda":  # the step queues its kernels and returns: wait for them
                torch.cuda.synchronize(trainer.device)
            if step >= warmup:
                times[mode].append(time.perf_counter() - started)
    return {mode: statistics.median(seconds) for mode, seconds in times.items()}


def create_clip_size(model: str) -> int:
    from harness.data.views import ViewSpec

    return ViewSpec.of(model).size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="bench-teacher")
    parser.add_argument("--student", default="bench-student")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data", default="digits", choices=["digits", "webdataset"])
    parser.add_argument("--views", type=int, default=3, help="webdataset: augmented views stored per sample")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    open_clip.add_model_config(Path(__file__).with_name("model_configs"))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        teacher_file = Path(folder) / "teacher.pt"
        torch.save({"state_dict": create_clip(args.teacher).model.state_dict()}, teacher_file)
        data = {"dataset": "digits", "augment": False}
        if args.data == "webdataset":
            samples = args.batch * (args.warmup + args.steps)
            shards = write_jpeg_shards(Path(folder) / "shards", samples, 8, size=2 * create_clip_size(args.student))
            data = {"dataset": "webdataset", "path": shards["pattern"], "num_samples": samples, "workers": 0}
        trainers = {mode or "baseline": Trainer(config(args, Path(folder), teacher_file, mode, data), DistEnv(), device)
                    for mode in (None, "live", "cached")}  # the cached one builds its cache here, untimed
        results = seconds_per_step(trainers, args.steps, args.warmup)
    baseline = results["baseline"]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    views = f", {args.views} stored views" if args.data == "webdataset" else ", un-augmented"
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.precision}, {device}{threads}; {args.data}"
          f"{views}; median of {args.steps} steps")
    for mode, seconds in results.items():
        print(f"{mode:9s} {seconds * 1000:8.1f} ms/step  {args.batch / seconds:8.1f} images/s  "
              f"{seconds / baseline:5.2f}x baseline")
    ratio = results["cached"] / baseline
    print(f"cached/baseline {ratio:.2f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}); "
          f"live/baseline {results['live'] / baseline:.2f}")


if __name__ == "__main__":
    main()
