"""Image sizes read from headers, without decoding: the decompression-bomb check.

An image's width and height are read from its header before it is decoded (PNG and JPEG here,
every other format through Pillow's lazy ``Image.open``), and an image over the pixel limit is
refused with a reason naming its size and the limit. A 219 kB PNG can hold 72 megapixels, 216 MB
once decoded. Used by :mod:`imgclf.data.decode`, for training images and ``imgclf-predict`` alike.
"""

from __future__ import annotations

import io
import struct
import warnings

from PIL import Image

# OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS, set by imgclf.data.decode before importing
# cv2) is the backstop for formats no reader here understands: 2 x 89,478,485 is Pillow's own
# hard limit, and preprocess.max_megapixels may not go above it.
BACKSTOP_PIXELS = 178_956_970
# Pillow warns about images over 89 megapixels when it opens them; the limit here is checked
# right after and replaces that warning with an error naming the file.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they hold the size): C0-CF but C4 (DHT), C8 (JPG), CC (DAC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MAX_SEGMENTS = 1024  # real files reach the frame header within a dozen segments


_JPEG_NO_LENGTH = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # markers without a length field
_U16 = struct.Struct(">H")
_U16_PAIR = struct.Struct(">HH")
_U32_PAIR = struct.Struct(">II")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    for _ in range(_JPEG_MAX_SEGMENTS):
        if i + 9 > n or data[i] != 0xFF:  # a frame header needs 9 bytes from its marker
            return None
        marker = data[i + 1]
        if marker in _JPEG_SOF:
            height, width = _U16_PAIR.unpack_from(data, i + 5)
            return width, height
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_NO_LENGTH:
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        else:
            i += 2 + _U16.unpack_from(data, i + 2)[0]
    return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the image's header, without decoding; None if no reader knows it.

    PNG (the IHDR chunk, always first) and JPEG (the first frame header) are read here: they
    are nearly every file, and this takes a microsecond where Pillow's ``Image.open`` takes
    ~40 us holding the GIL. Every other format goes through Pillow, which reads headers only.
    Raises ``PIL.Image.DecompressionBombError`` for an image over Pillow's hard limit.
    """
    if data[:8] == _PNG_MAGIC and data[12:16] == b"IHDR" and len(data) >= 24:
        return _U32_PAIR.unpack_from(data, 16)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError:
        raise
    except Exception:  # not a format Pillow knows, or a header it cannot parse: OpenCV decides
        return None


def too_many_pixels(data: bytes, max_pixels: int, limit_name: str = "") -> str:
    """The reason to refuse ``data`` without decoding it, or "" if its header is within the limit."""
    try:
        size = image_dimensions(data)
        if size is None or size[0] * size[1] <= max_pixels:
            return ""
        what = f"{size[0]} x {size[1]} pixels ({size[0] * size[1] / 1e6:.1f} megapixels)"
    except Image.DecompressionBombError:
        what = f"more than {BACKSTOP_PIXELS / 1e6:.0f} megapixels (Pillow's hard limit)"
    where = f" ({limit_name})" if limit_name else ""
    return f"{what}, over the limit of {max_pixels / 1e6:g} megapixels{where}; not decoded"
