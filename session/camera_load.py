"""Ask a checkout camera for fewer frames while the server cannot analyse what it sends.

Newest frame wins: a frame the session has no time for is dropped, never queued. But it has
been received and decoded first (a VP8 stream cannot skip a frame without restarting from a
keyframe), so an overloaded server spends more and more of its CPU on frames nobody looks
at: 69 % of the frames received at 12 checkout terminals on 2 cores, 77 % at 16, and its
throughput falls below what it managed at 8 (docs/performance.md). The camera can send
fewer instead, with the same ``camera {max_fps}`` request as the cap after each answer.

:class:`LoadPacer` watches one video connection's frames in windows of about ``window_s``
seconds at the rate last asked for (at least :data:`MIN_WINDOW_FRAMES` frames received):

- when the session analysed less than ``lower_below`` of them in ``lower_after`` windows in
  a row, it asks for about ``headroom`` times the rate it analysed (never below
  ``min_fps``). One window is not enough: at the target load (8 terminals on 2 cores) about
  half the frames are analysed, and single windows of a second dip below a third;
- when it analysed ``raise_above`` or more in a window, it asks for ``raise_step`` times
  more, up to the configured cap; the window being in seconds, a camera lowered to 5 fps
  is back at 15 after about three seconds of scanning;
- between the two it holds.

A lowered rate would outlast the rush that caused it: a kiosk's camera pauses between
shoppers, so a calm server sees a window of frames (a step back up) only once a shopper or
two, and on an idle server a 5 fps camera confirms in 970 ms against 373 ms at 15 fps. So when
a checkout starts scanning, a lowered camera is asked for the full rate again at once if the
server as a whole is keeping up (:class:`CheckoutLoad`: ``raise_above`` or more of all its
checkout cameras' frames analysed lately, or too few frames to tell); in a rush it is not.

Only the rate of frames changes, never what a frame must show, so a wrong guess costs time
or CPU, never a decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from session.config import FacePayConfig, LoadPacingConfig

#: Fewer frames than this are no evidence of load, whatever the rate.
MIN_WINDOW_FRAMES = 4


def camera_event(max_fps: float | None) -> dict[str, Any]:
    """The ``camera`` request (docs/protocol.md): at most ``max_fps`` frames a second, or
    the camera's own rate again for None. A checkout's cap and load pacing, an enrolment's
    cap and an idle gate all ask with it; the pages apply it as the sender's
    ``maxFramerate``."""
    return {"type": "camera", "max_fps": max_fps}


def pacer_for(
    config: FacePayConfig,
    mode: str,
    received: int = 0,
    taken: int = 0,
    load: CheckoutLoad | None = None,
) -> LoadPacer | None:
    """A pacer for a new video connection of a ``mode`` terminal, or None: only checkout
    cameras are paced (a gate's by its session), and only with a cap to come back to.
    ``received`` and ``taken`` are the frame slot's counts now (it outlives connections);
    ``load`` is the server's, shared by all its checkout connections."""
    cap, pacing = config.camera_cap(mode), config.checkout.load_pacing
    if mode != "checkout" or cap is None or not pacing.enabled:
        return None
    return LoadPacer(pacing, cap, received, taken, load)


class CheckoutLoad:
    """The share of its checkout cameras' frames the whole server analysed lately.

    Frames received and analysed are summed with weights that fall by e every ``window_s``
    seconds, so the share is that of about the last window, and the sums are about the
    frames of a window. One per server process: it is that process's CPU that is short.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._t = clock()
        self._received = 0.0
        self._taken = 0.0

    def _decay(self) -> None:
        now = self._clock()
        weight = math.exp(-max(0.0, now - self._t) / self.window_s)
        self._received *= weight
        self._taken *= weight
        self._t = now

    def add(self, received: int, taken: int) -> None:
        """Frames received and taken for analysis by one camera since its last report."""
        self._decay()
        self._received += received
        self._taken += taken

    def share(self) -> float | None:
        """The share analysed over about the last window; None with too few frames to tell
        (no camera sends: nothing is short of CPU because of them)."""
        self._decay()
        if self._received < MIN_WINDOW_FRAMES:
            return None
        return min(1.0, self._taken / self._received)


class LoadPacer:
    """The frame rate to ask of one camera, from how many of its frames were analysed."""

    def __init__(
        self,
        config: LoadPacingConfig,
        full_fps: float,
        received: int = 0,
        taken: int = 0,
        load: CheckoutLoad | None = None,
    ) -> None:
        self.cfg = config
        #: The rate asked for at the answer: the ceiling.
        self.full_fps = full_fps
        #: The rate asked for now.
        self.fps = full_fps
        self.load = load
        # The slot's counts at the last update, for what ``load`` is told.
        self._seen = (received, taken)
        self._start_window(received, taken)

    def _start_window(self, received: int, taken: int) -> None:
        # The slot's counts where the window starts: an earlier connection's frames are no
        # evidence of this one's load.
        self._received = received
        self._taken = taken
        # Frames received and analysed in the windows below ``lower_below`` in a row.
        self._low_windows = 0
        self._low_received = 0
        self._low_taken = 0

    @property
    def window_frames(self) -> int:
        """Frames received per window at the rate asked for now."""
        return max(MIN_WINDOW_FRAMES, round(self.cfg.window_s * self.fps))

    def update(self, received: int, taken: int) -> float | None:
        """The slot's running counts of frames received and taken for analysis; returns a
        new rate to ask for, or None to keep the current one."""
        if self.load is not None:
            self.load.add(received - self._seen[0], max(0, taken - self._seen[1]))
            self._seen = (received, taken)
        got = received - self._received
        if got < self.window_frames:
            return None
        took = max(0, taken - self._taken)
        wanted = None
        if took < self.cfg.lower_below * got:
            self._received, self._taken = received, taken
            self._low_windows += 1
            self._low_received += got
            self._low_taken += took
            if self._low_windows >= self.cfg.lower_after:
                share = self._low_taken / self._low_received
                wanted = max(self.cfg.min_fps, self.cfg.headroom * share * self.fps)
                wanted = min(wanted, self.full_fps)  # a floor above the cap: the cap
                self._start_window(received, taken)
        else:
            self._start_window(received, taken)
            if took >= self.cfg.raise_above * got and self.fps < self.full_fps:
                wanted = min(self.full_fps, self.cfg.raise_step * self.fps)
        if wanted is None:
            return None
        wanted = round(wanted, 1)
        if wanted == self.fps:
            return None
        self.fps = wanted
        return wanted

    def new_scan(self, received: int, taken: int) -> float | None:
        """A checkout starts scanning (frames wanted again after a pause): the full rate at
        once if the camera was lowered and the server keeps up with its checkout cameras
        now (``restart_full``), else None (keep the rate)."""
        if not self.cfg.restart_full or self.fps >= self.full_fps:
            return None
        share = self.load.share() if self.load is not None else None
        if share is not None and share < self.cfg.raise_above:
            return None  # still a rush: the lowered rate is what the server can analyse
        self._start_window(received, taken)
        self.fps = self.full_fps
        return self.fps
