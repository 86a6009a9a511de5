"""A live teacher at twice the student's resolution against one at the same resolution: the training step and the
loader's cost per sample of each, and their ratios (issue 31: each model sees its own input).

    python benchmarks/teacher_inputs.py                         # CPU scale (the defaults)
    python benchmarks/teacher_inputs.py --batch 256 --student ViT-T-16 --teacher ViT-B-16 --device cuda

The teacher at twice the resolution is the same model config with its ``image_size`` doubled (four times the
patches); both read the same JPEG shards (benchmarks/jpeg_shards.py, images at four times the student's side).
The loader cuts each decoded image once per distinct input: for the same-resolution teacher, once (the student's
view serves both, as before inputs were per model); for the wide one, twice. Seconds per sample are measured over
whole epochs of the loader in this process (``data.workers: 0``), the step with its batches loaded beforehand.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from jpeg_shards import write_jpeg_shards
from train_step import CLIP_KD, seconds_per_step

from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.models.build import create_clip
from harness.models.names import model_config
from harness.training.loop import Trainer


def wide_copy(model: str, folder: Path) -> str:
    """The model's config with its image side doubled, as a config file."""
    config = model_config(model)
    config["vision_cfg"]["image_size"] = 2 * config["vision_cfg"]["image_size"]
    path = folder / f"{model}-x2.json"
    path.write_text(json.dumps(config))
    return str(path)


def trainer(args, folder: Path, teacher: str, data: dict, device: torch.device) -> Trainer:
    weights = folder / f"{Path(teacher).stem}.pt"
    torch.save({"state_dict": create_clip(teacher).model.state_dict()}, weights)
    return Trainer(parse_config({
        "name": f"bench-{Path(teacher).stem}", "output_dir": str(folder), "seed": 0, "student": {"model": args.student},
        "teacher": {"model": teacher, "pretrained": str(weights)}, "distill": CLIP_KD, "data": data,
        "train": {"batch_size": args.batch, "steps": args.warmup + args.steps, "precision": args.precision}}),
        DistEnv(), device)


def loader_seconds_per_sample(run: Trainer, repeats: int) -> float:
    """Median over ``repeats`` epochs of the loader's seconds per sample (decode, cut every input, tokenise), after
    one untimed epoch (the files' first read)."""
    times = []
    for _ in range(repeats + 1):
        started, samples = time.perf_counter(), 0
        for batch in run.data.epoch_batches(0, 0):
            samples += len(batch)
        times.append((time.perf_counter() - started) / samples)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="bench-teacher")
    parser.add_argument("--student", default="bench-student")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="loader epochs timed (the median is reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    open_clip.add_model_config(Path(__file__).with_name("model_configs"))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        side = model_config(args.student)["vision_cfg"]["image_size"]
        samples = args.batch * (args.warmup + args.steps)
        shards = write_jpeg_shards(folder / "shards", samples, 4, size=4 * side, dataset="digits")
        data = {"dataset": "webdataset", "path": shards["pattern"], "num_samples": samples, "workers": 0}
        teachers = {"same": args.teacher, "twice": wide_copy(args.teacher, folder)}
        runs = {name: trainer(args, folder, teacher, data, device) for name, teacher in teachers.items()}
        assert not runs["same"].source.others.views and runs["twice"].source.others.views  # one input, two
        loader = {name: loader_seconds_per_sample(run, args.repeats) for name, run in runs.items()}
        step = seconds_per_step(runs, args.steps, args.warmup)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{args.teacher} (at {side} and {2 * side} px) -> {args.student} ({side} px), batch {args.batch}, "
          f"{args.precision}, {device}{threads}; JPEG shards at {4 * side} px; medians")
    for name in runs:
        print(f"teacher at {name:5s} the student's side: step {step[name] * 1000:8.1f} ms, "
              f"loader {loader[name] * 1e3:6.3f} ms/sample")
    print(f"twice/same: step {step['twice'] / step['same']:.2f}x, loader per sample "
          f"{loader['twice'] / loader['same']:.2f}x")


if __name__ == "__main__":
    main()
