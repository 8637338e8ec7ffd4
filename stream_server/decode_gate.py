"""Decode a terminal's video only while a session wants frames.

A kiosk's camera streams all day, but a checkout looks at it for about half a second per
shopper. Decoding VP8 costs ~1.2 ms per 640x480 frame; 15 frames a second from every kiosk,
decoded while nobody is paying, is CPU spent on nothing (and with inter frames, a frame cannot
be decoded alone later: the decoder must have seen every frame since the last keyframe).

So the gate sits in front of aiortc's decoder. While ``wanted()`` is false, complete encoded
frames are counted and discarded; the decoder thread idles. When frames are wanted again, the
gate asks the sender for a keyframe (RTCP PLI, RFC 4585 6.3.1, which browsers and aiortc
answer at once) and passes frames from the first keyframe on, so the decoder never sees an
inter frame whose reference it skipped (libvpx would draw it from a stale picture). Until that
keyframe arrives, the request is repeated every ``retry_s``; a sender that never sends one
gives the session no frames, and the session times out: the gate fails closed.

aiortc has no public hook for this: :func:`install` wraps ``put`` on the receiver's decoder
queue (``RTCRtpReceiver.__decoder_queue``, aiortc 1.16). If that attribute is missing (another
aiortc), it logs a warning and leaves the receiver decoding everything, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpReceiver

log = logging.getLogger(__name__)

#: Ask again for a keyframe this often while waiting for one.
RETRY_S = 0.3


def is_keyframe(codec_name: str, data: bytes) -> bool:
    """Whether an encoded frame (RTP payloads reassembled) can be decoded on its own.

    VP8 (RFC 6386 9.1): bit 0 of the frame tag is 0 for a key frame. H.264 (Annex B, as
    aiortc reassembles it): the frame holds an IDR slice (NAL type 5). Other codecs are
    treated as always decodable, so the gate never withholds what it cannot judge.
    """
    if not data:
        return False
    name = codec_name.upper()
    if name == "VP8":
        return data[0] & 0x01 == 0
    if name == "H264":
        i = data.find(b"\x00\x00\x01")
        while i != -1 and i + 3 < len(data):
            if data[i + 3] & 0x1F == 5:
                return True
            i = data.find(b"\x00\x00\x01", i + 3)
        return False
    return True


class DecodeGate:
    """Passes encoded frames to the decoder only while ``wanted()``, restarting on keyframes."""

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        wanted: Callable[[], bool],
        on_skipped: Callable[[], None] | None = None,
        retry_s: float = RETRY_S,
    ) -> None:
        self._receiver = receiver
        self._wanted = wanted
        self._on_skipped = on_skipped
        self._retry_s = retry_s
        self._need_key = True  # the decoder has seen nothing it could predict from
        self._asked_at = -1e9
        self._tasks: set[asyncio.Task[None]] = set()
        #: Encoded frames passed to the decoder / discarded undecoded.
        self.passed = 0
        self.skipped = 0

    def put(self, item: Any, put: Callable[[Any], None]) -> None:
        """Replacement for the decoder queue's ``put`` (runs on the event loop)."""
        if item is None:  # the receiver stopping its decoder thread
            put(item)
            return
        codec, frame = item
        if not self._wanted():
            self._need_key = True
            self._skip()
            return
        if self._need_key:
            if not is_keyframe(codec.name, frame.data):
                self._skip()
                self.request_keyframe(force=False)
                return
            self._need_key = False
        self.passed += 1
        put(item)

    def resume(self) -> None:
        """Frames are wanted again: if any were skipped, ask for a keyframe now."""
        if self._need_key:
            self.request_keyframe()

    def request_keyframe(self, force: bool = True) -> None:
        """Ask the sender for a keyframe (at most once per ``retry_s`` unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._asked_at < self._retry_s:
            return
        self._asked_at = now
        for source in self._receiver.getSynchronizationSources():
            task = asyncio.ensure_future(self._receiver._send_rtcp_pli(source.source))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _skip(self) -> None:
        self.skipped += 1
        if self._on_skipped is not None:
            self._on_skipped()


def install(
    receiver: RTCRtpReceiver,
    wanted: Callable[[], bool],
    on_skipped: Callable[[], None] | None = None,
) -> DecodeGate | None:
    """Put a :class:`DecodeGate` in front of ``receiver``'s decoder; None if this aiortc has no
    decoder queue to wrap (then everything is decoded, as without a gate)."""
    queue = getattr(receiver, "_RTCRtpReceiver__decoder_queue", None)
    if queue is None or not callable(getattr(queue, "put", None)):
        log.warning("aiortc's receiver has no decoder queue here: decoding every frame")
        return None
    gate = DecodeGate(receiver, wanted, on_skipped)
    original = queue.put

    def put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        gate.put(item, lambda it: original(it, block, timeout))

    queue.put = put
    return gate
