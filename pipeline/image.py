"""Input image validation: every stage receives a BGR uint8 array or a clear ImageError."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import ImageError
from pipeline.types import ImageArray

#: Largest encoded file accepted (bytes) and largest decoded image (pixels). Camera frames are
#: ~0.3-2 MP; 40 MP admits any phone photo while keeping a decode under ~120 MB.
MAX_FILE_BYTES = 40 * 1024 * 1024
MAX_PIXELS = 40_000_000
MIN_SIDE = 16


def _peek_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, WebP or BMP header without decoding, else None.

    Lets us refuse a decompression bomb (tiny file, enormous dimensions) before OpenCV
    allocates the full image: a 10 KB WebP claiming 16000x16000 otherwise costs ~1.5 GB.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:2] == b"\xff\xd8":
        return _peek_jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            width = int.from_bytes(data[24:27], "little") + 1
            height = int.from_bytes(data[27:30], "little") + 1
            return width, height
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L" and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return None
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    return None


def _peek_jpeg(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        (seg_len,) = struct.unpack(">H", data[i + 2 : i + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(width), int(height)
        i += 2 + seg_len
    return None


def to_bgr(image: np.ndarray) -> ImageArray:
    """Normalise an array to 3-channel BGR uint8, or raise ImageError saying why.

    Grayscale becomes 3 channels; BGRA loses its alpha; 16-bit images are scaled to 8 bits.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected an image array, got {type(image).__name__}")
    if image.size == 0:
        raise ImageError("image is empty (0 pixels)")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {image.dtype}; expected uint8")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"unsupported image shape {image.shape}; expected HxW, HxWx3 or HxWx4")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"image is too small ({width}x{height}); need at least {MIN_SIDE} px")
    if height * width > MAX_PIXELS:
        raise ImageError(f"image is too large ({width}x{height}); at most {MAX_PIXELS} pixels")
    return np.ascontiguousarray(image)


def decode_image(data: bytes) -> ImageArray:
    """Decode encoded image bytes (JPEG, PNG, ...) to BGR uint8, or raise ImageError."""
    if not data:
        raise ImageError("image file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"image file is too large ({len(data)} bytes; at most {MAX_FILE_BYTES})")
    size = _peek_size(data)
    if size is None:
        # Only formats whose size we can read before decoding are accepted (see above).
        raise ImageError(
            "image data is corrupt or in an unsupported format (use JPEG, PNG, WebP or BMP)"
        )
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageError(f"image is too large ({size[0]}x{size[1]}); at most {MAX_PIXELS} pixels")
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies the EXIF orientation (phone photos are often stored sideways with
    # a "rotate 90" tag), turns greyscale into 3 channels and drops alpha; IMREAD_UNCHANGED
    # would skip the rotation and hand the detector a sideways face.
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ImageError("image data is corrupt or in an unsupported format")
    return to_bgr(decoded)


def load_image(path: str | Path) -> ImageArray:
    """Read and decode an image file, or raise ImageError naming the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{p}: image file is too large ({size} bytes)")
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(f"{p}: cannot read image: {exc.strerror or exc}") from exc
    try:
        return decode_image(data)
    except ImageError as exc:
        raise ImageError(f"{p}: {exc}") from exc
