"""Read CIFAR-10's official python batches straight out of the archive, safely.

The archive is read through :mod:`imgclf.archive`, so a member name that could escape, a tar
cut at a member boundary or a bad gzip CRC is refused, never taken as a shorter archive. The
batches are pickles, and a pickle can run arbitrary code on load. :class:`SafeUnpickler`
admits only the globals that NumPy array reconstruction needs; anything else is refused
with an error naming the file and the global. The official files were written by Python 2,
so their keys load as ``b'data'`` with ``encoding='bytes'`` and as ``'data'`` with
``encoding='latin1'``; both spellings are accepted.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .archive import iter_members, open_archive
from .dataset import RawDataset, Split
from .files import PipelineError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
PIXELS = 3 * 32 * 32

# (module, name) -> the object it may resolve to. Python 2 pickles of NumPy arrays name
# numpy.core.multiarray; NumPy 2 moved it to numpy._core (the old name is a shim).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes in protocol 2 as _codecs.encode(text, 'latin1'): pure data.
    ("_codecs", "encode"): __import__("_codecs").encode,
}


class UnsafePickleError(PipelineError):
    pass


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global '{module}.{name}' from the pickle; "
                "CIFAR-10 batches hold only NumPy arrays, lists and dicts, so this file is "
                "not a genuine CIFAR-10 batch and was not loaded"
            ) from None


def load_pickle(data: bytes, *, source: str, encoding: str = "latin1") -> dict[str, Any]:
    """Unpickle one batch with only the allowed globals; keys come back as ``str``."""
    try:
        obj = SafeUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or malformed pickle data
        raise PipelineError(f"{source}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{source}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _as_text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


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
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise PipelineError(f"{source}: {labels.shape[0]} labels for {data.shape[0]} images")
    # Rows are 1024 red, 1024 green, 1024 blue values: reshaping gives CHW images directly.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images=images, labels=torch.from_numpy(labels))


def read_archive(path: str | Path) -> RawDataset:
    """Read train, test and class names from ``cifar-10-python.tar.gz`` without extracting."""
    path = Path(path)
    wanted = {f"{FOLDER}/{n}" for n in [*TRAIN_BATCHES, TEST_BATCH, META]}
    found: dict[str, bytes] = {}
    with open_archive(path) as raw:
        # Every member's name is checked and the archive read to its proper end, wanted or not:
        # a truncated or hostile archive fails here, naming the member.
        for member in iter_members(raw, path):
            if member.kind == "file" and member.path in wanted:
                found[member.path] = member.read()
    missing = sorted(wanted - found.keys())
    if missing:
        raise PipelineError(
            f"{path}: not a CIFAR-10 python archive: missing {', '.join(missing)}"
            + (" (for a folder of images, set preprocess.dataset=imagefolder)" if not found else "")
        )

    def load(name: str) -> dict[str, Any]:
        key = f"{FOLDER}/{name}"
        return load_pickle(found[key], source=f"{path.name}:{key}")

    meta = load(META)
    if "label_names" not in meta:
        raise PipelineError(f"{path.name}:{FOLDER}/{META}: missing key 'label_names'")
    classes = [_as_text(c) for c in meta["label_names"]]
    parts = [_batch_split(load(n), f"{path.name}:{FOLDER}/{n}") for n in TRAIN_BATCHES]
    train = Split(
        images=torch.cat([p.images for p in parts]), labels=torch.cat([p.labels for p in parts])
    )
    test = _batch_split(load(TEST_BATCH), f"{path.name}:{FOLDER}/{TEST_BATCH}")
    for split_name, split in (("train", train), ("test", test)):
        if len(split.labels) and (split.labels.min() < 0 or split.labels.max() >= len(classes)):
            raise PipelineError(
                f"{path.name}: {split_name} labels must lie in 0..{len(classes) - 1}, "
                f"found {int(split.labels.min())}..{int(split.labels.max())}"
            )
    return RawDataset(train=train, test=test, classes=classes)
