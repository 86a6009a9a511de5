"""Teacher-student feature similarity, the paper's explanation of why distillation methods differ (§5).

- cosine: mean cos(P s_i, t_i) between the student's embedding (through its learned projection when the dims
  differ) and the teacher's, for images and texts;
- linear CKA between the two embedding matrices (needs no projection);
- the sample-similarity analysis: mean similarity of positive image-text pairs minus that of negative pairs,
  for the student and, as the reference, for the teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import worker_errors_unwrapped
from core.precision import autocast
from evals.datasets import EvalSet, retrieval_collate
from evals.zeroshot import RankShare, RetrievalEmbeddings, evaluating


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019): ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on column-centred matrices."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def pair_similarity_gap(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine of matching pairs minus mean cosine of non-matching pairs."""
    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    n = similarity.shape[0]
    positives = similarity.diagonal().mean()
    negatives = (similarity.sum() - similarity.diagonal().sum()) / (n * n - n)
    return float(positives - negatives)


@torch.no_grad()
def embed_pairs(model: nn.Module, tokenizer, batches, device: torch.device, precision: str = "fp32"):
    """Every image and its first caption (one caption per image keeps pairs aligned), in the run's precision; None
    for no batches (an empty share)."""
    images, texts = [], []
    for batch_images, batch_captions in batches:
        with autocast(device, precision):
            images.append(model.encode_image(batch_images.to(device)).float())
            first_captions = [captions[0] for captions in batch_captions]
            texts.append(model.encode_text(tokenizer(first_captions).to(device)).float())
    return (torch.cat(images), torch.cat(texts)) if images else (None, None)


def pair_embeddings(bundle, pairs, device: torch.device, batch_size: int = 256, workers: int = 0,
                    precision: str = "fp32") -> RetrievalEmbeddings:
    """A model's embeddings of a set of image-caption pairs in the run's ``precision`` (each rank embeds its share;
    every rank gets all), the model left as it was found."""
    share = RankShare(pairs, batch_size, device, workers, retrieval_collate)
    with evaluating(bundle.model, device), worker_errors_unwrapped():
        embedded = embed_pairs(bundle.model, bundle.tokenizer, share.batches(), device, precision)
    return RetrievalEmbeddings(*(share.gather(part).cpu() for part in embedded))


def similarity_metrics(student: RetrievalEmbeddings, teacher: RetrievalEmbeddings | None,
                       projection: nn.Module | None) -> dict[str, float]:
    """The student's pair similarity gap and, given the teacher's embeddings of the same pairs, the teacher's gap,
    linear CKA and (where the dims agree or ``projection`` maps them) cosine."""
    metrics = {"pair_similarity_gap": pair_similarity_gap(student.images, student.first_texts)}
    if teacher is None:
        return metrics
    teacher_images, teacher_texts = teacher.images, teacher.first_texts
    metrics.update({
        "feature_cka_image": linear_cka(student.images, teacher_images),
        "feature_cka_text": linear_cka(student.first_texts, teacher_texts),
        "teacher_pair_similarity_gap": pair_similarity_gap(teacher_images, teacher_texts),
    })
    if projection is not None or student.images.shape[1] == teacher_images.shape[1]:
        project = (lambda x: x) if projection is None else (  # on its own device and dtype: the module is left as is
            lambda x: projection(x.to(next(projection.parameters()))).float().cpu())
        metrics["feature_cosine_image"] = float(F.cosine_similarity(project(student.images), teacher_images).mean())
        metrics["feature_cosine_text"] = float(F.cosine_similarity(project(student.first_texts), teacher_texts).mean())
    return metrics


@torch.no_grad()
def feature_similarity(student: RetrievalEmbeddings | None, teacher, projection: nn.Module | None, eval_set: EvalSet,
                       device: torch.device, batch_size: int = 256, workers: int = 0, precision: str = "fp32"
                       ) -> dict[str, float]:
    """Metrics over the set's image-caption pairs (the student's embeddings are those its retrieval evaluation
    computed; the teacher runs in the run's ``precision``, as it did in training); empty when the set has no
    captions."""
    if eval_set.retrieval is None or student is None:
        return {}
    embedded = pair_embeddings(teacher, eval_set.retrieval, device, batch_size, workers, precision)
    return similarity_metrics(student, embedded, projection)
