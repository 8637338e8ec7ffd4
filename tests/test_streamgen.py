"""Tests for the reproducible test-stream generator (pipeline.streamgen)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.streamgen import (
    StreamSpec,
    generate_frames,
    make_stream,
    plan_frames,
    read_y4m,
    write_video,
    write_y4m,
    y4m_info,
)

REPO = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = {"width": 160, "height": 120}


def _data_dir() -> Path:
    path = Path(os.environ.get("FACEPAY_TEST_DATA", REPO.parent / "shared" / "data"))
    if not (path / "faces").is_dir():
        pytest.fail(
            f"test photos not found at {path}: set FACEPAY_TEST_DATA to the shared data folder "
            "(the one holding faces/ and spoof/)"
        )
    return path


def _load(rel: str) -> np.ndarray:
    path = _data_dir() / rel
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        pytest.fail(f"cannot read test photo {path}")
    return image


def test_test_data_present() -> None:
    """The shared photos must be there: a missing folder fails the run, it never skips."""
    assert (_data_dir() / "faces" / "obama" / "obama.jpg").is_file()


@pytest.fixture(scope="module")
def obama() -> np.ndarray:
    return _load("faces/obama/obama.jpg")


@pytest.fixture(scope="module")
def print_attack() -> np.ndarray:
    return _load("spoof/image_F1.jpg")


def _frames(photo: np.ndarray, **kw: Any) -> list[np.ndarray]:
    return list(generate_frames(photo, StreamSpec(**kw)))


def test_same_seed_gives_identical_frames(obama: np.ndarray) -> None:
    kw = {**SMALL, "frames": 12, "seed": 7, "blur_prob": 0.5}
    a, b = _frames(obama, **kw), _frames(obama, **kw)
    assert len(a) == len(b) == 12
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


def test_different_seed_gives_different_frames(obama: np.ndarray) -> None:
    a = _frames(obama, **SMALL, frames=6, seed=1)
    b = _frames(obama, **SMALL, frames=6, seed=2)
    assert any(x.tobytes() != y.tobytes() for x, y in zip(a, b, strict=True))
    diff = np.mean(
        [np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b, strict=True)]
    )
    assert diff > 2.0


def test_frame_count_shape_and_dtype(print_attack: np.ndarray) -> None:
    frames = _frames(print_attack, width=322, height=240, frames=5)
    assert len(frames) == 5
    for f in frames:
        assert f.shape == (240, 322, 3)
        assert f.dtype == np.uint8
    assert len(_frames(print_attack, **SMALL, fps=10.0, seconds=0.7)) == 7
    assert StreamSpec(fps=30.0, seconds=2.0).n_frames == 60
    assert _frames(print_attack, **SMALL, frames=0) == []


def test_motion_is_smooth_rigid_and_bounded(obama: np.ndarray) -> None:
    spec = StreamSpec(frames=90, motion_px=12.0, rotation_deg=2.0, scale_jitter=0.04, seed=3)
    plans = plan_frames(obama.shape, spec)
    centre = np.array([obama.shape[1] / 2.0, obama.shape[0] / 2.0, 1.0])
    pts = []
    for p in plans:
        assert p.matrix is not None
        m = np.array(p.matrix)
        # A similarity: [[a, b], [-b, a]] (rigid plane, uniform scale).
        assert m[0, 0] == pytest.approx(m[1, 1]) and m[0, 1] == pytest.approx(-m[1, 0])
        assert abs(p.angle_deg) <= 2.0 + 1e-9
        pts.append(m @ centre)
    pts_a = np.array(pts) - [320.0, 240.0]
    assert np.abs(pts_a).max() <= 12.0 + 1e-6
    assert np.ptp(pts_a[:, 0]) > 2.0 or np.ptp(pts_a[:, 1]) > 2.0  # it does move
    assert np.linalg.norm(np.diff(pts_a, axis=0), axis=1).max() < 4.0  # no jumps
    scales = np.array([p.scale for p in plans])
    base = 0.95 * min(640 / obama.shape[1], 480 / obama.shape[0])
    assert np.all(np.abs(scales / base - 1.0) <= 0.04 + 1e-9)


def test_focus_region_sets_face_size(obama: np.ndarray) -> None:
    # A face box (roughly where obama.jpg's face is) fitted to 40% of the frame height.
    face = (330.0, 110.0, 580.0, 430.0)
    spec = StreamSpec(frames=10, fill=0.4, focus=face, scale_jitter=0.0, rotation_deg=0.0)
    for p in plan_frames(obama.shape, spec):
        assert p.matrix is not None
        m = np.array(p.matrix)
        top, bottom = m @ [face[0], face[1], 1.0], m @ [face[2], face[3], 1.0]
        assert bottom[1] - top[1] == pytest.approx(0.4 * 480)
        mid = (top + bottom) / 2.0
        assert np.abs(mid - [320.0, 240.0]).max() <= spec.motion_px + 1e-6


def test_gap_frames_show_only_background(obama: np.ndarray) -> None:
    spec = StreamSpec(**SMALL, frames=12, gap_frames=((3, 6), (10, 11)), seed=5)
    frames = list(generate_frames(obama, spec))
    plans = plan_frames(obama.shape, spec)
    gaps = {3, 4, 5, 10}
    assert [i for i, p in enumerate(plans) if not p.has_photo] == sorted(gaps)
    bg = np.array(spec.background, dtype=float)
    for i, (f, p) in enumerate(zip(frames, plans, strict=True)):
        std = f.reshape(-1, 3).std(axis=0).max()
        if i in gaps:
            assert std < 4.0, f"gap frame {i} has content (std {std:.1f})"
            mean = f.reshape(-1, 3).mean(axis=0)
            assert np.abs(mean - bg * p.gain).max() < 2.0
        else:
            assert std > 25.0, f"frame {i} lacks photo content (std {std:.1f})"


def test_brightness_varies_within_bound(print_attack: np.ndarray) -> None:
    kw = {**SMALL, "frames": 60, "seed": 11, "blur_prob": 0.0, "noise_std": 0.0}
    flat = _frames(print_attack, **kw, brightness_jitter=0.0)
    lit = _frames(print_attack, **kw, brightness_jitter=0.2)
    ratios = np.array([b.mean() / a.mean() for a, b in zip(flat, lit, strict=True)])
    assert ratios.min() >= 0.8 - 0.01 and ratios.max() <= 1.2 + 0.01
    assert np.ptp(ratios) > 0.05  # it does change over the stream
    gains = [p.gain for p in plan_frames(print_attack.shape, StreamSpec(brightness_jitter=0.2))]
    assert min(gains) >= 0.8 and max(gains) <= 1.2
    # Turning brightness jitter on leaves the motion untouched (independent random streams).
    plans_a = plan_frames(print_attack.shape, StreamSpec(brightness_jitter=0.0))
    plans_b = plan_frames(print_attack.shape, StreamSpec(brightness_jitter=0.2))
    assert [p.matrix for p in plans_a] == [p.matrix for p in plans_b]


def test_blur_probability(obama: np.ndarray) -> None:
    plans = plan_frames(obama.shape, StreamSpec(frames=300, blur_prob=0.2, seed=4))
    blurred = [p.blur_sigma for p in plans if p.blur_sigma > 0]
    assert 30 <= len(blurred) <= 90
    assert all(0.8 <= s <= 1.8 for s in blurred)
    assert all(p.blur_sigma == 0 for p in plan_frames(obama.shape, StreamSpec(blur_prob=0.0)))


def test_y4m_round_trip(tmp_path: Path, obama: np.ndarray) -> None:
    frames = _frames(obama, **SMALL, frames=4)
    path = tmp_path / "cam.y4m"
    assert write_y4m(frames, path, 30.0) == 4
    assert path.read_bytes().startswith(b"YUV4MPEG2 W160 H120 F30:1 Ip A1:1 C420jpeg\nFRAME\n")
    assert path.stat().st_size == len(b"YUV4MPEG2 W160 H120 F30:1 Ip A1:1 C420jpeg\n") + 4 * (
        len(b"FRAME\n") + 160 * 120 * 3 // 2
    )
    assert y4m_info(path) == (160, 120, 30.0)
    back = list(read_y4m(path))
    assert len(back) == 4
    for a, b in zip(frames, back, strict=True):
        assert b.shape == a.shape and b.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0


def test_y4m_ntsc_rate(tmp_path: Path, obama: np.ndarray) -> None:
    path = tmp_path / "ntsc.y4m"
    write_y4m(_frames(obama, **SMALL, frames=1), path, 30000 / 1001)
    assert b" F30000:1001 " in path.read_bytes()[:64]


def test_y4m_rejects_odd_size(tmp_path: Path, obama: np.ndarray) -> None:
    frames = _frames(obama, width=161, height=120, frames=2)
    path = tmp_path / "odd.y4m"
    with pytest.raises(ValueError, match="even width and height"):
        write_y4m(frames, path, 30.0)
    assert not path.exists()
    with pytest.raises(ValueError, match="even width and height"):
        make_stream(obama, path, StreamSpec(width=160, height=121, frames=2))
    assert not path.exists()


def test_read_y4m_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.y4m"
    path.write_bytes(b"RIFF....")
    with pytest.raises(ValueError, match="YUV4MPEG2"):
        list(read_y4m(path))
    path.write_bytes(b"YUV4MPEG2 W4 H2 F30:1 C420jpeg\nFRAME\n\x00\x00")
    with pytest.raises(ValueError, match="truncated"):
        list(read_y4m(path))


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_video_file_reads_back(tmp_path: Path, obama: np.ndarray, ext: str) -> None:
    spec = StreamSpec(**SMALL, frames=8, fps=15.0)
    path = tmp_path / f"stream{ext}"
    assert make_stream(obama, path, spec) == 8
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    expected = list(generate_frames(obama, spec))
    read = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        read.append(frame)
    cap.release()
    assert len(read) == 8
    assert read[0].shape == (120, 160, 3)
    # Lossy codecs: only check the content is the same picture.
    assert np.abs(read[0].astype(int) - expected[0].astype(int)).mean() < 12.0


def test_make_stream_y4m(tmp_path: Path, print_attack: np.ndarray) -> None:
    spec = StreamSpec(**SMALL, frames=5, gap_frames=((1, 2),))
    path = tmp_path / "fake_cam.y4m"
    assert make_stream(print_attack, path, spec) == 5
    assert len(list(read_y4m(path))) == 5


def test_unknown_extension_rejected(tmp_path: Path, obama: np.ndarray) -> None:
    frames = _frames(obama, **SMALL, frames=1)
    with pytest.raises(ValueError, match="extension"):
        write_video(frames, tmp_path / "x.mkv", 30.0)
    with pytest.raises(ValueError, match="extension"):
        make_stream(obama, tmp_path / "x.gif", StreamSpec(**SMALL, frames=1))


def test_writers_reject_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"):
        write_y4m([], tmp_path / "e.y4m", 30.0)
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "e.mp4", 30.0)
    mixed = [np.zeros((120, 160, 3), np.uint8), np.zeros((60, 80, 3), np.uint8)]
    with pytest.raises(ValueError, match="all frames"):
        write_y4m(mixed, tmp_path / "m.y4m", 30.0)


@pytest.mark.parametrize(
    "kw",
    [
        {"gap_frames": ((5, 3),)},
        {"width": 1},
        {"fps": 0.0},
        {"brightness_jitter": 1.5},
        {"blur_sigma": (2.0, 1.0)},
        {"focus": (10.0, 10.0, 5.0, 20.0)},
        {"frames": -1},
    ],
)
def test_spec_validation(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StreamSpec(**kw)


def test_accepts_gray_and_list_gaps(obama: np.ndarray) -> None:
    gray = cv2.cvtColor(obama, cv2.COLOR_BGR2GRAY)
    spec = StreamSpec(**SMALL, frames=3, gap_frames=[[0, 1]])  # type: ignore[arg-type]
    assert spec.gap_frames == ((0, 1),)
    frames = list(generate_frames(gray, spec))
    assert len(frames) == 3 and frames[1].shape == (120, 160, 3)
    with pytest.raises(ValueError, match="uint8"):
        list(generate_frames(obama.astype(np.float32), spec))


def test_cover_mode_never_shows_the_background(data_dir: Path) -> None:
    """Camera view: every pixel comes from the photo, even at the motion extremes."""
    photo = cv2.imread(str(data_dir / "spoof" / "image_T1.jpg"))
    assert photo is not None
    spec = StreamSpec(
        frames=40,
        cover=True,
        motion_px=20,
        noise_std=0,
        brightness_jitter=0,
        blur_prob=0,
        background=(255, 0, 255),
    )
    for frame in generate_frames(photo, spec):
        magenta = np.all(frame == (255, 0, 255), axis=2)
        assert not magenta.any()
    # Focus keeps the chosen region (here the upper third) in view.
    h, w = photo.shape[:2]
    top = StreamSpec(frames=1, cover=True, focus=(0, 0, w, h / 3), noise_std=0)
    plan = plan_frames(photo.shape, top)[0]
    assert plan.matrix is not None
    cy_frame = plan.matrix[1][1] * (h / 6) + plan.matrix[1][0] * (w / 2) + plan.matrix[1][2]
    assert cy_frame < spec.height / 2
