"""Assemble an image-folder dataset (train/, test/ or val/ class folders) from its archive.

Layout, as torchvision's ``ImageFolder`` with one folder per split::

    [one top-level folder/]train/<class>/<image>     (deeper sub-folders are fine)
    [one top-level folder/]test/<class>/<image>      (or val/ instead of test/)

Classes are the sorted folder names under ``train/``; a class under ``test/`` that ``train/``
lacks is an error. Within a split, images are ordered by (class, path), as ``ImageFolder``
orders them, so the cache does not depend on the order of the archive's members.

Members come from :mod:`imgclf.data.archive`, which checks every name and refuses anything that
could escape the archive. Links that stay inside are followed to the image (in a class
folder) they point at. Hidden files (``.DS_Store``, ``._name`` AppleDouble files),
``__MACOSX/`` and files outside the split folders are ignored. A later member of the same
name replaces an earlier one, as extracting the archive would.

Images are decoded by :mod:`imgclf.data.decode` (the rules are there) on a thread pool (OpenCV
releases the GIL) while the main thread reads members. Bad images fail the stage, naming
every one, or are left out with a warning (``bad_images="skip"``). So are images over a
limit: a member larger than ``limits.member_bytes`` (never read) and an image over
``max_pixels`` (never decoded). An archive over ``limits.total_bytes`` or ``limits.members``
always fails. Memory follows the images kept, whatever else the archive holds: the images
are counted from the headers first and refused if their cache cannot fit (:mod:`.budget`);
one member is read at a time; the encoded images waiting for a decode thread are bounded in
count and in bytes, and an empty or undecodable member costs no image slot (:mod:`.decoder`).
A member still costs its bookkeeping (a name and a row, about 200 bytes), which
``limits.members`` bounds.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from ..cache.dataset import RawDataset, Split
from ..core.errors import PipelineError
from .archive import DEFAULT_LIMITS, Limits, MemberTooLargeError, NotAnArchiveError, iter_members, open_archive
from .budget import CacheBudget
from .decode import MAX_PIXELS, opencv_for_threads
from .decoder import CHUNK, Decoder

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "test", "val")
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
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


@dataclass(slots=True)  # one per member in a class folder: kept small
class _Image:
    path: str
    split: str  # train, test or val
    cls: str
    source: int  # its row among the decoded images; -1 for a link not yet resolved, or not read
    target: str | None = None  # links: the path they point at
    refused: str = ""  # why it was not read (over a limit)


def _resolve_link(image: _Image, latest: dict[str, _Image]) -> _Image | None:
    """The image a link ends at (following links to links), or None."""
    for _ in range(MAX_LINK_HOPS):
        if image.target is None:
            return image
        nxt = latest.get(image.target)
        if nxt is None:
            return None
        image = nxt
    return image if image.target is None else None


def _not_an_archive(archive: Path, e: NotAnArchiveError) -> PipelineError:
    return PipelineError(
        f"{archive}: not a tar, tar.gz or zip archive (preprocess.dataset=imagefolder reads those; "
        f"tarfile says: {e.detail})"
    )


def count_images(archive: Path, limits: Limits = DEFAULT_LIMITS) -> int:
    """How many files and links the archive holds in class folders, from its headers alone: a
    pass that reads no image (a zip's directory; a tar's headers, its data skipped or, when
    compressed, decompressed and dropped). Every name and limit is checked on the way. An empty
    file is not counted: it can never become an image, so it never takes a slot in the cache."""
    n = 0
    try:
        with open_archive(archive) as raw:
            for m in iter_members(raw, archive, limits):
                n += m.kind != "other" and not (m.kind == "file" and m.size == 0) and _layout(m.path) is not None
    except NotAnArchiveError as e:
        raise _not_an_archive(archive, e) from None
    return n


def read_archive(
    archive: str | os.PathLike,
    *,
    image_size: int,
    bad_images: Literal["fail", "skip"] = "fail",
    workers: int = 0,
    limits: Limits = DEFAULT_LIMITS,
    max_pixels: int = MAX_PIXELS,
    budget: CacheBudget | None = None,
) -> RawDataset:
    """Decode every image of an image-folder archive into uint8 ``(N, 3, size, size)`` splits.

    ``bad_images="fail"`` raises a PipelineError naming every file that does not decode or is
    over a limit; ``"skip"`` leaves them out with a warning. ``workers`` decode threads; 0 =
    one per core. ``limits`` bound the archive's members, ``max_pixels`` each image.
    ``budget``: the images are counted first (:func:`count_images`) and refused, before any
    is decoded, if their cache cannot fit in memory or on disk.
    """
    archive = Path(archive)
    if bad_images not in ("fail", "skip"):
        raise PipelineError(f"preprocess.bad_images = {bad_images!r}: must be 'fail' or 'skip'")
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    if budget is not None:
        budget.check(count_images(archive, limits))
    latest: dict[str, _Image] = {}  # path -> image; a later member of the same name replaces it
    tops: set[str] = set()
    ignored = 0
    raw = open_archive(archive)
    size = os.fstat(raw.fileno()).st_size
    with raw, opencv_for_threads(), ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        decoder = Decoder(pool, workers, image_size, max_pixels, budget)
        try:
            with tqdm(total=size, unit="B", unit_scale=True, desc="decode", disable=None) as bar:
                for m in iter_members(raw, archive, limits):  # every member's name is checked, used or not
                    where = _layout(m.path) if m.kind != "other" else None
                    if where is None:
                        ignored += m.kind == "file"
                        continue
                    top, split, cls = where
                    tops.add(top)
                    if m.kind == "link":
                        latest[m.path] = _Image(m.path, split, cls, -1, m.link_target)
                        continue
                    try:
                        data = m.read()
                    except MemberTooLargeError as e:  # refused from its header: never read
                        latest[m.path] = _Image(m.path, split, cls, -1, refused=e.reason)
                        continue
                    latest[m.path] = _Image(m.path, split, cls, decoder.add(data))
                    del data  # the decoder holds it until decoded, and no longer
                    if decoder.rows % CHUNK == 0:
                        bar.update(raw.tell() - bar.n)
                decoder.finish()
                bar.update(size - bar.n)
        except NotAnArchiveError as e:
            decoder.cancel()
            raise _not_an_archive(archive, e) from None
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
        end = _resolve_link(image, latest)
        if end is None:
            failed[image.path] = f"link to {image.target!r}, which is not an image in a class folder"
            continue
        image.source = end.source
        if end.refused:
            failed[image.path] = end.refused
        elif image.source in decoder.failed:
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
                + ("; raise the limit named if those files are genuine" if "over the limit" in listing else "")
            )
        log.warning(
            "%s: skipped %d file(s) that could not be decoded as images (preprocess.bad_images=skip):\n  %s%s",
            archive, len(bad), listing, more,
        )
        images = [image for image in images if image.path not in failed]

    # ImageFolder's order: by class, then by path.
    rows = {split: sorted((index[image.cls], image.path, image.source) for image in images if image.split == split)
            for split in ("train", test_split)}
    for split, found in rows.items():
        if not found:
            raise PipelineError(f"{archive}: no decodable images left in {prefix}{split}/")
    emptied = sorted(set(classes) - {classes[label] for label, _, _ in rows["train"]})
    if emptied:  # only bad_images=skip can empty a class: train/ named it, so it held files
        raise PipelineError(
            f"{archive}: class(es) {', '.join(emptied)} have no training images left once the bad files are "
            f"skipped (preprocess.bad_images=skip). Every class needs training images: fix those files, or "
            f"remove the class folder from {prefix}train/ and {prefix}{test_split}/"
        )
    pixels = decoder.gather([np.fromiter((r[2] for r in found), np.int64, len(found)) for found in rows.values()])
    splits = {
        name: Split(torch.from_numpy(images), torch.from_numpy(np.fromiter((r[0] for r in found), np.int64, len(found))))
        for name, found, images in zip(("train", "test"), rows.values(), pixels)
    }
    log.info(
        "decoded %d train + %d test images of %d classes from %s in %.2f s (%d threads; %d other files ignored)",
        len(splits["train"]), len(splits["test"]), len(classes), archive.name, t_read, workers, ignored,
    )
    return RawDataset(train=splits["train"], test=splits["test"], classes=classes)
