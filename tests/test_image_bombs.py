"""Decompression and CPU bombs: refused by the header peek before OpenCV sees them.

Every bomb here is a few hundred bytes to a few KB built in the test, and the tests that
could cost gigabytes or minutes on a decoder that accepted them make ``cv2.imdecode`` fail
the test instead (``no_decode``): safe on any CI box, even against code without the peek.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import ImageError
from pipeline.image import MAX_PIXELS, decode_image
from pipeline.peek import MAX_SCANS, peek_size

ROOT = Path(__file__).resolve().parents[1]


def _encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok, f"cv2 could not encode {ext}"
    return buf.tobytes()


def _noise(height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _chunk(kind: bytes, body: bytes, length: int | None = None) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return struct.pack(">I", len(body) if length is None else length) + kind + body + crc


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any call to cv2.imdecode fail the test: the input must be refused before it."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        pytest.fail("cv2.imdecode was called on an input that should be refused first")

    monkeypatch.setattr(cv2, "imdecode", refuse)


# --- PNG: every chunk is walked -----------------------------------------------------------------


def png_chunk_bomb(length: int = 0xFFFFFFF0) -> bytes:
    """The reviewer's 105-byte file: a sane 64x64 IHDR, then a chunk claiming ``length``
    bytes. libpng allocated the claimed length: 4.2 GB of server memory per upload."""
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    return head + struct.pack(">I", length) + b"IDAT" + b"\x00" * 64


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0x80000000, 1000])
def test_png_chunk_longer_than_the_file_is_refused(no_decode: None, length: int) -> None:
    data = png_chunk_bomb(length)
    assert len(data) == 105
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(data)


def test_png_must_start_with_ihdr_and_reach_iend(no_decode: None) -> None:
    good = _encode(".png", _noise())
    assert peek_size(good) == (64, 48)
    cut = good[: good.rindex(b"IEND") - 4]  # every chunk intact, IEND missing
    text = _chunk(b"tEXt", b"a\x00b")
    not_first = good[:8] + text + good[8:]  # IHDR must come first
    for data in (cut, not_first):
        with pytest.raises(ImageError, match="corrupt"):
            decode_image(data)


def test_ordinary_pngs_still_decode() -> None:
    from PIL import Image  # another encoder than OpenCV's

    buf = io.BytesIO()
    Image.fromarray(_noise()[:, :, ::-1]).save(buf, "PNG", optimize=True)
    grey = _encode(".png", _noise()[:, :, 0])
    for data in (_encode(".png", _noise()), buf.getvalue(), grey):
        assert decode_image(data).shape == (48, 64, 3)


# --- JPEG: strict markers up to the first scan ----------------------------------------------------


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A valid small baseline JPEG whose SOF0 is patched to claim width x height."""
    data = bytearray(_encode(".jpg", np.zeros((32, 32, 3), np.uint8)))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_hiding_its_frame(width: int = 28_000, height: int = 28_000) -> bytes:
    """After SOI, "FF 00 00 0C" made the old peek jump 12 bytes into an APP1 holding a fake
    16x16 SOF, while libjpeg skips FF 00 as garbage and decodes the real frame (28000x28000:
    7.4 s and 4.5 GB; above 1 GP OpenCV raised cv2.error, an admin 500)."""
    fake_sof = b"\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00"
    app1 = b"\x00" * 6 + fake_sof + b"\x00" * 4
    real = _jpeg_claiming(width, height)
    return b"\xff\xd8\xff\x00\x00\x0c\xff\xe1" + struct.pack(">H", 2 + len(app1)) + app1 + real[2:]


def test_jpeg_stuffed_zero_cannot_hide_the_real_frame(no_decode: None) -> None:
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(jpeg_hiding_its_frame())


@pytest.mark.parametrize(
    "splice",
    [
        b"\x00\x00",  # garbage between SOI and the first marker
        b"\xff\x00",  # a stuffed zero outside entropy-coded data
        b"\xff\xd8",  # a second SOI
        b"\xff\xfe\x00\x01",  # a segment length below 2
        b"\xff\xfe\xff\xff",  # a segment running past the end of the file
    ],
    ids=["garbage", "ff00", "soi", "short-length", "long-length"],
)
def test_jpeg_marker_garbage_is_refused(no_decode: None, splice: bytes) -> None:
    good = _encode(".jpg", _noise())
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(good[:2] + splice + good[2:])


def test_jpeg_with_two_frame_headers_is_refused(no_decode: None) -> None:
    good = _encode(".jpg", _noise())
    i = good.index(b"\xff\xc0")
    sof = good[i : i + 2 + struct.unpack(">H", good[i + 2 : i + 4])[0]]
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(good[:i] + sof + good[i:])


def test_legal_fill_bytes_before_a_marker_are_accepted() -> None:
    # JPEG B.1.1.2: any marker may be preceded by 0xFF fill bytes; libjpeg skips them.
    good = _encode(".jpg", _noise())
    i = good.index(b"\xff\xc0")
    filled = good[:2] + b"\xff\xff" + good[2:i] + b"\xff" * 5 + good[i:]
    assert decode_image(filled).shape == (48, 64, 3)


def test_jpeg_restart_markers_and_progressive_files_still_decode() -> None:
    image = _noise(96, 128)
    for params in (
        [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
        [cv2.IMWRITE_JPEG_RST_INTERVAL, 1],
        [cv2.IMWRITE_JPEG_OPTIMIZE, 1],
        [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411],
    ):
        assert decode_image(_encode(".jpg", image, params)).shape == (96, 128, 3)


# --- JPEG: bounded scans -----------------------------------------------------------------------


def progressive_repeating_last_scan(repeats: int) -> bytes:
    """A progressive JPEG whose last scan (an AC refinement) is repeated ``repeats`` times."""
    good = _encode(".jpg", _noise(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    last = good.rindex(b"\xff\xda")
    assert good.endswith(b"\xff\xd9")
    return good[:last] + good[last:-2] * repeats + b"\xff\xd9"


def test_progressive_scan_bomb_is_refused_before_decoding(no_decode: None) -> None:
    # The reviewer's file repeated one 59-byte scan 20,000 times (1.3 MB): 45 s of a worker.
    data = progressive_repeating_last_scan(MAX_SCANS + 1)
    with pytest.raises(ImageError, match=f"more than {MAX_SCANS} scans"):
        decode_image(data)


def test_progressive_jpeg_within_the_scan_limit_is_decoded() -> None:
    good = _encode(".jpg", _noise(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    scans = good.count(b"\xff\xda")
    assert 1 < scans < MAX_SCANS
    data = progressive_repeating_last_scan(MAX_SCANS - scans + 1)  # exactly MAX_SCANS
    assert decode_image(data).shape == (48, 64, 3)


def test_scan_bomb_cut_off_before_eoi_is_refused(no_decode: None) -> None:
    data = progressive_repeating_last_scan(MAX_SCANS + 1)[:-2]
    with pytest.raises(ImageError, match=f"more than {MAX_SCANS} scans"):
        decode_image(data)


def _motion_photo(megabytes: int = 8) -> bytes:
    """A progressive JPEG followed by random bytes, as a phone's motion photo appends an MP4
    (3-10 MB) after EOI. Random bytes hold FF DA once per 64 KiB: 8 MB hold about 128."""
    good = _encode(".jpg", _noise(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    trailer = np.random.default_rng(0).integers(0, 256, megabytes << 20, dtype=np.uint8)
    return good + trailer.tobytes()


def test_motion_photo_trailer_after_eoi_is_not_counted() -> None:
    data = _motion_photo()
    assert data.count(b"\xff\xda") > MAX_SCANS  # the old count over the whole file refused it
    assert peek_size(data) == (64, 48)
    assert decode_image(data).shape == (48, 64, 3)


def test_scans_after_eoi_are_ignored() -> None:
    # The decoder stops at EOI: scans after it (another image, an Ultra HDR gain map) cost
    # nothing, while the same scans before EOI are refused (the scan bomb above).
    good = _encode(".jpg", _noise(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    last = good.rindex(b"\xff\xda")
    data = good + good[last:-2] * (MAX_SCANS + 1) + b"\xff\xd9"
    assert decode_image(data).shape == (48, 64, 3)


@pytest.mark.parametrize("marker", [b"\xff\xd8", b"\xff\xc0\x00\x0b"], ids=["soi", "sof"])
def test_jpeg_second_soi_or_frame_between_scans_is_refused(no_decode: None, marker: bytes) -> None:
    good = _encode(".jpg", _noise(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    last = good.rindex(b"\xff\xda")
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(good[:last] + marker + b"\x08" * 9 + good[last:])


def test_peek_is_fast_on_large_hostile_files() -> None:
    # bytes.find / count / a regex for fill bytes: no per-byte Python loop.
    good = _encode(".jpg", _noise())
    size = 10 * 1024 * 1024
    files = [
        b"\xff\xd8" + b"\xff" * size,  # fill bytes without end
        good[:-2] + b"\xff\x00" * (size // 2) + b"\xff\xd9",  # long entropy-coded data
        b"\xff\xd8" + b"\xff\xfe\x00\x02" * (size // 4),  # empty comment segments
        good[:-2] + b"\xff\xfe\x00\x02" * (size // 4) + b"\xff\xd9",  # ... after a scan
        _motion_photo(10),  # 10 MB after EOI
    ]
    for data in files:
        started = time.perf_counter()
        with contextlib.suppress(ImageError):
            peek_size(data)
        assert time.perf_counter() - started < 0.5


# --- OpenCV's own limit ----------------------------------------------------------------------


def test_an_opencv_refusal_is_an_image_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def opencv_refuses(*_args: object) -> None:
        raise cv2.error("pixels <= CV_IO_MAX_IMAGE_PIXELS")

    monkeypatch.setattr(cv2, "imdecode", opencv_refuses)
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(_encode(".png", _noise()))


def test_facepay_hands_max_pixels_to_opencv_before_it_loads(tmp_path: Path) -> None:
    # OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS when the library loads; setting it after
    # ``import cv2`` does nothing. The 41 MP grey PNG is ~40 KB; decoding it costs 41 MB.
    big = tmp_path / "big.png"
    big.write_bytes(_encode(".png", np.zeros((6400, 6400), np.uint8)))
    assert MAX_PIXELS < 6400 * 6400
    script = (
        "import sys\n"
        "from stream_server import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "import cv2, numpy as np\n"
        f"buf = np.fromfile({str(big)!r}, np.uint8)\n"
        "try:\n    cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)\nexcept cv2.error:\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, "OpenCV decoded an image above MAX_PIXELS"
