"""What a student costs: GFLOPs per image and per text (``torch.utils.flop_counter``, which counts a
multiply-add as 2 FLOPs, as the paper's tables do) and inference images per second on the evaluation device."""
from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.precision import autocast

THROUGHPUT_REPEATS = 3


def image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return size[0] if isinstance(size, tuple | list) else int(size)


@contextlib.contextmanager
def countable_attention():
    """Attention as plain matrix products, which the counter sees: in eval mode nn.MultiheadAttention takes a
    fused fast path and the CPU runs a fused SDPA kernel, neither of which ``FlopCounterMode`` counts (it missed
    every attention FLOP of the image tower: 2.63 of 3.89 MFLOPs for clipkd-tiny, tested against a hand count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


@torch.no_grad()
def gflops_per_sample(model, tokenizer, device: torch.device) -> tuple[float, float]:
    """FLOPs of one image through the image tower and of one caption (the full context) through the text tower."""
    model.eval()
    image = torch.zeros(1, 3, image_size(model), image_size(model), device=device)
    text = tokenizer(["a photo of a thing"]).to(device)
    counts = []
    for forward in (lambda: model.encode_image(image), lambda: model.encode_text(text)):
        with countable_attention(), FlopCounterMode(display=False) as counter:
            forward()
        counts.append(counter.get_total_flops() / 1e9)
    return counts[0], counts[1]


@torch.no_grad()
def images_per_second(model, device: torch.device, batch: int, precision: str = "fp32") -> float:
    """Image-tower throughput on ``device`` at the evaluation batch size, in the run's ``precision``: the median of
    a few timed batches."""
    model.eval()
    images = torch.randn(batch, 3, image_size(model), image_size(model), device=device)
    with autocast(device, precision):
        model.encode_image(images)  # warm-up: kernels, allocator
    seconds = []
    for _ in range(THROUGHPUT_REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with autocast(device, precision):
            model.encode_image(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)
