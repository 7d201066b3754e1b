"""Read an image-folder dataset straight out of its archive (tar, tar.gz or zip), safely.

Layout, as torchvision's ``ImageFolder`` with one folder per split::

    [one top-level folder/]train/<class>/<image>     (deeper sub-folders are fine)
    [one top-level folder/]test/<class>/<image>      (or val/ instead of test/)

Classes are the sorted folder names under ``train/``; a class under ``test/`` that ``train/``
lacks is an error. Within a split, images are ordered by (class, path), as ``ImageFolder``
orders them, so the cache does not depend on the order of the archive's members.

Nothing is extracted: members are read into memory one after another (a tar.gz is streamed,
never seeked back), and every member name is checked first. An absolute name, a ``..``
component, or a link whose target lies outside the archive is refused, naming the member.
Links that stay inside are followed to the image (in a class folder) they point at. Hidden files (``.DS_Store``,
``._name`` AppleDouble files), ``__MACOSX/`` and files outside the split folders are ignored.

Decoding (:func:`decode_image`, shared with prediction so both see identical pixels):

* OpenCV decodes JPEG, PNG, BMP, WebP, TIFF, PNM, ... at their own bit depth.
* Grayscale and palette images become RGB; 4-channel images lose their alpha channel (the
  colour values under transparent pixels are kept as stored, as PIL's ``convert("RGB")``
  does; no compositing over a background colour).
* JPEG EXIF orientation is applied, so a portrait phone photo is not learnt sideways.
* Every image is resized to ``image_size`` x ``image_size`` (aspect ratio not kept, like
  ``Resize((s, s))``): ``INTER_AREA`` when shrinking (it averages, so no aliasing),
  ``INTER_LINEAR`` when enlarging. Resizing happens at the source bit depth.
* 16-bit images are then scaled to 8 bits by ``round(v / 257)``, which maps 0..65535 onto
  0..255 exactly (65535 -> 255, 32896 -> 128): no clipping, no bias. Float images (TIFF)
  are taken as 0..1 and clipped, as a float image has no fixed maximum.

Decoding runs on a thread pool (OpenCV releases the GIL) while the main thread reads members.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import posixpath
import re
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .dataset import RawDataset, Split
from .files import PipelineError

log = logging.getLogger(__name__)

# IMREAD_ANYDEPTH keeps 16-bit data 16-bit; IMREAD_ANYCOLOR keeps grayscale as one channel,
# expands palettes to BGR and drops alpha. Unlike IMREAD_UNCHANGED it applies the EXIF
# orientation, so a portrait phone photo is not learnt (or predicted) sideways. Not used:
# IMREAD_COLOR_RGB, which in OpenCV 5.0 returns garbage for 16-bit TIFFs.
DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR

# File name endings taken as images when scanning a folder for prediction. Inside an
# archive every file in a class folder is decoded, so a stray non-image is reported.
IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .png .bmp .dib .webp .tif .tiff .pbm .pgm .ppm .pnm .sr .ras".split()
)
SPLIT_FOLDERS = ("train", "test", "val")
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
CHUNK = 256  # images per decode task: large enough to amortise the hand-off, small for balance
MAX_LINK_HOPS = 8
SHOW_BAD = 10  # bad files named in an error or warning


class ImageFileError(PipelineError):
    """An image file that cannot be read or decoded; ``reason`` is the message without the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# --- Decoding ------------------------------------------------------------------------------


def _decode(data: bytes, image_size: int, flags: int = DECODE_FLAGS) -> tuple[np.ndarray | None, str]:
    """``(image, "")`` or ``(None, reason)``; the image is ``image_size`` square, uint8, and
    either gray (2-D) or BGR: the caller converts to RGB, a whole chunk at a time in training."""
    if not data:
        return None, "empty file"
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:  # OpenCV asserts on some malformed input instead of returning None
        return None, f"not a decodable image (OpenCV: {str(e).strip().splitlines()[-1]})"
    if img is None or img.size == 0:
        return None, "not an image OpenCV can decode (corrupt, truncated or another file type)"
    if img.dtype == np.uint8 and img.shape[:2] == (image_size, image_size) and img.shape[2:] in ((), (3,)):
        return img, ""  # the common case: stored at the training size, nothing left to do
    if img.ndim == 3 and img.shape[2] in (1, 2):  # gray, gray + alpha
        img = np.ascontiguousarray(img[:, :, 0])
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)  # drop alpha (see the module docstring)
    elif not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        return None, f"unsupported image shape {img.shape}"

    h, w = img.shape[:2]
    if (h, w) != (image_size, image_size):
        shrinking = h > image_size or w > image_size
        img = cv2.resize(
            img, (image_size, image_size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        )

    if img.dtype == np.uint16:
        # round(v / 257) in integers; v / 257 is never exactly x.5, so this rounds exactly.
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(np.nan_to_num(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        return None, f"unsupported pixel type {img.dtype}"
    return img, ""


def _to_rgb(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB if img.ndim == 2 else cv2.COLOR_BGR2RGB)


def decode_image(data: bytes, image_size: int, name: str = "<bytes>") -> np.ndarray | None:
    """Decode encoded image bytes into an ``image_size`` x ``image_size`` RGB uint8 HWC array.

    Returns None (never raises) for data that is not a decodable image; ``name`` only
    labels the debug log line giving the reason.
    """
    img, reason = _decode(data, image_size)
    if img is None:
        log.debug("%s: %s", name, reason)
        return None
    return _to_rgb(img)


def load_image_file(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Read and decode one image file exactly as training images are decoded (HWC RGB uint8).

    Raises :class:`ImageFileError` (a PipelineError) for a missing, unreadable or non-image file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageFileError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageFileError(path, "is a folder") from None
    except OSError as e:
        raise ImageFileError(path, f"cannot read ({e.strerror or e})") from None
    img, reason = _decode(data, image_size)
    if img is None:
        raise ImageFileError(path, reason)
    return _to_rgb(img)


def _decode_chunk(chunk: list[bytes], image_size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a chunk into one RGB CHW uint8 array; returns it and ``(row, reason)`` of failures.

    Images are stored as decoded (BGR, HWC; gray broadcast to three channels) and turned
    into RGB CHW by one numpy copy per chunk: a 32x32 JPEG decodes in ~20 us, so a
    per-image conversion call would cost a noticeable share, GIL hand-offs included.
    """
    out = np.zeros((len(chunk), image_size, image_size, 3), np.uint8)
    bad: list[tuple[int, str]] = []
    for i, data in enumerate(chunk):
        img, reason = _decode(data, image_size)
        if img is None:
            bad.append((i, reason))
        else:
            out[i] = img if img.ndim == 3 else img[:, :, None]
    return np.ascontiguousarray(out[..., ::-1].transpose(0, 3, 1, 2)), bad


# --- Archive members -------------------------------------------------------------------------


@dataclass
class _Member:
    name: str  # as stored in the archive
    path: str  # normalised and checked: relative, no '..'
    kind: Literal["file", "link", "other"]
    link_target: str  # "link": the target's path from the archive root (checked)
    read: Callable[[], bytes]  # "file": its bytes; valid only until the next member


_DRIVE = re.compile(r"^[A-Za-z]:")
_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError)


def _safe_path(name: str, archive: Path) -> str:
    """The member's normalised path inside the archive; refuses anything that could escape.

    Backslashes count as separators, so a Windows-made ``..\\x`` is caught too.
    """
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise PipelineError(f"{archive}: refusing archive member {name!r}: absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PipelineError(f"{archive}: refusing archive member {name!r}: '..' in its path")
    return "/".join(parts)


def _safe_link(name: str, path: str, target: str, archive: Path, *, symlink: bool) -> str:
    """Where a link points, as a path from the archive root; refuses targets outside it.

    A symlink's target is relative to the link's own folder, a tar hardlink's to the root.
    """
    unified = target.replace("\\", "/")
    kind = "symlink" if symlink else "hardlink"
    if unified.startswith("/") or _DRIVE.match(unified):
        raise PipelineError(f"{archive}: refusing archive member {name!r}: {kind} to absolute path {target!r}")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path) if symlink else "", unified))
    if resolved == ".." or resolved.startswith("../"):
        raise PipelineError(
            f"{archive}: refusing archive member {name!r}: {kind} target {target!r} is outside the archive"
        )
    return resolved


def _corrupt(archive: Path, e: BaseException, member: str | None = None) -> PipelineError:
    where = f" (at member {member!r})" if member else ""
    return PipelineError(
        f"{archive}: truncated or corrupt archive{where}: {type(e).__name__}: {e}. "
        "Fetch or pack it again: delete data/raw and rerun `dvc repro download`"
    )


class _CheckedTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped reading: only a zero block is a proper end of archive.

    ``TarFile.next()`` silently ends the iteration at a missing, short or garbled header
    after the first one, so a tar cut at a member boundary would otherwise read as complete.
    """

    @classmethod
    def fromtarfile(cls, tar):  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            tar._imgclf_bad_end = e  # checked by _tar_members after the loop
            raise


def _tar_members(fileobj, archive: Path, compression: str) -> Iterator[_Member]:
    # "r:gz" reads through GzipFile, which checks the CRC and length at the end of the stream
    # (drained below); tarfile's streaming "r|gz" never checks them. Both read sequentially.
    try:
        tar = tarfile.open(fileobj=fileobj, mode=f"r:{compression}", tarinfo=_CheckedTarInfo)
    except _ARCHIVE_ERRORS as e:
        if compression == "tar" and not _is_ustar(fileobj):
            raise PipelineError(
                f"{archive}: not a tar, tar.gz or zip archive (data.dataset=imagefolder reads those; "
                f"tarfile says: {e})"
            ) from None
        raise _corrupt(archive, e) from None
    current = None
    with tar:
        try:
            for info in tar:
                current = info.name
                path = _safe_path(info.name, archive)
                if info.issym() or info.islnk():
                    target = _safe_link(info.name, path, info.linkname, archive, symlink=info.issym())
                    yield _Member(info.name, path, "link", target, bytes)
                elif info.isfile():
                    yield _Member(info.name, path, "file", "", functools.partial(_read_tar_member, tar, info, archive))
                else:  # folders, devices, fifos: nothing to read, never created
                    yield _Member(info.name, path, "other", "", bytes)
            current = None
            if getattr(tar, "_imgclf_bad_end", None) is not None:
                raise _corrupt(archive, tar._imgclf_bad_end, "after the last complete one")
            for _ in iter(lambda: tar.fileobj.read(1 << 20), b""):  # to the end: checks gzip's CRC
                pass
        except PipelineError:
            raise
        except _ARCHIVE_ERRORS as e:
            raise _corrupt(archive, e, current) from None


def _read_tar_member(tar: tarfile.TarFile, info: tarfile.TarInfo, archive: Path) -> bytes:
    try:
        return tar.extractfile(info).read()  # type: ignore[union-attr]
    except _ARCHIVE_ERRORS as e:  # the data ends early, bad compressed data
        raise _corrupt(archive, e, info.name) from None


def _is_ustar(fileobj) -> bool:
    fileobj.seek(257)
    magic = fileobj.read(5)
    fileobj.seek(0)
    return magic == b"ustar"


def _zip_members(fileobj, archive: Path) -> Iterator[_Member]:
    try:
        zf = zipfile.ZipFile(fileobj)
    except _ARCHIVE_ERRORS as e:
        raise _corrupt(archive, e) from None
    with zf:
        for info in zf.infolist():
            path = _safe_path(info.filename, archive)

            def read(info: zipfile.ZipInfo = info) -> bytes:
                try:
                    return zf.read(info)
                except (RuntimeError, NotImplementedError) as e:  # encrypted, unsupported method
                    raise PipelineError(f"{archive}: cannot read member {info.filename!r}: {e}") from None
                except _ARCHIVE_ERRORS as e:  # bad CRC, bad compressed data
                    raise _corrupt(archive, e, info.filename) from None

            if stat.S_ISLNK(info.external_attr >> 16):  # a Unix symlink: its data is the target
                target = read().decode("utf-8", "surrogateescape")
                target = _safe_link(info.filename, path, target, archive, symlink=True)
                yield _Member(info.filename, path, "link", target, bytes)
            elif info.is_dir():
                yield _Member(info.filename, path, "other", "", bytes)
            else:
                yield _Member(info.filename, path, "file", "", read)


def _members(fileobj, archive: Path) -> Iterator[_Member]:
    """Members of a zip or a (compressed) tar; the format is told by content, not by name."""
    head = fileobj.read(8)
    fileobj.seek(0)
    if head[:2] == b"PK" and head[2:4] in (b"\x03\x04", b"\x05\x06", b"\x07\x08"):
        return _zip_members(fileobj, archive)
    compression = next((c for magic, c in _MAGIC.items() if head.startswith(magic)), "tar")
    return _tar_members(fileobj, archive, compression)


# --- The dataset -----------------------------------------------------------------------------


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


@contextlib.contextmanager
def _opencv_for_threads() -> Iterator[None]:
    """One OpenCV thread per decode call (our pool supplies the parallelism), and no
    per-file warnings from its decoders (bad files are reported once, by us)."""
    threads, level = cv2.getNumThreads(), cv2.utils.logging.getLogLevel()
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
        cv2.utils.logging.setLogLevel(level)


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
        self.pending.append(self.pool.submit(_decode_chunk, self.chunk, self.image_size))
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
        raise PipelineError(f"data.bad_images = {bad_images!r}: must be 'fail' or 'skip'")
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    latest: dict[str, _Image] = {}  # path -> image; a later member of the same name replaces it
    tops: set[str] = set()
    ignored = 0
    try:
        raw = open(archive, "rb")
    except OSError as e:
        raise PipelineError(f"{archive}: cannot open ({e.strerror or e}); run `dvc repro download`") from None
    size = os.fstat(raw.fileno()).st_size
    with raw, _opencv_for_threads(), ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        decoder = _Decoder(pool, workers, image_size)
        try:
            with tqdm(total=size, unit="B", unit_scale=True, desc="decode", disable=None) as bar:
                for m in _members(raw, archive):  # every member's name is checked, used or not
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
                "Fix or remove them, or leave them out with data.bad_images=skip "
                "(`dvc exp run -S data.bad_images=skip`)"
            )
        log.warning(
            "%s: skipped %d file(s) that could not be decoded as images (data.bad_images=skip):\n  %s%s",
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
