"""Batched tensor transforms: resizing, normalisation statistics and augmentation.

Everything here works on whole uint8 batches ``(N, 3, H, W)`` on whatever device holds them;
there is no per-image Python. The tutorial's per-image ``v2`` pipeline
(``ToImage -> ToDtype(float32, scale=True) -> Normalize``) is the reference these batched
versions are tested against.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

CHUNK = 4096  # images per step when streaming over a split: bounds the float32 working set


def tutorial_transform(mean: list[float], std: list[float]) -> v2.Compose:
    """The tutorial's transform (§1, §2): image -> float in [0, 1] -> normalised."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch to ``size`` x ``size`` (antialiased bilinear, as v2.Resize does)."""
    if images.shape[-2:] == (size, size):
        return images
    op = v2.Resize((size, size), antialias=True)
    return torch.cat([op(images[i : i + CHUNK]) for i in range(0, len(images), CHUNK)])


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 batch after ``ToDtype(float32, scale=True)``.

    Accumulates in float64 over chunks, so 50,000 images need no 600 MB float copy.
    """
    to_float = v2.ToDtype(torch.float32, scale=True)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in range(0, len(images), CHUNK):
        x = to_float(v2.ToImage()(images[i : i + CHUNK])).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise ValueError("cannot compute normalisation statistics of an empty split")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(-pad, n + pad, device=device).abs()
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random ``H x W`` crops of the batch reflect-padded by ``padding`` pixels.

    Rows and columns are shifted in two passes grouped by offset, so the work is
    2 * (2 * padding + 1) slice copies of the batch, not one gather per pixel.
    """
    if padding == 0:
        return images
    n, c, h, w = images.shape
    dev = images.device
    padded = images[:, :, _reflect_index(h, padding, dev)][:, :, :, _reflect_index(w, padding, dev)]
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    rows = torch.empty(n, c, h, w + 2 * padding, dtype=images.dtype, device=dev)
    for s in range(2 * padding + 1):
        idx = (dy == s).nonzero().squeeze(1)
        rows[idx] = padded[idx, :, s : s + h]
    out = torch.empty_like(images)
    for s in range(2 * padding + 1):
        idx = (dx == s).nonzero().squeeze(1)
        out[idx] = rows[idx, :, :, s : s + w]
    return out


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def augment(images: torch.Tensor, *, crop_padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation of a whole uint8 batch (or a whole epoch) at once."""
    images = random_crop(images, crop_padding, generator)
    if flip:
        images = random_flip(images, generator)
    return images
