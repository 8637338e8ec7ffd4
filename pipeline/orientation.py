"""Upside-down faces: the same face, looked for again in the frame turned 180 degrees.

YuNet finds a face turned upside down (a scan fed in the wrong way round, a re-encoded file
that lost its EXIF orientation, a camera mounted upside down) with a good score, and labels
its landmarks as if it were upright: the mouth corners become the "eyes". Such a face then
passes every landmark-based check (pose, size) and its aligned crop is upside down: the
template is useless for its own person (cosine -0.14 to the upright photo of obama.jpg)
and upside-down templates of different people resemble each other (LFW: median 0.38, 31%
of pairs at or above the 0.45 match threshold). The landmarks cannot tell: their geometry
is that of an upright face.

What does tell is the detector itself: a face scores higher the right way up. The frame is
turned 180 degrees, detected again, and the face's box found there (mapped back) is compared
with the original: if the turned copy scores more than ``margin`` higher, the face is upside
down. On LFW (500 photos and the same turned) and on every shared photo the two scores
never tied (``pipeline.config.QualityConfig.upside_down_margin`` gives the figures).

It costs one detector run (about 6 ms at 640x480, docs/performance.md): a photo import runs
it once per photo, a video stream once per face track (``pipeline.stream``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from pipeline.types import Box, Face, ImageArray

#: The turned copy's box must overlap the face's (mapped back) at least this much.
MATCH_IOU = 0.3


def turned_box(box: Box, width: int, height: int) -> Box:
    """Where ``box`` lies in the image turned 180 degrees (``cv2.ROTATE_180``)."""
    return Box(width - box.x2, height - box.y2, width - box.x1, height - box.y1)


def turned_scores(
    detect: Callable[[ImageArray], list[Face]], image: ImageArray, faces: Sequence[Face]
) -> list[float | None]:
    """Per face, the detector's score for it in the image turned 180 degrees (one detector
    run for all faces).

    Where the turned copy shows no face at that place, the best face it shows that is none
    of ``faces`` stands in (None if there is none): a face that is not found the other way
    up is upright unless the turned copy shows a better face elsewhere, which happened once
    in 500 LFW photos (an upside-down photo whose only detection was a weak one beside the
    real face). So ``faces`` must be every face found in the image, not only those the
    caller asks about: a face left out would have its turned copy stand in for another.
    """
    if not faces:
        return []
    height, width = image.shape[:2]
    found = detect(np.asarray(cv2.rotate(image, cv2.ROTATE_180), dtype=np.uint8))
    matched: list[float | None] = []
    used: set[int] = set()
    for face in faces:
        where = turned_box(face.box, width, height)
        hits = [i for i, f in enumerate(found) if f.box.iou(where) >= MATCH_IOU]
        used.update(hits)
        matched.append(max(found[i].score for i in hits) if hits else None)
    spare = max((f.score for i, f in enumerate(found) if i not in used), default=None)
    return [spare if s is None else s for s in matched]


def upside_down(
    detect: Callable[[ImageArray], list[Face]],
    image: ImageArray,
    faces: Sequence[Face],
    margin: float,
) -> list[bool]:
    """Per face: whether it scores more than ``margin`` higher in the turned image."""
    turned = turned_scores(detect, image, faces)
    return [s is not None and s > f.score + margin for f, s in zip(faces, turned, strict=True)]
