"""clipkd's data path against open_clip_train's own, side by side in one run, on real JPEG shards.

    python benchmarks/data_throughput.py [--samples 20480] [--sizes 224,512] [--batch 64] [--workers 2] [--skip-kd]

1. Loader, for JPEGs stored at each of ``--sizes`` px (224, and 512 as img2dataset shards commonly are): images/s
   of clipkd's webdataset loader against open_clip_train's ``get_wds_dataset`` (imported, not rewritten), in 2
   processes (gloo, world size 2), both cutting ``--crop-model``'s 224 px input (RandomResizedCrop(0.9-1.0),
   bicubic; open_clip normalises in its workers, clipkd sends uint8 pixels and normalises where they are used),
   the same per-rank batch and loader workers; the images each decoded per epoch ÷ the dataset's size, counted
   where each tool decodes (clipkd: in its decode calls; open_clip: webdataset's image decoder); decodes/s per
   worker process and how many such workers a GPU at the paper's step rate would need. Targets: ratio ≥ 2.0 on
   the 512 px set (≥ 1.0 at 224 px); decoded ÷ dataset = 1.00.
2. KD epoch: a whole epoch of live-teacher distillation (open_clip's DistillClipLoss in both: clipkd's
   ``open_clip_distill`` method, ``open_clip_train --distill``) with the same models, launched by torchrun with 2
   processes each; seconds per epoch from runs of 1 and 2 epochs (start-up cancels). Also clipkd's no-KD epoch and
   its epoch with a teacher-embedding cache of ``--views`` augmented views (built before, timed apart). Target:
   cached ≤ 1.2× no-KD.
3. In memory: the demo student (clipkd-tiny on Fashion-MNIST, batch 128, as grids/demo.yaml) — milliseconds per
   batch in the loader and in the training step. Target: the loader's share of a step < 10 %.

Shards: ``benchmarks/jpeg_shards.py`` (Fashion-MNIST upscaled, digits where Fashion-MNIST is not installed), uneven
on purpose. The KD epochs' models: ``benchmarks/model_configs/`` (64 px, a ViT-B/16 : ViT-T/16-shaped pair scaled
for the CPU).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from jpeg_shards import write_jpeg_shards  # noqa: E402

STUDENT, TEACHER = "bench-student", "bench-teacher"
# open_clip_train is started through this, so that it knows the benchmark's model configs (per process). Its
# arguments come from a file: torchrun's own parser would take open_clip's --logs for its --logs-specs. On a CPU
# open_clip_train hands DDP device_ids=[cpu], which torch refuses; the wrapper leaves device_ids out there.
OPEN_CLIP_TRAIN = """import json, sys, open_clip, torch
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
DDP = torch.nn.parallel.DistributedDataParallel
def cpu_ddp(module, device_ids=None, **options):
    on_cpu = device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids)
    return DDP(module, device_ids=None if on_cpu else device_ids, **options)
torch.nn.parallel.DistributedDataParallel = cpu_ddp
main(json.loads(open(sys.argv[2]).read()))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _join(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)  # loader workers forked, as under torchrun (spawned ranks default to spawn)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)


def _clipkd_epoch(rank: int, port: int, args, pattern: str, index_root: str, out: str) -> None:
    import open_clip

    from harness.config.specs import DataSpec
    from harness.data.loaders import build_source, build_train_data
    from harness.data.views import Augmentation, ViewSpec

    _join(rank, port)
    open_clip.add_model_config(HERE / "model_configs")
    spec = DataSpec(dataset="webdataset", path=pattern, num_samples=args.samples, workers=args.workers)
    from harness.models.build import model_name
    from harness.models.names import register_model_configs

    register_model_configs()
    crop = model_name(args.crop_model)
    source = build_source(spec, ViewSpec.of(crop), open_clip.get_tokenizer(crop), Augmentation("random", 0), Path(index_root))
    data = build_train_data(spec, source, 2 * args.batch, seed=0, rank=rank, world_size=2)
    torch.distributed.barrier()
    started, images, decoded = time.perf_counter(), 0, 0
    for batch in data.epoch_batches(0, 0):
        images, decoded = images + len(batch), decoded + batch.decoded
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - started, "images": images, "decoded": decoded}))


def _open_clip_epoch(rank: int, port: int, args, pattern: str, index_root: str, out: str) -> None:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    _join(rank, port)
    open_clip.add_model_config(HERE / "model_configs")
    from harness.models.build import model_name
    from harness.models.names import register_model_configs

    register_model_configs()
    crop = model_name(args.crop_model)
    _, preprocess_train, _ = open_clip.create_model_and_transforms(crop)
    options = SimpleNamespace(train_data=pattern, train_num_samples=args.samples, train_data_upsampling_factors=None,
                              dataset_resampled=False, batch_size=args.batch, workers=args.workers, world_size=2,
                              seed=0)
    decodes = counting_webdataset_decodes()
    data = get_wds_dataset(options, preprocess_train, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer(crop))
    torch.distributed.barrier()
    started, images = time.perf_counter(), 0
    for image, _ in data.dataloader:
        images += len(image)
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - started, "images": images,
                                     "decoded": decodes.value}))


def counting_webdataset_decodes():
    """A counter of webdataset's image decodes (open_clip's ``wds.decode("pilrgb")``) in this process and the
    loader workers it forks: shared memory, since each worker decodes in its own process."""
    import multiprocessing

    import webdataset.autodecode as autodecode

    decodes, decode = multiprocessing.get_context("fork").Value("q", 0), autodecode.ImageHandler.__call__

    def counted(self, key, data):
        image = decode(self, key, data)
        if image is not None:  # None: not an image extension
            with decodes.get_lock():
                decodes.value += 1
        return image

    autodecode.ImageHandler.__call__ = counted
    return decodes


def loader_epoch(tool, args, pattern: str, folder: Path) -> dict:
    """One epoch of ``tool``'s loader on 2 ranks: images/s over both, and images decoded."""
    outputs = [folder / f"{tool.__name__}-{rank}.json" for rank in range(2)]
    mp.spawn(lambda_rank, args=(tool, free_port(), args, pattern, str(folder), outputs), nprocs=2)
    ranks = [json.loads(out.read_text()) for out in outputs]
    images = sum(r["images"] for r in ranks)
    return {"images_per_s": images / max(r["seconds"] for r in ranks), "images": images,
            "decoded": sum(r["decoded"] for r in ranks)}


def lambda_rank(rank, tool, port, args, pattern, folder, outputs):
    tool(rank, port, args, pattern, folder, str(outputs[rank]))


def torchrun(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), *command], cwd=cwd, check=True, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started


def per_epoch(run, epochs=(1, 2)) -> float:
    """Seconds per epoch: the difference of a 2-epoch and a 1-epoch run, so start-up and teardown cancel."""
    short, long = (run(e) for e in epochs)
    return (long - short) / (epochs[1] - epochs[0])


def clipkd_kd_epoch(args, pattern: str, folder: Path, teacher: Path, mode: str) -> float:
    import yaml

    def run(epochs: int) -> float:
        out = folder / f"clipkd-{mode}-{epochs}"
        config = {"name": f"bench-{mode}", "output_dir": str(out), "student": {"model": STUDENT},
                  "data": {"dataset": "webdataset", "path": pattern, "num_samples": args.samples,
                           "workers": args.workers},
                  "optim": {"warmup_steps": 10},
                  "train": {"batch_size": 2 * args.batch, "epochs": epochs, "checkpoint_every": 10**6}}
        if mode != "no-kd":
            config["teacher"] = {"model": TEACHER, "pretrained": str(teacher), "embeddings": mode,
                                 "views": args.views if mode == "cached" else 0}
            config["distill"] = {"open_clip_distill": 1}
            config["output_dir"] = str(folder / "shared-cache") if mode == "cached" else config["output_dir"]
            config["name"] = f"bench-{mode}-{epochs}"
        file = folder / f"clipkd-{mode}-{epochs}.yaml"
        file.write_text(yaml.safe_dump(config))
        return torchrun([str(HERE / "clipkd_with_bench_configs.py"), "train", str(file)], folder)

    return per_epoch(run)


def open_clip_kd_epoch(args, pattern: str, folder: Path, teacher: Path, distill: bool) -> float:
    script = folder / "open_clip_train_bench.py"
    script.write_text(OPEN_CLIP_TRAIN)

    def run(epochs: int) -> float:
        name = f"open_clip-{'distill' if distill else 'no-kd'}-{epochs}"
        options = ["--train-data", pattern, "--train-num-samples", str(args.samples), "--dataset-type", "webdataset",
                   "--batch-size", str(args.batch), "--workers", str(args.workers), "--epochs", str(epochs),
                   "--model", STUDENT, "--lr", "1e-3", "--warmup", "10", "--precision", "fp32", "--device", "cpu",
                   "--dist-backend", "gloo", "--logs", str(folder), "--name", name, "--save-frequency", "0",
                   "--report-to", "", "--seed", "0"]
        if distill:
            options += ["--distill-model", TEACHER, "--distill-pretrained", str(teacher)]
        arguments = folder / f"{name}.json"
        arguments.write_text(json.dumps(options))
        return torchrun([str(script), str(HERE / "model_configs"), str(arguments)], folder)

    return per_epoch(run)


def in_memory_share(steps: int, dataset: str = "fashion-mnist") -> dict:
    """The demo student's loader and step, each timed alone (median ms per batch)."""
    from core.distributed import DistEnv
    from harness.config.run_config import parse_config
    from harness.training.loop import Trainer

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        config = parse_config({"name": "share", "output_dir": folder, "student": {"model": "clipkd-tiny"},
                               "data": {"dataset": dataset}, "optim": {"warmup_steps": 50},
                               "train": {"batch_size": 128, "steps": steps}})
        trainer = Trainer(config, DistEnv(), torch.device("cpu"))
        loader, steps_ms, load_ms = iter(trainer.data.epoch_batches(0, 0)), [], []
        for _ in range(steps):
            started = time.perf_counter()
            batch = next(loader)
            load_ms.append(1000 * (time.perf_counter() - started))
            started = time.perf_counter()
            trainer.train_step(batch.to(trainer.device, trainer.dtype))
            steps_ms.append(1000 * (time.perf_counter() - started))
    load, step = statistics.median(load_ms[1:]), statistics.median(steps_ms[1:])
    return {"load_ms": load, "step_ms": step, "share": load / (load + step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_480)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[224, 512],
                        help="stored JPEG sizes the loaders are compared on")
    parser.add_argument("--crop-model", default="ViT-T-16", help="the model whose input the loaders cut (224 px)")
    parser.add_argument("--size", type=int, default=224, help="stored JPEG size of the KD epochs' shards")
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank, for both tools")
    parser.add_argument("--views", type=int, default=2, help="augmented views in the teacher-embedding cache")
    parser.add_argument("--repeats", type=int, default=2, help="loader epochs per tool, alternating (median)")
    parser.add_argument("--shards-dir", type=Path, help="where the shards are made (kept: made once)")
    parser.add_argument("--skip-kd", action="store_true", help="loaders and in-memory share only")
    parser.add_argument("--share-steps", type=int, default=30)
    parser.add_argument("--share-dataset", default="fashion-mnist", help="the in-memory set (the demo's by default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for size in args.sizes:
            compare_loaders(args, size, folder)
        manifest = write_jpeg_shards((args.shards_dir or folder / "shards") / str(args.size), args.samples, args.shards,
                                     args.size)
        pattern = manifest["pattern"]

        if not args.skip_kd:
            teacher = folder / "teacher.pt"
            import open_clip

            from harness.models.build import create_clip
            from harness.models.names import register_model_configs

            register_model_configs()
            open_clip.add_model_config(HERE / "model_configs")
            torch.manual_seed(0)
            torch.save({"state_dict": create_clip(TEACHER).model.state_dict()}, teacher)
            started = time.perf_counter()
            clipkd_kd_epoch_build_cache(args, pattern, folder, teacher)
            build = time.perf_counter() - started
            epochs = {"open_clip no-KD": open_clip_kd_epoch(args, pattern, folder, teacher, distill=False),
                      "open_clip --distill": open_clip_kd_epoch(args, pattern, folder, teacher, distill=True),
                      "clipkd no-KD": clipkd_kd_epoch(args, pattern, folder, teacher, "no-kd"),
                      "clipkd live": clipkd_kd_epoch(args, pattern, folder, teacher, "live"),
                      "clipkd cached": clipkd_kd_epoch(args, pattern, folder, teacher, "cached")}
            for name, seconds in epochs.items():
                print(f"epoch {name:20s} {seconds:7.1f} s")
            print(f"KD epoch ratio clipkd live / open_clip_train --distill: "
                  f"{epochs['clipkd live'] / epochs['open_clip --distill']:.2f}")
            print(f"clipkd cached / clipkd no-KD epoch: {epochs['clipkd cached'] / epochs['clipkd no-KD']:.2f} "
                  f"(target <= 1.2; the {args.views}-view cache took {build:.0f} s to build, once)")

    share = in_memory_share(args.share_steps, args.share_dataset)
    print(f"in memory (clipkd-tiny, {args.share_dataset}, batch 128): loader {share['load_ms']:.1f} ms, step "
          f"{share['step_ms']:.1f} ms per batch: loader share {100 * share['share']:.1f} % (target < 10 %)")


# The paper's scale on one H200 (DESIGN.md §7): a cached ViT-T/16 step is ~17 GFLOPs per sample, the GPU ~790
# TFLOP/s in bf16; at a 40 % share of that, a step consumes about 18,600 images/s.
PAPER_STEP_IMAGES_PER_S = 0.4 * 790e12 / 17e9


def compare_loaders(args, size: int, folder: Path) -> None:
    """Both tools' loaders on JPEGs stored at ``size`` px, cut to ``--crop-model``'s input; the decodes each made,
    and the decoded images per second of one worker process."""
    manifest = write_jpeg_shards((args.shards_dir or folder / "shards") / str(size), args.samples, args.shards, size)
    pattern = manifest["pattern"]
    print(f"shards: {manifest['samples']:,} {manifest['source']} images as {size} px JPEG in {manifest['shards']} "
          f"shards of {min(manifest['counts'])}-{max(manifest['counts'])}, cut to {args.crop_model}'s input; 2 "
          f"processes (gloo), batch {args.batch} per rank, {args.workers} loader workers each, {os.cpu_count()} CPUs")
    loaders = {"clipkd": [], "open_clip": []}
    for _ in range(args.repeats):
        for name, tool in (("clipkd", _clipkd_epoch), ("open_clip", _open_clip_epoch)):
            loaders[name].append(loader_epoch(tool, args, pattern, folder))
    rate = {name: statistics.median(r["images_per_s"] for r in runs) for name, runs in loaders.items()}
    workers = 2 * max(1, args.workers)
    for name, runs in loaders.items():
        per_worker = runs[0]["decoded"] / (runs[0]["images"] / rate[name]) / workers
        print(f"  {size} px loader {name:9s} {rate[name]:8.1f} images/s; decoded per epoch ÷ dataset "
              f"{runs[0]['decoded'] / args.samples:.2f} ({runs[0]['images']:,} images yielded); {per_worker:.0f} "
              f"decodes/s per worker process: a GPU at the paper's step rate (~{PAPER_STEP_IMAGES_PER_S:,.0f} "
              f"images/s) needs {PAPER_STEP_IMAGES_PER_S / per_worker:.0f} such workers")
    print(f"  {size} px loader ratio clipkd/open_clip_train: {rate['clipkd'] / rate['open_clip']:.2f} "
          f"(target >= {2.0 if size > 224 else 1.0})")
    decoded = loaders["clipkd"][0]["decoded"] / args.samples
    print(f"  {size} px clipkd decoded per epoch ÷ dataset at world size 2: {decoded:.2f} (target 1.00)")


def clipkd_kd_epoch_build_cache(args, pattern: str, folder: Path, teacher: Path) -> None:
    """The cached runs' teacher-embedding cache, built by torchrun with 2 processes before any timing."""
    import yaml

    config = {"name": "bench-cache", "output_dir": str(folder / "shared-cache"), "student": {"model": STUDENT},
              "teacher": {"model": TEACHER, "pretrained": str(teacher), "embeddings": "cached", "views": args.views},
              "distill": {"open_clip_distill": 1},
              "data": {"dataset": "webdataset", "path": pattern, "num_samples": args.samples, "workers": args.workers},
              "train": {"batch_size": 2 * args.batch, "steps": 1}}
    file = folder / "cache.yaml"
    file.write_text(yaml.safe_dump(config))
    torchrun([str(HERE / "clipkd_with_bench_configs.py"), "train", str(file)], folder)


if __name__ == "__main__":
    main()
