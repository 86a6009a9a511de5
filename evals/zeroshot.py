"""Zero-shot classification and retrieval, computed by clip_benchmark's own metric functions.

numpy 2.4 breaks clip_benchmark 1.6.2's ``accuracy()`` (``float()`` of a 1-element array raises TypeError);
the project pins ``numpy<2.4`` in pyproject.toml for that reason rather than patching the library.
"""
from __future__ import annotations

import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from torch.utils.data import DataLoader

from evals.datasets import EvalSet, retrieval_collate

RECALL_K = (1, 5, 10)


def use_amp(device: torch.device) -> bool:
    """Mixed precision on GPUs only: on the CPU clip_benchmark's amp means bf16, and CPU numbers must be exact."""
    return device.type == "cuda"


def zero_shot_metrics(model, tokenizer, eval_set: EvalSet, device: torch.device, batch_size: int = 256) -> dict:
    model.eval()
    metrics: dict[str, float] = {}
    amp = use_amp(device)
    if eval_set.classification is not None:
        dataset = eval_set.classification
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        result = zeroshot_classification.evaluate(
            model, loader, tokenizer, dataset.classes, dataset.templates, device.type, amp=amp
        )
        metrics.update(result)
    if eval_set.retrieval is not None:
        loader = DataLoader(eval_set.retrieval, batch_size=batch_size, shuffle=False, collate_fn=retrieval_collate)
        metrics.update(
            zeroshot_retrieval.evaluate(model, loader, tokenizer, device.type, amp=amp, recall_k_list=list(RECALL_K))
        )
    return {name: float(value) for name, value in metrics.items()}
