"""The in-memory dataset: uint8 image tensors, labels and class names.

The whole dataset lives as one uint8 tensor per split (CIFAR-10's 60,000 images are 184 MB),
so a batch is one indexing operation; normalisation and augmentation run batched on the
device that trains (see :mod:`imgclf.train.augment`).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import PipelineError
from ..core.files import atomic_path, save_torch, write_json

TRAIN_FILE = "train.pt"
TEST_FILE = "test.pt"
META_FILE = "meta.json"


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, 3, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawDataset:
    train: Split
    test: Split
    classes: list[str]


@dataclass
class Cache:
    """What the preprocess stage writes and every later stage reads."""

    train: Split
    test: Split
    classes: list[str]
    mean: list[float]  # per channel, of the train split scaled to [0, 1]
    std: list[float]
    image_size: int


def save_cache(cache: Cache, out_dir: str | os.PathLike, extra_meta: dict | None = None) -> None:
    """Write the cache as a folder, atomically (the folder appears whole or not at all)."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, split in ((TRAIN_FILE, cache.train), (TEST_FILE, cache.test)):
            save_torch({"images": split.images.contiguous(), "labels": split.labels}, tmp / name)
        meta = {
            "classes": cache.classes,
            "mean": cache.mean,
            "std": cache.std,
            "image_size": cache.image_size,
            "num_train": len(cache.train),
            "num_test": len(cache.test),
            **(extra_meta or {}),
        }
        write_json(tmp / META_FILE, meta)


def load_meta(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing; run `dvc repro preprocess` first") from None


def damaged(path: Path, what: str) -> PipelineError:
    return PipelineError(
        f"{path}: damaged, does not load as a cache split ({what}); rerun `dvc repro preprocess` "
        "(or `dvc checkout data/processed` to restore it from DVC's cache)"
    )


def _split_of(d: object, path: Path) -> Split:
    """The split a loaded file holds, checked: uint8 (N, 3, H, W) images, N int64 labels."""
    if not isinstance(d, dict) or not {"images", "labels"} <= d.keys():
        raise damaged(path, "not a mapping of 'images' and 'labels'")
    images, labels = d["images"], d["labels"]
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == (len(images),)):
        raise damaged(path, "not uint8 (N, 3, H, W) images with N int64 labels")
    return Split(images=images, labels=labels)


def load_cache(cache_dir: str | os.PathLike, splits: tuple[str, ...] = ("train", "test")) -> Cache:
    """Load the cached tensors (memory-mapped: only the pages used are read)."""
    cache_dir = Path(cache_dir)
    meta = load_meta(cache_dir)
    loaded: dict[str, Split] = {}
    for split in ("train", "test"):
        if split not in splits:
            loaded[split] = Split(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
            continue
        path = cache_dir / (TRAIN_FILE if split == "train" else TEST_FILE)
        try:
            d = torch.load(path, weights_only=True, mmap=True)
        except FileNotFoundError:
            raise PipelineError(f"{path}: missing; run `dvc repro preprocess` first") from None
        except Exception as e:  # truncated, overwritten, not a torch file
            if not zipfile.is_zipfile(path):  # torch's own words would speak of mmap or checkpoints
                raise damaged(path, "not a PyTorch file: no zip archive") from None
            said = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
            raise damaged(path, f"{type(e).__name__}: {said}") from None
        loaded[split] = _split_of(d, path)
    return Cache(
        train=loaded["train"],
        test=loaded["test"],
        classes=list(meta["classes"]),
        mean=list(meta["mean"]),
        std=list(meta["std"]),
        image_size=int(meta["image_size"]),
    )


def hold_out(split: Split, fraction: float, seed: int = 0) -> tuple[Split, Split]:
    """``(kept, held_out)``: ``fraction`` of each class's images held out, stratified (each
    class keeps its share in both parts) and deterministic: a fixed seed, not ``train.seed``,
    so every training seed is measured on the same validation images."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    labels = split.labels[order]
    held = [order[labels == c][: int(fraction * int((labels == c).sum()) + 0.5)] for c in labels.unique()]
    held_idx = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.int64)
    keep = torch.ones(len(split), dtype=torch.bool)
    keep[held_idx] = False
    keep_idx = keep.nonzero().squeeze(1)
    return (Split(split.images[keep_idx], split.labels[keep_idx]),
            Split(split.images[held_idx], split.labels[held_idx]))
