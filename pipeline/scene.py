"""Reproducible walk-through scenes: several people approach a gate camera at once.

Each ``Actor`` is a photo walking a straight line across a soft corridor while its face grows
(people grow as they approach); nearer (larger) actors are drawn over farther ones, so people
occlude each other when their paths cross. The drawing matters to MiniFASNet, which looks at
2.7x and 4x crops around the face, context included:

* ``live``: the whole photo is warped (mirrored past its sides) to the current face size and
  place and shown through a feathered head-and-shoulders silhouette: a real person has no
  rectangular outline (hard rectangular edges made live actors read spoof);
* ``print``: the whole attack capture (a camera photo of a print) is pasted with hard edges;
* after ``turn_away_s`` the person shows the back of the head and clothes: no face.

Every random choice comes from ``SceneSpec.seed``: the same spec and photos give
byte-identical frames. ``render_scene`` yields ground truth (``ActorState``) with each frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from pipeline.types import ImageArray

BoxT = tuple[float, float, float, float]
FaceBoxFn = Callable[[ImageArray], BoxT]
LoadFn = Callable[[str], ImageArray]
Kind = Literal["live", "print"]
Roi = tuple[int, int, int, int]
SCENE_FORMAT = "facepay-scene/1"
FACE_Y = 0.42  #: face centre height, as a fraction of the frame height
FADE_S = 0.15  #: an actor fades in after entering and out before leaving
TURN_S = 0.2  #: the face turns into the back of the head over this long
_F32 = np.float32
CORRIDOR = ((150, 152, 156), (78, 82, 88))  #: default background, top and bottom BGR


@dataclass(frozen=True, slots=True)
class Actor:
    """One person crossing the scene between ``enter_s`` and ``exit_s``.

    ``x0``/``x1``: face centre at enter/exit as fractions of the frame width; ``face0_px``/
    ``face1_px``: face height then; both change linearly in between. ``photo`` and
    ``enroll_photo`` (another photo of the same person) are relative to the data root, or
    absolute.
    """

    name: str
    photo: str
    kind: Kind = "live"
    enter_s: float = 0.0
    exit_s: float = 3.0
    x0: float = 0.5
    x1: float = 0.5
    face0_px: float = 60.0
    face1_px: float = 150.0
    turn_away_s: float | None = None
    enrolled: bool = False
    enroll_photo: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("live", "print") or not self.exit_s > self.enter_s >= 0:
            raise ValueError(f"actor {self.name!r}: need kind live|print, 0 <= enter < exit")
        if min(self.face0_px, self.face1_px) < 8 or (self.enrolled and not self.enroll_photo):
            raise ValueError(f"actor {self.name!r}: faces must be >= 8 px; enrolled needs a photo")

    def x_at(self, t: float) -> float:
        """Face centre at ``t`` as a fraction of the frame width."""
        return self.x0 + (self.x1 - self.x0) * (t - self.enter_s) / (self.exit_s - self.enter_s)

    def face_at(self, t: float) -> float:
        """Face height in pixels at ``t``."""
        u = (t - self.enter_s) / (self.exit_s - self.enter_s)
        return self.face0_px + (self.face1_px - self.face0_px) * u

    def visible_at(self, t: float) -> bool:
        """Whether the actor is in the scene at ``t``."""
        return self.enter_s <= t < self.exit_s


@dataclass(frozen=True, slots=True)
class SceneSpec:
    """Frame geometry, duration, actors and the seed of every random choice.

    ``background``: the corridor's (top, bottom) BGR colours; ``noise_std``: sensor noise;
    ``brightness_jitter``: slow exposure drift (fraction of the gain).
    """

    width: int = 640
    height: int = 480
    fps: float = 30.0
    seconds: float = 4.0
    actors: tuple[Actor, ...] = ()
    seed: int = 0
    background: tuple[tuple[int, int, int], tuple[int, int, int]] = CORRIDOR
    noise_std: float = 2.0
    brightness_jitter: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "actors", tuple(self.actors))
        bg = tuple(tuple(int(c) for c in colour) for colour in self.background)
        object.__setattr__(self, "background", bg)
        if min(self.width, self.height) < 16 or not 0 < self.fps < math.inf or self.seconds <= 0:
            raise ValueError("need a frame of at least 16x16 px and positive fps and seconds")
        if self.noise_std < 0 or not 0 <= self.brightness_jitter < 1:
            raise ValueError("noise_std must be >= 0 and brightness_jitter in [0, 1)")
        names = [a.name for a in self.actors]
        if len(set(names)) != len(names):
            raise ValueError(f"actor names must be unique, got {names}")

    @property
    def n_frames(self) -> int:
        """Number of frames in the scene."""
        return round(self.seconds * self.fps)


@dataclass(frozen=True, slots=True)
class ActorState:
    """Ground truth for one actor in one frame.

    ``box``: face box (x1, y1, x2, y2) in frame pixels, None when the actor is not in view;
    ``face_shown``: False once the actor has turned away; ``occluded``: share of the face box
    covered by nearer actors (0..1).
    """

    name: str
    kind: Kind
    visible: bool
    face_shown: bool
    box: BoxT | None
    face_px: float
    occluded: float = 0.0


@dataclass(frozen=True, slots=True)
class _Sprite:
    """An actor's photo as a pyramid of area-downscaled copies, its face box and sway."""

    levels: tuple[tuple[float, ImageArray], ...]
    face: BoxT
    sway: tuple[float, float]  # (phase, step frequency in Hz)

    def pick(self, scale: float) -> tuple[float, ImageArray]:
        """The smallest copy at least ``scale`` times the photo: the warp never aliases."""
        return min((lv for lv in self.levels if lv[0] >= scale), default=self.levels[0],
                   key=lambda lv: lv[0])  # fmt: skip


def _sprite(photo: ImageArray, face: BoxT, phase: float, body: bool) -> _Sprite:
    """Pyramid of ``photo``. With ``body`` the photo is first extended up and down by
    repeating its edge rows, so a warp mirrored past them never shows an upside-down copy of
    the face on the torso (or of the hair above the head)."""
    if body:
        fh, fcy = face[3] - face[1], (face[1] + face[3]) / 2
        above = math.ceil(max(0.0, 1.6 * fh - fcy))
        below = math.ceil(max(0.0, fcy + 8 * fh - photo.shape[0]))
        photo = np.ascontiguousarray(np.pad(photo, ((above, below), (0, 0), (0, 0)), "edge"))
        face = (face[0], face[1] + above, face[2], face[3] + above)
    levels, image, factor = [(1.0, photo)], photo, 1.0
    while min(image.shape[:2]) >= 64:
        size = (image.shape[1] // 2, image.shape[0] // 2)
        factor *= size[0] / image.shape[1]
        image = np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), np.uint8)
        levels.append((factor, image))
    return _Sprite(tuple(levels), face, (phase, 1.6 + phase % 0.4))


def corridor(spec: SceneSpec) -> np.ndarray:
    """The empty scene (float32 BGR): a vertical gradient, soft ceiling lights, vignette."""
    top, bottom = (np.array(c, np.float32) for c in spec.background)
    y = np.linspace(0.0, 1.0, spec.height, dtype=np.float32)[:, None]
    light = 10.0 * np.exp(-(((y - 0.08) / 0.05) ** 2)) + 6.0 * np.exp(-(((y - 0.3) / 0.08) ** 2))
    column = top[None, :] * (1 - y) + bottom[None, :] * y + light
    x = np.linspace(-1.0, 1.0, spec.width, dtype=np.float32)[None, :]
    return np.ascontiguousarray(column[:, None, :] * (1.0 - 0.08 * x**2)[:, :, None], np.float32)


def _silhouette(shape: tuple[int, int], cx: float, cy: float, h: float) -> np.ndarray:
    """Feathered head-and-shoulders mask (float32 0..1) in a ``shape`` (rows, cols) ROI."""
    mask, k = np.zeros(shape, np.uint8), 16  # 4-bit fixed point: sub-pixel smooth motion

    def pt(dx: float, dy: float) -> tuple[int, int]:
        return round((cx + dx * h) * k), round((cy + dy * h) * k)

    def quad(x: float, y1: float, y2: float) -> np.ndarray:
        return np.array([pt(-x, y1), pt(x, y1), pt(x, y2), pt(-x, y2)])

    cv2.ellipse(mask, pt(0, 0), (round(0.75 * h * k), round(0.95 * h * k)), 0, 0, 360, 255, -1,
                cv2.LINE_AA, 4)  # fmt: skip
    cv2.ellipse(mask, pt(0, 1.95), (round(1.5 * h * k), round(0.8 * h * k)), 0, 0, 360, 255, -1,
                cv2.LINE_AA, 4)  # fmt: skip
    bottom = (shape[0] - cy) / h + 1
    cv2.fillPoly(mask, [quad(0.38, 0.5, 1.6), quad(1.35, 1.95, bottom)], 255, cv2.LINE_AA, 4)
    out = mask.astype(np.float32) * _F32(1 / 255)
    return np.asarray(cv2.GaussianBlur(out, (0, 0), max(0.12 * h, 0.8)), np.float32)


def _warp(sprite: _Sprite, image: ImageArray, factor: float, scale: float, angle: float,
          centre: tuple[float, float], roi: Roi, border: int) -> np.ndarray:  # fmt: skip
    """``image`` (a pyramid level of the sprite) warped so the face centre lands on
    ``centre`` (frame pixels), into the ROI."""
    fcx = (sprite.face[0] + sprite.face[2]) / 2 * factor
    fcy = (sprite.face[1] + sprite.face[3]) / 2 * factor
    m = cv2.getRotationMatrix2D((fcx, fcy), angle, scale / factor)
    m[0, 2] += centre[0] - fcx - roi[0]
    m[1, 2] += centre[1] - fcy - roi[1]
    size = (roi[2] - roi[0], roi[3] - roi[1])
    return np.asarray(cv2.warpAffine(image, m, size, flags=cv2.INTER_LINEAR, borderMode=border),
                      np.float32)  # fmt: skip


def _turn_around(layer: np.ndarray, cx: float, cy: float, h: float, amount: float) -> None:
    """In place: the back of the clothes (body blurred and darkened: no shirt front) and the
    back of the head (a dark blurred ellipse: no features, so no face is detected)."""
    rows, cols = layer.shape[:2]
    small = cv2.resize(layer, (max(1, cols // 4), max(1, rows // 4)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), max(0.09 * h, 0.5))
    back = cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR) * _F32(0.7)
    layer += _F32(amount) * (back - layer)
    hair = np.zeros((rows, cols), np.uint8)
    axes = (round(0.78 * h), round(0.98 * h))
    cv2.ellipse(hair, (round(cx), round(cy)), axes, 0, 0, 360, 255, -1, cv2.LINE_AA)
    a = cv2.GaussianBlur(hair.astype(np.float32) / 255, (0, 0), max(0.1 * h, 0.8))[:, :, None]
    layer += a * _F32(amount) * (np.array([38, 42, 50], np.float32) - layer)


def _clip_roi(x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> Roi | None:
    """Integer ROI clipped to the frame, or None when nothing of it is inside."""
    a, b = max(0, math.floor(x1)), max(0, math.floor(y1))
    c, d = min(w, math.ceil(x2)), min(h, math.ceil(y2))
    return (a, b, c, d) if c > a and d > b else None


def _draw(actor: Actor, sprite: _Sprite, t: float, w: int, h: int
          ) -> tuple[Roi, np.ndarray, np.ndarray, BoxT] | None:  # fmt: skip
    """(ROI, layer, alpha mask, face box) of one actor at ``t``, or None when out of view."""
    face_px = actor.face_at(t)
    phase, step_hz = sprite.sway
    cx = actor.x_at(t) * w
    cy = FACE_Y * h + 0.04 * face_px * math.sin(2 * math.pi * step_hz * t + phase)
    angle = 2.0 * math.sin(2 * math.pi * 0.45 * t + 1.7 * phase)
    fx1, fy1, fx2, fy2 = sprite.face
    scale = face_px / (fy2 - fy1)
    factor, image = sprite.pick(scale)
    if actor.kind == "print":
        ph, pw = image.shape[:2]
        far = math.hypot(
            max(fx1 + fx2, 2 * pw / factor - fx1 - fx2), max(fy1 + fy2, 2 * ph / factor - fy1 - fy2)
        )
        reach = scale * far / 2 + 2
        roi = _clip_roi(cx - reach, cy - reach, cx + reach, cy + reach, w, h)
        if roi is None:
            return None
        layer = _warp(sprite, image, factor, scale, angle / 2, (cx, cy), roi, cv2.BORDER_CONSTANT)
        sheet = np.full(image.shape[:2], 255, np.uint8)
        alpha = _warp(sprite, sheet, factor, scale, angle / 2, (cx, cy), roi, cv2.BORDER_CONSTANT)
        mask = (alpha >= 128).astype(np.float32)  # hard edges: a sheet of paper
    else:
        roi = _clip_roi(cx - 1.9 * face_px, cy - 1.4 * face_px, cx + 1.9 * face_px, h, w, h)
        if roi is None:
            return None
        layer = _warp(sprite, image, factor, scale, angle, (cx, cy), roi, cv2.BORDER_REFLECT_101)
        mask = _silhouette(layer.shape[:2], cx - roi[0], cy - roi[1], face_px)
        if actor.turn_away_s is not None and t >= actor.turn_away_s:
            turned = min(1.0, (t - actor.turn_away_s) / TURN_S)
            _turn_around(layer, cx - roi[0], cy - roi[1], face_px, turned)
    mask *= _F32(min(1.0, (t - actor.enter_s) / FADE_S, (actor.exit_s - t) / FADE_S))
    hw, hh = (fx2 - fx1) * scale / 2, face_px / 2
    return roi, layer, mask, (cx - hw, cy - hh, cx + hw, cy + hh)


def render_scene(
    spec: SceneSpec, load: LoadFn, face_box: FaceBoxFn
) -> Iterator[tuple[ImageArray, list[ActorState]]]:
    """Yield ``spec.n_frames`` (BGR frame, ground truth per actor) pairs.

    ``load`` reads an actor's photo by its ``photo`` string; ``face_box`` returns the largest
    face (x1, y1, x2, y2) of a photo (called once per distinct photo).
    """
    boxes: dict[str, BoxT] = {}
    sprites: dict[str, _Sprite] = {}
    for i, actor in enumerate(spec.actors):
        image = np.ascontiguousarray(load(actor.photo))
        if actor.photo not in boxes:
            x1, y1, x2, y2 = (float(v) for v in face_box(image))
            boxes[actor.photo] = (x1, y1, x2, y2)
        phase = float(np.random.default_rng([spec.seed, 100 + i]).uniform(0, 2 * math.pi))
        sprites[actor.name] = _sprite(image, boxes[actor.photo], phase, actor.kind == "live")
    n, w, h = spec.n_frames, spec.width, spec.height
    rng = np.random.default_rng([spec.seed, 0])
    # Exposure drift: a sum of three slow random sines (0.05-0.4 Hz), in [-1, 1].
    freqs, phases = rng.uniform(0.05, 0.4, 3), rng.uniform(0, 2 * math.pi, 3)
    weights = rng.uniform(0.3, 1.0, 3)
    times = np.arange(n)[:, None] / spec.fps
    drift = (weights / weights.sum() * np.sin(2 * math.pi * freqs * times + phases)).sum(1)
    gain = 1.0 + spec.brightness_jitter * drift
    pool = rng.standard_normal((h + 32, w + 32, 3), dtype=np.float32) * _F32(spec.noise_std)
    offsets = rng.integers(0, 33, size=(max(n, 1), 2))
    empty = corridor(spec)
    for index in range(n):
        t = index / spec.fps
        frame = empty.copy()
        # Far (small) actors first: near ones are drawn over them.
        present = sorted((a for a in spec.actors if a.visible_at(t)), key=lambda a: a.face_at(t))
        drawn: list[tuple[str, Roi, np.ndarray, BoxT]] = []
        for actor in present:
            got = _draw(actor, sprites[actor.name], t, w, h)
            if got is not None:
                roi, layer, mask, box = got
                region = frame[roi[1] : roi[3], roi[0] : roi[2]]
                region += mask[:, :, None] * (layer - region)
                drawn.append((actor.name, roi, mask, box))
        occlusion = _occlusion(drawn, w, h)
        frame *= _F32(gain[index])
        if spec.noise_std > 0:
            oy, ox = offsets[index]
            frame += pool[oy : oy + h, ox : ox + w]
        np.clip(frame + 0.5, 0, 255, out=frame)
        found = {name: box for name, _, _, box in drawn}
        states = [
            ActorState(a.name, a.kind, True, a.turn_away_s is None or t < a.turn_away_s,
                       found[a.name], a.face_at(t), occlusion[a.name])
            if a.name in found
            else ActorState(a.name, a.kind, False, False, None, 0.0)
            for a in spec.actors
        ]  # fmt: skip
        yield frame.astype(np.uint8), states


def _occlusion(drawn: list[tuple[str, Roi, np.ndarray, BoxT]], w: int, h: int) -> dict[str, float]:
    """Share of each drawn actor's face box covered by the actors drawn after it."""
    cover = np.zeros((h, w), np.float32)
    out: dict[str, float] = {}
    for name, (x0, y0, x1, y1), mask, box in reversed(drawn):
        r = _clip_roi(box[0], box[1], box[2], box[3], w, h)
        out[name] = 0.0 if r is None else float(cover[r[1] : r[3], r[0] : r[2]].mean())
        part = cover[y0:y1, x0:x1]
        part += mask * (1 - part)
    return out


def reach_times(truth: Iterable[list[ActorState]], fps: float, px: float) -> dict[str, float]:
    """Scene time of the first frame (of ``truth``, one list per frame at ``fps``) in which
    each actor's face is shown with its box's shorter side at least ``px``: where a gate's
    decision clock starts (``gate.min_face_px``). Actors whose face never gets there are
    left out."""
    out: dict[str, float] = {}
    for index, states in enumerate(truth):
        for state in states:
            if state.name in out or state.box is None or not state.face_shown:
                continue
            x1, y1, x2, y2 = state.box
            if min(x2 - x1, y2 - y1) >= px:
                out[state.name] = index / fps
    return out
