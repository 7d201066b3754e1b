"""Read CIFAR-10's official python batches straight out of the archive, safely.

The batches are pickles, and a pickle can run arbitrary code on load. :class:`SafeUnpickler`
admits only the globals that NumPy array reconstruction needs; anything else is refused
with an error naming the file and the global. The official files were written by Python 2,
so their keys load as ``b'data'`` with ``encoding='bytes'`` and as ``'data'`` with
``encoding='latin1'``; both spellings are accepted.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    found[name] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise PipelineError(
            f"{path}: truncated or corrupt archive ({type(e).__name__}: {e}); "
            "delete it and rerun the download stage, or check data.url"
        ) from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise PipelineError(
            f"{path}: not a CIFAR-10 python archive: missing {', '.join(missing)}"
            + (" (for a folder of images, set data.dataset=imagefolder)" if not found else "")
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


# --- Writing the official format -------------------------------------------------------
# Used by the tests (tiny archives of the exact official format) and by
# tools/make_cifar_archive.py (the real images, repacked for an end-to-end run).


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us override opcodes
    """Writes protocol-2 pickles as Python 2's cPickle did for the official batches.

    Python 2's ``str`` is a byte string, written with the (SHORT_)BINSTRING opcodes; that is
    why Python 3 needs ``encoding='bytes'`` or ``'latin1'`` to read the official files.
    NumPy's reconstructor is named by its Python 2 module path, ``numpy.core.multiarray``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", None) or "__main__"
        name = name or obj.__qualname__
        if module.startswith("numpy._core") or module.startswith("numpy.core"):
            module = "numpy.core.multiarray" if name == "_reconstruct" else module
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)


def dumps_py2(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_archive(path: str | Path, train: Split, test: Split, classes: list[str]) -> None:
    """Write ``cifar-10-python.tar.gz`` in the official layout from 32x32 uint8 splits."""
    import gzip

    def batch(split: Split, label: str) -> bytes:
        n = len(split)
        return dumps_py2(
            {
                b"batch_label": label.encode(),
                b"labels": [int(v) for v in split.labels],
                b"data": split.images.reshape(n, PIXELS).numpy().astype(np.uint8),
                b"filenames": [f"img_{label.replace(' ', '_')}_{i:05d}.png".encode() for i in range(n)],
            }
        )

    members: list[tuple[str, bytes]] = []
    bounds = np.linspace(0, len(train), len(TRAIN_BATCHES) + 1).astype(int)
    for i, name in enumerate(TRAIN_BATCHES):
        part = Split(train.images[bounds[i] : bounds[i + 1]], train.labels[bounds[i] : bounds[i + 1]])
        members.append((name, batch(part, f"training batch {i + 1} of 5")))
    members.append((TEST_BATCH, batch(test, "testing batch 1 of 1")))
    per_batch = int(bounds[1] - bounds[0])
    meta = {b"label_names": [c.encode() for c in classes], b"num_cases_per_batch": per_batch, b"num_vis": PIXELS}
    members.append((META, dumps_py2(meta)))
    members.append(("readme.html", b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; url=https://www.cs.toronto.edu/~kriz/cifar.html\">\n"))
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, payload in members:
                info = tarfile.TarInfo(f"{FOLDER}/{name}")
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
