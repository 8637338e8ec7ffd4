"""YuNet detector: our decoding against OpenCV's, every face in the group photos, NMS."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.detector import YuNetDetector, nms

SINGLE_FACE = [
    "faces/obama/obama.jpg",
    "faces/obama/obama2.jpg",
    "faces/obama/obama3.jpg",
    "faces/obama/obama-480p.jpg",
    "faces/biden/biden.jpg",
    "faces/biden/biden2.jpg",
    "faces/kit_harington/john1.jpeg",
    "faces/kit_harington/john2.jpeg",
    "faces/kit_harington/johnsnow_test1.jpg",
    "spoof/image_T1.jpg",
    "spoof/image_F1.jpg",
    "spoof/image_F2.jpg",
]


@pytest.mark.parametrize("rel", SINGLE_FACE)
def test_each_single_face_photo_has_exactly_one_face(analyzer, photo, rel):
    faces = analyzer.detect(photo(rel))
    assert len(faces) == 1, [f.to_json() for f in faces]
    face = faces[0]
    # Landmarks lie inside the box: the decoding put them in the right grid cell.
    for x, y in face.landmarks:
        assert face.box.x1 <= x <= face.box.x2 and face.box.y1 <= y <= face.box.y2


def test_group_photos_every_face_found(analyzer, photo):
    two = analyzer.detect(photo("faces/group/two_people.jpg"))
    assert len(two) == 2
    # obama_and_biden.jpg: Obama, Biden, and a third man in profile behind them.
    trio = analyzer.detect(photo("faces/group/obama_and_biden.jpg"))
    assert len(trio) == 3
    boxes = sorted(f.box.x1 for f in trio)
    assert boxes[1] - boxes[0] > 100 and boxes[2] - boxes[1] > 100  # three distinct faces


@pytest.mark.parametrize(
    "rel", ["faces/obama/obama.jpg", "faces/group/two_people.jpg", "spoof/image_F2.jpg"]
)
def test_same_boxes_as_opencv_facedetectoryn(store, photo, rel):
    image = cv2.resize(photo(rel), (640, 480))
    ours = YuNetDetector(store.session("yunet"), score_threshold=0.75).detect(image)
    ref = cv2.FaceDetectorYN.create(str(store.path("yunet")), "", (640, 480), 0.75, 0.3, 50)
    _, rows = ref.detect(image)
    assert rows is not None and len(rows) == len(ours)
    rows = sorted(rows.tolist(), key=lambda r: -r[-1])
    for face, row in zip(ours, rows, strict=True):
        x, y, w, h = row[:4]
        np.testing.assert_allclose(
            [face.box.x1, face.box.y1, face.box.x2, face.box.y2], [x, y, x + w, y + h], atol=0.5
        )
        np.testing.assert_allclose(face.landmarks_array().ravel(), row[4:14], atol=0.5)
        assert face.score == pytest.approx(row[14], abs=1e-3)


def test_downscaled_input_maps_boxes_back_to_original(store, photo):
    image = photo("faces/obama/obama.jpg")  # 910x1137: detected at 640 max side
    full = YuNetDetector(store.session("yunet"), max_side=2048).detect(image)[0]
    small = YuNetDetector(store.session("yunet"), max_side=640).detect(image)[0]
    assert small.box.iou(full.box) > 0.85


def test_blank_image_has_no_face(analyzer):
    assert analyzer.detect(np.full((480, 640, 3), 127, np.uint8)) == []


def test_nms_keeps_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.8, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.3, 10) == [1, 2]
    assert nms(boxes, scores, 0.3, 1) == [1]
    assert nms(boxes, scores, 0.99, 10) == [1, 0, 2]
