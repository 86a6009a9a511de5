"""Zero-shot classification and retrieval, scored by clip_benchmark's own metric functions on embeddings
computed once.

clip_benchmark's ``evaluate`` functions embed everything they need on every call. The loops below feed the same
functions (``zero_shot_classifier``, ``run_classification``, ``accuracy``, ``recall_at_k``) the same batches, so the
numbers are clip_benchmark's (a test compares them with ``clip_benchmark eval``), but a model's class-prompt
classifier is built once per class list and template set (ImageNet, -V2 and -Sketch share one), and the retrieval
embeddings are returned for the feature-similarity pass instead of being computed again.

numpy 2.4 breaks clip_benchmark 1.6.2's ``accuracy()`` (``float()`` of a 1-element array raises TypeError);
the project pins ``numpy<2.4`` in pyproject.toml for that reason rather than patching the library.
"""
from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_classification import accuracy, run_classification, zero_shot_classifier
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader, Subset
from torch.utils.data.dataloader import default_collate

from core.distributed import NothingToGather, gather_rows, my_share
from core.errors import worker_errors_unwrapped
from evals import datacomp
from evals.datasets import EvalSet, retrieval_collate
from evals.errors import EvalDatasetError
from evals.streams import StreamedBenchmark, Tagged

RECALL_K = (1, 5, 10)


def use_amp(device: torch.device) -> bool:
    """Mixed precision on GPUs only: on the CPU clip_benchmark's amp means bf16, and CPU numbers must be exact."""
    return device.type == "cuda"


@contextlib.contextmanager
def buffers_kept(model: torch.nn.Module):
    """``model``'s buffers as they were before, whatever a forward in between wrote to them (an evaluation must
    leave a training run as it found it). Only for passes whose backward, if any, runs inside: a restored buffer
    is a changed input to the autograd graph of a pass that read it."""
    kept = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` in eval mode while it is evaluated, then exactly as it was found: each module's train flag, every
    buffer (BatchNorm's running statistics), and the random streams (the CPU's, this device's, numpy's and
    Python's: a loader draws its workers' seeds). An evaluation during training then changes nothing trained,
    and it measures what a checkpoint of that step would (BatchNorm's running statistics, no dropout)."""
    modes = [(module, module.training) for module in model.modules()]
    python, numpy = random.getstate(), np.random.get_state()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), buffers_kept(model):
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
        random.setstate(python)
        np.random.set_state(numpy)


class RankShare:
    """This rank's items of an evaluation set as batches (``batches``), and every rank's results back in the set's
    order (``gather``). A set with a length is split in contiguous shares; a stream (a ``wds/…`` benchmark) by its
    shards or items (evals/streams.py), its items tagged with their place in the stream and put back in order by
    their tags. A share may be empty (fewer items than ranks): its rank gathers None, taking the others' shapes."""

    def __init__(self, dataset, batch_size: int, device: torch.device, workers: int, collate_fn=None):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device, self._tags, self._order = device, [], None
        if isinstance(dataset, StreamedBenchmark):
            stream = dataset.share(rank, world)
            self.streamed = True
            self.loader = DataLoader(stream, batch_size=batch_size, num_workers=min(workers, stream.readers),
                                     collate_fn=Tagged(collate_fn or default_collate), pin_memory=device.type == "cuda")
        else:
            share = my_share(len(dataset))
            self.streamed = False
            self.loader = eval_loader(Subset(dataset, share) if len(share) < len(dataset) else dataset, batch_size,
                                      device, workers, collate_fn) if len(share) else []

    def batches(self) -> Iterator:
        """This rank's batches (a stream's without their tags, which are kept for ``gather``)."""
        for batch in self.loader:
            if self.streamed:
                batch, tags = batch
                self._tags.append(tags)
            yield batch

    def first(self) -> Iterator | None:
        """The batches, or None when this rank's share is empty (known only once a stream has been read)."""
        batches = self.batches()
        head = next(batches, None)
        return None if head is None else itertools.chain([head], batches)

    def gather(self, rows: torch.Tensor | None) -> torch.Tensor:
        """Every rank's ``rows`` (one per item of its share, in its batches' order; None for an empty share) in the
        set's order, on every rank."""
        gathered = _rows_of_every_rank(rows, self.device)
        order = self.order()
        return gathered if order is None else gathered[order.to(gathered.device)]

    def order(self) -> torch.Tensor | None:
        """Where each item of the set sits among the gathered rows (None: they are in order already)."""
        if self.streamed and self._order is None:
            mine = torch.cat(self._tags) if self._tags else None
            self._order = torch.argsort(_rows_of_every_rank(mine, torch.device("cpu")))
        return self._order


def _rows_of_every_rank(rows: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``gather_rows``, with a benchmark that has no item at all (on any rank) said as such."""
    try:
        return gather_rows(rows, device)
    except NothingToGather:
        raise EvalDatasetError("the benchmark has no items: nothing to evaluate (is its root the staged set?)") from None


@dataclass
class Classifiers:
    """A model's zero-shot classifiers, by (class names, templates): built once, reused by every benchmark."""
    built: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def get(self, model, tokenizer, classes, templates, device: torch.device) -> torch.Tensor:
        """clip_benchmark's classifier (D × classes); under torchrun each rank embeds its share of the classes'
        prompts and all gather the columns (a rank with no class, when there are fewer than ranks, none)."""
        key = (tuple(classes), tuple(templates) if isinstance(templates, list) else repr(templates))
        if key not in self.built:
            mine = [classes[i] for i in my_share(len(classes))]
            columns = zero_shot_classifier(model, tokenizer, mine, templates, device.type, amp=use_amp(device)) if mine else None
            self.built[key] = gather_rows(None if columns is None else columns.T.contiguous(), device).T
        return self.built[key]


@dataclass
class RetrievalEmbeddings:
    """The retrieval set's raw embeddings: every image, and the first caption of each image (aligned pairs)."""
    images: torch.Tensor
    first_texts: torch.Tensor


@dataclass
class BenchmarkResult:
    """A benchmark's metrics; per test item, whether it counted for each item-level metric (a bit per image for
    top-k, per query for recall@k: the mean of the bits is the metric); the retrieval embeddings for the feature-
    similarity pass (None without captions)."""
    metrics: dict[str, float]
    items: dict[str, np.ndarray] = field(default_factory=dict)
    embedded: RetrievalEmbeddings | None = None


def eval_loader(dataset, batch_size: int, device: torch.device, workers: int, collate_fn=None) -> DataLoader:
    """Batches in order, decoded by ``workers`` processes (a 50,000-image benchmark streams through them: only
    embeddings and logits are kept), in pinned memory when they go to a GPU."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=device.type == "cuda")


def classification_metrics(model, tokenizer, dataset, device: torch.device, batch_size: int,
                           classifiers: Classifiers, workers: int = 0) -> BenchmarkResult:
    """clip_benchmark's metrics; under torchrun each rank embeds its share of the images and all gather the
    logits (the numbers are those of one process: each image's logits depend on that image alone)."""
    with evaluating(model, device), worker_errors_unwrapped():
        classifier = classifiers.get(model, tokenizer, dataset.classes, dataset.templates, device)
        share = RankShare(dataset, batch_size, device, workers)
        batches = share.first()
        mine = run_classification(model, classifier, batches, device.type, amp=use_amp(device)) if batches else (None, None)
        logits, target = (share.gather(part) for part in mine)
    ks = (1, 5) if len(dataset.classes) >= 5 else (1,)  # clip_benchmark's rule for top-5
    accuracies = accuracy(logits, target, topk=ks)
    # each item's hit, from the same top-k call as clip_benchmark's accuracy(): their mean is its number exactly
    predicted = logits.topk(max(ks), 1, True, True)[1]
    hits = {f"acc{k}": (predicted[:, :k] == target[:, None]).any(1).numpy() for k in ks}
    metrics = {"acc1": accuracies[0], "acc5": accuracies[1] if len(ks) > 1 else float("nan"),
               "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(axis=1))}
    if isinstance(dataset, StreamedBenchmark):  # a DataComp task with an evaluator of its own adds its metrics
        metrics |= datacomp.scored(dataset.name, dataset.urls, logits, target, hits)
    return BenchmarkResult(metrics, hits)


@torch.no_grad()
def retrieval_metrics(model, tokenizer, dataset, device: torch.device, batch_size: int, workers: int = 0
                      ) -> BenchmarkResult:
    """clip_benchmark's recall@k; under torchrun each rank embeds its share of the images and their captions, and
    all gather them (in the dataset's order, so the numbers are one process's)."""
    with evaluating(model, device), worker_errors_unwrapped():
        share = RankShare(dataset, batch_size, device, workers, retrieval_collate)
        images, texts, captions_per_image = [], [], []
        for batch_images, batch_captions in share.batches():
            captions_per_image.extend(len(captions) for captions in batch_captions)
            with torch.autocast(device.type, enabled=use_amp(device)):
                images.append(model.encode_image(batch_images.to(device)).float())
                tokens = tokenizer([caption for captions in batch_captions for caption in captions]).to(device)
                texts.append(model.encode_text(tokens).float())
        raw_images = share.gather(torch.cat(images) if images else None).cpu()
        counts = gather_rows(torch.tensor(captions_per_image, device=device) if images else None, device).cpu()
        raw_texts = gather_rows(torch.cat(texts) if texts else None, device).cpu()
    order = share.order()
    if order is not None:  # a stream's captions, each image's in a run, put in the images' order
        starts = torch.cumsum(counts, 0) - counts
        counts, starts = counts[order], starts[order]
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        raw_texts = raw_texts[torch.repeat_interleave(starts, counts) + within]
    text_image = torch.repeat_interleave(torch.arange(len(counts)), counts).tolist()  # each caption's image
    first_text = (torch.cumsum(counts, 0) - counts).tolist()  # each image's first caption
    scores = F.normalize(raw_texts, dim=-1) @ F.normalize(raw_images, dim=-1).T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), text_image] = True
    found = {"image_retrieval": queries_found(scores, positive_pairs, batch_size, device),
             "text_retrieval": queries_found(scores.T, positive_pairs.T, batch_size, device)}
    metrics, hits = {}, {}
    for column, k in enumerate(RECALL_K):
        for task, bits in found.items():
            metrics[f"{task}_recall@{k}"] = bits[:, column].float().mean().item()
            hits[f"{task}_recall@{k}"] = bits[:, column].numpy()
    return BenchmarkResult(metrics, hits, RetrievalEmbeddings(raw_images, raw_texts[first_text]))


def queries_found(scores: torch.Tensor, positives: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Whether each query (a row of ``scores``) has a positive among its top k, for each k of RECALL_K: clip_benchmark's
    ``recall_at_k`` > 0, batch by batch. Under torchrun each rank scores its share of the queries and all gather
    the bits: the function is row by row (a top-k per row), so they are one process's, and a retrieval set's
    scoring (one_hot of every query's top k over the gallery) is split over the ranks like its embedding."""
    share = my_share(len(scores))
    mine = [batchify(recall_at_k, scores[share.start:share.stop], positives[share.start:share.stop], batch_size,
                     device.type, k=k) > 0 for k in RECALL_K] if len(share) else None
    return gather_rows(torch.stack(mine, dim=1).to(torch.uint8) if mine else None).bool()


def zero_shot_metrics(model, tokenizer, eval_set: EvalSet, device: torch.device, batch_size: int = 256,
                      classifiers: Classifiers | None = None, workers: int = 0) -> BenchmarkResult:
    """The set's metrics, their per-item hits, and its retrieval embeddings for the feature-similarity pass."""
    return _zero_shot_metrics(model, tokenizer, eval_set, device, batch_size, classifiers, workers)


def _zero_shot_metrics(model, tokenizer, eval_set: EvalSet, device: torch.device, batch_size: int,
                       classifiers: Classifiers | None, workers: int) -> BenchmarkResult:
    parts = []
    if eval_set.classification is not None:
        parts.append(classification_metrics(model, tokenizer, eval_set.classification, device, batch_size,
                                            classifiers or Classifiers(), workers))
    if eval_set.retrieval is not None:
        parts.append(retrieval_metrics(model, tokenizer, eval_set.retrieval, device, batch_size, workers))
    if eval_set.association is not None:  # every rank scores every instance: a few thousand, one cue each
        with evaluating(model, device):
            parts.append(BenchmarkResult(datacomp.winogavil_metrics(model, tokenizer, eval_set.association, device)))
    return BenchmarkResult({name: float(v) for part in parts for name, v in part.metrics.items()},
                           {name: bits for part in parts for name, bits in part.items.items()},
                           next((part.embedded for part in parts if part.embedded is not None), None))
