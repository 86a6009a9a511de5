"""A webdataset shard set of real JPEGs with captions, for the benchmarks: a built-in set's images upscaled.

    python benchmarks/jpeg_shards.py OUT [--samples 20480] [--shards 16] [--size 224] [--dataset fashion-mnist]

Fashion-MNIST's 28 px images (or digits' 8 px ones, repeated) are upscaled to ``--size`` (bicubic), saved as JPEG
(quality 90, what img2dataset writes) beside their computed captions. Shards are uneven on purpose (±25 % around
the mean), as real shard sets are after failed downloads.
"""
import argparse
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from core.builtin import DatasetUnavailableError, load_builtin


def shard_sizes(samples: int, shards: int, seed: int = 0) -> list[int]:
    weights = np.random.default_rng(seed).uniform(0.75, 1.25, shards)
    sizes = np.floor(weights / weights.sum() * samples).astype(int)
    sizes[: samples - sizes.sum()] += 1
    return sizes.tolist()


def write_jpeg_shards(out: Path, samples: int, shards: int, size: int = 224, dataset: str = "fashion-mnist") -> dict:
    """Writes ``out/shard-NNNNN.tar`` and ``out/manifest.json``; returns the manifest (pattern, counts, source)."""
    manifest_file = out / "manifest.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if (manifest["samples"], manifest["shards"], manifest["size"]) == (samples, shards, size):
            return manifest  # made before with the same shape
    try:
        split = load_builtin(dataset, "train")
    except DatasetUnavailableError:
        dataset, split = "digits", load_builtin("digits", "train")
    out.mkdir(parents=True, exist_ok=True)
    sizes, sample = shard_sizes(samples, shards), 0
    for shard, count in enumerate(sizes):
        with wds.TarWriter(str(out / f"shard-{shard:05d}.tar")) as sink:
            for _ in range(count):
                i = sample % len(split.labels)
                image = Image.fromarray(split.images[i]).convert("RGB").resize((size, size), Image.BICUBIC)
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=90)
                sink.write({"__key__": f"{sample:08d}", "jpg": jpeg.getvalue(), "txt": split.captions[i]})
                sample += 1
    manifest = {"pattern": str(out / f"shard-{{00000..{shards - 1:05d}}}.tar"), "samples": samples, "shards": shards,
                "size": size, "counts": sizes, "source": dataset}
    manifest_file.write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=20_480)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    args = parser.parse_args()
    manifest = write_jpeg_shards(args.out, args.samples, args.shards, args.size, args.dataset)
    print(f"{manifest['samples']} samples of {manifest['source']} as {manifest['size']} px JPEGs in "
          f"{manifest['shards']} shards ({min(manifest['counts'])}-{max(manifest['counts'])} each): {manifest['pattern']}")


if __name__ == "__main__":
    main()
