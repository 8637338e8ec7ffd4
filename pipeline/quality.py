"""Face quality: size, sharpness, pose from landmarks, exposure, the frame's edge; each failure
has a reason.

Pose is estimated from the five landmarks alone (no extra model): yaw from how far the nose
tip sits from the eyes' midline relative to the eye distance, pitch from where the nose sits
between the eye line and the mouth line. Both are approximations good to roughly ±10° near
frontal, which is all a gate needs ("look at the camera").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.types import Face, ImageArray

#: Nose depth over eye distance for an average adult face; converts the nose's sideways
#: offset into a yaw angle (offset/eye_distance = DEPTH_RATIO * tan(yaw)).
_NOSE_DEPTH_RATIO = 0.55
#: Nose position between eye line (0) and mouth line (1) on the frontal ArcFace template.
_FRONTAL_NOSE_RATIO = 0.494
_PITCH_RATIO_SCALE = 0.35


@dataclass(frozen=True, slots=True)
class QualityThresholds:
    """Bounds a face must meet; see ``pipeline.config.QualityConfig`` for the defaults' reasons."""

    min_face_px: float = 64.0
    min_sharpness: float = 20.0
    max_yaw_deg: float = 30.0
    max_pitch_deg: float = 25.0
    min_brightness: float = 40.0
    max_brightness: float = 215.0
    min_detection_score: float = 0.8
    #: Largest face for liveness, as its squared box's side over the frame's shorter side
    #: (1.0: no limit). Only checked when ``assess`` is given the frame's shape.
    max_face_frac: float = 1.0
    #: ``cut_off`` (only checked when ``assess`` is given the frame's shape): a landmark
    #: nearer the frame's edge than this many eye distances (negative: outside it) ...
    min_edge_margin: float = 0.35
    #: ... or more than this share of the detector's unclipped box outside the frame.
    max_outside_frac: float = 0.2


@dataclass(frozen=True, slots=True)
class QualityReport:
    """Quality of one face in one frame. ``weight`` in [0, 1] ranks frames for averaging."""

    ok: bool
    reasons: tuple[str, ...]
    face_px: float
    sharpness: float
    yaw_deg: float
    pitch_deg: float
    brightness: float
    weight: float
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "ok": self.ok,
            "reasons": list(self.reasons),
            "face_px": round(self.face_px, 1),
            "sharpness": round(self.sharpness, 1),
            "yaw_deg": round(self.yaw_deg, 1),
            "pitch_deg": round(self.pitch_deg, 1),
            "brightness": round(self.brightness, 1),
            "weight": round(self.weight, 3),
        }


def estimate_pose(face: Face) -> tuple[float, float]:
    """(yaw, pitch) in degrees from the five landmarks; 0, 0 is frontal."""
    pts = face.landmarks_array().astype(np.float64)
    right_eye, left_eye, nose, mouth_r, mouth_l = pts
    eye_mid = (right_eye + left_eye) / 2
    mouth_mid = (mouth_r + mouth_l) / 2
    eye_vec = left_eye - right_eye
    eye_dist = float(np.hypot(*eye_vec))
    if eye_dist < 1e-6:
        return 90.0, 90.0
    # Work in the face's own frame so head roll does not read as yaw.
    ux = eye_vec / eye_dist
    uy = np.array([-ux[1], ux[0]])
    nose_x = float((nose - eye_mid) @ ux)
    yaw = math.degrees(math.atan((nose_x / eye_dist) / _NOSE_DEPTH_RATIO))
    span = float((mouth_mid - eye_mid) @ uy)
    if span < 1e-6:
        return yaw, 90.0
    ratio = float((nose - eye_mid) @ uy) / span
    pitch = math.degrees(math.atan((ratio - _FRONTAL_NOSE_RATIO) / _PITCH_RATIO_SCALE))
    return yaw, pitch


def sharpness(aligned: ImageArray) -> float:
    """Variance of the Laplacian of the aligned crop's grey image (scale-independent)."""
    grey = cv2.cvtColor(aligned, cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def too_close(face: Face, frame_shape: tuple[int, ...], max_face_frac: float) -> bool:
    """Whether the face fills so much of the frame that liveness loses its context.

    MiniFASNet judges a crop 2.7x and 4.0x the (squared) face box; a face whose box is more
    than ``max_face_frac`` of the frame's shorter side leaves both crops at under
    ``1 / max_face_frac`` times the face, with no edges, bezels or background to judge.
    """
    side = max(face.box.width, face.box.height)
    return max_face_frac < 1.0 and side > max_face_frac * min(frame_shape[0], frame_shape[1])


def edge_margin(face: Face, frame_shape: tuple[int, ...]) -> float:
    """Distance from the landmark nearest the frame's edge to that edge, in eye distances.

    Negative when a landmark lies outside the frame (the detector extrapolates the parts of
    a face that the edge cut off). In eye distances so that it means the same for a face of
    any size: the aligned crop reaches about 1.1 eye distances beside the eyes and 0.56
    below the mouth, so a small margin leaves part of the crop black (``pipeline.align``).
    """
    pts = face.landmarks_array().astype(np.float64)
    eye_dist = max(float(np.hypot(*(pts[1] - pts[0]))), 1e-6)
    height, width = frame_shape[0], frame_shape[1]
    nearest = min(
        float(pts[:, 0].min()),
        float(pts[:, 1].min()),
        width - float(pts[:, 0].max()),
        height - float(pts[:, 1].max()),
    )
    return nearest / eye_dist


def cut_off(face: Face, frame_shape: tuple[int, ...], limits: QualityThresholds) -> bool:
    """Whether the frame's edge cuts off enough of the face to spoil its template.

    The embedding of a face whose aligned crop is partly black scores low against the same
    person and high against other cut-off faces (``pipeline.config.QualityConfig`` gives
    the figures behind the bounds).
    """
    return (
        edge_margin(face, frame_shape) < limits.min_edge_margin
        or face.outside_fraction() > limits.max_outside_frac
    )


def assess(
    face: Face,
    aligned: ImageArray,
    limits: QualityThresholds,
    frame_shape: tuple[int, ...] | None = None,
) -> QualityReport:
    """Check one face against ``limits``; the report lists every failed check.

    ``frame_shape`` (the frame's ``shape``) enables the ``too_close`` and ``cut_off`` checks.
    """
    face_px = min(face.box.width, face.box.height)
    sharp = sharpness(aligned)
    yaw, pitch = estimate_pose(face)
    # Brightness of the central face region only (the aligned crop's borders can be padding).
    centre = cv2.cvtColor(aligned[24:100, 20:92], cv2.COLOR_BGR2GRAY)
    brightness = float(centre.mean())
    reasons: list[str] = []
    if face.score < limits.min_detection_score:
        reasons.append("uncertain_face")
    if face_px < limits.min_face_px:
        reasons.append("too_small")
    if frame_shape is not None and too_close(face, frame_shape, limits.max_face_frac):
        reasons.append("too_close")
    if frame_shape is not None and cut_off(face, frame_shape, limits):
        reasons.append("cut_off")
    if sharp < limits.min_sharpness:
        reasons.append("blurry")
    if abs(yaw) > limits.max_yaw_deg:
        reasons.append("turned_away")
    if abs(pitch) > limits.max_pitch_deg:
        reasons.append("head_tilted")
    if brightness < limits.min_brightness:
        reasons.append("too_dark")
    if brightness > limits.max_brightness:
        reasons.append("too_bright")
    # Weight: each factor saturates at "comfortably good" so frames are ranked, not rewarded
    # for extreme values.
    weight = (
        min(1.0, face_px / (2 * limits.min_face_px))
        * min(1.0, sharp / (4 * limits.min_sharpness))
        * max(0.0, 1.0 - abs(yaw) / (2 * limits.max_yaw_deg))
        * max(0.0, 1.0 - abs(pitch) / (2 * limits.max_pitch_deg))
    )
    return QualityReport(
        ok=not reasons,
        reasons=tuple(reasons),
        face_px=face_px,
        sharpness=sharp,
        yaw_deg=yaw,
        pitch_deg=pitch,
        brightness=brightness,
        weight=weight if not reasons else 0.0,
    )
