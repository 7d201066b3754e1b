"""The preprocess stage's work: archive -> cached uint8 tensors + normalisation statistics."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ..cache.dataset import Cache, RawDataset, Split, save_cache
from ..core.errors import PipelineError
from ..core.paths import PreprocessPaths, find_archive
from ..core.files import atomic_path
from ..core.params import PreprocessParams
from . import cifar
from .archive import Limits
from .budget import CacheBudget
from .decode import resize_images

log = logging.getLogger(__name__)
STATS_CHUNK = 4096  # images per step when streaming over a split: bounds the float32 working set


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 batch after ``ToDtype(float32, scale=True)``.

    Accumulates in float64 over chunks, so 50,000 images need no 600 MB float copy. The
    scaling is torchvision's, op for op (``to(float32).mul_(1 / 255)``), without importing it.
    """
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in range(0, len(images), STATS_CHUNK):
        x = images[i : i + STATS_CHUNK].to(torch.float32).mul_(1.0 / 255).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise ValueError("cannot compute normalisation statistics of an empty split")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def read_dataset(archive: Path, pre: PreprocessParams, budget: CacheBudget | None = None) -> RawDataset:
    """The decoded dataset; ``budget``, when given, refuses a cache that cannot fit before the
    images are decoded (image folders) or resized (CIFAR-10, read at 32 pixels)."""
    limits = Limits.of(pre)
    if pre.dataset == "cifar10":
        raw = cifar.read_archive(archive, limits)
        if budget is not None:
            budget.check(len(raw.train) + len(raw.test))
        return raw
    from . import imagefolder

    return imagefolder.read_archive(
        archive, image_size=pre.image_size, bad_images=pre.bad_images, workers=pre.workers,
        limits=limits, max_pixels=round(pre.max_megapixels * 1e6), budget=budget,
    )


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The uint8 batch at ``size`` x ``size``, by the resize that decoding and imgclf-predict
    use (:func:`imgclf.data.decode.resize_square`), so every path gives the same pixels."""
    return torch.from_numpy(resize_images(images.numpy(), size))


def write_sample_grid(images: torch.Tensor, log_dir: str | os.PathLike) -> None:
    """A grid of training images for TensorBoard (tutorial §3.3), written atomically."""
    from torch.utils.tensorboard import SummaryWriter

    with atomic_path(log_dir, is_dir=True) as tmp:
        writer = SummaryWriter(log_dir=str(tmp))
        # uint8 NCHW is what add_images expects for dataformats="NCHW" (values 0..255).
        writer.add_images("train samples", images, global_step=0, dataformats="NCHW")
        writer.close()


def preprocess(
    archive: str | os.PathLike,
    out_dir: str | os.PathLike,
    pre: PreprocessParams,
    log_dir: str | os.PathLike | None = None,
) -> dict:
    """Decode, resize and cache the dataset; return what was measured."""
    t0 = time.perf_counter()
    raw = read_dataset(Path(archive), pre, CacheBudget.measure(pre.image_size, out_dir))
    t_read = time.perf_counter() - t0
    if len(raw.train) == 0 or len(raw.test) == 0:
        raise PipelineError(
            f"{archive}: the dataset needs images in both splits; found "
            f"{len(raw.train)} train and {len(raw.test)} test images"
        )
    if len(raw.classes) < 2:
        raise PipelineError(
            f"{archive}: one class ({', '.join(map(repr, raw.classes))}): a classifier needs at least two "
            "classes to tell apart, and would score 100% on this data without learning anything"
        )
    train = Split(resize(raw.train.images, pre.image_size), raw.train.labels)
    test = Split(resize(raw.test.images, pre.image_size), raw.test.labels)
    mean, std = channel_stats(train.images)
    cache = Cache(train=train, test=test, classes=raw.classes, mean=mean, std=std, image_size=pre.image_size)
    save_cache(cache, out_dir, extra_meta={"dataset": pre.dataset, "source": Path(archive).name})
    if log_dir is not None:
        write_sample_grid(train.images[: pre.sample_images], log_dir)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(out_dir).iterdir())
    stats = {
        "num_train": len(train),
        "num_test": len(test),
        "classes": len(raw.classes),
        "image_size": pre.image_size,
        "read_seconds": round(t_read, 3),
        "seconds": round(seconds, 3),
        "cache_bytes": size,
        "mean": [round(m, 4) for m in mean],
        "std": [round(s, 4) for s in std],
    }
    log.info(
        "preprocessed %d train + %d test images (%d classes, %dpx) in %.2f s (read %.2f s); "
        "cache %.1f MB; mean %s std %s",
        len(train), len(test), len(raw.classes), pre.image_size, seconds, t_read,
        size / 1e6, stats["mean"], stats["std"],
    )
    return stats


def run(pre: PreprocessParams, paths: PreprocessPaths) -> dict:
    """The preprocess stage: the download stage's archive into the tensor cache."""
    return preprocess(find_archive(paths.raw), paths.cache_dir, pre, log_dir=paths.log_dir)
