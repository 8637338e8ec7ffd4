"""Frozen value types passed between pipeline stages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class Box:
    """Axis-aligned box in pixel coordinates (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        """Box height in pixels."""
        return self.y2 - self.y1

    @property
    def center(self) -> tuple[float, float]:
        """Centre point (x, y)."""
        return ((self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0)

    @property
    def area(self) -> float:
        """Area in square pixels (0 for a degenerate box)."""
        return max(0.0, self.width) * max(0.0, self.height)

    def iou(self, other: Box) -> float:
        """Intersection over union with another box."""
        ix1, iy1 = max(self.x1, other.x1), max(self.y1, other.y1)
        ix2, iy2 = min(self.x2, other.x2), min(self.y2, other.y2)
        inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def as_list(self) -> list[float]:
        """[x1, y1, x2, y2] rounded to 0.1 px, for JSON."""
        return [round(v, 1) for v in (self.x1, self.y1, self.x2, self.y2)]


@dataclass(frozen=True, slots=True)
class Face:
    """One detected face.

    ``landmarks`` are five (x, y) points in the YuNet/ArcFace order: right eye, left eye
    (from the viewer: the eye on the image's left first), nose tip, right and left mouth corner.

    ``box`` is clipped to the image; ``raw_box`` is the detector's box before clipping (None
    when the detector gave none), so the quality gate can see how much of a face the image's
    edge cut off (``pipeline.quality.cut_off``).
    """

    box: Box
    landmarks: tuple[tuple[float, float], ...]
    score: float
    raw_box: Box | None = None

    def outside_fraction(self) -> float:
        """Share of the detector's unclipped box that lies outside the image (0 if unknown)."""
        raw = self.raw_box
        if raw is None or raw.area <= 0:
            return 0.0
        return max(0.0, 1.0 - self.box.area / raw.area)

    def landmarks_array(self) -> FloatArray:
        """Landmarks as a float32 array of shape (5, 2)."""
        return np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)

    def to_json(self) -> dict[str, object]:
        """JSON-ready description (no pixels)."""
        return {
            "box": self.box.as_list(),
            "landmarks": [[round(x, 1), round(y, 1)] for x, y in self.landmarks],
            "score": round(self.score, 4),
        }


def focus_box(faces: Sequence[Face]) -> tuple[float, float, float, float] | None:
    """(x1, y1, x2, y2) of the largest face (the one nearest the camera), or None.

    What a camera view of a photo centres on (``StreamSpec.focus``).
    """
    if not faces:
        return None
    box = max(faces, key=lambda f: f.box.area).box
    return box.x1, box.y1, box.x2, box.y2
