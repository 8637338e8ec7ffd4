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

Standing there, the gate also bounds what a hostile or broken sender can make the decoder
do, since aiortc's decoder input queue has no bound and the decoder knows no size limit:

- A VP8 keyframe declaring more than ``max_pixels`` (``server.max_frame_pixels``) is dropped
  before the decoder sees it, and so is every inter frame after it (they are predicted from
  it) until a keyframe of an acceptable size comes; a keyframe is asked for meanwhile. libvpx
  would otherwise allocate and decode the picture first (one 8192x8192 keyframe: seconds of a
  decoder thread) and the size would be checked only after. An inter frame cannot change the
  size, so checking keyframes is enough. H.264 is held to the same limit through the size
  its sequence parameter set (SPS) declares (:mod:`stream_server.h264_sps`); since any
  frame may carry a new SPS, every H.264 frame holding one is checked, not only IDRs. An
  H.264 frame without an SPS, or with one that cannot be parsed, is passed: an IDR may
  rely on an SPS sent earlier, which then went through the same check. Other codecs are
  not parsed. Decoded frames of every codec are still checked against the limit after
  decoding (``stream_server/ws.py``).
- While the decoder already has :data:`MAX_BACKLOG` frames waiting, a new frame is dropped
  and the decoder restarts from a requested keyframe: a decoder that cannot keep up would
  otherwise queue frames without end (memory), and stopping the receiver joins its thread on
  the event loop only after it has decoded everything queued.
- :meth:`DecodeGate.close` empties the queue and drops what comes after, so that closing the
  connection never waits for a backlog to be decoded.

aiortc has no public hook for this: :func:`install` wraps ``put`` on the receiver's decoder
queue (``RTCRtpReceiver.__decoder_queue``, aiortc 1.16) and reads its length and empties it
through the same object (``qsize``, ``get_nowait``: a :class:`queue.Queue`, thread-safe). What
the gate gets is one whole encoded frame: aiortc strips each packet's VP8 payload descriptor
(``depayload``) and the jitter buffer joins a frame's packets, so the frame starts with the
VP8 frame tag, as the decoder reads it. If the attribute is missing (another aiortc),
:func:`install` logs a warning and leaves the receiver decoding everything, as before.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpReceiver

from stream_server.h264_sps import h264_keyframe_size

log = logging.getLogger(__name__)

#: Ask again for a keyframe this often while waiting for one.
RETRY_S = 0.3
#: Encoded frames the decoder may have waiting; a frame arriving beyond them is dropped. A
#: decoder keeping up has none waiting (a 640x480 frame decodes in ~1.2 ms, they come every
#: 67 ms), but on a saturated server its thread waits for the cores and the GIL behind the
#: inference workers for a while: each drop costs a keyframe (several times an inter
#: frame's bytes and decoding), so the bound leaves that room. Eight 640x480 frames at
#: 1 Mbit/s are ~70 KB; what matters is that the queue cannot grow without end.
MAX_BACKLOG = 8
#: VP8 key frame start code (RFC 6386 9.1), after the 3-byte frame tag.
_VP8_START_CODE = b"\x9d\x01\x2a"


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


def vp8_keyframe_size(data: bytes) -> tuple[int, int] | None:
    """Width and height a VP8 key frame declares; None if ``data`` is no well-formed key frame.

    RFC 6386 9.1: a 3-byte frame tag (bit 0 is 0 for a key frame), the start code
    ``9d 01 2a``, then width and height as 16-bit little-endian numbers whose low 14 bits
    are the size and top 2 bits an upscaling hint, which does not change the decoded size.
    """
    if len(data) < 10 or data[0] & 0x01 or data[3:6] != _VP8_START_CODE:
        return None
    width = int.from_bytes(data[6:8], "little") & 0x3FFF
    height = int.from_bytes(data[8:10], "little") & 0x3FFF
    return width, height


class DecodeGate:
    """Passes encoded frames to the decoder only while ``wanted()``, restarting on keyframes.

    It also withholds VP8 keyframes and H.264 frames whose SPS declares more than
    ``max_pixels``, and the frames predicted from them
    (``on_oversized`` is called for each), and frames beyond a decoder backlog of
    :data:`MAX_BACKLOG` in ``decoder_queue`` (see the module's docstring).
    """

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        wanted: Callable[[], bool],
        on_skipped: Callable[[], None] | None = None,
        retry_s: float = RETRY_S,
        *,
        max_pixels: int | None = None,
        on_oversized: Callable[[], None] | None = None,
        decoder_queue: queue.Queue[Any] | None = None,
    ) -> None:
        self._receiver = receiver
        self._wanted = wanted
        self._on_skipped = on_skipped
        self._retry_s = retry_s
        self._max_pixels = max_pixels
        self._on_oversized = on_oversized
        self._queue = decoder_queue
        self._need_key = True  # the decoder has seen nothing it could predict from
        # Why frames are withheld until the next keyframe: "skipped" (nobody wanted them, or
        # the start), "oversized" (the last keyframe was too large), "overrun" (backlog) or
        # "corrupt" (a key frame tag without a key frame header: a frame cut short).
        self._reason = "skipped"
        self._closed = False
        self._asked_at = -1e9
        self._tasks: set[asyncio.Task[None]] = set()
        #: Encoded frames passed to the decoder / discarded undecoded because nobody wanted
        #: them / discarded as too large (keyframes over ``max_pixels`` and the frames after
        #: them) / discarded because the decoder was behind (and the frames after them) /
        #: discarded as a broken key frame (and the frames after it).
        self.passed = 0
        self.skipped = 0
        self.oversized = 0
        self.overrun = 0
        self.corrupt = 0

    def put(self, item: Any, put: Callable[[Any], None]) -> None:
        """Replacement for the decoder queue's ``put`` (runs on the event loop)."""
        if item is None:  # the receiver stopping its decoder thread
            put(item)
            return
        if self._closed:
            return  # closing: give the decoder nothing its thread would have to finish first
        codec, frame = item
        if not self._wanted():
            self._withhold("skipped")
            return
        name = codec.name.upper()
        keyframe = is_keyframe(name, frame.data)
        # A VP8 inter frame cannot change the picture size, but any H.264 frame can carry an
        # SPS (the size an IDR after it, possibly without an SPS of its own, is decoded at).
        fits = self._fits(name, frame.data) if keyframe or name == "H264" else True
        if fits is None:
            # No key frame header where the tag says key frame: a frame the jitter buffer
            # cut short after a loss, not a big picture. Withheld without "too large".
            self._withhold("corrupt")
            self.request_keyframe(force=False)
            return
        if not fits:
            self._withhold("oversized")
            self.request_keyframe(force=False)  # a camera that shrank its picture sends one
            return
        if self._need_key and not keyframe:
            self._withhold(self._reason)
            self.request_keyframe(force=False)
            return
        if self._queue is not None and self._queue.qsize() >= MAX_BACKLOG:
            self._withhold("overrun")
            self.request_keyframe(force=False)
            return
        self._need_key = False
        self.passed += 1
        put(item)

    def close(self) -> None:
        """Drop every frame still waiting for the decoder, and every frame from now on.

        Call it before the peer connection closes: stopping the receiver joins the decoder
        thread on the event loop, and the thread first decodes whatever is queued.
        """
        self._closed = True
        if self._queue is None:
            return
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is None:  # the receiver is already stopping its thread: leave it the stop
                self._queue.put(None)
                return

    def _fits(self, codec_name: str, data: bytes) -> bool | None:
        """Whether a frame may be decoded: a VP8 keyframe, or an H.264 frame's SPS, must
        declare at most ``max_pixels``; None for a VP8 key frame without a valid header
        (libvpx would only fail on it)."""
        if self._max_pixels is None:
            return True
        name = codec_name.upper()
        if name == "H264":
            size = h264_keyframe_size(data)
            # No SPS is no fault in H.264 (the IDR may use one sent before, already checked);
            # the decoded picture is still checked after decoding.
            return size is None or size[0] * size[1] <= self._max_pixels
        if name != "VP8":
            return True
        size = vp8_keyframe_size(data)
        if size is None:
            return None
        return size[0] * size[1] <= self._max_pixels

    def _withhold(self, reason: str) -> None:
        """Discard a frame; the decoder restarts at the next acceptable keyframe."""
        self._need_key = True
        self._reason = reason
        if reason == "oversized":
            self.oversized += 1
            if self._on_oversized is not None:
                self._on_oversized()
        elif reason == "overrun":
            self.overrun += 1
        elif reason == "corrupt":
            self.corrupt += 1
        else:
            self._skip()

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
    *,
    max_pixels: int | None = None,
    on_oversized: Callable[[], None] | None = None,
) -> DecodeGate | None:
    """Put a :class:`DecodeGate` in front of ``receiver``'s decoder; None if this aiortc has no
    decoder queue to wrap (then everything is decoded, as without a gate)."""
    decoder_queue = getattr(receiver, "_RTCRtpReceiver__decoder_queue", None)
    if not isinstance(decoder_queue, queue.Queue):
        log.warning("aiortc's receiver has no decoder queue here: decoding every frame")
        return None
    gate = DecodeGate(
        receiver,
        wanted,
        on_skipped,
        max_pixels=max_pixels,
        on_oversized=on_oversized,
        decoder_queue=decoder_queue,
    )
    original = decoder_queue.put

    def put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        gate.put(item, lambda it: original(it, block, timeout))

    decoder_queue.put = put  # type: ignore[method-assign]
    return gate
