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

Only the rate of frames changes, never what a frame must show, so a wrong guess costs time
or CPU, never a decision.
"""

from __future__ import annotations

from session.config import FacePayConfig, LoadPacingConfig

#: Fewer frames than this are no evidence of load, whatever the rate.
MIN_WINDOW_FRAMES = 4


def pacer_for(
    config: FacePayConfig, mode: str, received: int = 0, taken: int = 0
) -> LoadPacer | None:
    """A pacer for a new video connection of a ``mode`` terminal, or None: only checkout
    cameras are paced (a gate's by its session), and only with a cap to come back to.
    ``received`` and ``taken`` are the frame slot's counts now (it outlives connections)."""
    cap, pacing = config.camera_cap(mode), config.checkout.load_pacing
    if mode != "checkout" or cap is None or not pacing.enabled:
        return None
    return LoadPacer(pacing, cap, received, taken)


class LoadPacer:
    """The frame rate to ask of one camera, from how many of its frames were analysed."""

    def __init__(
        self, config: LoadPacingConfig, full_fps: float, received: int = 0, taken: int = 0
    ) -> None:
        self.cfg = config
        #: The rate asked for at the answer: the ceiling.
        self.full_fps = full_fps
        #: The rate asked for now.
        self.fps = full_fps
        # The slot's counts where the first window starts: an earlier connection's frames
        # are no evidence of this one's load.
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
        got = received - self._received
        if got < self.window_frames:
            return None
        took = max(0, taken - self._taken)
        self._received, self._taken = received, taken
        wanted = None
        if took < self.cfg.lower_below * got:
            self._low_windows += 1
            self._low_received += got
            self._low_taken += took
            if self._low_windows >= self.cfg.lower_after:
                share = self._low_taken / self._low_received
                wanted = max(self.cfg.min_fps, self.cfg.headroom * share * self.fps)
                wanted = min(wanted, self.full_fps)  # a floor above the cap: the cap
                self._low_windows = self._low_received = self._low_taken = 0
        else:
            self._low_windows = self._low_received = self._low_taken = 0
            if took >= self.cfg.raise_above * got and self.fps < self.full_fps:
                wanted = min(self.full_fps, self.cfg.raise_step * self.fps)
        if wanted is None:
            return None
        wanted = round(wanted, 1)
        if wanted == self.fps:
            return None
        self.fps = wanted
        return wanted
