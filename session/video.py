"""What every session fed by a terminal's video shares (checkout, gate, enrolment).

The newest frame is taken from the slot, converted and analysed in the executor (never on the
event loop), and the per-stage timings go to the observer. ``stop()`` is a flag as well as
the connection's cancel: on Python 3.11 redis-py can swallow ``Task.cancel()`` (its
``wait_for`` returns a reply that already arrived), so each session checks the flag before
anything that charges or stores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.stream import StreamAnalyzer, TrackReport
from session.frames import FrameSlot, TimedFrame
from session.services import SessionServices

log = logging.getLogger(__name__)
#: Face boxes and hints are pushed to the terminal at most this often (pages draw them).
FACES_EVENT_INTERVAL_S = 0.2
Emit = Callable[[dict[str, Any]], Awaitable[None]]
Analysed = tuple[list[TrackReport], tuple[int, int], TimedFrame[Any]]


def nearest(reports: list[TrackReport]) -> TrackReport | None:
    """The largest face in view (the person nearest the camera), or None if there is none."""
    return max(reports, key=lambda r: r.face.box.area, default=None)


class VideoSession:
    """Base of the video-fed sessions: frames in, analysed reports out, events to the terminal."""

    label = "session"

    def __init__(
        self,
        services: SessionServices,
        frames: FrameSlot[Any],
        emit: Emit,
        pipeline: PipelineConfig,
    ) -> None:
        self.svc = services
        self.frames = frames
        self.emit = emit
        self.stream = StreamAnalyzer(services.analyzer, pipeline)
        self._stopped = False
        #: Timings of the last analysed frame (ms): ``frame`` (analysis), ``frame_age``
        #: (how old the frame was when analysis started), and per stage.
        self.last_timings: dict[str, float] = {}
        self._last_faces_event = 0.0
        #: An analysis that outlived its ``analysis_timeout`` and still runs in its thread.
        self._busy: asyncio.Future[Any] | None = None

    def stop(self) -> None:
        """The terminal is gone: from now on nothing may be charged or stored."""
        self._stopped = True

    def _forget_faces(self) -> None:
        """Drop what this session holds of the faces it saw (the tracks' embeddings and
        scores) and any frame still waiting. Called when a checkout or an enrolment ends:
        its connection keeps the finished session until the next one starts, and a kiosk
        stays connected all day (docs/privacy.md)."""
        self.stream = StreamAnalyzer(self.svc.analyzer, self.stream.config)
        self.frames.clear()

    async def _send(self, event: dict[str, Any]) -> None:
        try:
            await self.emit(event)
        except (ConnectionError, RuntimeError):
            # The terminal went away; the connection handler stops us shortly.
            log.debug("%s: could not send %s", self.label, event.get("type"))

    def _faces_due(self) -> bool:
        """Whether a faces/feedback event may be sent now (throttled to the interval)."""
        now = time.monotonic()
        if now - self._last_faces_event < FACES_EVENT_INTERVAL_S:
            return False
        self._last_faces_event = now
        return True

    async def _send_faces(self, size: tuple[int, int], **drawn: Any) -> None:
        """A ``faces`` event: the analysed frame's size and what the mode draws on it."""
        await self._send({"type": "faces", "width": size[0], "height": size[1], **drawn})

    def _analyse(
        self, frame: Any, t: float, since: float
    ) -> tuple[list[TrackReport], tuple[int, int]]:
        """Worker thread: convert the frame and run the pipeline on it."""
        image = self.svc.to_bgr(frame)
        reports = self.stream.process(image, t, since=since)
        return reports, (int(image.shape[1]), int(image.shape[0]))

    async def _analyse_next(
        self, timeout: float, analysis_timeout: float | None = None
    ) -> Analysed | None:
        """The newest frame, analysed in the executor; None if none came within ``timeout``.

        With ``analysis_timeout`` the wait for the executor is bounded too (an overloaded or
        stuck executor must not hold a session past its deadline): None if the analysis did
        not finish in time. That job still runs in its thread; no other analysis of this
        stream starts until it has finished (the tracker is not thread-safe).
        """
        if self._busy is not None:
            done, _ = await asyncio.wait({self._busy}, timeout=timeout)
            if not done:
                return None
            self._busy = None
        item = await self.frames.get(timeout=timeout)
        if item is None:
            return None
        age_ms = (time.monotonic() - item.t) * 1000.0
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self.svc.executor, self._analyse, item.frame, item.t, item.since)
        try:
            reports, size = await asyncio.wait_for(asyncio.shield(job), analysis_timeout)
        except TimeoutError:
            log.warning("%s: frame analysis took over %.1f s", self.label, analysis_timeout)
            # Abandoned, not lost: retrieve its outcome so no error goes unreported.
            job.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._busy = job
            return None
        except asyncio.CancelledError:
            job.cancel()  # a job still queued never runs for a session that is gone
            raise
        timings = {"frame": (time.perf_counter() - t0) * 1000.0, "frame_age": age_ms}
        for r in reports:
            timings.update(r.analysis.timings_ms)
        self.svc.observer.frame_processed(timings, detector_ran=self.stream.detector_ran)
        self.last_timings = timings
        return reports, size, item
