"""Decode image bytes into square RGB uint8 pixels: one decoder for training and prediction.

The preprocess stage (through :mod:`imgclf.imagefolder`) and ``imgclf-predict`` both decode
here, so a file gives identical pixels in training and in prediction.

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
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

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


class ImageFileError(PipelineError):
    """An image file that cannot be read or decoded; ``reason`` is the message without the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


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


def decode_chunk(chunk: list[bytes], image_size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
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
