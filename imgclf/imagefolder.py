"""Assemble an image-folder dataset (train/, test/ or val/ class folders) from its archive.

Layout, as torchvision's ``ImageFolder`` with one folder per split::

    [one top-level folder/]train/<class>/<image>     (deeper sub-folders are fine)
    [one top-level folder/]test/<class>/<image>      (or val/ instead of test/)

Classes are the sorted folder names under ``train/``; a class under ``test/`` that ``train/``
lacks is an error. Within a split, images are ordered by (class, path), as ``ImageFolder``
orders them, so the cache does not depend on the order of the archive's members.

Members come from :mod:`imgclf.archive`, which checks every name and refuses anything that
could escape the archive. Links that stay inside are followed to the image (in a class
folder) they point at. Hidden files (``.DS_Store``, ``._name`` AppleDouble files),
``__MACOSX/`` and files outside the split folders are ignored. A later member of the same
name replaces an earlier one, as extracting the archive would.

Images are decoded by :mod:`imgclf.decode` (the rules are there) on a thread pool (OpenCV
releases the GIL) while the main thread reads members. Bad images fail the stage, naming
every one, or are left out with a warning (``bad_images="skip"``).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from .archive import NotAnArchiveError, iter_members, open_archive
from .dataset import RawDataset, Split
from .decode import decode_chunk, opencv_for_threads
from .files import PipelineError

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "test", "val")
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
CHUNK = 256  # images per decode task: large enough to amortise the hand-off, small for balance
MAX_LINK_HOPS = 8
SHOW_BAD = 10  # bad files named in an error or warning


def _layout(path: str) -> tuple[str, str, str] | None:
    """``(top folder, split, class)`` of a file in a class folder, else None (ignored).

    The split folder sits at the root or under one top-level folder; its name is matched
    case-insensitively (``Train/`` works too).
    """
    parts = path.split("/")
    if any(p.startswith(".") or p in IGNORED_NAMES for p in parts):
        return None  # hidden files, macOS resource forks, Windows thumbnails
    if parts[0].lower() in SPLIT_FOLDERS:
        top, rest = "", parts
    elif len(parts) > 1 and parts[1].lower() in SPLIT_FOLDERS:
        top, rest = parts[0], parts[1:]
    else:
        return None
    if len(rest) < 3:  # a file directly in the split folder has no class
        return None
    return top, rest[0].lower(), rest[1]


@dataclass
class _Image:
    path: str
    split: str  # train, test or val
    cls: str
    source: int  # its row among the decoded images; -1 for a link not yet resolved
    target: str | None = None  # links: the path they point at


class _Decoder:
    """Reads members in the calling thread and decodes them in chunks on a thread pool.

    Row ``i`` of the decoded images lives in ``blocks[i // CHUNK]``. At most two chunks per
    thread wait in the queue, which bounds the encoded bytes held in memory.
    """

    def __init__(self, pool: ThreadPoolExecutor, workers: int, image_size: int):
        self.pool, self.workers, self.image_size = pool, workers, image_size
        self.rows = 0
        self.chunk: list[bytes] = []
        self.pending: collections.deque[Future] = collections.deque()
        self.blocks: list[np.ndarray] = []
        self.failed: dict[int, str] = {}  # row -> reason

    def add(self, data: bytes) -> int:
        self.chunk.append(data)
        self.rows += 1
        if len(self.chunk) == CHUNK:
            self._submit()
        return self.rows - 1

    def _submit(self) -> None:
        self.pending.append(self.pool.submit(decode_chunk, self.chunk, self.image_size))
        self.chunk = []
        while len(self.pending) > 2 * self.workers:
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        out, failures = self.pending.popleft().result()
        base = len(self.blocks) * CHUNK
        self.blocks.append(out)
        self.failed.update((base + row, reason) for row, reason in failures)

    def finish(self) -> None:
        if self.chunk:
            self._submit()
        while self.pending:
            self._collect_oldest()

    def cancel(self) -> None:
        for fut in self.pending:
            fut.cancel()

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The decoded images of ``rows``, in that order, as one preallocated array."""
        out = np.empty((len(rows), 3, self.image_size, self.image_size), np.uint8)
        for k, block in enumerate(self.blocks):  # block by block: no second full-size copy
            sel = np.flatnonzero((rows >= k * CHUNK) & (rows < (k + 1) * CHUNK))
            if len(sel):
                out[sel] = block[rows[sel] - k * CHUNK]
        return out


def _resolve_link(image: _Image, latest: dict[str, _Image]) -> int:
    """The decoded row a link ends at (following links to links), or -1."""
    for _ in range(MAX_LINK_HOPS):
        if image.source >= 0 or image.target is None:
            break
        nxt = latest.get(image.target)
        if nxt is None:
            return -1
        image = nxt
    return image.source


def read_archive(
    archive: str | os.PathLike,
    *,
    image_size: int,
    bad_images: Literal["fail", "skip"] = "fail",
    workers: int = 0,
) -> RawDataset:
    """Decode every image of an image-folder archive into uint8 ``(N, 3, size, size)`` splits.

    ``bad_images="fail"`` raises a PipelineError naming every file that does not decode;
    ``"skip"`` leaves them out with a warning. ``workers`` decode threads; 0 = one per core.
    """
    archive = Path(archive)
    if bad_images not in ("fail", "skip"):
        raise PipelineError(f"preprocess.bad_images = {bad_images!r}: must be 'fail' or 'skip'")
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    latest: dict[str, _Image] = {}  # path -> image; a later member of the same name replaces it
    tops: set[str] = set()
    ignored = 0
    raw = open_archive(archive)
    size = os.fstat(raw.fileno()).st_size
    with raw, opencv_for_threads(), ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        decoder = _Decoder(pool, workers, image_size)
        try:
            with tqdm(total=size, unit="B", unit_scale=True, desc="decode", disable=None) as bar:
                for m in iter_members(raw, archive):  # every member's name is checked, used or not
                    where = _layout(m.path) if m.kind != "other" else None
                    if where is None:
                        ignored += m.kind == "file"
                        continue
                    top, split, cls = where
                    tops.add(top)
                    if m.kind == "link":
                        latest[m.path] = _Image(m.path, split, cls, -1, m.link_target)
                        continue
                    latest[m.path] = _Image(m.path, split, cls, decoder.add(m.read()))
                    if decoder.rows % CHUNK == 0:
                        bar.update(raw.tell() - bar.n)
                decoder.finish()
                bar.update(size - bar.n)
        except NotAnArchiveError as e:
            decoder.cancel()
            raise PipelineError(
                f"{archive}: not a tar, tar.gz or zip archive (preprocess.dataset=imagefolder reads those; "
                f"tarfile says: {e.detail})"
            ) from None
        except BaseException:
            decoder.cancel()
            raise
    t_read = time.perf_counter() - t0

    if len(tops) > 1:
        shown = ", ".join(sorted(f"{t}/" if t else "(the archive root)" for t in tops))
        raise PipelineError(
            f"{archive}: split folders under several top-level folders ({shown}); an archive "
            "holds one dataset: train/<class>/... and test/<class>/..., optionally inside one folder"
        )
    prefix = f"{next(iter(tops))}/" if tops and next(iter(tops)) else ""

    failed: dict[str, str] = {}  # path -> reason
    for image in latest.values():
        if image.target is not None:
            image.source = _resolve_link(image, latest)
            if image.source < 0:
                failed[image.path] = f"link to {image.target!r}, which is not an image in a class folder"
        if image.source in decoder.failed:
            failed[image.path] = decoder.failed[image.source]

    present = {image.split for image in latest.values()}
    test_split = "test" if "test" in present else "val"
    if "test" in present and "val" in present:
        log.warning("%s: %stest/ is the test split; the images in %sval/ are not used", archive, prefix, prefix)
    for split, folder in (("train", "train/"), (test_split, "test/ (or val/)")):
        if split not in present:
            top = prefix or "[one-folder/]"
            raise PipelineError(
                f"{archive}: no images in a {folder} folder; expected {top}train/<class>/<image> and "
                f"{top}test/<class>/<image> (val/ may replace test/). "
                f"{ignored} file(s) outside that layout were ignored"
            )
    images = [image for image in latest.values() if image.split in ("train", test_split)]

    classes = sorted({image.cls for image in images if image.split == "train"})
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({image.cls for image in images if image.split == test_split} - index.keys())
    if unknown:
        raise PipelineError(
            f"{archive}: {prefix}{test_split}/ has class folder(s) that {prefix}train/ lacks: "
            f"{', '.join(unknown)} (train/ has: {', '.join(classes)}). Every class needs training images"
        )

    bad = sorted((image.path, failed[image.path]) for image in images if image.path in failed)
    if bad:
        listing = "\n  ".join(f"{path}: {reason}" for path, reason in bad[:SHOW_BAD])
        more = f"\n  ... and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
        if bad_images == "fail":
            raise PipelineError(
                f"{archive}: {len(bad)} file(s) could not be decoded as images:\n  {listing}{more}\n"
                "Fix or remove them, or leave them out with preprocess.bad_images=skip "
                "(`dvc exp run -S preprocess.bad_images=skip`)"
            )
        log.warning(
            "%s: skipped %d file(s) that could not be decoded as images (preprocess.bad_images=skip):\n  %s%s",
            archive, len(bad), listing, more,
        )
        images = [image for image in images if image.path not in failed]

    splits: dict[str, Split] = {}
    for split in ("train", test_split):
        # ImageFolder's order: by class, then by path.
        rows = sorted((index[image.cls], image.path, image.source) for image in images if image.split == split)
        if not rows:
            raise PipelineError(f"{archive}: no decodable images left in {prefix}{split}/")
        pixels = decoder.gather(np.fromiter((r[2] for r in rows), np.int64, len(rows)))
        labels = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        splits["train" if split == "train" else "test"] = Split(torch.from_numpy(pixels), torch.from_numpy(labels))

    counts = np.bincount(splits["train"].labels.numpy(), minlength=len(classes))
    if not counts.all():
        empty = [c for c, n in zip(classes, counts) if n == 0]
        log.warning("%s: class(es) left with no training image: %s", archive, ", ".join(empty))
    log.info(
        "decoded %d train + %d test images of %d classes from %s in %.2f s (%d threads; %d other files ignored)",
        len(splits["train"]), len(splits["test"]), len(classes), archive.name, t_read, workers, ignored,
    )
    return RawDataset(train=splits["train"], test=splits["test"], classes=classes)
