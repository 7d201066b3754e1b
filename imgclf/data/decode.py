"""Decode image bytes into square RGB uint8 pixels: one decoder for training and prediction.

The preprocess stage (through :mod:`imgclf.data.imagefolder`) and ``imgclf-predict`` both decode
here, so a file gives identical pixels in training and in prediction.

* OpenCV decodes JPEG, PNG, BMP, WebP, TIFF, PNM, ... at their own bit depth.
* Grayscale and palette images become RGB; 4-channel images lose their alpha channel (the
  colour values under transparent pixels are kept as stored, as PIL's ``convert("RGB")``
  does; no compositing over a background colour).
* JPEG EXIF orientation is applied, so a portrait phone photo is not learnt sideways.
* Every image is resized to ``image_size`` x ``image_size`` (aspect ratio not kept, like
  ``Resize((s, s))``) by :func:`resize_square`: ``INTER_AREA`` when shrinking (it averages,
  so no aliasing), ``INTER_LINEAR`` when enlarging. Resizing happens at the source bit depth.
  It is the only resize in the project: the CIFAR-10 batches are resized by it too
  (:func:`resize_images`), so the cache and ``imgclf-predict`` give identical pixels.
* 16-bit images are then scaled to 8 bits by ``round(v / 257)``, which maps 0..65535 onto
  0..255 exactly (65535 -> 255, 32896 -> 128): no clipping, no bias. Float images (TIFF)
  are taken as 0..1 and clipped, as a float image has no fixed maximum.

Decompression bombs: an image's width and height are read from its header before it is
decoded (:mod:`imgclf.data.headers`), and an image over ``max_pixels`` is refused with a reason
naming its size and the limit. For what no header reader understands, OpenCV's own
``OPENCV_IO_MAX_IMAGE_PIXELS`` (:data:`BACKSTOP_PIXELS`) is the backstop. A file given by path
(``imgclf-predict``) is refused before it is read when it is over a size limit or is not a
regular file (a device, a FIFO, a link to one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .headers import BACKSTOP_PIXELS, too_many_pixels

# OpenCV refuses images over OPENCV_IO_MAX_IMAGE_PIXELS (its default is 2^30, 3 GB of pixels),
# a value it reads once, when cv2 is imported: so it is set before the import. It is the
# backstop for formats the header check (imgclf.data.headers) cannot read. A value already in
# the environment is kept.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(BACKSTOP_PIXELS))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from ..core.errors import PipelineError  # noqa: E402
from ..core.params import PreprocessParams  # noqa: E402

log = logging.getLogger(__name__)

# The default pixel and file-size limits, preprocess.max_megapixels's and max_member_mb's;
# imgclf-predict uses them too.
MAX_PIXELS = round(PreprocessParams().max_megapixels * 1e6)
MAX_BYTES = round(PreprocessParams().max_member_mb * 1e6)

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


class ImageFileError(PipelineError):
    """An image file that cannot be read or decoded; ``reason`` is the message without the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def resize_square(img: np.ndarray, image_size: int) -> np.ndarray:
    """``img`` (HW or HWC, any depth) resized to ``image_size`` square: INTER_AREA when
    shrinking, INTER_LINEAR when enlarging; returned as is when already that size."""
    h, w = img.shape[:2]
    if (h, w) == (image_size, image_size):
        return img
    shrinking = h > image_size or w > image_size
    return cv2.resize(
        img, (image_size, image_size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """A uint8 ``(N, C, H, W)`` batch resized by :func:`resize_square`, image by image (the
    very call that decoding makes, so pixels match ``imgclf-predict`` exactly)."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    out = np.empty((len(images), images.shape[1], image_size, image_size), images.dtype)
    for i, img in enumerate(images):
        out[i] = resize_square(np.ascontiguousarray(img.transpose(1, 2, 0)), image_size).reshape(
            image_size, image_size, -1
        ).transpose(2, 0, 1)
    return out


def _decode(
    data: bytes, image_size: int, flags: int = DECODE_FLAGS, *, max_pixels: int = MAX_PIXELS, limit_name: str = ""
) -> tuple[np.ndarray | None, str]:
    """``(image, "")`` or ``(None, reason)``; the image is ``image_size`` square, uint8, and
    either gray (2-D) or BGR: the caller converts to RGB, a whole chunk at a time in training.
    ``limit_name`` names ``max_pixels`` in the reason (the param that sets it)."""
    if not data:
        return None, "empty file"
    reason = too_many_pixels(data, max_pixels, limit_name)
    if reason:
        return None, reason
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:  # OpenCV asserts on some malformed input instead of returning None
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):  # the backstop: a header only OpenCV reads
            limit = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "?")
            return None, f"more pixels than OpenCV's limit (OPENCV_IO_MAX_IMAGE_PIXELS = {limit}); not decoded"
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

    img = resize_square(img, image_size)

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


# What a path that is not a regular file is, by the type its stat gives.
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """``a character device``, ``a FIFO (named pipe)``, ...: what a non-regular file is."""
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def read_image_bytes(path: str | os.PathLike, max_bytes: int, limit_name: str = "") -> bytes:
    """The bytes of the regular file at ``path``, refused before reading when it is over
    ``max_bytes`` or not a regular file (a device, a FIFO, a socket, a folder; a link counts as
    what it points at, so a link to ``/dev/zero`` is a character device). Raises ImageFileError."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused by type below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageFileError(path, "no such file") from None
    except OSError as e:
        raise ImageFileError(path, f"cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            link = f", a link to {os.path.realpath(path)}" if path.is_symlink() else ""
            raise ImageFileError(path, f"{file_kind(st.st_mode)}{link}, not a regular file; not read")
    except BaseException:
        os.close(fd)
        raise
    where = f" ({limit_name})" if limit_name else ""
    with open(fd, "rb") as f:
        if st.st_size > max_bytes:
            raise ImageFileError(
                path, f"{st.st_size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:g} MB{where}; not read"
            )
        data = f.read(max_bytes + 1)  # at most one byte past the limit, should the file grow
    if len(data) > max_bytes:
        raise ImageFileError(path, f"more than the limit of {max_bytes / 1e6:g} MB{where}; not read")
    return data


def load_image_file(
    path: str | os.PathLike, image_size: int, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
    limit_names: tuple[str, str] = ("", ""),
) -> np.ndarray:
    """Read and decode one image file exactly as training images are decoded (HWC RGB uint8).

    Raises :class:`ImageFileError` (a PipelineError) for a missing, unreadable or non-image
    file; one that is not a regular file or is over ``max_bytes`` (refused from its stat,
    before reading); or one over ``max_pixels`` (refused from its header, before decoding).
    ``limit_names`` name the two limits in those messages (the options that set them).
    """
    data = read_image_bytes(path, max_bytes, limit_names[0])
    img, reason = _decode(data, image_size, max_pixels=max_pixels, limit_name=limit_names[1])
    if img is None:
        raise ImageFileError(path, reason)
    return _to_rgb(img)


def decode_chunk(
    chunk: list[bytes], image_size: int, *, max_pixels: int = MAX_PIXELS, limit_name: str = ""
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Decode a chunk: the images that decoded, as one RGB CHW uint8 array; their positions in
    the chunk (ascending); and ``(position, reason)`` of the failures.

    A failure costs no image slot: memory follows the images kept, not the chunk's length.
    Images are stored as decoded (BGR, HWC; gray broadcast to three channels) and turned
    into RGB CHW by one numpy copy per chunk: a 32x32 JPEG decodes in ~20 us, so a
    per-image conversion call would cost a noticeable share, GIL hand-offs included.
    """
    decoded: list[np.ndarray] = []
    ok: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, data in enumerate(chunk):
        img, reason = _decode(data, image_size, max_pixels=max_pixels, limit_name=limit_name)
        if img is None:
            bad.append((i, reason))
        else:
            decoded.append(img)
            ok.append(i)
    out = np.empty((len(decoded), image_size, image_size, 3), np.uint8)
    for j, img in enumerate(decoded):
        out[j] = img if img.ndim == 3 else img[:, :, None]
    del decoded
    return np.ascontiguousarray(out[..., ::-1].transpose(0, 3, 1, 2)), np.array(ok, np.int64), bad


@contextlib.contextmanager
def opencv_for_threads() -> Iterator[None]:
    """One OpenCV thread per decode call (the caller's pool supplies the parallelism), and no
    per-file warnings from its decoders (bad files are reported once, by the caller)."""
    threads, level = cv2.getNumThreads(), cv2.utils.logging.getLogLevel()
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
        cv2.utils.logging.setLogLevel(level)
