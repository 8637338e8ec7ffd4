"""Input image validation: every stage receives a BGR uint8 array or a clear ImageError."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import ImageError
from pipeline.peek import MAX_PIXELS, peek_size
from pipeline.types import ImageArray

__all__ = ["MAX_FILE_BYTES", "MAX_PIXELS", "MIN_SIDE", "decode_image", "load_image", "to_bgr"]

#: Largest encoded file accepted (bytes); the largest decoded image is MAX_PIXELS (40 MP, see
#: pipeline.peek), which ``facepay`` also sets as OpenCV's own limit (stream_server.cli.main).
MAX_FILE_BYTES = 40 * 1024 * 1024
MIN_SIDE = 16


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
    size = peek_size(data)
    if size is None:
        # Only files whose size we can trust before decoding are accepted (pipeline.peek):
        # a tiny file claiming an enormous image otherwise costs gigabytes inside OpenCV.
        raise ImageError(
            "image data is corrupt or in an unsupported format (use JPEG, PNG, WebP or BMP)"
        )
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageError(f"image is too large ({size[0]}x{size[1]}); at most {MAX_PIXELS} pixels")
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies the EXIF orientation (phone photos are often stored sideways with
    # a "rotate 90" tag), turns greyscale into 3 channels and drops alpha; IMREAD_UNCHANGED
    # would skip the rotation and hand the detector a sideways face.
    try:
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        # OpenCV's own limits (OPENCV_IO_MAX_IMAGE_PIXELS, ...) raise instead of returning
        # None: still a refused file, never a 500 or a traceback.
        decoded = None
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
