"""The files a training set is made of, read without torch: a shard pattern's files, a CSV table's rows, and
digests of what they hold. Cache keys and a grid's plan read them in processes that never load a batch."""
from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import braceexpand

INDEX_DIR = ".shard-index"


def expand_shards(pattern: str) -> list[Path]:
    """The shard files of a brace pattern; an error names a missing one."""
    urls = list(braceexpand.braceexpand(pattern))
    streams = [url for url in urls if "://" in url or url.startswith("pipe:")]
    if streams:
        raise ValueError(f"data.path: {streams[0]!r} is a stream; clipkd seeks in shards, so they must be files "
                         "(mount the bucket or copy the shards)")
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        raise ValueError(f"data.path: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]!r}")
    return [Path(url) for url in urls]


INDEX_VERSION = 2  # 2: samples with an image or a caption (1: both), so that a half sample is found and logged



class CaptionTable:
    """The rows of a CSV/TSV of image paths and captions; every column error names the file and the columns."""

    def __init__(self, path: str, image_key: str, caption_key: str, separator: str):
        if not Path(path).is_file():
            raise ValueError(f"data.path: {path!r} does not exist")
        import pandas as pd  # a table is read in a process that reads it; a plan that does not, goes without

        frame = pd.read_csv(path, sep=separator)
        for setting, key in (("image_key", image_key), ("caption_key", caption_key)):
            if key not in frame.columns:
                raise ValueError(f"data.{setting}: {path} has no column {key!r} (separator {separator!r}); "
                                 f"columns: {list(frame.columns)}")
        self.path = str(path)
        self.images = frame[image_key].astype(str).tolist()
        captions = frame[caption_key]  # a missing caption stays None (a bad sample), not the text "nan"
        self.captions = [None if missing else str(text) for text, missing in zip(captions, captions.isna())]

    def __len__(self) -> int:
        return len(self.images)

    def first(self, count: int) -> CaptionTable:
        """The first ``count`` rows (a data budget)."""
        subset = copy.copy(self)
        subset.images, subset.captions = self.images[:count], self.captions[:count]
        return subset



def csv_checked_file(folder: Path, spec) -> Path:
    """Where ``clipkd data check`` leaves a CSV's bad rows (row index -> reason), keyed by what its samples are."""
    return folder / f"csv-{csv_identity(spec)[:20]}.bad.json"


def csv_identity(spec) -> str:
    """A digest of what a CSV set's samples are (``spec``: a config's ``data``): the table's bytes, and each image
    file's path, size and time (a missing one as missing). A table edited, or its images downloaded again with the
    same rows, is another set: a teacher cache keyed by it is not read for it. A stat a row each time (seconds for
    a million rows on a local disk); the table is read once per process and state of the file."""
    stat = Path(spec.path).stat()
    table, images = _csv_images(str(Path(spec.path).resolve()), stat.st_size, stat.st_mtime_ns, spec.image_key,
                                spec.caption_key, spec.separator)
    digest = hashlib.sha256(table)
    for image in images:
        try:
            found = os.stat(image)
            digest.update(f"{image}\0{found.st_size}\0{found.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{image}\0missing\n".encode())
    return digest.hexdigest()


@functools.cache
def _csv_images(path: str, size: int, mtime_ns: int, image_key: str, caption_key: str, separator: str
                ) -> tuple[bytes, list[str]]:
    """A table's digest and its image paths, for one state of its file (``size``, ``mtime_ns``)."""
    return (hashlib.sha256(Path(path).read_bytes()).digest(),
            CaptionTable(path, image_key, caption_key, separator).images)

