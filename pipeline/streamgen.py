"""Reproducible synthetic camera streams made from a still photo, for tests and demos.

A photo is composited onto a neutral background and moved as a rigid plane (a similarity
warp: translation, small roll, scale breathing), as if it were held in front of a camera.
Exposure drifts, a few frames are mildly defocused, a little sensor noise is added, and
chosen frame ranges show the empty scene. Every random choice comes from ``StreamSpec.seed``,
so the same spec and photo always give byte-identical frames.

Writers: ``.y4m`` (YUV4MPEG2, what Chromium's fake camera reads), ``.mp4`` and ``.avi``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from pipeline.types import ImageArray

_FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}
_Y4M_420 = {"420jpeg", "420", "420paldv", "420mpeg2"}
# Independent random streams, one per effect, so that changing one knob of the spec
# (say brightness) leaves the others (say motion) exactly as they were.
_RNG_X, _RNG_Y, _RNG_ROT, _RNG_SCALE, _RNG_GAIN, _RNG_BLUR, _RNG_NOISE = range(7)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What to generate. Lengths are in frames; ranges are half-open ``[start, end)``.

    ``fill`` is the fraction of the frame that the photo (or the ``focus`` region of it, in
    photo pixels ``(x1, y1, x2, y2)``, e.g. a face box) occupies along its limiting axis before
    motion: with the default 0.95 a typical head-and-shoulders portrait shows a face about
    120-200 px tall at 640x480. ``seconds``, when set, overrides ``frames``.
    """

    width: int = 640
    height: int = 480
    fps: float = 30.0
    frames: int = 90
    seconds: float | None = None
    seed: int = 0
    motion_px: float = 12.0
    rotation_deg: float = 2.0
    scale_jitter: float = 0.04
    brightness_jitter: float = 0.12
    blur_prob: float = 0.08
    blur_sigma: tuple[float, float] = (0.8, 1.8)
    noise_std: float = 1.5
    fill: float = 0.95
    focus: tuple[float, float, float, float] | None = None
    background: tuple[int, int, int] = (118, 122, 126)
    gap_frames: tuple[tuple[int, int], ...] = ()
    #: Camera view: the photo always fills the whole frame (the view pans and zooms a little
    #: around ``focus``), so no photo edge is ever visible. Use it to stand in for a live
    #: camera capture; the default (False) shows the photo as a sheet held in front of the
    #: camera, edges and background included, which is what a print attack looks like.
    cover: bool = False

    def __post_init__(self) -> None:
        gaps = tuple((int(a), int(b)) for a, b in self.gap_frames)
        object.__setattr__(self, "gap_frames", gaps)
        if self.width < 2 or self.height < 2:
            raise ValueError(f"frame size must be at least 2x2, got {self.width}x{self.height}")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.seconds is not None and not self.seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {self.seconds}")
        if self.frames < 0:
            raise ValueError(f"frames must be >= 0, got {self.frames}")
        for name in ("motion_px", "rotation_deg", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("scale_jitter", "brightness_jitter"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.blur_prob <= 1:
            raise ValueError(f"blur_prob must be in [0, 1], got {self.blur_prob}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must be 0 < low <= high, got {self.blur_sigma}")
        if not 0 < self.fill <= 4:
            raise ValueError(f"fill must be in (0, 4], got {self.fill}")
        if self.focus is not None and not (
            self.focus[2] > self.focus[0] and self.focus[3] > self.focus[1]
        ):
            raise ValueError(f"focus must be (x1, y1, x2, y2) with x2 > x1, y2 > y1: {self.focus}")
        for start, end in gaps:
            if not 0 <= start < end:
                raise ValueError(f"gap range must satisfy 0 <= start < end, got ({start}, {end})")

    @property
    def n_frames(self) -> int:
        """Number of frames the stream has (from ``seconds`` if set, else ``frames``)."""
        if self.seconds is not None:
            return round(self.seconds * self.fps)
        return self.frames

    def is_gap(self, index: int) -> bool:
        """True when frame ``index`` falls in one of the no-face ``gap_frames`` ranges."""
        return any(start <= index < end for start, end in self.gap_frames)


@dataclass(frozen=True, slots=True)
class FramePlan:
    """Ground truth for one generated frame.

    ``matrix`` is the 2x3 affine map from photo pixels to frame pixels (a similarity), so a
    face box known in the photo can be located in the frame. It is None on gap frames, which
    show only the background. ``gain`` multiplies the whole frame; ``blur_sigma`` is 0 when
    the frame is sharp.
    """

    index: int
    has_photo: bool
    matrix: tuple[tuple[float, float, float], tuple[float, float, float]] | None
    scale: float
    angle_deg: float
    gain: float
    blur_sigma: float


def _smooth_signal(
    seed: int, stream: int, n: int, fps: float, band: tuple[float, float]
) -> np.ndarray:
    """Sum of four sines with random frequencies in ``band`` (Hz); values lie in [-1, 1]."""
    rng = np.random.default_rng([seed, stream])
    freqs = rng.uniform(band[0], band[1], size=4)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=4)
    weights = rng.uniform(0.3, 1.0, size=4)
    weights /= weights.sum()
    t = np.arange(n, dtype=np.float64)[:, None] / fps
    return np.asarray((weights * np.sin(2.0 * math.pi * freqs * t + phases)).sum(axis=1))


def plan_frames(image_shape: tuple[int, ...], spec: StreamSpec) -> list[FramePlan]:
    """Per-frame transform, gain and blur for a photo of ``image_shape`` (height, width, ...)."""
    n = spec.n_frames
    ph, pw = int(image_shape[0]), int(image_shape[1])
    if ph < 1 or pw < 1:
        raise ValueError(f"photo is empty: shape {image_shape}")
    x1, y1, x2, y2 = spec.focus if spec.focus is not None else (0.0, 0.0, float(pw), float(ph))
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    if spec.cover:
        # Smallest scale at which the photo covers the frame, plus room for the motion, roll
        # and breathing so that no edge shows; then keep the view centre inside the photo.
        room = 1.0 + spec.scale_jitter + 2.5 * spec.motion_px / min(spec.width, spec.height)
        room += math.sin(math.radians(spec.rotation_deg)) * 1.5
        base = max(spec.width / pw, spec.height / ph) * max(1.0, spec.fill) * room
        half_w, half_h = spec.width / (2.0 * base), spec.height / (2.0 * base)
        cx = min(max(cx, half_w), pw - half_w)
        cy = min(max(cy, half_h), ph - half_h)
    else:
        base = spec.fill * min(spec.width / (x2 - x1), spec.height / (y2 - y1))
    dx = spec.motion_px * _smooth_signal(spec.seed, _RNG_X, n, spec.fps, (0.1, 0.7))
    dy = spec.motion_px * _smooth_signal(spec.seed, _RNG_Y, n, spec.fps, (0.1, 0.7))
    rot = spec.rotation_deg * _smooth_signal(spec.seed, _RNG_ROT, n, spec.fps, (0.05, 0.4))
    breath = spec.scale_jitter * _smooth_signal(spec.seed, _RNG_SCALE, n, spec.fps, (0.1, 0.4))
    gain = 1.0 + spec.brightness_jitter * _smooth_signal(
        spec.seed, _RNG_GAIN, n, spec.fps, (0.05, 0.3)
    )
    blur_rng = np.random.default_rng([spec.seed, _RNG_BLUR])
    blurred = blur_rng.random(n) < spec.blur_prob
    sigmas = blur_rng.uniform(spec.blur_sigma[0], spec.blur_sigma[1], size=n)
    plans = []
    for i in range(n):
        scale = base * (1.0 + float(breath[i]))
        angle = float(rot[i])
        # Rotate and scale about the focus centre, then put it at the frame centre + offset.
        m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
        m[0, 2] += spec.width / 2.0 + float(dx[i]) - cx
        m[1, 2] += spec.height / 2.0 + float(dy[i]) - cy
        gap = spec.is_gap(i)
        matrix = (
            None
            if gap
            else (
                (float(m[0, 0]), float(m[0, 1]), float(m[0, 2])),
                (float(m[1, 0]), float(m[1, 1]), float(m[1, 2])),
            )
        )
        sigma = float(sigmas[i]) if blurred[i] else 0.0
        plans.append(FramePlan(i, not gap, matrix, scale, angle, float(gain[i]), sigma))
    return plans


def _as_bgr(image: np.ndarray) -> ImageArray:
    """Validate a photo and return it as a contiguous HxWx3 uint8 array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("photo must be a uint8 numpy array")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ValueError(f"photo must be HxWx3 BGR (or gray/BGRA), got shape {image.shape}")
    return np.ascontiguousarray(image)


def generate_frames(image_bgr: np.ndarray, spec: StreamSpec) -> Iterator[ImageArray]:
    """Yield ``spec.n_frames`` BGR uint8 frames (height x width x 3) of the moving photo.

    Identical photo and spec give byte-identical frames; a different seed gives different
    motion, exposure, blur and noise. Gap frames show only the (exposed, noisy) background.
    """
    photo = _as_bgr(image_bgr)
    plans = plan_frames(photo.shape, spec)
    # Shrink once with area averaging so the per-frame warp does not alias; the warp then
    # only applies the small remaining scale.
    pre = min(1.0, max(p.scale for p in plans) * 1.25) if plans else 1.0
    if pre < 1.0:
        size = (max(1, round(photo.shape[1] * pre)), max(1, round(photo.shape[0] * pre)))
        small = cv2.resize(photo, size, interpolation=cv2.INTER_AREA)
        pre_x, pre_y = size[0] / photo.shape[1], size[1] / photo.shape[0]
    else:
        small, pre_x, pre_y = photo, 1.0, 1.0
    bg = tuple(float(c) for c in spec.background)
    empty = np.empty((spec.height, spec.width, 3), np.uint8)
    empty[:] = spec.background
    # Sensor noise: one seeded noise field, cropped at a random offset per frame (drawing
    # a fresh full-frame field every frame would cost most of the generation time).
    noise_rng = np.random.default_rng([spec.seed, _RNG_NOISE])
    pad = 64
    pool = noise_rng.standard_normal((spec.height + pad, spec.width + pad, 3), dtype=np.float32)
    pool *= np.float32(spec.noise_std)
    offsets = noise_rng.integers(0, pad + 1, size=(len(plans), 2))
    for plan in plans:
        frame: np.ndarray
        if plan.matrix is None:
            frame = empty
        else:
            m = np.array(plan.matrix, dtype=np.float64)
            m[:, 0] /= pre_x
            m[:, 1] /= pre_y
            frame = cv2.warpAffine(
                small,
                m,
                (spec.width, spec.height),
                flags=cv2.INTER_LINEAR,
                # A camera view never shows an edge: mirror the last pixels if motion reaches it.
                borderMode=cv2.BORDER_REFLECT_101 if spec.cover else cv2.BORDER_CONSTANT,
                borderValue=bg,
            )
        out: np.ndarray = frame.astype(np.float32) * np.float32(plan.gain)
        if plan.blur_sigma > 0:
            out = cv2.GaussianBlur(out, (0, 0), plan.blur_sigma)
        if spec.noise_std > 0:
            oy, ox = offsets[plan.index]
            out += pool[oy : oy + spec.height, ox : ox + spec.width]
        np.clip(out + 0.5, 0, 255, out=out)
        yield out.astype(np.uint8)


def _check_frame(frame: np.ndarray, size: tuple[int, int] | None) -> tuple[int, int]:
    """Check one BGR frame and that it has ``size`` (width, height) if given."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be HxWx3 uint8, got {frame.dtype} {frame.shape}")
    got = (int(frame.shape[1]), int(frame.shape[0]))
    if size is not None and got != size:
        raise ValueError(f"all frames must be {size[0]}x{size[1]}, got {got[0]}x{got[1]}")
    return got


def write_video(frames: Iterable[np.ndarray], path: str | Path, fps: float) -> int:
    """Write frames to ``.mp4`` (mp4v) or ``.avi`` (MJPG); return the number written."""
    path = Path(path)
    fourcc = _FOURCC.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"unknown video extension {path.suffix!r}; use .mp4 or .avi")
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("no frames to write")
    size = _check_frame(first, None)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), float(fps), size)
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot open a {fourcc} writer for {path}")
    count = 0
    try:
        for frame in _chain(first, it):
            _check_frame(frame, size)
            writer.write(np.ascontiguousarray(frame))
            count += 1
    finally:
        writer.release()
    return count


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Yield ``first`` then everything in ``rest``."""
    yield first
    yield from rest


def _fps_fraction(fps: float) -> Fraction:
    """Frame rate as a small fraction (30.0 -> 30/1, 30000/1001 -> 30000/1001)."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def write_y4m(frames: Iterable[np.ndarray], path: str | Path, fps: float) -> int:
    """Write frames as YUV4MPEG2 4:2:0 (C420jpeg); return the number written.

    Width and height must be even (I420 chroma planes are half size in both directions).
    """
    rate = _fps_fraction(fps)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("no frames to write")
    w, h = _check_frame(first, None)
    if w % 2 or h % 2:
        raise ValueError(f"y4m (I420) needs even width and height, got {w}x{h}")
    header = f"YUV4MPEG2 W{w} H{h} F{rate.numerator}:{rate.denominator} Ip A1:1 C420jpeg\n"
    count = 0
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        for frame in _chain(first, it):
            _check_frame(frame, (w, h))
            f.write(b"FRAME\n")
            f.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_BGR2YUV_I420).tobytes())
            count += 1
    return count


def _read_y4m_header(f: BinaryIO) -> tuple[int, int, Fraction]:
    """Parse a YUV4MPEG2 stream header from binary file ``f``."""
    line = f.readline(4096)
    if not line.startswith(b"YUV4MPEG2 ") or not line.endswith(b"\n"):
        raise ValueError("not a YUV4MPEG2 file")
    fields = {tok[:1]: tok[1:] for tok in line.decode("ascii").split()[1:]}
    try:
        w, h = int(fields["W"]), int(fields["H"])
        num, den = fields.get("F", "30:1").split(":")
        rate = Fraction(int(num), int(den))
    except (KeyError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"bad YUV4MPEG2 header: {line!r}") from exc
    colour = fields.get("C", "420jpeg")
    if colour not in _Y4M_420:
        raise ValueError(f"only 4:2:0 y4m is supported, got C{colour}")
    if w <= 0 or h <= 0 or w % 2 or h % 2:
        raise ValueError(f"y4m size must be positive and even, got {w}x{h}")
    return w, h, rate


def y4m_info(path: str | Path) -> tuple[int, int, float]:
    """Return (width, height, fps) from a YUV4MPEG2 file's header."""
    with open(path, "rb") as f:
        w, h, rate = _read_y4m_header(f)
    return w, h, float(rate)


def read_y4m(path: str | Path) -> Iterator[ImageArray]:
    """Yield the frames of a 4:2:0 YUV4MPEG2 file as BGR uint8 arrays."""
    with open(path, "rb") as f:
        w, h, _ = _read_y4m_header(f)
        plane = w * h * 3 // 2
        while True:
            tag = f.readline(4096)
            if not tag:
                return
            if not tag.startswith(b"FRAME"):
                raise ValueError(f"bad y4m frame header: {tag[:32]!r}")
            data = f.read(plane)
            if len(data) != plane:
                raise ValueError("truncated y4m frame")
            yuv = np.frombuffer(data, np.uint8).reshape(h * 3 // 2, w)
            yield np.asarray(cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR_I420), dtype=np.uint8)


def make_stream(photo_bgr: np.ndarray, out_path: str | Path, spec: StreamSpec) -> int:
    """Generate the stream for ``photo_bgr`` and write it to ``.y4m``, ``.mp4`` or ``.avi``.

    Returns the number of frames written.
    """
    suffix = Path(out_path).suffix.lower()
    if suffix == ".y4m":
        if spec.width % 2 or spec.height % 2:
            raise ValueError(
                f"y4m (I420) needs even width and height, got {spec.width}x{spec.height}"
            )
        return write_y4m(generate_frames(photo_bgr, spec), out_path, spec.fps)
    if suffix in _FOURCC:
        return write_video(generate_frames(photo_bgr, spec), out_path, spec.fps)
    raise ValueError(f"unknown stream extension {suffix!r}; use .y4m, .mp4 or .avi")
