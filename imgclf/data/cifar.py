"""Read CIFAR-10's official python batches straight out of the archive, safely.

The archive is read through :mod:`imgclf.data.archive`, so a member name that could escape, a tar
cut at a member boundary or a bad gzip CRC is refused, never taken as a shorter archive, and
members are bounded by :class:`imgclf.data.archive.Limits`. Each batch is parsed as soon as it is
read, so one raw member at a time is held in memory, and unpickled by
:func:`imgclf.data.safe_pickle.load_pickle`, which runs no code and bounds what it allocates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache.dataset import RawDataset, Split
from ..core.errors import PipelineError
from .archive import DEFAULT_LIMITS, Limits, iter_members, open_archive
from .safe_pickle import load_pickle

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
PIXELS = 3 * 32 * 32


def _class_names(meta: dict[str, Any], source: str) -> list[str]:
    if "label_names" not in meta:
        raise PipelineError(f"{source}: missing key 'label_names'")
    names = meta["label_names"]
    try:
        if not isinstance(names, list) or not all(isinstance(c, (str, bytes)) for c in names):
            raise TypeError
        return [c.decode("utf-8") if isinstance(c, bytes) else c for c in names]
    except (TypeError, UnicodeDecodeError):
        raise PipelineError(f"{source}: 'label_names' must be a list of class names (UTF-8 text)") from None


def _batch_split(batch: dict[str, Any], source: str) -> Split:
    try:
        data, labels = batch["data"], batch["labels"]
    except KeyError as e:
        raise PipelineError(f"{source}: missing key {e.args[0]!r} (keys: {sorted(batch)})") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise PipelineError(
            f"{source}: 'data' must be uint8 of shape (N, {PIXELS}), got {data.dtype} {data.shape}"
        )
    try:
        if not (isinstance(labels, list) and all(type(v) is int for v in labels)) and not (
            isinstance(labels, np.ndarray) and labels.dtype.kind in "iu"
        ):
            raise TypeError
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, OverflowError):
        raise PipelineError(f"{source}: 'labels' must be a list or array of integers (int64)") from None
    if labels.shape != (data.shape[0],):
        raise PipelineError(f"{source}: {len(labels)} labels for {data.shape[0]} images")
    # Rows are 1024 red, 1024 green, 1024 blue values: reshaping gives CHW images directly.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images=images, labels=torch.from_numpy(labels))


def read_archive(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> RawDataset:
    """Read train, test and class names from ``cifar-10-python.tar.gz`` without extracting."""
    path = Path(path)
    wanted = {f"{FOLDER}/{n}" for n in [*TRAIN_BATCHES, TEST_BATCH, META]}
    found: dict[str, Split | list[str]] = {}  # parsed as read: one raw member in memory at a time
    with open_archive(path) as raw:
        # Every member's name is checked and the archive read to its proper end, wanted or not:
        # a truncated or hostile archive fails here, naming the member.
        for member in iter_members(raw, path, limits):
            if member.kind == "file" and member.path in wanted:
                source = f"{path.name}:{member.path}"
                batch = load_pickle(member.read(), source=source)
                if member.path == f"{FOLDER}/{META}":
                    found[member.path] = _class_names(batch, source)
                else:
                    found[member.path] = _batch_split(batch, source)
                del batch
    missing = sorted(wanted - found.keys())
    if missing:
        raise PipelineError(
            f"{path}: not a CIFAR-10 python archive: missing {', '.join(missing)}"
            + (" (for a folder of images, set preprocess.dataset=imagefolder)" if not found else "")
        )

    classes: list[str] = found[f"{FOLDER}/{META}"]  # type: ignore[assignment]
    parts: list[Split] = [found[f"{FOLDER}/{n}"] for n in TRAIN_BATCHES]  # type: ignore[misc]
    train = Split(
        images=torch.cat([p.images for p in parts]), labels=torch.cat([p.labels for p in parts])
    )
    test: Split = found[f"{FOLDER}/{TEST_BATCH}"]  # type: ignore[assignment]
    for split_name, split in (("train", train), ("test", test)):
        if len(split.labels) and (split.labels.min() < 0 or split.labels.max() >= len(classes)):
            raise PipelineError(
                f"{path.name}: {split_name} labels must lie in 0..{len(classes) - 1}, "
                f"found {int(split.labels.min())}..{int(split.labels.max())}"
            )
    return RawDataset(train=train, test=test, classes=classes)
