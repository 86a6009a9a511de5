"""Built-in real datasets that need no download: scikit-learn's digits and Debian's Fashion-MNIST.

Captions are computed from each image's pixels: the class plus measured attributes (stroke weight, slant and
size for digits; shade, size and texture for clothing). Attribute thresholds are tertiles over the whole
dataset, so each word splits the data into thirds and the text tower must compose words to match images.
Splits are fixed (seeded permutation / the official test split) and do not depend on a run's seed.
"""
from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import ClipkdError

SPLITS = ("train", "val", "test")
# Retrieval on a built-in set uses the first RETRIEVAL_GALLERY test images: captions describe attributes shared
# by many images (Fashion-MNIST's 10,000 test images have ~240 distinct captions), so a larger gallery only adds
# indistinguishable candidates, and clip_benchmark's recall costs O(N²·k).
RETRIEVAL_GALLERY = 1000
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_SEED = 0


class DatasetUnavailableError(ClipkdError, RuntimeError):
    pass


@dataclass
class CaptionedImages:
    """One split: uint8 grayscale images (N, H, W), integer labels and one caption per image."""

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]
    classnames: list[str]
    templates: list[str] = field(default_factory=list)


def _tertile_words(values: np.ndarray, words: tuple[str, str, str]) -> list[str]:
    low, high = np.quantile(values, [1 / 3, 2 / 3])
    return [words[0] if v < low else words[2] if v > high else words[1] for v in values]


def _ink_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, from the pixel intensities: mean and spread of the inked pixels, slant (μ11/μ02), box area."""
    _, h, w = images.shape
    pixels = images.astype(np.float64)
    on = images > images.max() * 0.25
    count = np.maximum(on.sum(axis=(1, 2)), 1)
    mean_on = (pixels * on).sum(axis=(1, 2)) / count
    std_on = np.sqrt(((pixels - mean_on[:, None, None]) ** 2 * on).sum(axis=(1, 2)) / count)
    mass = pixels.sum(axis=(1, 2)) + 1e-9
    ys, xs = np.mgrid[0:h, 0:w]
    dy = ys[None] - ((pixels * ys).sum(axis=(1, 2)) / mass)[:, None, None]
    dx = xs[None] - ((pixels * xs).sum(axis=(1, 2)) / mass)[:, None, None]
    # image rows grow downwards, so a stroke leaning right has negative covariance of x with y
    slant = -(pixels * dx * dy).sum(axis=(1, 2)) / ((pixels * dy * dy).sum(axis=(1, 2)) + 1e-9)
    height = on.any(axis=2).sum(axis=1)  # rows that hold ink
    width = on.any(axis=1).sum(axis=1)
    return {"mean": mean_on, "spread": std_on, "slant": slant, "area": height * width}


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = ["a handwritten digit {c}.", "a photo of the number {c}.", "the digit {c}, written by hand."]


def _digit_captions(images: np.ndarray, labels: np.ndarray) -> list[str]:
    stats = _ink_statistics(images)
    weight = _tertile_words(stats["mean"], ("thin", "medium", "bold"))
    lean = _tertile_words(stats["slant"], ("left-leaning", "upright", "right-leaning"))
    size = _tertile_words(stats["area"], ("small", "mid-sized", "large"))
    return [f"a {s}, {w}, {slant} {DIGIT_NAMES[y]}" for w, slant, s, y in zip(weight, lean, size, labels)]


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target.astype(np.int64)


def _split_indices(n: int, fractions=(0.7, 0.1, 0.2)) -> dict[str, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_train, n_val = int(n * fractions[0]), int(n * fractions[1])
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def load_digits_split(split: str) -> CaptionedImages:
    images, labels = _digits()
    captions = _digit_captions(images, labels)  # tertiles over the whole dataset, so words mean the same per split
    index = _split_indices(len(labels))[split]
    return CaptionedImages(images[index], labels[index], [captions[i] for i in index], DIGIT_NAMES, DIGIT_TEMPLATES)


FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_TEMPLATES = ["a photo of a {c}.", "a black and white photo of a {c}.", "a product photo of a {c}."]
FASHION_VAL_SIZE = 5000


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.cache
def _fashion_mnist(part: str) -> tuple[np.ndarray, np.ndarray]:
    images_file = FASHION_MNIST_DIR / f"{part}-images-idx3-ubyte.gz"
    if not images_file.is_file():
        raise DatasetUnavailableError(
            f"fashion-mnist needs Debian's package `dataset-fashion-mnist` ({images_file} not found); "
            "install it with `apt-get install dataset-fashion-mnist` (scripts/install_debian.sh fashion-mnist)"
        )
    return _read_idx(images_file), _read_idx(FASHION_MNIST_DIR / f"{part}-labels-idx1-ubyte.gz").astype(np.int64)


def _fashion_captions(images: np.ndarray, labels: np.ndarray) -> list[str]:
    stats = _ink_statistics(images)
    shade = _tertile_words(stats["mean"], ("dark", "grey", "light"))
    size = _tertile_words(stats["area"], ("small", "medium-sized", "large"))
    texture = _tertile_words(stats["spread"], ("plain", "textured", "patterned"))
    return [f"a {z}, {s}, {t} {FASHION_NAMES[y]}" for s, z, t, y in zip(shade, size, texture, labels)]


def load_fashion_mnist_split(split: str) -> CaptionedImages:
    images, labels = _fashion_mnist("t10k" if split == "test" else "train")
    captions = _fashion_captions(images, labels)
    if split != "test":
        order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
        index = order[:FASHION_VAL_SIZE] if split == "val" else order[FASHION_VAL_SIZE:]
        images, labels, captions = images[index], labels[index], [captions[i] for i in index]
    return CaptionedImages(images, labels, captions, FASHION_NAMES, FASHION_TEMPLATES)


BUILTIN_DATASETS: dict[str, Callable[[str], CaptionedImages]] = {
    "digits": load_digits_split,
    "fashion-mnist": load_fashion_mnist_split,
}


def retrieval_gallery(split: CaptionedImages) -> CaptionedImages:
    n = min(RETRIEVAL_GALLERY, len(split.labels))
    return CaptionedImages(split.images[:n], split.labels[:n], split.captions[:n], split.classnames, split.templates)


def load_builtin(name: str, split: str) -> CaptionedImages:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    return BUILTIN_DATASETS[name](split)
