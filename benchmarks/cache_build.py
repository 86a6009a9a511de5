"""A K-view teacher-cache build decodes each image once: its time at K = 4 against K = 1, and its decodes.

    python benchmarks/cache_build.py [--samples 4096] [--size 512] [--views 4]

On JPEGs stored at ``--size`` px (512: img2dataset's usual) and a 224 px student view, with a teacher small
enough that decoding is most of the build (``model_configs/bench-tiny-224.json``: 224 px, 7×7 patches of 32, two
layers of width 64), as student and teacher. Each build runs in this process with the default loader workers;
the decodes are counted where images are decoded (the cache's ``meta.json``). Targets: decodes = samples at any
K; the K = 4 build ≤ 1.3× the K = 1 build.

Then the work a build does, timed apart in one process, as per sample (decode, caption tokens and text pass) and
per view (cut, then normalised and through the teacher's image tower): a K-view build does the first once and the
second K times: (f + K·v) ÷ (f + v) of a 1-view build's work.
"""
import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import open_clip
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from jpeg_shards import write_jpeg_shards  # noqa: E402

from core.distributed import DistEnv  # noqa: E402
from harness.config.run_config import parse_config  # noqa: E402
from harness.data.bad import open_image  # noqa: E402
from harness.data.batch import normalize  # noqa: E402
from harness.data.views import ViewSpec, centre_boxes  # noqa: E402
from harness.models.build import create_clip  # noqa: E402
from harness.teachers import cache_build, cache_key  # noqa: E402

MODEL = "bench-tiny-224"
TARGET = 1.3


def build(folder: Path, teacher: Path, pattern: str, samples: int, views: int) -> tuple[float, dict]:
    config = parse_config({
        "name": f"build-{views}", "output_dir": str(folder / f"views-{views}"), "student": {"model": MODEL},
        "teacher": {"model": MODEL, "pretrained": str(teacher), "embeddings": "cached", "views": views},
        "distill": {"fd": 1}, "data": {"dataset": "webdataset", "path": pattern, "num_samples": samples},
        "train": {"batch_size": 64, "steps": 1}, "eval": {"batch_size": 128}})
    started = time.perf_counter()
    built = cache_build.ensure(config, torch.device("cpu"), DistEnv())
    return time.perf_counter() - started, cache_key.read_meta(built)


def work_ms(shard: Path, teacher, count: int = 512, batch: int = 128) -> dict[str, float]:
    """Milliseconds a sample of a build's work: decode, text (tokens, text pass), and per view: cut, image
    (normalise, image pass), each timed over ``count`` samples of ``shard`` in this process, in ``batch``-sized
    passes."""
    with tarfile.open(shard) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith((".jpg", ".txt"))), key=lambda m: m.name)
        files = {m.name: tar.extractfile(m).read() for m in members[:2 * count]}
    jpegs = [data for name, data in files.items() if name.endswith(".jpg")]
    captions = [data.decode() for name, data in files.items() if name.endswith(".txt")]
    spec, tokenizer = ViewSpec.of(MODEL), open_clip.get_tokenizer(MODEL)
    clock = {}

    def timed(name, work):
        started = time.perf_counter()
        result = work()
        clock[name] = (time.perf_counter() - started) * 1e3 / len(jpegs)
        return result

    pixels = timed("decode", lambda: [open_image(io.BytesIO(jpeg), spec) for jpeg in jpegs])
    boxes = centre_boxes([p.shape[1] for p in pixels], [p.shape[2] for p in pixels])
    views = timed("cut", lambda: torch.stack([spec.cut(p, box) for p, box in zip(pixels, boxes)]))
    with torch.no_grad():
        timed("image", lambda: [teacher.encode_image(normalize(views[i:i + batch], spec.mean, spec.std))
                                for i in range(0, len(views), batch)])
        timed("text", lambda: [teacher.encode_text(tokenizer(captions[i:i + batch]))
                               for i in range(0, len(captions), batch)])
    return clock


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
        model = create_clip(MODEL, str(teacher)).model.eval()
        work = work_ms(next((folder / "shards").glob("*.tar")), model)
    print(f"{args.samples:,} JPEGs of {args.size} px in {args.shards} shards, cut to 224 px; teacher {MODEL}")
    for views, (seconds, meta) in results.items():
        decoded = sum(meta["decoded_by_rank"])
        print(f"  K = {views}: {seconds:6.1f} s; decoded {decoded:,} images for {meta['samples']:,} samples "
              f"({decoded / meta['samples']:.2f} per sample, target 1.00)")
    ratio = results[args.views][0] / results[1][0]
    print(f"build K = {args.views} ÷ K = 1: {ratio:.2f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    per_sample, per_view = work["decode"] + work["text"], work["cut"] + work["image"]
    print(f"its work, in one process: a sample decode {work['decode']:.2f} + text {work['text']:.2f} ms, a view cut "
          f"{work['cut']:.2f} + image pass {work['image']:.2f} ms: K = {args.views} does "
          f"{(per_sample + args.views * per_view) / (per_sample + per_view):.2f}× the work of K = 1")


if __name__ == "__main__":
    main()
