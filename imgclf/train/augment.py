"""The training augmentation, batched on the tensor.

Everything here works on whole uint8 batches ``(N, 3, H, W)`` on whatever device holds them;
there is no per-image Python. The tutorial's per-image ``v2`` pipeline
(:func:`imgclf.bench.feeders.tutorial_transform`) is the reference these batched versions are
tested against. Resizing is not here: the cache is resized by OpenCV, as decoding and
``imgclf-predict`` resize (:func:`imgclf.data.decode.resize_square`), so every path gives the same
pixels.
"""

from __future__ import annotations

import torch


class Augmenter:
    """The training augmentation of a whole dataset, one epoch at a time.

    Random ``H x W`` crops of the images reflect-padded by ``crop_padding`` pixels, then a
    horizontal flip. The padding is done once, here; each call then gathers the epoch's
    (permuted) images straight from the padded copy, grouped by crop offset, so an epoch costs
    (2p+1)^2 slice copies and no per-image work (on 2 CPU cores: 1.0 s -> 0.2 s for CIFAR-10's
    50,000 images against the gather-based version this replaced).

    ``flip``: ``True`` mirrors a random half of the images each epoch; ``"alternate"`` mirrors
    a fixed random half (drawn once from ``seed``) in even epochs and the other half in odd
    ones, so every image is seen both ways in every two epochs (the derandomised flip of the
    CIFAR-10 speed records); ``False`` never.
    """

    def __init__(self, images: torch.Tensor, *, crop_padding: int, flip: bool | str, seed: int = 0):
        self.images = images
        self.padding = crop_padding
        self.flip = flip
        p = crop_padding
        # reflect mode works on uint8 tensors of (N, C, H, W) directly.
        self.padded = torch.nn.functional.pad(images, (p, p, p, p), mode="reflect") if p else images
        self.flip_half = None
        if flip == "alternate":
            gen = torch.Generator().manual_seed(seed)
            self.flip_half = (torch.rand(len(images), generator=gen) < 0.5).to(images.device)

    def __call__(self, index: torch.Tensor, generator: torch.Generator, epoch: int = 0) -> torch.Tensor:
        """Augmented copies of ``images[index]``, in the order of ``index``, for ``epoch``."""
        n = len(index)
        _, c, h, w = self.images.shape
        dev = self.images.device
        if self.padding == 0:
            out = self.images[index]
        else:
            k = 2 * self.padding + 1
            offset = torch.randint(0, k * k, (n,), generator=generator, device=dev)
            order = torch.argsort(offset, stable=True)
            counts = torch.bincount(offset, minlength=k * k).tolist()  # one sync per epoch
            out = torch.empty((n, c, h, w), dtype=self.images.dtype, device=dev)
            start = 0
            for o, count in enumerate(counts):
                if count:
                    pos = order[start : start + count]
                    dy, dx = divmod(o, k)
                    out[pos] = self.padded[index[pos], :, dy : dy + h, dx : dx + w]
                    start += count
        if self.flip_half is not None:
            mask = self.flip_half[index] ^ bool(epoch % 2)
        elif self.flip:
            mask = torch.rand(n, generator=generator, device=dev) < 0.5
        else:
            return out
        pos = mask.nonzero().squeeze(1)
        out[pos] = out[pos].flip(-1)
        return out
