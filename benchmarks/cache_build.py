"""A K-view teacher-cache build decodes each image once: its time at K = 4 against K = 1, and its decodes.

    python benchmarks/cache_build.py [--samples 4096] [--size 512] [--views 4]

On JPEGs stored at ``--size`` px (512: img2dataset's usual) and a 224 px student view, with a teacher small
enough that decoding is most of the build (``model_configs/bench-tiny-224.json``: 224 px, 7×7 patches of 32, two
layers of width 64), as student and teacher. Each build runs in this process with the default loader workers;
the decodes are counted where images are decoded (the cache's ``meta.json``). Targets: decodes = samples at any
K; the K = 4 build ≤ 1.3× the K = 1 build.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from jpeg_shards import write_jpeg_shards  # noqa: E402

from harness import teacher_cache  # noqa: E402
from harness.config import parse_config  # noqa: E402
from harness.distributed import DistEnv  # noqa: E402
from harness.models import create_clip  # noqa: E402

MODEL = "bench-tiny-224"
TARGET = 1.3


def build(folder: Path, teacher: Path, pattern: str, samples: int, views: int) -> tuple[float, dict]:
    config = parse_config({
        "name": f"build-{views}", "output_dir": str(folder / f"views-{views}"), "student": {"model": MODEL},
        "teacher": {"model": MODEL, "pretrained": str(teacher), "embeddings": "cached", "views": views},
        "distill": {"fd": 1}, "data": {"dataset": "webdataset", "path": pattern, "num_samples": samples},
        "train": {"batch_size": 64, "steps": 1}, "eval": {"batch_size": 128}})
    started = time.perf_counter()
    built = teacher_cache.ensure(config, torch.device("cpu"), DistEnv())
    return time.perf_counter() - started, teacher_cache.read_meta(built)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args()
    open_clip.add_model_config(HERE / "model_configs")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        pattern = write_jpeg_shards(folder / "shards", args.samples, args.shards, args.size)["pattern"]
        teacher = folder / "teacher.pt"
        torch.manual_seed(0)
        torch.save({"state_dict": create_clip(MODEL).model.state_dict()}, teacher)
        build(folder / "warm-up", teacher, pattern, args.samples, 1)  # the shard index, imports, first kernels
        results = {views: build(folder, teacher, pattern, args.samples, views) for views in (1, args.views)}
    print(f"{args.samples:,} JPEGs of {args.size} px in {args.shards} shards, cut to 224 px; teacher {MODEL}")
    for views, (seconds, meta) in results.items():
        decoded = sum(meta["decoded_by_rank"])
        print(f"  K = {views}: {seconds:6.1f} s; decoded {decoded:,} images for {meta['samples']:,} samples "
              f"({decoded / meta['samples']:.2f} per sample, target 1.00)")
    ratio = results[args.views][0] / results[1][0]
    print(f"build K = {args.views} ÷ K = 1: {ratio:.2f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
