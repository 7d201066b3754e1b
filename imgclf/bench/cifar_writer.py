"""Write CIFAR-10's official python archive: tiny archives of the exact format for the tests,
the benchmark's synthetic data, and tools/make_cifar_archive.py (real images, repacked).

No stage runs this code, so it lives apart from :mod:`imgclf.data.cifar` (which the preprocess
stage declares): editing the writer must not rerun preprocessing. The layout names come from
the reader, so the two cannot disagree.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from ..cache.dataset import Split
from ..data.cifar import FOLDER, META, PIXELS, TEST_BATCH, TRAIN_BATCHES


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
