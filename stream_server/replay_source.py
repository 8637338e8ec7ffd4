"""Frame sources for ``facepay replay`` and the track that plays them in real time.

A SOURCE is a photo (made into a camera-view stream with small natural motion by
:mod:`pipeline.streamgen`), a video file (decoded with PyAV, looped if shorter than needed)
or a folder of photos (each a short camera-view segment, in name order, with a moment of
empty scene between them). Every source yields 640x480 BGR frames for ``seconds``; after
that :class:`ReplayTrack` keeps sending the last frame until it is stopped.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import av
import cv2
import numpy as np
from aiortc import VideoStreamTrack
from aiortc.mediastreams import MediaStreamError

from pipeline.errors import FacePayError, ImageError
from pipeline.image import load_image
from pipeline.streamgen import StreamSpec, generate_frames

log = logging.getLogger(__name__)

FRAME_W, FRAME_H = 640, 480
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
#: Empty scene shown between two photos of a folder, so a tracker sees two people, not one.
FOLDER_GAP_S = 0.3
_CLOCK = 90000
Box = tuple[float, float, float, float]
#: Finds the box (photo pixels) a camera would frame in a photo, or None to centre it.
Locate = Callable[[np.ndarray], Box | None]


class ReplaySourceError(FacePayError):
    """SOURCE is missing, unreadable or holds nothing to stream."""

    code = "bad_source"


def _fit(image: np.ndarray, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Scale and crop ``image`` to fill 640x480 (no bars, aspect kept).

    The crop is centred on ``centre`` (image pixels) as far as the image allows, else on
    the middle of the image.
    """
    h, w = image.shape[:2]
    if (w, h) == (FRAME_W, FRAME_H):
        return image
    scale = max(FRAME_W / w, FRAME_H / h)
    size = (max(FRAME_W, round(w * scale)), max(FRAME_H, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, size, interpolation=interp)
    x0, y0 = (size[0] - FRAME_W) // 2, (size[1] - FRAME_H) // 2
    if centre is not None:
        x0 = min(max(round(centre[0] * scale - FRAME_W / 2), 0), size[0] - FRAME_W)
        y0 = min(max(round(centre[1] * scale - FRAME_H / 2), 0), size[1] - FRAME_H)
    return np.ascontiguousarray(resized[y0 : y0 + FRAME_H, x0 : x0 + FRAME_W])


def _upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a video's display rotation (phones store portrait video sideways).

    ``rotation`` is FFmpeg's: degrees counter-clockwise; showing the frame upright takes the
    opposite turn, as ``ffmpeg`` itself does on playback.
    """
    turn = (-round(rotation / 90) * 90) % 360
    if turn == 90:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if turn == 180:
        return cv2.rotate(image, cv2.ROTATE_180)
    if turn == 270:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


def _decoded(frame: av.VideoFrame) -> np.ndarray:
    """One decoded video frame as an upright BGR image."""
    return _upright(frame.to_ndarray(format="bgr24"), int(frame.rotation or 0))


def _video_face_centre(
    path: Path, locate: Locate, seconds: float = 2.0
) -> tuple[float, float] | None:
    """Where the face is in the first ``seconds`` of a video (upright pixels), or None.

    One fixed crop for the whole video, as a camera that does not move: every 5th frame is
    looked at until a face is found.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 25)
        first: float | None = None
        for index, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else index / rate
            first = t if first is None else first
            if t - first > seconds:
                break
            if index % 5:
                continue
            box = locate(_decoded(frame))
            if box is not None:
                return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    return None


def photo_frames(
    image: np.ndarray, *, fps: float, seconds: float, focus: Box | None = None, seed: int = 0
) -> Iterator[np.ndarray]:
    """A camera-view stream of one photo (``focus``: box in photo pixels to centre on)."""
    spec = StreamSpec(fps=fps, seconds=seconds, cover=True, focus=focus, seed=seed)
    return generate_frames(image, spec)


def folder_frames(
    folder: Path, *, fps: float, seconds: float, locate: Locate | None = None
) -> Iterator[np.ndarray]:
    """Each photo of ``folder`` in name order, ``seconds`` shared out (at least 1 s each).

    ``locate`` picks what each photo's camera view centres on (default: the centre).
    """
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not photos:
        raise ReplaySourceError(f"{folder}: no photos ({', '.join(sorted(IMAGE_EXTS))})")
    segment = max(1.0, seconds / len(photos))
    n = round(segment * fps)
    gap = min(n // 3, round(FOLDER_GAP_S * fps))

    def frames() -> Iterator[np.ndarray]:
        for i, path in enumerate(photos):
            try:
                image = load_image(path)
            except ImageError as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            gaps = ((n - gap, n),) if gap and i < len(photos) - 1 else ()
            focus = locate(image) if locate is not None else None
            spec = StreamSpec(fps=fps, frames=n, cover=True, focus=focus, seed=i, gap_frames=gaps)
            yield from generate_frames(image, spec)

    return frames()


def video_frames(
    path: Path, *, fps: float, seconds: float, locate: Locate | None = None
) -> Iterator[np.ndarray]:
    """``seconds`` of ``path`` resampled to ``fps`` in its own time, looped if shorter.

    Frames are turned upright (display rotation) and cropped to 640x480 around the face
    ``locate`` finds early in the video, else around the middle.
    """
    needed = round(seconds * fps)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ReplaySourceError(f"{path}: no video stream")
    except (av.FFmpegError, OSError) as exc:
        raise ReplaySourceError(f"{path}: not a readable photo or video ({exc})") from exc

    def frames() -> Iterator[np.ndarray]:
        centre = _video_face_centre(path, locate) if locate is not None else None
        produced, offset = 0, 0.0
        while produced < needed:
            last: np.ndarray | None = None
            first_t: float | None = None
            t = 0.0
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                rate = float(stream.average_rate or 25)
                for index, frame in enumerate(container.decode(stream)):
                    ft = frame.time if frame.time is not None else index / rate
                    first_t = ft if first_t is None else first_t
                    t = ft - first_t
                    # Output frames due before this decoded frame show the previous one.
                    while last is not None and produced < needed and produced / fps < offset + t:
                        yield last
                        produced += 1
                    if produced >= needed:
                        return
                    last = _fit(_decoded(frame), centre)
            if last is None:
                raise ReplaySourceError(f"{path}: no decodable video frames")
            offset += t + 1.0 / rate
            while produced < needed and produced / fps < offset:
                yield last
                produced += 1

    return frames()


def open_source(
    source: str | Path,
    *,
    fps: float,
    seconds: float,
    focus: Box | None = None,
    locate: Locate | None = None,
) -> Iterator[np.ndarray]:
    """Frames (640x480 BGR) for SOURCE: a photo, a video file or a folder of photos.

    A photo's camera view centres on ``focus`` if given, else on what ``locate`` finds
    (a portrait's centre crop often shows a chest, not a face), else on the centre. A video
    is turned upright and cropped around the face ``locate`` finds in its first seconds.
    """
    path = Path(source)
    if not path.exists():
        raise ReplaySourceError(f"{path}: no such file or folder")
    if path.is_dir():
        return folder_frames(path, fps=fps, seconds=seconds, locate=locate)
    if path.suffix.lower() in IMAGE_EXTS:
        try:
            image = load_image(path)
        except ImageError as exc:
            raise ReplaySourceError(str(exc)) from exc
        if focus is None and locate is not None:
            focus = locate(image)
        return photo_frames(image, fps=fps, seconds=seconds, focus=focus)
    return video_frames(path, fps=fps, seconds=seconds, locate=locate)


def camera_rate(max_fps: object) -> float | None:
    """A ``camera`` request's ``max_fps`` as a camera can use it: a positive number, else None
    (the full rate: a camera that cannot make sense of a request errs towards frames)."""
    if isinstance(max_fps, bool) or not isinstance(max_fps, int | float) or not max_fps > 0:
        return None
    return float(max_fps)


class ReplayTrack(VideoStreamTrack):
    """Plays BGR frames at ``fps`` in real time; repeats the last one once they run out.

    Frames are produced in a worker thread. ``source_done`` is set when the frames run out;
    ``first_frame_at`` is the ``time.monotonic()`` of the first frame handed to the sender.
    """

    def __init__(self, frames: Iterable[np.ndarray], fps: float = 15.0) -> None:
        super().__init__()
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self._frames = iter(frames)
        self._last: np.ndarray | None = None
        self._pending: asyncio.Future[np.ndarray | None] | None = None
        self._t0: float | None = None
        self._pts = 0.0
        self.frames_sent = 0
        #: Frames the camera took but did not send, at a rate asked by :meth:`set_max_fps`.
        self.frames_held = 0
        self._interval = 0.0  # at a capped rate, seconds between frames sent (0: all)
        self._due: float | None = None  # the camera's clock time of the next frame to send
        self.first_frame_at: float | None = None
        self.source_done = asyncio.Event()
        self.source_error: str | None = None

    def set_max_fps(self, max_fps: float | None) -> None:
        """Send at most ``max_fps`` frames a second (None: all), as a browser's camera does
        with ``maxFramerate``: the camera keeps its ``fps`` clock and source, and leaves
        frames out so that those sent average ``max_fps`` (every second one for
        ``fps / 2``; 15 of every 25 of a 25 fps video capped at 15)."""
        if max_fps is None or not max_fps > 0 or max_fps >= self.fps:
            self._interval = 0.0  # a rate it cannot make sense of: every frame, never fewer
        else:
            self._interval = 1.0 / max_fps
        self._due = None

    def _keeps(self, t: float) -> bool:
        """Whether the frame at camera time ``t`` (seconds) is sent at the current cap."""
        if not self._interval:
            return True
        # Half a frame's slack absorbs rounding; a frame is never held for a late one.
        if self._due is not None and t < self._due - 0.5 / self.fps:
            return False
        due = self._due
        # Behind (the first frame, or a gap in the frames): count from this one.
        self._due = (t if due is None or t - due >= self._interval else due) + self._interval
        return True

    async def next_timestamp(self) -> tuple[int, fractions.Fraction]:
        """Wait until the next frame is due at ``fps``; return its pts in a 90 kHz clock."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            self._pts += _CLOCK / self.fps
            wait = self._t0 + self._pts / _CLOCK - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        return round(self._pts), fractions.Fraction(1, _CLOCK)

    def _next_source_frame(self) -> np.ndarray | None:
        try:
            return next(self._frames, None)
        except Exception as exc:  # a broken source ends it; the stream goes on
            log.warning("replay source failed: %s", exc)
            self.source_error = str(exc)
            return None

    async def _next_image(self) -> np.ndarray:
        if not self.source_done.is_set():
            if self._pending is None:
                loop = asyncio.get_running_loop()
                self._pending = loop.run_in_executor(None, self._next_source_frame)
            image = await asyncio.shield(self._pending)  # survives a cancelled recv()
            self._pending = None
            if image is None:
                self.source_done.set()
            else:
                self._last = _fit(image)
        if self._last is None:
            self._last = np.full((FRAME_H, FRAME_W, 3), 120, np.uint8)
        return self._last

    async def recv(self) -> av.VideoFrame:
        """The next frame, paced at ``fps`` (frames left out by a rate limit take their time)."""
        while True:
            pts, time_base = await self.next_timestamp()
            image = await self._next_image()
            if self._keeps(pts / _CLOCK):
                break
            self.frames_held += 1
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts, frame.time_base = pts, time_base
        if self.first_frame_at is None:
            self.first_frame_at = time.monotonic()
        self.frames_sent += 1
        return frame
