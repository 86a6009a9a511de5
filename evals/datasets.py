"""Evaluation sets: the built-in test splits, any clip_benchmark dataset with a root, local folders and CSVs.

An evaluation set bundles what clip_benchmark's metric functions need: a classification dataset with
``.classes`` and ``.templates`` yielding (image, label), and/or a retrieval dataset yielding (image, [captions]).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import torch
from clip_benchmark.datasets.builder import build_dataset, get_dataset_default_task
from PIL import Image
from torch.utils.data import Dataset

from core.builtin import BUILTIN_DATASETS, CaptionedImages, load_builtin, retrieval_gallery
from evals.datacomp import WinoGAViL
from evals.errors import EvalDatasetError
from evals.streams import StreamedBenchmark

LOCAL_KINDS = ("imagefolder", "csv", "winogavil")


def read_image(path) -> Image.Image:
    """A benchmark's image; a bad one is one message naming the file. Evaluation does not skip: a benchmark that
    silently lost an image would be another benchmark."""
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise EvalDatasetError(f"{path}: the image cannot be decoded ({type(error).__name__}: {error}); evaluation "
                               "does not skip images (the benchmark would change): fix or remove the file") from None
    if image.width == 0 or image.height == 0:
        raise EvalDatasetError(f"{path}: the image has no pixels; evaluation does not skip images: fix or remove it")
    return image


@dataclass
class EvalSet:
    benchmark: str  # the name recorded in the store: clip_benchmark's own name where it has one
    classification: Dataset | None = None
    retrieval: Dataset | None = None
    association: WinoGAViL | None = None  # cue-to-images association (DataComp's WinoGAViL)


class _BuiltinSplit(Dataset):
    def __init__(self, split: CaptionedImages, transform: Callable, with_captions: bool):
        self.split, self.transform, self.with_captions = split, transform, with_captions
        self.classes, self.templates = split.classnames, split.templates

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int):
        image = self.transform(Image.fromarray(self.split.images[index]).convert("RGB"))
        return image, ([self.split.captions[index]] if self.with_captions else int(self.split.labels[index]))


class _CaptionCsv(Dataset):
    """``filepath,caption`` rows; several rows of one image are its several captions."""

    def __init__(self, path: Path, transform: Callable):
        frame = pd.read_csv(path, sep=None, engine="python")
        missing = {"filepath", "caption"} - set(frame.columns)
        if missing:
            raise EvalDatasetError(f"{path}: needs columns filepath and caption; missing {sorted(missing)}")
        grouped = frame.groupby("filepath", sort=False)["caption"].apply(list)
        base = path.parent
        self.items = [(base / filepath, captions) for filepath, captions in grouped.items()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, captions = self.items[index]
        return self.transform(read_image(path)), captions


def _imagenet_templates() -> list[str]:
    text = resources.files("clip_benchmark.datasets").joinpath("en_zeroshot_classification_templates.json").read_text()
    return json.loads(text)["imagenet1k"]


def _clip_benchmark_set(name: str, root: str | None, transform: Callable, task: str | None = None) -> EvalSet:
    if root is None:
        raise EvalDatasetError(f"dataset {name!r} is a clip_benchmark dataset and needs --root (where it is staged)")
    if "://" not in root and not Path(root).exists():
        raise EvalDatasetError(f"dataset root {root!r} for {name!r} does not exist")
    task = task or _declared_task(name, root) or get_dataset_default_task(name)
    try:
        dataset = build_dataset(name, root=root, transform=transform, split="test", download=False, task=task)
    except AssertionError as error:  # clip_benchmark asserts what a classification set must have
        raise EvalDatasetError(f"dataset {name!r} at {root!r} cannot be read for {task}: {error} (a retrieval set "
                               "is read with task zeroshot_retrieval)") from None
    except ValueError as error:
        if "Unsupported dataset" in str(error):
            accepted = ", ".join([*BUILTIN_DATASETS, *LOCAL_KINDS])
            raise EvalDatasetError(
                f"unknown dataset {name!r}; accepted: {accepted}, or a clip_benchmark dataset name "
                "(imagenet1k, imagenetv2, imagenet-r, imagenet-a, imagenet_sketch, mscoco_captions, flickr30k, wds/NAME…)"
            ) from None
        raise EvalDatasetError(f"dataset {name!r} at {root!r} could not be opened: {error}") from None
    except (FileNotFoundError, RuntimeError, OSError) as error:
        raise EvalDatasetError(f"dataset {name!r} is not staged under {root!r}: {error}") from None
    retrieval = task == "zeroshot_retrieval" or getattr(dataset, "classes", None) is None
    if not hasattr(dataset, "__len__"):  # a webdataset (wds/…): evaluated as it streams, each rank its share
        dataset = StreamedBenchmark.of(dataset, transform, retrieval, name)
    return EvalSet(name, retrieval=dataset) if retrieval else EvalSet(name, classification=dataset)


def _declared_task(name: str, root: str) -> str | None:
    """The task a ``wds/…`` set declares in its ``dataset_type.txt`` (clip_benchmark's layout: ``retrieval``, as
    ``clipkd export-dataset`` writes it), which clip_benchmark's default for the name does not read."""
    declared = Path(root) / "dataset_type.txt"
    if name.startswith("wds/") and "://" not in root and declared.is_file():
        return {"retrieval": "zeroshot_retrieval"}.get(declared.read_text().strip().lower())
    return None


def benchmark_name(name: str, root: str | None) -> str:
    """The name a set's metrics are stored under: clip_benchmark's own, or the kind and the folder/file name."""
    if name == "imagefolder":
        return f"imagefolder:{Path(root or '').name}"
    if name == "csv":
        return f"csv:{Path(root or '').stem}"
    return name


def load_eval_set(name: str, root: str | None, transform: Callable, task: str | None = None) -> EvalSet:
    if name in BUILTIN_DATASETS:
        split = load_builtin(name, "test")
        return EvalSet(name, _BuiltinSplit(split, transform, False),
                       _BuiltinSplit(retrieval_gallery(split), transform, True))
    if name == "imagefolder":
        from torchvision.datasets import ImageFolder

        if root is None or not Path(root).is_dir():
            raise EvalDatasetError(f"dataset 'imagefolder' needs --root, an existing folder of class folders (got {root!r})")
        folder = ImageFolder(root, transform=transform, loader=read_image)
        folder.templates = _imagenet_templates()
        return EvalSet(benchmark_name(name, root), classification=folder)
    if name == "csv":
        if root is None or not Path(root).is_file():
            raise EvalDatasetError(f"dataset 'csv' needs --root, an existing filepath,caption CSV (got {root!r})")
        return EvalSet(benchmark_name(name, root), retrieval=_CaptionCsv(Path(root), transform))
    if name == "winogavil":
        if root is None or not Path(root).is_dir():
            raise EvalDatasetError(f"dataset 'winogavil' needs --root, a folder of the Hugging Face split's parquet "
                                   f"files (got {root!r})")
        return EvalSet(name, association=WinoGAViL(Path(root), transform))
    return _clip_benchmark_set(name, root, transform, task)


def during_training(dataset, count: int | None, dtype: torch.dtype):
    """A classification or retrieval set as evaluation during training reads it: its first ``count`` items (all when None), a
    stream's in stream order, images in the student's parameter dtype."""
    if isinstance(dataset, StreamedBenchmark):
        return dataset.first(count, dtype)
    return DuringTraining(dataset, count, dtype)


class DuringTraining(Dataset):
    """A set as evaluation during training reads it: its first ``count`` items (a fixed subset; all of them when
    None), images in the student's parameter dtype (float64 in an fp64 run), a classification set's classes and
    templates kept."""

    def __init__(self, dataset: Dataset, count: int | None, dtype: torch.dtype):
        self.dataset, self.count, self.dtype = dataset, min(count or len(dataset), len(dataset)), dtype
        self.classes, self.templates = getattr(dataset, "classes", None), getattr(dataset, "templates", None)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image.to(self.dtype), label


def image_caption_pairs(eval_set: EvalSet) -> Dataset:
    """The set's image-caption pairs: its captions, or for a set without them each image with its class in the
    set's first template (the pair similarity gap needs pairs on every benchmark)."""
    return eval_set.retrieval if eval_set.retrieval is not None else ClassPrompts(eval_set.classification)


class ClassPrompts(Dataset):
    """A classification set's images, each captioned by its class in the set's first template."""

    def __init__(self, dataset: Dataset):
        templates = dataset.templates
        self.dataset = dataset
        self.captions = [(templates[c] if isinstance(templates, dict) else templates)[0].format(c=c)
                         for c in dataset.classes]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, [self.captions[label]]


def retrieval_collate(batch):
    """Images stacked, captions kept as lists: clip_benchmark's layout for retrieval."""
    images, captions = zip(*batch)
    return torch.stack(images), list(captions)
