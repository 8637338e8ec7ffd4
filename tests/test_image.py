"""Input image validation: bad bytes and arrays give ImageError, odd images still work."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.analyzer import FaceAnalyzer
from pipeline.errors import FacePayError, ImageError
from pipeline.image import MAX_PIXELS, MIN_SIDE, decode_image, load_image, to_bgr
from pipeline.types import ImageArray

Photo = Callable[[str], ImageArray]


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok, f"cv2 could not encode {ext}"
    return buf.tobytes()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR is patched to claim width x height."""
    data = bytearray(_encode(".png", np.zeros((32, 32, 3), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A valid tiny baseline JPEG whose SOF0 segment is patched to claim width x height."""
    data = bytearray(_encode(".jpg", np.zeros((32, 32, 3), np.uint8)))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any call to cv2.imdecode fail the test: the input must be refused before it."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        pytest.fail("cv2.imdecode was called on an input that should be refused first")

    monkeypatch.setattr(cv2, "imdecode", refuse)


# --- encoded bytes ---------------------------------------------------------------------------


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_image_error_is_a_facepay_error_with_a_code() -> None:
    with pytest.raises(FacePayError) as info:
        decode_image(b"")
    assert info.value.code == "bad_image"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_refused(seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(data)


@pytest.mark.parametrize("keep", [2, 20, 200, 1000, 5000])
def test_truncated_jpeg_is_refused(data_dir: Path, keep: int) -> None:
    data = (data_dir / "faces/obama/obama.jpg").read_bytes()
    with pytest.raises(ImageError):
        decode_image(data[:keep])


def test_jpeg_magic_with_garbage_is_refused() -> None:
    # A JPEG start marker followed by junk must not trip the header peek (no struct.error).
    for tail in (b"", b"\xff", b"\xff\xc0", b"\xff\xc0\x00", b"\xff\xff\xff\xff" * 8):
        with pytest.raises(ImageError):
            decode_image(b"\xff\xd8" + tail)


def test_png_magic_with_garbage_is_refused() -> None:
    with pytest.raises(ImageError):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)


def test_png_bomb_is_refused_before_decoding(no_decode: None) -> None:
    data = _png_claiming(100_000, 100_000)
    assert len(data) < 1000
    with pytest.raises(ImageError, match="too large"):
        decode_image(data)


def test_jpeg_bomb_is_refused_before_decoding(no_decode: None) -> None:
    data = _jpeg_claiming(65_000, 65_000)
    with pytest.raises(ImageError, match="too large"):
        decode_image(data)


def test_header_just_within_limits_is_decoded() -> None:
    # The peeked size only refuses; a sane header goes on to the real decode.
    image = decode_image(_encode(".png", np.full((40, 50, 3), 7, np.uint8)))
    assert image.shape == (40, 50, 3)
    assert image.dtype == np.uint8


def test_oversized_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.image as image_module

    monkeypatch.setattr(image_module, "MAX_FILE_BYTES", 1000)
    data = (b"\x00" * 2000) + b"x"
    with pytest.raises(ImageError, match="too large"):
        decode_image(data)
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value)


# --- files -----------------------------------------------------------------------------------


def test_grayscale_png_file_decodes_to_bgr(tmp_path: Path) -> None:
    gray = np.tile(np.arange(64, dtype=np.uint8), (48, 1))
    path = tmp_path / "gray.png"
    path.write_bytes(_encode(".png", gray))
    image = load_image(path)
    assert image.shape == (48, 64, 3)
    assert image.dtype == np.uint8
    assert np.array_equal(image[:, :, 0], gray)
    assert np.array_equal(image[:, :, 1], gray)
    assert np.array_equal(image[:, :, 2], gray)


def test_rgba_png_file_decodes_to_bgr(tmp_path: Path) -> None:
    bgra = np.zeros((40, 30, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 128
    path = tmp_path / "rgba.png"
    path.write_bytes(_encode(".png", bgra))
    image = load_image(path)
    assert image.shape == (40, 30, 3)
    assert image.dtype == np.uint8
    assert tuple(image[0, 0]) == (10, 20, 30)


def test_16bit_png_file_decodes_to_8bit(tmp_path: Path) -> None:
    deep = np.full((24, 24, 3), 0xABCD, np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(_encode(".png", deep))
    image = load_image(path)
    assert image.shape == (24, 24, 3)
    assert image.dtype == np.uint8
    assert int(image[0, 0, 0]) == 0xAB


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "missing.jpg"
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_folder_instead_of_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_corrupt_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ImageError, match="corrupt") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_exif_orientation_is_applied(data_dir: Path) -> None:
    path = data_dir / "spoof/image_T1.jpg"
    stored = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert stored is not None
    assert stored.shape[1] > stored.shape[0], "the file is stored landscape with an EXIF tag"
    image = load_image(path)
    assert image.shape[0] > image.shape[1], f"expected portrait, got {image.shape}"
    assert image.shape[:2] == stored.shape[1::-1]


# --- arrays ----------------------------------------------------------------------------------


def test_oversized_array_is_refused() -> None:
    # A broadcast view: the right shape without allocating 120 MB.
    side = int(np.sqrt(MAX_PIXELS)) + 1
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (side, side, 3))
    with pytest.raises(ImageError, match="too large"):
        to_bgr(huge)


def test_16bit_array_becomes_8bit_bgr() -> None:
    deep = np.full((32, 32), 0x1234, np.uint16)
    image = to_bgr(deep)
    assert image.shape == (32, 32, 3)
    assert image.dtype == np.uint8
    assert int(image.max()) == 0x12 and int(image.min()) == 0x12
    assert to_bgr(np.full((20, 20, 3), 65535, np.uint16)).min() == 255


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.bool_])
def test_non_uint8_arrays_are_refused(dtype: type) -> None:
    with pytest.raises(ImageError, match="pixel type"):
        to_bgr(np.zeros((32, 32, 3), dtype))


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 1), (MIN_SIDE - 1, 200, 3), (300, 2, 3)])
def test_tiny_images_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageError, match="too small"):
        to_bgr(np.zeros(shape, np.uint8))


def test_tiny_png_is_refused() -> None:
    with pytest.raises(ImageError, match="too small"):
        decode_image(_encode(".png", np.zeros((1, 1, 3), np.uint8)))


@pytest.mark.parametrize("shape", [(32, 32, 2), (32, 32, 5), (4, 32, 32, 3), (32,)])
def test_unsupported_layouts_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageError):
        to_bgr(np.zeros(shape, np.uint8))


def test_non_arrays_are_refused() -> None:
    with pytest.raises(ImageError, match="expected an image array"):
        to_bgr([[0, 0, 0]])  # type: ignore[arg-type]


def test_grayscale_and_bgra_arrays_become_bgr() -> None:
    assert to_bgr(np.zeros((20, 30), np.uint8)).shape == (20, 30, 3)
    assert to_bgr(np.zeros((20, 30, 1), np.uint8)).shape == (20, 30, 3)
    assert to_bgr(np.zeros((20, 30, 4), np.uint8)).shape == (20, 30, 3)


def test_non_contiguous_input_becomes_contiguous() -> None:
    base = np.zeros((64, 64, 3), np.uint8)
    out = to_bgr(base[::2, ::2])
    assert out.flags["C_CONTIGUOUS"]
    assert out.shape == (32, 32, 3)


# --- the analyzer on bad and odd inputs ------------------------------------------------------

BAD_ARRAYS: dict[str, Any] = {
    "empty": np.zeros((0, 0, 3), np.uint8),
    "zero_width": np.zeros((100, 0, 3), np.uint8),
    "one_pixel": np.zeros((1, 1, 3), np.uint8),
    "tiny": np.zeros((8, 8, 3), np.uint8),
    "float": np.zeros((64, 64, 3), np.float32),
    "two_channels": np.zeros((64, 64, 2), np.uint8),
    "four_dims": np.zeros((2, 64, 64, 3), np.uint8),
}


@pytest.mark.parametrize("name", sorted(BAD_ARRAYS))
def test_analyzer_refuses_bad_arrays(analyzer: FaceAnalyzer, name: str) -> None:
    bad = BAD_ARRAYS[name]
    with pytest.raises(ImageError):
        analyzer.analyze(bad)
    with pytest.raises(ImageError):
        analyzer.detect(bad)


def test_analyzer_accepts_grayscale_photo(analyzer: FaceAnalyzer, photo: Photo) -> None:
    gray = cv2.cvtColor(photo("faces/obama/obama.jpg"), cv2.COLOR_BGR2GRAY).astype(np.uint8)
    results = analyzer.analyze(gray, liveness=False)
    assert len(results) == 1


def _face_box_in(analyzer: FaceAnalyzer, image: np.ndarray) -> tuple[float, float, float, float]:
    faces = analyzer.detect(image)
    assert len(faces) == 1, f"expected one face, got {len(faces)}"
    b = faces[0].box
    return b.x1, b.y1, b.x2, b.y2


def test_detection_on_odd_sized_crop_finds_the_face(analyzer: FaceAnalyzer, photo: Photo) -> None:
    full = photo("faces/obama/obama.jpg")
    fx1, fy1, fx2, fy2 = _face_box_in(analyzer, full)
    # A 333 (wide) x 517 (tall) crop around the face: odd, not a multiple of any stride.
    cx = int((fx1 + fx2) / 2)
    x0 = max(0, min(cx - 333 // 2, full.shape[1] - 333))
    crop = np.ascontiguousarray(full[0:517, x0 : x0 + 333])
    assert crop.shape == (517, 333, 3)
    assert x0 <= fx1 and fx2 <= x0 + 333 and fy2 <= 517, "the crop must contain the face"
    cx1, cy1, cx2, cy2 = _face_box_in(analyzer, crop)
    # Same face, shifted by the crop offset (a few pixels of slack for the resize).
    for got, want in zip((cx1, cy1, cx2, cy2), (fx1 - x0, fy1, fx2 - x0, fy2), strict=True):
        assert abs(got - want) < 12, ((cx1, cy1, cx2, cy2), (fx1 - x0, fy1, fx2 - x0, fy2))
    results = analyzer.analyze(crop, liveness=False)
    assert len(results) == 1 and results[0].embedding is not None


@pytest.mark.parametrize(
    ("rel", "rows", "cols"),
    [
        ("faces/group/obama_and_biden.jpg", slice(0, 100), slice(0, 2000)),  # 2000 x 100
        ("faces/biden/biden.jpg", slice(0, 2000), slice(0, 100)),  # 100 x 2000
        ("faces/obama/obama.jpg", slice(0, MIN_SIDE), slice(0, 901)),  # 901 x 16
        ("faces/obama/obama.jpg", slice(3, 20), slice(5, 22)),  # 17 x 17
    ],
)
def test_detection_on_strips_does_not_crash(
    analyzer: FaceAnalyzer,
    photo: Photo,
    rel: str,
    rows: slice,
    cols: slice,
) -> None:
    strip = photo(rel)[rows, cols]
    faces = analyzer.detect(strip)
    assert isinstance(faces, list)
    for face in faces:
        assert 0 <= face.score <= 1
    results = analyzer.analyze(strip)
    assert len(results) == len(faces)


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_header_claiming_a_huge_image_is_refused_before_decoding(
    lossless: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = [cv2.IMWRITE_WEBP_QUALITY, 101 if lossless else 80]
    ok, buf = cv2.imencode(".webp", np.full((32, 32, 3), 90, np.uint8), params)
    assert ok
    data = bytearray(buf.tobytes())
    chunk = bytes(data[12:16])
    if chunk == b"VP8 ":
        data[26:30] = struct.pack("<HH", 16000, 16000)
    elif chunk == b"VP8L":
        bits = (16000 - 1) | ((16000 - 1) << 14)
        data[21:25] = (bits | (int.from_bytes(data[21:25], "little") & ~0xFFFFFFF)).to_bytes(
            4, "little"
        )
    else:
        pytest.fail(f"unexpected WebP chunk {chunk!r}")
    # A genuine small WebP still decodes.
    assert decode_image(buf.tobytes()).shape == (32, 32, 3)
    _forbid_imdecode(monkeypatch)
    with pytest.raises(ImageError, match="too large"):
        decode_image(bytes(data))


def test_format_whose_size_cannot_be_read_first_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ok, buf = cv2.imencode(".tiff", np.full((32, 32, 3), 90, np.uint8))
    assert ok
    _forbid_imdecode(monkeypatch)
    with pytest.raises(ImageError, match="unsupported format"):
        decode_image(buf.tobytes())


def _forbid_imdecode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        pytest.fail("cv2.imdecode was called on an input that should be refused first")

    monkeypatch.setattr(cv2, "imdecode", refuse)
