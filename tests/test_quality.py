"""Quality gate: each failure is reported with its reason."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from pipeline.align import align
from pipeline.analyzer import quality_limits
from pipeline.quality import assess, edge_margin, estimate_pose
from pipeline.types import Box, Face


def _report(analyzer, image):
    faces = analyzer.detect(image)
    assert faces, "expected a face"
    face = max(faces, key=lambda f: f.box.area)
    return assess(face, align(image, face), analyzer.limits)


def test_good_photo_passes(analyzer, photo):
    report = _report(analyzer, photo("faces/obama/obama.jpg"))
    assert report.ok and report.reasons == () and report.weight > 0


def test_small_face_is_too_small(analyzer, photo):
    image = photo("faces/obama/obama.jpg")
    tiny = cv2.resize(image, (image.shape[1] // 6, image.shape[0] // 6))
    assert "too_small" in _report(analyzer, tiny).reasons


def test_blurred_face_is_blurry(analyzer, photo):
    blurred = cv2.GaussianBlur(photo("spoof/image_T1.jpg"), (0, 0), 6)
    assert "blurry" in _report(analyzer, blurred).reasons


def test_dark_and_bright_exposure(analyzer, photo):
    image = photo("faces/obama/obama.jpg").astype(np.float32)
    dark = np.clip(image * 0.2, 0, 255).astype(np.uint8)
    bright = np.clip(image * 1.9 + 60, 0, 255).astype(np.uint8)
    assert "too_dark" in _report(analyzer, dark).reasons
    assert "too_bright" in _report(analyzer, bright).reasons


def test_profile_face_is_turned_away(analyzer, photo):
    faces = analyzer.detect(photo("faces/group/obama_and_biden.jpg"))
    image = photo("faces/group/obama_and_biden.jpg")
    reasons = [assess(f, align(image, f), analyzer.limits).reasons for f in faces]
    assert sum("turned_away" in r for r in reasons) == 1  # the man in profile
    assert sum(r == () for r in reasons) == 2


def test_pose_is_zero_for_the_template_and_signed_for_turns():
    frontal = Face(
        Box(0, 0, 112, 112),
        ((38.29, 51.70), (73.53, 51.50), (56.03, 71.74), (41.55, 92.37), (70.73, 92.20)),
        0.9,
    )
    yaw, pitch = estimate_pose(frontal)
    assert yaw == pytest.approx(0, abs=2) and pitch == pytest.approx(0, abs=2)
    pts = list(frontal.landmarks)
    pts[2] = (pts[2][0] + 15, pts[2][1])  # nose pushed to the image right
    turned = Face(frontal.box, tuple(pts), 0.9)
    assert estimate_pose(turned)[0] > 20


def _face(x1: float, y1: float, x2: float, y2: float) -> Face:
    w, h = x2 - x1, y2 - y1
    marks = (
        (x1 + 0.3 * w, y1 + 0.4 * h),
        (x1 + 0.7 * w, y1 + 0.4 * h),
        (x1 + 0.5 * w, y1 + 0.6 * h),
        (x1 + 0.35 * w, y1 + 0.8 * h),
        (x1 + 0.65 * w, y1 + 0.8 * h),
    )
    return Face(Box(x1, y1, x2, y2), marks, 0.95)


@pytest.mark.parametrize(("height", "close"), [(300, False), (384, False), (390, True)])
def test_a_face_filling_the_frame_is_too_close(analyzer, height, close):
    # 480 px is the shorter side: 0.8 of it is 384 px (the default max_face_frac). The box
    # is narrower than tall, as YuNet's are; its squared side is its height.
    face = _face(100, 40, 100 + 0.75 * height, 40 + height)
    aligned = np.full((112, 112, 3), 128, np.uint8)
    video = quality_limits(analyzer.config, video=True)
    report = assess(face, aligned, video, (480, 640, 3))
    assert ("too_close" in report.reasons) is close
    # Without the frame's shape, or with a single photo's limits, there is no distance rule.
    assert "too_close" not in assess(face, aligned, video).reasons
    assert "too_close" not in assess(face, aligned, analyzer.limits, (480, 640, 3)).reasons


def test_the_distance_rule_can_be_switched_off(analyzer):
    face = _face(0, 0, 470, 470)
    aligned = np.full((112, 112, 3), 128, np.uint8)
    video = quality_limits(analyzer.config, video=True)
    off = dataclasses.replace(video, max_face_frac=1.0)
    assert "too_close" in assess(face, aligned, video, (480, 640)).reasons
    assert "too_close" not in assess(face, aligned, off, (480, 640)).reasons


def test_a_landmark_near_or_past_the_edge_is_cut_off(analyzer):
    # _face's eyes are 0.4 box widths apart and 0.3 box widths from the box's left side.
    aligned = np.full((112, 112, 3), 128, np.uint8)
    limits = analyzer.limits  # min_edge_margin 0.35 eye distances

    def reasons(x1: float) -> tuple[str, ...]:
        return assess(_face(x1, 100, x1 + 200, 300), aligned, limits, (480, 640, 3)).reasons

    # Eye at x1 + 60, eye distance 80: margin (x1 + 60) / 80.
    assert "cut_off" not in reasons(0)  # 0.75 eye distances from the edge
    assert "cut_off" in reasons(-35)  # 0.31
    assert "cut_off" in reasons(-100)  # the eye is outside the picture
    assert edge_margin(_face(0, 100, 200, 300), (480, 640)) == pytest.approx(0.75)
    # Without the frame's shape there is no edge to be cut by.
    assert "cut_off" not in assess(_face(-100, 100, 100, 300), aligned, limits).reasons


def test_a_box_reaching_far_out_of_the_frame_is_cut_off(analyzer):
    aligned = np.full((112, 112, 3), 128, np.uint8)
    inside = _face(100, 100, 300, 300)
    clipped = Box(100, 100, 300, 300)

    def with_raw(y2: float) -> Face:
        return Face(clipped, inside.landmarks, 0.95, raw_box=Box(100, 100, 300, y2))

    assert with_raw(340).outside_fraction() == pytest.approx(40 / 240)
    ok = assess(with_raw(340), aligned, analyzer.limits, (300, 640, 3))
    cut = assess(with_raw(380), aligned, analyzer.limits, (300, 640, 3))  # 29% outside
    assert "cut_off" not in ok.reasons and "cut_off" in cut.reasons
    assert inside.outside_fraction() == 0.0  # no raw box known: nothing is assumed cut


@pytest.mark.parametrize(("side", "frac"), [("left", 0.45), ("top", 0.45), ("bottom", 0.45)])
def test_a_photo_cut_through_the_face_is_cut_off(analyzer, photo, side, frac):
    image = photo("faces/obama/obama.jpg")
    box = max(analyzer.detect(image), key=lambda f: f.box.area).box
    if side == "left":
        cut = image[:, int(box.x1 + frac * box.width) :]
    elif side == "top":
        cut = image[int(box.y1 + frac * box.height) :, :]
    else:
        cut = image[: int(box.y2 - frac * box.height), :]
    cut = np.ascontiguousarray(cut)
    face = max(analyzer.detect(cut), key=lambda f: f.box.area)
    assert "cut_off" in assess(face, align(cut, face), analyzer.limits, cut.shape).reasons


def test_a_whole_photo_is_not_cut_off(analyzer, photo):
    for rel in ("faces/obama/obama.jpg", "faces/biden/biden2.jpg", "spoof/image_T1.jpg"):
        image = photo(rel)
        face = max(analyzer.detect(image), key=lambda f: f.box.area)
        assert assess(face, align(image, face), analyzer.limits, image.shape).ok, rel
