"""Built-in real datasets that need no download: scikit-learn's digits and Debian's Fashion-MNIST.

Captions are computed from each image's pixels: the class plus measured attributes (stroke weight, slant and
size for digits; shade, size and texture for clothing). Attribute thresholds are tertiles over the whole
dataset, so each word splits the data into thirds and the text tower must compose words to match images.
Splits are fixed (seeded permutation / the official test split) and do not depend on a run's seed.

Zero-shot classification prompts a class in the captions' own phrasing, averaged over every combination of the
attribute words (27 prompts, CLIP's prompt ensembling): a generic "a photo of a {c}." is a phrasing the text
tower never saw, and which class such a prompt lands nearest then changes from seed to seed (measured: whole
classes at 12 % or 76 % top-1 across three seeds of one student, 8 points of top-1 apart; 2.8 with the ensemble).
"""
from __future__ import annotations

import functools
import gzip
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import ClipkdError

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

    def first(self, count: int) -> CaptionedImages:
        """The first ``count`` images (a data budget: the split's order is fixed, so the same for every run)."""
        return CaptionedImages(self.images[:count], self.labels[:count], self.captions[:count], self.classnames,
                               self.templates)


def _tertile_words(values: np.ndarray, words: tuple[str, str, str]) -> list[str]:
    low, high = np.quantile(values, [1 / 3, 2 / 3])
    return [words[0] if v < low else words[2] if v > high else words[1] for v in values]


def _ink_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, from the pixel intensities: mean and spread of the inked pixels, slant (μ11/μ02), box area. Raw
    moments as matrix products over the flattened images (one pass each, no image-sized temporaries)."""
    n, h, w = images.shape
    pixels = images.reshape(n, h * w).astype(np.float64)
    on = (images > images.max() * 0.25).reshape(n, h * w)
    count = np.maximum(on.sum(axis=1), 1)
    inked = pixels * on
    mean_on = inked.sum(axis=1) / count
    std_on = np.sqrt(np.maximum((inked * pixels).sum(axis=1) / count - mean_on**2, 0))
    ys, xs = (grid.reshape(-1).astype(np.float64) for grid in np.mgrid[0:h, 0:w])
    mass = pixels.sum(axis=1) + 1e-9
    my, mx = pixels @ ys / mass, pixels @ xs / mass
    covariance = pixels @ (xs * ys) - mass * mx * my
    spread_y = pixels @ (ys * ys) - mass * my * my
    # image rows grow downwards, so a stroke leaning right has negative covariance of x with y
    slant = -covariance / (spread_y + 1e-9)
    on = on.reshape(n, h, w)
    height = on.any(axis=2).sum(axis=1)  # rows that hold ink
    width = on.any(axis=1).sum(axis=1)
    return {"mean": mean_on, "spread": std_on, "slant": slant, "area": height * width}


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_WORDS = {"size": ("small", "mid-sized", "large"), "weight": ("thin", "medium", "bold"),
               "lean": ("left-leaning", "upright", "right-leaning")}


def caption_templates(size: tuple[str, ...], second: tuple[str, ...], third: tuple[str, ...]) -> list[str]:
    """Every caption a class can have, with the class as ``{c}``: the zero-shot prompts of a built-in set."""
    return [f"a {a}, {b}, {c} " + "{c}" for a, b, c in itertools.product(size, second, third)]


DIGIT_TEMPLATES = caption_templates(DIGIT_WORDS["size"], DIGIT_WORDS["weight"], DIGIT_WORDS["lean"])


def _attribute_captions(images: np.ndarray, labels: np.ndarray, attributes: list[tuple[str, tuple[str, ...]]],
                        names: list[str]) -> list[str]:
    """'a {first}, {second}, {third} {class}': each word the tertile of one ink statistic (attributes: the
    statistic and its three words, in the caption's order)."""
    stats = _ink_statistics(images)
    words = [_tertile_words(stats[statistic], vocabulary) for statistic, vocabulary in attributes]
    return [f"a {first}, {second}, {third} {names[y]}" for first, second, third, y in zip(*words, labels)]


def _digit_captions(images: np.ndarray, labels: np.ndarray) -> list[str]:
    return _attribute_captions(images, labels, [("area", DIGIT_WORDS["size"]), ("mean", DIGIT_WORDS["weight"]),
                                                ("slant", DIGIT_WORDS["lean"])], DIGIT_NAMES)


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
FASHION_WORDS = {"size": ("small", "medium-sized", "large"), "shade": ("dark", "grey", "light"),
                 "texture": ("plain", "textured", "patterned")}
FASHION_TEMPLATES = caption_templates(FASHION_WORDS["size"], FASHION_WORDS["shade"], FASHION_WORDS["texture"])
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
    return _attribute_captions(images, labels, [("area", FASHION_WORDS["size"]), ("mean", FASHION_WORDS["shade"]),
                                                ("spread", FASHION_WORDS["texture"])], FASHION_NAMES)


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
    return split.first(RETRIEVAL_GALLERY)


def load_builtin(name: str, split: str) -> CaptionedImages:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    return BUILTIN_DATASETS[name](split)
