"""Upside-down faces (pipeline.orientation): told by the detector, once per photo or track."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.analyzer import FaceAnalysis, FaceAnalyzer
from pipeline.config import PipelineConfig
from pipeline.orientation import turned_box, turned_scores, upside_down
from pipeline.quality import QualityReport
from pipeline.stream import StreamAnalyzer
from pipeline.streamgen import StreamSpec, generate_frames
from pipeline.types import Box, Face, ImageArray


def _face(box: Box, score: float) -> Face:
    marks = ((box.x1 + 10, box.y1 + 10),) * 5
    return Face(box, marks, score)


def test_turned_box_maps_into_the_turned_image():
    image = np.zeros((100, 200, 3), np.uint8)
    image[10:30, 20:60] = 255
    turned = cv2.rotate(image, cv2.ROTATE_180)
    ys, xs = np.nonzero(turned[:, :, 0])
    box = turned_box(Box(20, 10, 60, 30), 200, 100)
    assert (box.x1, box.y1, box.x2, box.y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_the_turned_score_of_each_face_decides():
    image = np.zeros((100, 200, 3), np.uint8)
    a, b = Box(0, 0, 50, 50), Box(120, 40, 170, 90)
    found = [_face(turned_box(a, 200, 100), 0.95), _face(turned_box(b, 200, 100), 0.80)]
    faces = [_face(a, 0.85), _face(b, 0.90)]
    assert turned_scores(lambda _: found, image, faces) == [0.95, 0.80]
    assert upside_down(lambda _: found, image, faces, 0.0) == [True, False]
    assert upside_down(lambda _: found, image, faces, 0.02) == [True, False]
    assert upside_down(lambda _: found, image, [_face(a, 0.94)], 0.02) == [False]
    # Not found turned round, and nothing better elsewhere: upright.
    assert upside_down(lambda _: [], image, faces, 0.0) == [False, False]


def test_a_better_face_elsewhere_in_the_turned_image_stands_in():
    # A weak detection beside an upside-down face that the detector missed (LFW, once in
    # 500): the turned image shows the real face, elsewhere, better.
    image = np.zeros((100, 200, 3), np.uint8)
    weak = _face(Box(0, 0, 40, 40), 0.83)
    real = _face(Box(100, 20, 180, 100), 0.93)
    assert upside_down(lambda _: [real], image, [weak], 0.0) == [True]
    # A turned face that is another of ``faces`` (here upside down) stands in for no other.
    other = _face(turned_box(real.box, 200, 100), 0.80)
    assert upside_down(lambda _: [real], image, [weak, other], 0.0) == [False, True]


class _TwoFaces:
    """A fake analyzer for the reviewer's frame: B (close, upright, 0.95) alone in the first
    frame, then B and A (far, weak, upright, 0.75). The turned frame (told by its marked
    corner pixel) shows B upside down (0.85, below its 0.95) and misses A."""

    width, height = 640, 480
    a = _face(Box(400, 100, 460, 170), 0.75)
    b = _face(Box(100, 100, 260, 300), 0.95)

    def __init__(self) -> None:
        self.config = PipelineConfig()
        self.frames = 0

    def frame(self) -> ImageArray:
        image = np.zeros((self.height, self.width, 3), np.uint8)
        image[0, 0] = 255  # at the bottom right once turned
        return image

    def detect(self, image: ImageArray) -> list[Face]:
        if not image[0, 0].any():
            return [_face(turned_box(self.b.box, self.width, self.height), 0.85)]
        self.frames += 1
        return [self.b] if self.frames == 1 else [self.b, self.a]

    def analyze_face(self, image: ImageArray, face: Face, **_: object) -> FaceAnalysis:
        quality = QualityReport(True, (), face.box.width, 100.0, 0.0, 0.0, 120.0, 1.0)
        return FaceAnalysis(face, quality, None, None)


def test_a_face_already_checked_stands_in_for_no_new_face():
    # Given only the due face A, the upside-down check let B's turned copy stand in for A
    # (0.85 > 0.75): A was refused as upside down. The stream now hands every face of the
    # frame to the check and keeps only the due tracks' flags.
    fake = _TwoFaces()
    stream = StreamAnalyzer(fake)  # type: ignore[arg-type]
    reports = [stream.process(fake.frame(), t) for t in (0.0, 0.1)]
    assert [len(r) for r in reports] == [1, 2]
    assert not any("upside_down" in r.analysis.quality.reasons for rs in reports for r in rs)
    assert [flag for flag, _ in stream.orientation.values()] == [False, False]


class _Counting:
    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls = 0

    def detect(self, image: ImageArray) -> list[Face]:
        self.calls += 1
        return self.inner.detect(image)  # type: ignore[attr-defined,no-any-return]


def _stream(analyzer: FaceAnalyzer, frames: list[ImageArray]):  # type: ignore[no-untyped-def]
    counting = _Counting(analyzer.detector)
    wrapped = FaceAnalyzer(counting, analyzer.embedder, analyzer.liveness_model, analyzer.config)
    stream = StreamAnalyzer(wrapped, keep_ended=True)
    reports = [stream.process(frame, i / 15) for i, frame in enumerate(frames)]
    return stream, reports, counting.calls


@pytest.fixture(scope="module")
def camera(analyzer, photo) -> list[ImageArray]:  # type: ignore[no-untyped-def]
    image = photo("spoof/image_T1.jpg")  # a genuine camera capture: live on video
    box = max(analyzer.detect(image), key=lambda f: f.box.area).box
    spec = StreamSpec(frames=20, seed=0, cover=True, focus=(box.x1, box.y1, box.x2, box.y2))
    return list(generate_frames(image, spec))


def test_an_upright_track_is_checked_once_and_judged(analyzer, camera):
    stream, reports, calls = _stream(analyzer, camera)
    assert calls == len(camera) + 1  # one detector run per frame, one look for the track
    (verdict,) = stream.verdicts().values()
    assert verdict.status == "live"
    assert not any("upside_down" in r.analysis.quality.reasons for rs in reports for r in rs)


def test_an_upside_down_camera_adds_no_evidence(analyzer, camera):
    # A camera mounted upside down: every frame turned. The faces pass every other check,
    # but none of their frames counts, so the track is never judged (a checkout or gate
    # declines for want of evidence; nothing is matched).
    frames = [cv2.rotate(f, cv2.ROTATE_180) for f in camera]
    stream, reports, calls = _stream(analyzer, frames)
    seen = [r for rs in reports for r in rs]
    assert seen and all("upside_down" in r.analysis.quality.reasons for r in seen)
    assert all(r.analysis.embedding is None and r.analysis.p_real is None for r in seen)
    (verdict,) = stream.verdicts().values()
    assert verdict.status == "undecided"
    # Looked at again every recheck_every frames while upside down, not on every frame.
    every = analyzer.config.selection.recheck_every
    assert calls <= len(frames) + 1 + len(frames) // every
