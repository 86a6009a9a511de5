"""Building a teacher-embedding cache: one pass over the training set, every rank its share, in the run's
precision, each sample in the teacher's own input (the cached embeddings are those a live teacher of the same run
computes)."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.distributed import DistEnv, from_main, init_distributed
from core.errors import worker_errors_unwrapped
from core.precision import autocast, output_dtype, parameter_dtype
from harness.config.run_config import RunConfig, teacher_input
from harness.data.bad import decode_replacing
from harness.data.batch import Batch, crop_views, decodes_to_report
from harness.data.captions import CaptionChoice
from harness.data.loaders import build_source, workers
from harness.data.shards import SHARD_BITS, ShardSource
from harness.data.views import Augmentation, ViewSpec
from harness.teachers.cache_key import META, CacheSpec, cache_dir, complete
from harness.teachers.cache_lock import OWNER, Marks, claim, exclusive, meet, partial_name, publish, remove_abandoned
from harness.teachers.cached import OpenArrays
from harness.teachers.live import create_teacher, logit_bias
from methods import normalize

STORAGE = {"float32": np.float32, "float16": np.float16}


def ensure(config: RunConfig, device: torch.device, env: DistEnv | None = None) -> Path:
    """The cache folder of ``config``'s teacher, data and views, built first if it does not exist yet; under
    torchrun every rank embeds its share."""
    folder = cache_dir(config)
    env = env or init_distributed(config.train.collective_timeout_s)
    if from_main(complete(folder)):
        return folder
    builder = _Builder(config, device)  # the teacher and the data's index, before this rank meets the others
    with exclusive(folder.with_suffix(".lock"), env), worker_errors_unwrapped():
        built, partial = from_main((complete(folder), folder.with_name(partial_name(folder))))
        if not built:  # another builder may have finished while this one waited
            if env.is_main:
                remove_abandoned(folder)
            builder.build(partial, env)
            if env.is_main:
                publish(partial, folder)
        meet(env)  # rank 0 has renamed the folder into place: a moment's wait
    return folder


class _Work(IterableDataset):
    """The chunks a rank embeds, split again across its loader workers: (array prefix, rows, images per view
    (K' × n × C × H × W), the pixels' normalisation or None, tokens, boxes per view, images decoded, bad samples,
    captions per sample or None). Tokens are each sample's first caption, or under ``CaptionChoice("all")`` every
    caption of every sample in turn (``captions`` says how many each has). Loader workers decode each image once
    and cut its K views from it; the main process runs the teacher."""

    def __init__(self, source, chunks: list[tuple[str, np.ndarray, np.ndarray]], views: int):
        self.source, self.chunks, self.views = source, chunks, views

    def __iter__(self):
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        stored = [None] if not self.views else list(range(self.views))
        every_caption = getattr(self.source, "captions", None) == CaptionChoice("all")
        for prefix, rows, ids in self.chunks[first::stride]:
            source, bad, counts = self.source, [], None
            if hasattr(source, "load"):  # files: decoded once, every view cut from the one image
                decoded = decode_replacing(source, ids)  # a bad sample's row holds its replacement, as a run reads
                ids, bad = decoded.ids, [asdict(entry) for entry in decoded.bad]
                cut = [crop_views(decoded.images, ids, None if v is None else np.full(len(ids), v), 0, source.spec,
                                  source.augmentation)[:2] for v in stored]
                texts = [caption for captions in decoded.captions for caption in (captions if every_caption else captions[:1])]
                counts = torch.tensor([len(captions) for captions in decoded.captions]) if every_caption else None
                pixels, tokens = (source.spec.mean, source.spec.std), source.tokenizer(texts)
            else:  # in memory: nothing to decode
                batches = [source.render(0, ids, None if v is None else np.full(len(ids), v)) for v in stored]
                cut, pixels, tokens = [(b.images, b.boxes.numpy()) for b in batches], None, batches[0].texts
            yield (prefix, rows, torch.stack([images for images, _ in cut]), pixels, tokens,
                   torch.stack([torch.from_numpy(boxes) for _, boxes in cut]), decodes_to_report(), json.dumps(bad),
                   counts)


def _chunks(source, share: tuple[int, int], batch: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """This rank's work as (array prefix, rows in those arrays, sample ids): its part of a map-style set (a
    contiguous share, in files of its own), or every world-th shard."""
    rank, world = share
    if isinstance(source, ShardSource):
        chunks = []
        for shard in range(rank, len(source.index.shards), world):
            positions = np.arange(int(source.index.counts[shard]))
            for start in range(0, len(positions), batch):
                rows = positions[start:start + batch]
                chunks.append((f"shards/{shard}.", rows, (np.int64(shard) << SHARD_BITS) | rows))
        return chunks
    ids = np.arange(*_part_range(len(source), rank, world))
    rows = ids - ids[0] if len(ids) else ids
    return [(f"parts/{rank}.", rows[start:start + batch], ids[start:start + batch]) for start in range(0, len(ids), batch)]


def _part_range(count: int, rank: int, world: int) -> tuple[int, int]:
    """The samples of a map-style set that building rank ``rank`` of ``world`` embeds into its own files."""
    return count * rank // world, count * (rank + 1) // world


class _Builder:
    """One process's part of a build: the teacher, run in the run's precision (the cached embeddings are the ones
    a live teacher of the same run computes), and the training set as the student sees it."""

    def __init__(self, config: RunConfig, device: torch.device):
        self.config, self.device, self.spec = config, device, CacheSpec.of(config)
        self.teacher = create_teacher(config.teacher, device, config.train.precision)
        augmentation = Augmentation("replay", views=self.spec.views) if self.spec.views else Augmentation("none")
        self.every_caption = config.data.captions != "first"
        self.source = build_source(config.data, ViewSpec.of(*teacher_input(config.teacher)), self.teacher.tokenizer,
                                   augmentation, config.output_dir,
                                   captions=CaptionChoice("all" if self.every_caption else "first"))
        self.sharded = isinstance(self.source, ShardSource)

    def files(self, world: int) -> list[tuple[str, int]]:
        """Each file set of the cache (its prefix) and its rows: a shard's, or a building rank's part."""
        if self.sharded:
            return [(f"shards/{i}.", int(n)) for i, n in enumerate(self.source.index.counts)]
        ranges = [_part_range(len(self.source), rank, world) for rank in range(world)]
        return [(f"parts/{rank}.", stop - start) for rank, (start, stop) in enumerate(ranges)]

    def build(self, folder: Path, env: DistEnv) -> None:
        """Rank 0 creates the arrays (cheap: their files), then every rank embeds its share at once; they meet
        when all are done."""
        marks = Marks(folder)
        try:
            if env.is_main:
                claim(folder)
                self.create_arrays(folder, env.world_size)
                marks.set("created")
            else:
                marks.wait(["created"])
            embedded = self.embed(folder, (env.rank, env.world_size))
        except BaseException as error:
            if folder.is_dir():
                marks.set(f"failed-rank{env.rank}", f"{type(error).__name__}: {error}")
            raise
        marks.set(f"embedded-{env.rank}", json.dumps({"embedded": embedded, "decoded": self.decoded,
                                                      "bad": list(self.bad.values())}))
        marks.wait([f"embedded-{rank}" for rank in range(env.world_size)])
        meet(env)  # every rank has seen every mark: a moment's wait
        if env.is_main:
            ranks = [json.loads(marks.read(f"embedded-{rank}")) for rank in range(env.world_size)]
            marks.clear()
            (folder / OWNER).unlink()
            self.write_meta(folder, ranks, env.world_size)

    def create_arrays(self, folder: Path, world: int) -> None:
        (folder / ("shards" if self.sharded else "parts")).mkdir()
        storage, views, dim = STORAGE[self.spec.storage], self.spec.views, self.teacher.embed_dim
        files = self.files(world)
        # every caption: a row per sample of as many captions as the shard's sample with the most has (the shards'
        # caption members read in threads, as their index is: the reads wait on the disk)
        with ThreadPoolExecutor(max_workers=16) as pool:
            most = list(pool.map(lambda shard: int(self.source.index.caption_counts(shard).max(initial=1)),
                                 range(len(files)) if self.every_caption else []))
        for shard, (prefix, count) in enumerate(files):
            captions = (most[shard],) if self.every_caption else ()
            shapes = {"image": ((count, max(1, views), dim), storage), "text": ((count, *captions, dim), storage),
                      "boxes": ((count, views, 4), np.int32)}
            for name, (shape, dtype) in shapes.items():
                np.lib.format.open_memmap(folder / f"{prefix}{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()

    def embed(self, folder: Path, share: tuple[int, int]) -> int:
        """Embed this rank's share of the samples (every stored view) into the arrays; returns how many."""
        chunks = _chunks(self.source, share, self.config.eval.batch_size)
        loader = DataLoader(_Work(self.source, chunks, self.spec.views), batch_size=None,
                            num_workers=min(workers(self.config.data.workers), len(chunks)))
        storage, model = STORAGE[self.spec.storage], self.teacher.model
        dtype = parameter_dtype(self.config.train.precision)
        arrays, owner = OpenArrays(folder, writable=True), folder / OWNER
        self.decoded, self.bad = 0, {}
        with torch.no_grad():
            for prefix, rows, images, pixels, tokens, boxes, decoded, bad, counts in loader:
                os.utime(owner)  # the heartbeat that tells other builders this one is alive
                self.decoded += int(decoded)
                self.bad |= {entry["sample"]: entry for entry in json.loads(bad)}
                views, n = images.shape[:2]
                images = Batch(images.flatten(0, 1), tokens, torch.as_tensor(rows), pixels=pixels).to(self.device, dtype)
                with autocast(self.device, self.config.train.precision):
                    image = normalize(model.encode_image(images.images))
                    text = normalize(model.encode_text(tokens.to(self.device)))
                # through float64, which holds a bf16, fp32 or fp64 value exactly: one rounding, to the storage dtype
                arrays[f"{prefix}image"][rows] = image.view(views, n, -1).transpose(0, 1).double().cpu().numpy().astype(storage)
                text = text.double().cpu().numpy().astype(storage)
                if counts is None:
                    arrays[f"{prefix}text"][rows] = text
                else:  # sample i's captions in turn: row rows[i], caption slots 0 … counts[i] - 1
                    counts, target = counts.numpy(), arrays[f"{prefix}text"]
                    slots = np.arange(len(text)) - np.repeat(np.cumsum(counts) - counts, counts)
                    fits = slots < target.shape[1]  # a bad sample's row holds its replacement's, read by neither id
                    target[np.repeat(np.asarray(rows), counts)[fits], slots[fits]] = text[fits]
                if self.spec.views:
                    arrays[f"{prefix}boxes"][rows] = boxes.transpose(0, 1).numpy()
        arrays.close()
        return sum(len(rows) for _, rows, _ in chunks)

    def write_meta(self, folder: Path, ranks: list[dict[str, int]], world: int) -> None:
        """``ranks``: each rank's samples embedded and images decoded (files: once each, whatever the views)."""
        files = self.files(world)
        meta = {"spec": asdict(self.spec), "samples": sum(n for _, n in files),
                "embedded_by_rank": [rank["embedded"] for rank in ranks],
                "decoded_by_rank": [rank["decoded"] for rank in ranks],
                # the bad samples found (data/bad.py): their rows hold their replacements, which runs read instead
                "bad_samples": sorted((entry for rank in ranks for entry in rank["bad"]), key=lambda e: e["sample"]),
                "embed_dim": self.teacher.embed_dim, "logit_scale": float(self.teacher.model.logit_scale.exp()),
                **({} if (bias := logit_bias(self.teacher.model)) is None else {"logit_bias": float(bias)}),
                "embedding_dtype": str(output_dtype(self.config.train.precision)).removeprefix("torch."),
                "teacher_model": type(self.teacher.model).__name__,
                **({"captions": "all"} if self.every_caption else {})}
        if self.sharded:  # which shard's rows are where (the key names the shards by path, size and time)
            meta["shards"] = [{"path": str(path), "samples": count}
                              for path, (_, count) in zip(self.source.index.shards, files)]
        else:  # each part's first sample
            meta["parts"] = [_part_range(len(self.source), rank, world)[0] for rank in range(world)]
        (folder / META).write_text(json.dumps(meta, indent=1))

