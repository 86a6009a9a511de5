"""The teacher-embedding cache's size, and what float16 storage does to the losses.

    python benchmarks/cache_size.py [--views 5] [--batches 5]

1. Measured: a K-view cache of digits (clipkd-tiny-teacher, D = 96) stored in float32 and in float16: bytes per
   sample of each, and the relative change float16 makes to every loss term of CLIP-KD (+ GD, AFD) over a few
   batches (the same batches and views: only the storage differs).
2. At the paper's scale, from the arithmetic the measurement confirms (per sample: (max(K, 1) + 1) embeddings of
   D numbers and K crop boxes of 4 int32): the disk a cache of CC3M+CC12M (the shipped grids' num_samples) takes
   at D = 512 and K = 1, 5, 10, and the teacher forward passes it saves over each shipped paper grid (every
   distilled cell, every epoch, against K × N image passes and N text passes once).
"""
import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.grids.expansion import load_grid
from harness.models.build import create_clip
from harness.teachers import cache_build
from harness.teachers.cached import info as cache_info
from harness.training.loop import Trainer
from harness.training.objective import compute_losses

ROOT = Path(__file__).resolve().parents[1]
PAPER_GRIDS = ["paper_ablation", "paper_students", "paper_laion"]


def config(folder: Path, teacher: Path, storage: str, views: int):
    return parse_config({
        "name": f"cache-{storage}", "output_dir": str(folder), "seed": 0, "student": {"model": "clipkd-tiny"},
        "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher), "embeddings": "cached",
                    "views": views, "cache_dtype": storage},
        "distill": {"fd": 375, "icl": 1, "crd": 1, "gd": 10000, "afd": 1}, "data": {"dataset": "digits", "workers": 0},
        "train": {"batch_size": 128, "steps": 10}})


def loss_terms(trainer: Trainer, batches: int) -> list[dict[str, float]]:
    terms = []
    with torch.no_grad():
        for batch, _ in zip(trainer.data.epoch_batches(0, 0), range(batches)):
            values = compute_losses(trainer.student.model, trainer.teacher, trainer.objective, batch)
            terms.append({name: float(value) for name, value in values.items()})
    return terms


def bytes_per_sample(views: int, dim: int, storage_bytes: int) -> int:
    return (max(views, 1) + 1) * dim * storage_bytes + views * 4 * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        torch.manual_seed(0)
        teacher = folder / "teacher.pt"
        torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, teacher)
        measured = {}
        for storage in ("float32", "float16"):
            cfg = config(folder, teacher, storage, args.views)
            facts = cache_info(cache_build.ensure(cfg, torch.device("cpu")))
            torch.manual_seed(0)
            trainer = Trainer(cfg, DistEnv(), torch.device("cpu"))
            measured[storage] = (facts, loss_terms(trainer, args.batches))
    (full, full_terms), (_, half_terms) = measured["float32"], measured["float16"]
    print(f"digits, {full['samples']} samples, {args.views} views, D = {full['embed_dim']}")
    for storage, (facts, _) in measured.items():
        expected = bytes_per_sample(args.views, facts["embed_dim"], 4 if storage == "float32" else 2)
        print(f"  {storage}: {facts['bytes_per_sample']:,.0f} bytes per sample (arrays {expected:,}, the rest .npy "
              f"headers), {facts['bytes'] / 2**20:.2f} MiB")
    print("  float16 against float32, relative change of each loss term (median and largest over "
          f"{args.batches} batches):")
    for name in full_terms[0]:
        changes = [abs(h[name] - f[name]) / max(abs(f[name]), 1e-12) for f, h in zip(full_terms, half_terms)]
        print(f"    {name:5s} {statistics.median(changes):.1e}  max {max(changes):.1e}")

    print("\nthe paper's scale: CC3M+CC12M, D = 512")
    for grid_name in PAPER_GRIDS:
        grid = yaml.safe_load((ROOT / "grids" / f"{grid_name}.yaml").read_text())
        samples, epochs = grid["base"]["data"]["num_samples"], grid["base"]["train"]["epochs"]
        distilled = sum(1 for cell in load_grid(ROOT / "grids" / f"{grid_name}.yaml").cells
                        if cell.kind == "run" and cell.config.distill)
        live = distilled * epochs * samples
        print(f"  {grid_name}: {distilled} distilled cells x {epochs} epochs x {samples:,} samples = {live:,} "
              "image and as many text passes of a live teacher")
        for views in (1, 5, 10):  # the cache: K image passes per sample, and one text pass per caption
            print(f"    K = {views:2d}: {views * samples:,} image passes ({1 - views * samples / live:.2%} saved) "
                  f"and {samples:,} text passes ({1 - samples / live:.2%} saved)")
    samples = 12_800_000
    for views in (1, 5, 10):
        sizes = {s: bytes_per_sample(views, 512, b) * samples / 1e9 for s, b in (("float32", 4), ("float16", 2))}
        print(f"  disk, K = {views:2d}: {sizes['float32']:,.1f} GB float32, {sizes['float16']:,.1f} GB float16")


if __name__ == "__main__":
    main()
