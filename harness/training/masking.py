"""The masked student forward for MFD: keep a random fraction of the image's patches, MAE-style.

For open_clip ViTs the dropped patch tokens are removed before the transformer (no mask token), through the
same hook open_clip uses for its patch dropout. Other towers (timm CNNs) have no tokens to drop, so the dropped
patches are zeroed in pixel space instead. The noise that picks the patches is drawn for the global batch and
sliced per rank, so masks do not depend on how the batch is sharded.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from core.distributed import DistEnv
from harness.models.build import running_statistics_frozen


class _KeepTokens(nn.Module):
    """Replaces open_clip's PatchDropout for one forward: keeps the tokens with the highest given noise."""

    def __init__(self, noise: torch.Tensor, keep: int):
        super().__init__()
        self.noise, self.keep = noise, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_token, patches = x[:, :1], x[:, 1:]
        kept = self.noise.to(x.device).topk(self.keep, dim=1).indices
        patches = torch.gather(patches, 1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls_token, patches], dim=1)


def patch_grid(visual: nn.Module, image_size: int) -> tuple[int, int]:
    grid = getattr(visual, "grid_size", None)
    if grid is not None:
        return tuple(grid)
    patch = 16 if image_size >= 64 else 8
    return image_size // patch, image_size // patch


@contextlib.contextmanager
def _swapped(module: nn.Module, name: str, replacement: nn.Module):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def masked_image_features(model: nn.Module, images: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Raw image embeddings of ``images`` with ``mask_ratio`` of the patches removed; ``noise`` is (B, patches)."""
    keep = max(1, int(round(noise.shape[1] * (1.0 - mask_ratio))))
    visual = model.visual
    if hasattr(visual, "patch_dropout"):
        with _swapped(visual, "patch_dropout", _KeepTokens(noise, keep)):
            return model.encode_image(images)
    rows, cols = patch_grid(visual, images.shape[-1])
    kept = torch.zeros_like(noise, dtype=images.dtype).scatter_(1, noise.topk(keep, dim=1).indices, 1.0)
    pixel_mask = kept.view(-1, 1, rows, cols).to(images.device)
    pixel_mask = nn.functional.interpolate(pixel_mask, size=images.shape[-2:], mode="nearest")
    with running_statistics_frozen(model):  # mostly blank images: running statistics stay the real images'
        return model.encode_image(images * pixel_mask)


def mask_noise(global_batch: int, patches: int, seed: int, step: int, env: DistEnv,
               device: torch.device | None = None) -> torch.Tensor:
    """Per-step patch-selection noise for the global batch, drawn on the run's device (no copy from the host);
    this rank's rows only."""
    device = device or torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    noise = torch.rand(global_batch, patches, generator=generator, device=device)
    block = global_batch // env.world_size
    return noise[env.rank * block : (env.rank + 1) * block]
