"""A model's training view of an image: a crop box drawn like open_clip's, and drawn again exactly. The student and
every teacher cut the same box, each at its own side, interpolation and normalisation (``ViewSpec``; data/inputs.py).

open_clip trains on ``RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3), bicubic)``, then RGB, tensor,
normalise. Here, as in torchvision's ``RandomResizedCrop.get_params``, the box is drawn apart from applying it,
with the same distribution, but from a counter-based generator: a sample's box is a pure function of (seed, sample
id, view), not of a stateful RNG. The same view is therefore drawn again in any process: a loader worker, a resumed
run, or the builder of a teacher-embedding cache that stores the teacher's embedding of that very view (dataset
reinforcement, Vasu et al. 2024). Draws are vectorised over a batch.

Two appliers share the boxes: for images read from files, torchvision's ``resized_crop`` of the decoded uint8
pixels (bicubic, antialiased: PIL's kernel, so on photographs open_clip's transform to within two levels of 255 in
under 1 % of the values), and a batched tensor path (``grid_sample``, bicubic with torch's kernel) for in-memory
sets. The file path deliberately resamples with torch rather than with PIL as open_clip does: torch's uint8 kernel
is about 3.5× faster than PIL's (0.32 against 1.13 ms a 224 px view, AMD EPYC) and gives the same bits on every CPU
capability (AVX-512, AVX2 and the scalar default; ``tests/test_data.py``), so a teacher cache built on one machine
holds the pixels a run sees on another.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from harness.models.names import image_input

if TYPE_CHECKING:
    import torch
    from PIL import Image

ATTEMPTS = 10  # as torchvision: then a centre crop
VIEW_SEED = 20_240_601  # the fixed pool of K views per sample that a cache stores, whatever a run's seed


def mix(*keys) -> np.ndarray:
    """A 64-bit hash (splitmix64's finaliser, chained) of integer keys, element-wise over arrays."""
    arrays = [np.asarray(k) for k in keys]
    state = np.zeros(np.broadcast(*arrays).shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in arrays:
            bits = key.astype(np.uint64) if key.dtype == np.uint64 else key.astype(np.int64).astype(np.uint64)
            z = (state ^ bits) + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            state = z ^ (z >> np.uint64(31))
    return state


def uniforms(key: np.ndarray, count: int) -> np.ndarray:
    """``count`` independent uniforms in [0, 1) per key: shape (len(key), count)."""
    draws = mix(np.asarray(key, dtype=np.uint64)[:, None], np.arange(count, dtype=np.int64)[None, :])
    return (draws >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_boxes(key: np.ndarray, heights, widths, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """(top, left, h, w) per key (for images of the given sizes), distributed as torchvision's
    ``RandomResizedCrop.get_params``: up to ten tries of an area fraction in ``scale`` and a log-uniform aspect
    ratio, else the centre crop clamped to ``ratio``."""
    heights = np.broadcast_to(np.asarray(heights, dtype=np.int64), (len(key),))[:, None]
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), (len(key),))[:, None]
    u = uniforms(key, 4 * ATTEMPTS).reshape(len(key), ATTEMPTS, 4)
    area = heights * widths * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_low + (log_high - log_low) * u[..., 1])
    w = np.round(np.sqrt(area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first = fits.argmax(axis=1)
    rows = np.arange(len(key))
    h, w = h[rows, first], w[rows, first]
    heights, widths = heights[:, 0], widths[:, 0]
    top = np.floor(u[rows, first, 2] * (heights - h + 1)).astype(np.int64)
    left = np.floor(u[rows, first, 3] * (widths - w + 1)).astype(np.int64)
    boxes = np.stack([top, left, h, w], axis=1)
    missed = ~fits.any(axis=1)
    boxes[missed] = centre_boxes(heights[missed], widths[missed], ratio)
    return boxes


def centre_boxes(heights, widths, ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio, centred."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    in_ratio = widths / np.maximum(heights, 1)
    w = np.where(in_ratio > max(ratio), np.round(heights * max(ratio)), widths).astype(np.int64)
    h = np.where(in_ratio < min(ratio), np.round(widths / min(ratio)), heights).astype(np.int64)
    return np.stack([(heights - h) // 2, (widths - w) // 2, h, w], axis=1).reshape(-1, 4)


@dataclass(frozen=True)
class ViewSpec:
    """What turns a crop box into a model's input: its side, interpolation and normalisation (``names.image_input``
    of the model and its pretrained tag). Every model of a run cuts the same box: a view is the box resized to the
    model's square, as open_clip's training crop (``RandomResizedCrop``) whatever the model's evaluation resize mode,
    with the model's interpolation (open_clip's training crop is always bicubic, the default here)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] = (0.9, 1.0)  # open_clip's AugmentationCfg default
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    @classmethod
    def of(cls, model: str, pretrained: str | None = None) -> ViewSpec:
        found = image_input(model, pretrained)
        return cls(found["size"], found["mean"], found["std"], interpolation=found["interpolation"])

    def describe(self) -> dict:
        """The spec as a cache key names it; the interpolation only where it is not bicubic (the keys of caches
        made before it was read stand)."""
        described = asdict(self)
        if self.interpolation == "bicubic":
            del described["interpolation"]
        return described

    # torch and torchvision are imported where pixels are cut: a cache key reads a ViewSpec without them
    def cut(self, pixels: torch.Tensor, box) -> torch.Tensor:
        """open_clip's training transform with the given box (to two levels: the module's docstring says why), on
        an image decoded to uint8 pixels (C, H, W): the bicubic resized crop, as uint8 (C, size, size);
        ``batch.normalize`` does open_clip's to_tensor and normalise where the batch is used."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2.functional import resized_crop

        top, left, h, w = (int(v) for v in box)
        return resized_crop(pixels, top, left, h, w, [self.size, self.size],
                            interpolation=InterpolationMode(self.interpolation), antialias=True)

    def draft(self, image: Image.Image) -> Image.Image:
        """A JPEG decoded at 1/2, 1/4 or 1/8 of its size by the decoder itself (PIL's ``draft``, a DCT scaling)
        where its shorter side keeps at least size / scale[0] pixels: a crop of the smallest area at a square
        aspect then still has ``size`` pixels a side, and the narrowest crops (at the aspect limits) are widened
        by at most 7 %. Other images as they are. An img2dataset 512 px JPEG for a 224 px student decodes at half
        size: a quarter of the pixels to decode and to resample."""
        shorter = min(image.height, image.width)
        factor = self.size / self.scale[0] / shorter
        if factor < 1:
            image.draft("RGB", (math.ceil(image.width * factor), math.ceil(image.height * factor)))
        return image

    def tensor(self, images: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        """The same for a batch of uint8 images (n, H, W) or (n, H, W, C) in one ``grid_sample``: the spec's
        interpolation (bicubic with torch's kernel, a = -0.75, against PIL's -0.5), clamped to the pixel range as
        PIL's is."""
        import torch
        import torch.nn.functional as F

        x = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        x = x.float() / 255
        n, _, height, width = x.shape
        top, left, h, w = (torch.as_tensor(boxes[:, i], dtype=torch.float32) for i in range(4))
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w / width, (2 * left + w) / width - 1
        theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * top + h) / height - 1
        grid = F.affine_grid(theta, [n, 1, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode=self.interpolation, padding_mode="border", align_corners=False).clamp_(0, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class Augmentation:
    """Which view of each sample a run trains on, per epoch.

    - ``none``: the centre view (the evaluation transform's, for square images);
    - ``random``: a fresh box per (run seed, epoch, sample), open_clip's augmentation;
    - ``replay``: one of the sample's K stored views, chosen per (run seed, epoch, sample); view v's box is drawn
      from (VIEW_SEED, sample, v), so every run and every cache builder agrees on it.
    """

    kind: Literal["none", "random", "replay"]
    seed: int = 0
    views: int = 0

    @classmethod
    def of(cls, augment: bool, seed: int, views: int) -> Augmentation:
        if not augment:
            return cls("none")
        return cls("replay", seed, views) if views else cls("random", seed)

    def choose(self, epoch: int, samples: np.ndarray) -> np.ndarray | None:
        """The view index of each sample this epoch (replay), else None."""
        if self.kind != "replay":
            return None
        return (mix(self.seed, epoch, samples) % np.uint64(self.views)).astype(np.int64)

    def boxes(self, epoch: int, samples: np.ndarray, views: np.ndarray | None, heights, widths,
              spec: ViewSpec) -> np.ndarray:
        """The crop box of each sample this epoch, for images of the given sizes (arrays, or one size for all)."""
        if self.kind == "none":  # the centred square: open_clip's evaluation crop, before its resize
            heights, widths = (np.broadcast_to(np.asarray(v), (len(samples),)) for v in (heights, widths))
            return centre_boxes(heights, widths, (1.0, 1.0))
        key = mix(self.seed, epoch, samples) if views is None else mix(VIEW_SEED, samples, views)
        return crop_boxes(key, heights, widths, spec.scale, spec.ratio)
