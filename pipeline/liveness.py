"""Passive liveness: MiniFASNetV2 (crop x2.7) and MiniFASNetV1SE (crop x4.0), fused.

Each model sees the face box scaled about its centre, shifted to stay inside the frame and
resized to 80x80, exactly as Silent-Face-Anti-Spoofing's ``CropImage`` does: the context
around the face (paper edges, screen bezels, fingers) is part of the signal. Inputs are BGR
0..255, not normalised. The fused score is the mean of the two softmax outputs' real class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.detector import InferenceSession
from pipeline.errors import ModelError
from pipeline.types import Box, Face, FloatArray, ImageArray

LIVENESS_INPUT = 80
REAL_CLASS = 1


def crop_box(width: int, height: int, box: Box, scale: float) -> tuple[int, int, int, int]:
    """Integer (x1, y1, x2, y2) inclusive crop: box scaled about its centre, kept in frame.

    A port of ``CropImage._get_new_box``: the scale is reduced when the scaled box would not
    fit the frame at all, then the box is shifted (not clipped) back inside.
    """
    box_w, box_h = max(box.width, 1.0), max(box.height, 1.0)
    scale = min((height - 1) / box_h, (width - 1) / box_w, scale)
    new_w, new_h = box_w * scale, box_h * scale
    cx, cy = box.x1 + box_w / 2, box.y1 + box_h / 2
    x1, y1 = cx - new_w / 2, cy - new_h / 2
    x2, y2 = cx + new_w / 2, cy + new_h / 2
    if x1 < 0:
        x2 -= x1
        x1 = 0
    if y1 < 0:
        y2 -= y1
        y1 = 0
    if x2 > width - 1:
        x1 -= x2 - width + 1
        x2 = width - 1
    if y2 > height - 1:
        y1 -= y2 - height + 1
        y2 = height - 1
    return int(x1), int(y1), int(x2), int(y2)


def square_box(box: Box) -> Box:
    """The box widened (or heightened) to a square about its centre.

    MiniFASNet was trained on boxes from its own detector, which are close to square; YuNet's
    are about 0.75 wide per 1 tall. Because the x2.7/x4.0 crop is then resized to 80x80, a
    narrow box squeezes the face sideways. Measured on NUAA (train subset, single frames, fused
    p_real >= 0.5): YuNet boxes as they are gave BPCER 15.6%, squared boxes 0.0%, both with
    APCER 0.
    """
    side = max(box.width, box.height)
    cx, cy = box.center
    return Box(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def liveness_crop(image: ImageArray, box: Box, scale: float) -> ImageArray:
    """The 80x80 BGR crop a MiniFASNet model expects, from the squared face box."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = crop_box(width, height, square_box(box), scale)
    patch = image[max(0, y1) : y2 + 1, max(0, x1) : x2 + 1]
    return np.asarray(cv2.resize(patch, (LIVENESS_INPUT, LIVENESS_INPUT)), dtype=np.uint8)


def _softmax(logits: FloatArray) -> FloatArray:
    if not np.all(np.isfinite(logits)):
        raise ModelError("liveness model gave non-finite logits")
    shifted = logits - np.max(logits)
    exp = np.exp(shifted)
    return (exp / exp.sum()).astype(np.float32)


@dataclass(frozen=True, slots=True)
class LivenessModel:
    """One MiniFASNet session and the crop scale it was trained with."""

    session: InferenceSession
    scale: float

    def probabilities(self, image: ImageArray, face: Face) -> FloatArray:
        """Softmax over (spoof-print, real, spoof-replay) for one face."""
        crop = liveness_crop(image, face.box, self.scale)
        blob = crop.transpose(2, 0, 1)[None].astype(np.float32)
        name = self.session.get_inputs()[0].name
        logits = np.asarray(self.session.run(None, {name: blob})[0][0], dtype=np.float32)
        return _softmax(logits)


class MiniFASNetFusion:
    """``liveness(frame, face) -> p_real`` in [0, 1]: mean of the models' real-class scores."""

    name = "minifasnet_fusion"

    def __init__(self, models: Sequence[LivenessModel]) -> None:
        if not models:
            raise ValueError("liveness fusion needs at least one model")
        self.models = tuple(models)

    def liveness(self, frame: ImageArray, face: Face) -> float:
        """Fused probability that the face is a live person in front of the camera."""
        probs = np.mean([m.probabilities(frame, face) for m in self.models], axis=0)
        p_real = float(probs[REAL_CLASS])
        if not 0.0 <= p_real <= 1.0:  # NaN or inf logits: a model fault, never a score
            raise ModelError(f"liveness model output is not a probability: {p_real}")
        return p_real
