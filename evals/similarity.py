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


@torch.no_grad()
def feature_similarity(student: RetrievalEmbeddings | None, teacher, projection: nn.Module | None, eval_set: EvalSet,
                       device: torch.device, batch_size: int = 256, workers: int = 0, precision: str = "fp32"
                       ) -> dict[str, float]:
    """Metrics over the set's image-caption pairs (the student's embeddings are those its retrieval evaluation
    computed; the teacher runs in the run's ``precision``, as it did in training); empty when the set has no
    captions."""
    if eval_set.retrieval is None or student is None:
        return {}
    share = RankShare(eval_set.retrieval, batch_size, device, workers, retrieval_collate)  # each rank its pairs
    with evaluating(teacher.model, device), worker_errors_unwrapped():
        embedded = embed_pairs(teacher.model, teacher.tokenizer, share.batches(), device, precision)
    teacher_images, teacher_texts = (share.gather(part).cpu() for part in embedded)
    student_images, student_texts = student.images, student.first_texts
    metrics = {
        "feature_cka_image": linear_cka(student_images, teacher_images),
        "feature_cka_text": linear_cka(student_texts, teacher_texts),
        "pair_similarity_gap": pair_similarity_gap(student_images, student_texts),
        "teacher_pair_similarity_gap": pair_similarity_gap(teacher_images, teacher_texts),
    }
    if projection is not None or student_images.shape[1] == teacher_images.shape[1]:
        project = (lambda x: x) if projection is None else (  # on its own device and dtype: the module is left as is
            lambda x: projection(x.to(next(projection.parameters()))).float().cpu())
        metrics["feature_cosine_image"] = float(F.cosine_similarity(project(student_images), teacher_images).mean())
        metrics["feature_cosine_text"] = float(F.cosine_similarity(project(student_texts), teacher_texts).mean())
    return metrics
