"""Newest-frame-wins hand-off from the video receiver to the session worker.

The receiver ``put``s every decoded frame; the worker ``get``s the newest one when it is ready
for more. A frame replaced before anyone took it counts as dropped: we never queue frames, so
a slow CPU lowers the analysed frame rate instead of growing a backlog and the latency.

The slot also says whether frames are wanted at all: a session holds :meth:`FrameSlot.wanted`
while it looks at the video (a checkout while it scans, an enrolment while it captures, a gate
always). Between those windows the receiver does not decode the stream, and when a window
opens ``on_demand`` asks the camera for a fresh keyframe to restart from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TimedFrame(Generic[T]):
    """A frame and the monotonic time (seconds) it arrived.

    ``since``: when the first frame not looked at before this one arrived (``t`` unless
    frames were dropped since the last one taken). Something this frame shows may have been
    in those dropped frames already: a gate starts its decision clock there.
    """

    frame: T
    t: float
    index: int
    since: float


class FrameSlot(Generic[T]):
    """Holds at most one frame: the newest."""

    def __init__(self) -> None:
        self._item: TimedFrame[T] | None = None
        self._event = asyncio.Event()
        self._closed = False
        self.received = 0
        self.dropped = 0
        self.taken = 0
        self._demand = 0
        # Arrival of the first frame put since the last one taken (None: none since).
        self._since: float | None = None
        #: Called (on the event loop) each time frames become wanted after a pause.
        self.on_demand: Callable[[], None] | None = None
        #: Called for each frame dropped unanalysed (the server's metric counts them).
        self.on_dropped: Callable[[], None] | None = None

    def put(self, frame: T, t: float) -> None:
        """Offer a frame; an untaken older frame is dropped."""
        if self._closed:
            return
        if self._item is not None:
            self._dropped()
        self.received += 1
        if self._since is None:
            self._since = t
        self._item = TimedFrame(frame, t, self.received, min(self._since, t))
        self._event.set()

    async def get(self, timeout: float | None = None) -> TimedFrame[T] | None:
        """The newest frame not yet taken; waits for one. None on timeout or when closed."""
        while self._item is None and not self._closed:
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                return None
        item, self._item = self._item, None
        if item is not None:
            self.taken += 1
            self._since = None
        return item

    def drop_older(self, t: float) -> None:
        """Drop the waiting frame if it arrived before ``t`` (counted as dropped)."""
        if self._item is not None and self._item.t < t:
            self._item = None
            self._dropped()

    def _dropped(self) -> None:
        self.dropped += 1
        if self.on_dropped is not None:
            self.on_dropped()

    def clear(self) -> None:
        """Forget a waiting frame (e.g. when a new checkout starts); not counted as dropped."""
        self._item = None
        self._since = None

    @property
    def in_demand(self) -> bool:
        """True while some session holds :meth:`wanted`."""
        return self._demand > 0

    @contextlib.contextmanager
    def wanted(self) -> Iterator[None]:
        """Frames are wanted while this is held (nested holds count)."""
        self._demand += 1
        try:
            if self._demand == 1 and self.on_demand is not None:
                try:
                    self.on_demand()
                except Exception:  # a failed keyframe request must not end a session
                    log.exception("on_demand callback failed")
            yield
        finally:
            self._demand -= 1

    def close(self) -> None:
        """Wake waiters; further puts are ignored."""
        self._closed = True
        self._event.set()

    @property
    def closed(self) -> bool:
        """True once the stream has ended."""
        return self._closed
