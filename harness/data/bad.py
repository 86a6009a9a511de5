"""Samples that cannot be trained on, and what a run does with them (``data.bad_samples``).

A sample is bad when its image cannot be decoded (no file, unreadable bytes, a truncated JPEG, no pixels) or its
caption is missing or empty. CC3M and CC12M as downloaded hold some; open_clip_train's pipeline drops them as it
streams (``log_and_continue``). clipkd's epochs are planned (which sample each rank and worker reads) and its
teacher caches hold a row per sample, so a bad sample is *replaced*, not dropped: by the next good sample in the
set's own order (a shard's next position, then the next shard's first; a CSV's next row; the last wraps to the
first). That is a function of the sample alone, so every rank and loader worker, a resumed run and a cache build
replace it alike, batches keep their size, and the replacement's id (its views, its cached rows) is the one the
batch carries. ``skip`` (the default) logs each bad sample once to ``runs/<id>/bad_samples.jsonl`` and stops the
run past ``data.max_bad_fraction`` of the set; ``error`` stops it at the first.
"""
from __future__ import annotations

import fcntl
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.errors import ClipkdError

MAX_IN_A_ROW = 1000  # bad samples in a row before a set is called unusable rather than a few samples bad
SHOWN = 5  # bad samples a message names
BAD_SAMPLES_LOG = "bad_samples.jsonl"


class BadSampleError(ClipkdError, RuntimeError):
    """A bad sample under ``data.bad_samples: error``, or more bad samples than ``data.max_bad_fraction``."""


class Unusable(Exception):
    """Raised by a source's ``load`` for a bad sample, with the reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class BadSample:
    sample: int  # the sample's id (a row index, or shard << 32 | position)
    where: str  # its shard and key, or its CSV row and path
    reason: str

    def describe(self) -> str:
        return f"{self.where}: {self.reason}"


def open_image(file, spec) -> torch.Tensor:
    """An image file (a path or bytes) decoded to RGB at the view's draft scale, as uint8 pixels (C, H, W), from
    which every view of it is cut; Unusable if it cannot be decoded."""
    try:
        image = spec.draft(Image.open(file)).convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise Unusable(f"the image cannot be decoded ({type(error).__name__}: {error})") from None
    if image.width == 0 or image.height == 0:
        raise Unusable("the image has no pixels")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def usable_caption(caption: str | None) -> str:
    if caption is None:
        raise Unusable("no caption")
    if not caption.strip():
        raise Unusable("an empty caption")
    return caption


@dataclass
class Decoded:
    images: list[torch.Tensor]  # uint8 (C, H, W)
    captions: list[list[str]]  # each sample's captions, its own first (data/captions.py)
    ids: np.ndarray  # each slot's sample: the one asked for, or its replacement
    bad: list[BadSample]


def decode_replacing(source, ids: np.ndarray) -> Decoded:
    """Each sample's image and caption, a bad one replaced by the next good sample (``source.after``); samples a
    data check found bad (``source.known_bad``) are replaced without being decoded again."""
    images, captions, resolved, bad = [None] * len(ids), [None] * len(ids), np.array(ids, dtype=np.int64), []
    tries = min(MAX_IN_A_ROW, len(source))  # past the set's size the search would come round to its start again
    for slot in source.read_order(ids):
        sample = int(ids[slot])
        for _ in range(tries):
            try:
                if sample in source.known_bad:
                    raise Unusable(source.known_bad[sample])
                images[slot], captions[slot] = source.load(sample)
                break
            except Unusable as problem:
                bad.append(BadSample(sample, source.where(sample), problem.reason))
                sample = source.after(sample)
        else:
            raise BadSampleError(
                (f"all {tries} samples of the set are bad" if tries == len(source) else
                 f"{tries} bad samples in a row from {bad[-tries].where}") +
                f": is this the data you meant? (e.g. {bad[-1].describe()})")
        resolved[slot] = sample
    return Decoded(images, captions, resolved, bad)


class BadSampleLog:
    """A run's bad samples, each written once to ``bad_samples.jsonl`` (every rank appends under a lock, so a
    sample found again in a later epoch or by another rank is not repeated), and the policy applied."""

    def __init__(self, run_dir: Path, policy: str, max_fraction: float, dataset_size: int, setting: str = "data"):
        self.path, self.policy, self.setting = Path(run_dir) / BAD_SAMPLES_LOG, policy, setting
        self.bound = max_fraction * dataset_size
        self.max_fraction, self.dataset_size = max_fraction, dataset_size
        self.seen: set[int] = set()

    def add(self, found: list[dict]) -> BadSampleError | None:
        """Logs the block's bad samples; returns the error that stops the run (under ``error``, or past the bound),
        which the caller raises on every rank at once (core/distributed.py StepVote): a rank that raised it
        alone would leave the others waiting in the step's collectives."""
        fresh = [BadSample(**entry) for entry in found if entry["sample"] not in self.seen]
        if not fresh:
            return None
        if self.policy == "error":
            return BadSampleError(f"bad sample {fresh[0].describe()} (data.bad_samples: error; with skip a bad "
                                  "sample is replaced by the next good one and logged)")
        with self.path.open("a+") as log:
            fcntl.flock(log, fcntl.LOCK_EX)
            log.seek(0)
            logged = [BadSample(**json.loads(line)) for line in log.read().splitlines() if line]
            known = {entry.sample for entry in logged}
            new = [entry for entry in dict((e.sample, e) for e in fresh).values() if entry.sample not in known]
            log.writelines(json.dumps(asdict(entry)) + "\n" for entry in new)
        self.seen |= known | {entry.sample for entry in fresh}
        everyone = logged + new
        if len(everyone) > self.bound:
            shown = "; ".join(entry.describe() for entry in everyone[:SHOWN])
            return BadSampleError(
                f"{len(everyone)} bad samples, more than {self.setting}.max_bad_fraction {self.max_fraction:g} of the "
                f"{self.dataset_size:,} samples: {shown}{' …' if len(everyone) > SHOWN else ''} (all in {self.path}; "
                f"raise {self.setting}.max_bad_fraction or fix the data: `clipkd data check` lists them)")
        return None


def count_logged(run_dir: Path) -> int:
    path = Path(run_dir) / BAD_SAMPLES_LOG
    return len([line for line in path.read_text().splitlines() if line]) if path.is_file() else 0
