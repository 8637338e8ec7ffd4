"""Server-side WebRTC video ingest (aiortc).

One :class:`VideoIngest` per terminal connection: it answers the terminal's offer, receives
its single video track and hands every decoded frame to a callback on the event loop. The
callback must be cheap (keep the newest frame); conversion to numpy happens elsewhere, in a
worker thread, with a :class:`BgrConverter`.

Loopback: aioice never offers 127.0.0.1 as a host candidate, so a server and a terminal on
one machine cannot connect unless candidate gathering is restricted with
:func:`restrict_host_addresses` (process-wide; see DESIGN.md §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence

import aioice.ice
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription
from av.video.reformatter import VideoReformatter

from pipeline.errors import InvalidRequest
from stream_server import decode_gate, jitter

log = logging.getLogger(__name__)

#: Added to the answer's video codecs: Chrome then starts at 640x480 instead of scaling down.
BITRATE_FMTP = "x-google-start-bitrate=1500;x-google-min-bitrate=750;x-google-max-bitrate=3000"
#: Codecs that carry no picture of their own (retransmission, redundancy, FEC): no bitrate hint.
_AUX_CODECS = {"rtx", "red", "ulpfec", "flexfec-03"}
#: Longest offer we parse (a browser's offer is a few KiB).
MAX_SDP_BYTES = 64 * 1024
#: Most ICE candidates an offer may carry: the server checks connectivity to every one (STUN
#: requests to addresses the offer chooses). Browsers offer a host candidate per interface,
#: address family and protocol (a laptop with VPN and container bridges can list 20 or
#: more), and terminals use no STUN or TURN server. 48 keeps those while bounding the STUN
#: checks one offer can aim at other addresses (one offer with 450 sent 2,700 in 30 s).
MAX_REMOTE_CANDIDATES = 48

FrameCallback = Callable[[av.VideoFrame, float], None]

_original_get_host_addresses = aioice.ice.get_host_addresses


class BadSdp(InvalidRequest):
    """An offer that cannot be parsed, is not an offer, or is not one video m-line."""

    code = "bad_sdp"


def rtc_configuration() -> RTCConfiguration:
    """Peer-connection settings: no ICE servers (aiortc's default asks a public STUN server)."""
    return RTCConfiguration(iceServers=[])


def restrict_host_addresses(addresses: Sequence[str]) -> Callable[[bool, bool], list[str]]:
    """Make aioice gather host candidates only on ``addresses`` (e.g. ``["127.0.0.1"]``).

    Process-wide: it replaces ``aioice.ice.get_host_addresses`` for every peer connection
    created afterwards, server and client alike. Idempotent: a later call replaces the list;
    :func:`unrestrict_host_addresses` restores aioice's own discovery, and
    :func:`restore_host_addresses` what the call returned (what was in force before it).
    Never called at import: the server calls it at start-up when ``server.ice_addresses`` is
    set (the app's peer connection context), the client tools from their options, tests
    from a fixture.
    """
    parsed = [ipaddress.ip_address(a) for a in addresses]
    if not parsed:
        raise ValueError("restrict_host_addresses needs at least one address")
    allowed = [str(a) for a in parsed]

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [
            a for a in allowed if (use_ipv6 if ipaddress.ip_address(a).version == 6 else use_ipv4)
        ]

    previous: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = get_host_addresses
    log.info("ICE host candidates restricted to %s", ", ".join(allowed))
    return previous


def restore_host_addresses(previous: Callable[[bool, bool], list[str]]) -> None:
    """Put back what :func:`restrict_host_addresses` returned: whatever was in force before
    it (another app's restriction, a test's), not necessarily aioice's own discovery."""
    # mypy knows the attribute as a def with named parameters; this is one of those.
    aioice.ice.get_host_addresses = previous  # type: ignore[assignment]


def unrestrict_host_addresses() -> None:
    """Undo :func:`restrict_host_addresses` (process-wide); harmless if it was never called."""
    aioice.ice.get_host_addresses = _original_get_host_addresses


def frame_to_bgr(frame: av.VideoFrame) -> np.ndarray:
    """Convert a decoded frame to a contiguous HxWx3 BGR uint8 array (one-off conversions).

    The server converts with a :class:`BgrConverter` instead, which gives the same pixels for
    a sixth of the CPU. Call either in a worker thread, never on the event loop.
    """
    return np.ascontiguousarray(frame.to_ndarray(format="bgr24"))


class BgrConverter:
    """Decoded frames to contiguous HxWx3 BGR uint8 arrays, one swscale context per thread.

    ``VideoFrame.to_ndarray(format="bgr24")`` builds a new swscale context for every frame
    (PyAV keeps it on the frame object), and FFmpeg's default of automatic threading starts
    and joins a pool of scaling threads for each one: 0.72 ms of CPU per 640x480 frame.
    A reformatter kept per worker thread reuses its context (rebuilt only when the size or
    format changes) and scales on the calling thread: 0.12 ms, the same pixels bit for bit
    (``tests/test_webrtc.py``). Thread-safe: a reformatter is never shared between threads.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        """The frame as BGR; call it in a worker thread."""
        reformatter = getattr(self._local, "reformatter", None)
        if reformatter is None:
            reformatter = self._local.reformatter = VideoReformatter()
        # threads=1: the executor already keeps every core busy; scaling threads would only
        # be started, synchronised and joined for a sub-millisecond job.
        bgr = reformatter.reformat(frame, format="bgr24", threads=1)
        return np.ascontiguousarray(bgr.to_ndarray())


def add_bitrate_hints(sdp: str, fmtp: str = BITRATE_FMTP) -> str:
    """Add ``fmtp`` to every picture codec of every video m-section of ``sdp``.

    Codecs with an ``a=fmtp`` line get the parameters appended; codecs without one (VP8) get
    a new ``a=fmtp`` line after their ``a=rtpmap``. Retransmission and FEC codecs are left as
    they are. Line endings of the input are kept.
    """
    eol = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(eol)
    # Find payload types per video section first, then rewrite.
    out: list[str] = []
    in_video = False
    picture_pts: set[str] = set()
    section: list[str] = []

    def flush() -> None:
        if not in_video:
            out.extend(section)
            return
        has_fmtp = set()
        for line in section:
            m = re.match(r"a=fmtp:(\d+) ", line)
            if m:
                has_fmtp.add(m.group(1))
        for line in section:
            m = re.match(r"a=fmtp:(\d+) (.*)$", line)
            if m and m.group(1) in picture_pts and "x-google-" not in line:
                out.append(f"{line};{fmtp}")
                continue
            out.append(line)
            m = re.match(r"a=rtpmap:(\d+) ", line)
            if m and m.group(1) in picture_pts and m.group(1) not in has_fmtp:
                out.append(f"a=fmtp:{m.group(1)} {fmtp}")

    for line in lines:
        if line.startswith("m="):
            flush()
            section = []
            in_video = line.startswith("m=video ")
            picture_pts = set()
        section.append(line)
        m = re.match(r"a=rtpmap:(\d+) ([^/]+)/", line)
        if m and m.group(2).lower() not in _AUX_CODECS:
            picture_pts.add(m.group(1))
    flush()
    return eol.join(out)


def validate_offer(offer_sdp: str, offer_type: str) -> None:
    """Refuse what is not a parseable offer of exactly one video m-line (raise :class:`BadSdp`).

    One m-line, because aiortc gives every m-line a receiver and a decoder thread, and a
    track the server does not read (a second video, an audio track) fills aiortc's unbounded
    track queue with decoded frames: memory without end. Terminals send one video track.
    At most :data:`MAX_REMOTE_CANDIDATES` ICE candidates, since each is checked over STUN.
    """
    if offer_type != "offer":
        raise BadSdp(f"bad_sdp: expected an SDP of type 'offer', got {offer_type!r}")
    if not isinstance(offer_sdp, str) or not offer_sdp.strip():
        raise BadSdp("bad_sdp: the offer is empty")
    if len(offer_sdp) > MAX_SDP_BYTES:
        raise BadSdp(f"bad_sdp: the offer is longer than {MAX_SDP_BYTES} bytes")
    try:
        parsed = SessionDescription.parse(offer_sdp)
    except Exception as exc:  # aiortc raises ValueError, KeyError, IndexError... on garbage
        raise BadSdp(f"bad_sdp: the offer cannot be parsed ({type(exc).__name__})") from exc
    if not any(m.kind == "video" for m in parsed.media):
        raise BadSdp("bad_sdp: the offer has no video m-line")
    if len(parsed.media) != 1:
        kinds = ", ".join(m.kind for m in parsed.media)
        raise BadSdp(f"bad_sdp: the offer has {len(parsed.media)} m-lines ({kinds}), not one video")
    # Counted as aiortc parsed them: the candidates it would check (those of media sections).
    candidates = sum(len(m.ice_candidates) for m in parsed.media)
    if candidates > MAX_REMOTE_CANDIDATES:
        raise BadSdp(
            f"bad_sdp: the offer has {candidates} ICE candidates, more than {MAX_REMOTE_CANDIDATES}"
        )


def _always() -> bool:
    return True


class VideoIngest:
    """Receive one terminal's video over WebRTC and pass each decoded frame to ``on_frame``.

    ``on_frame(frame, t_monotonic)`` runs on the event loop for every frame: keep it cheap
    (store the newest frame; convert later in a worker with a :class:`BgrConverter`).
    ``peers`` is the server's set of open peer connections: the connection is added by
    :meth:`start` and removed when it closes. ``on_closed`` is called once, on the event
    loop, when the connection ends on its own (ICE/DTLS failure, the peer closed, the track
    ended); it is not called after :meth:`close`.

    With ``wanted``, the video is decoded only while ``wanted()`` is true
    (:mod:`stream_server.decode_gate`); call :meth:`resume` when it turns true so the camera
    sends a keyframe to restart from. ``on_skipped`` is called for every frame not decoded
    because it was not wanted. With ``max_frame_pixels``, VP8 and H.264 frames declaring a
    larger picture are dropped before decoding, and ``on_oversized`` is called for each.
    Whatever the options, the decoder is never given more than a short backlog
    (``decode_gate.MAX_BACKLOG``).
    """

    def __init__(
        self,
        on_frame: FrameCallback,
        peers: set[RTCPeerConnection],
        on_closed: Callable[[], None] | None = None,
        wanted: Callable[[], bool] | None = None,
        on_skipped: Callable[[], None] | None = None,
        max_frame_pixels: int | None = None,
        on_oversized: Callable[[], None] | None = None,
    ) -> None:
        self._on_frame = on_frame
        self._peers = peers
        self._on_closed = on_closed
        self._wanted = wanted if wanted is not None else _always
        self._on_skipped = on_skipped
        self._max_frame_pixels = max_frame_pixels
        self._on_oversized = on_oversized
        self._gate: decode_gate.DecodeGate | None = None
        self._pc: RTCPeerConnection | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        #: Frames received so far.
        self.frames = 0
        #: ``time.monotonic()`` of the newest frame, or None before the first.
        self.last_frame_at: float | None = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran or the connection ended."""
        return self._closing

    @property
    def connection_state(self) -> str:
        """The peer connection's state (``new`` before :meth:`start`)."""
        return self._pc.connectionState if self._pc is not None else "new"

    async def start(
        self, offer_sdp: str, offer_type: str, *, timeout_s: float = 10.0
    ) -> RTCSessionDescription:
        """Answer ``offer_sdp``; return the answer once ICE gathering is complete.

        Raises :class:`BadSdp` (an :class:`InvalidRequest`, code ``bad_sdp``) for an offer
        that cannot be used; nothing stays open then. One offer per instance: for a new
        offer, close this ingest and start another.
        """
        if self._pc is not None or self._closing:
            raise RuntimeError("VideoIngest.start may be called once")
        validate_offer(offer_sdp, offer_type)
        pc = RTCPeerConnection(rtc_configuration())
        self._pc = pc
        self._peers.add(pc)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state_change)
        try:
            async with asyncio.timeout(timeout_s):
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)  # waits for ICE gathering
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError | asyncio.CancelledError):
                raise
            if isinstance(exc, Exception):
                raise BadSdp(f"bad_sdp: the offer was refused ({exc})") from exc
            raise
        local = pc.localDescription
        log.debug("answer ready (%d bytes)", len(local.sdp))
        return RTCSessionDescription(add_bitrate_hints(local.sdp), local.type)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "video":
            log.debug("ignoring %s track", track.kind)
            return
        if self._consumer is not None:  # validate_offer allows one m-line: cannot happen
            log.warning("second video track ignored; one per connection")
            return
        receivers = self._pc.getReceivers() if self._pc is not None else []
        receiver = next((r for r in receivers if r.track is track), None)
        if receiver is not None:
            jitter.install(receiver)  # frames leave at their last packet, not a frame later
            # Always: besides skipping unwanted frames, the gate bounds what the decoder gets.
            self._gate = decode_gate.install(
                receiver,
                self._wanted,
                self._on_skipped,
                max_pixels=self._max_frame_pixels,
                on_oversized=self._on_oversized,
            )
        self._consumer = asyncio.ensure_future(self._consume(track))

    async def _consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                log.debug("video track ended after %d frames", self.frames)
                break
            now = time.monotonic()
            self.frames += 1
            self.last_frame_at = now
            try:
                self._on_frame(frame, now)  # type: ignore[arg-type]
            except Exception:
                log.exception("on_frame callback failed; frame dropped")
        self._ended_by_peer()

    @property
    def undecoded(self) -> int:
        """Encoded frames discarded because no session wanted them."""
        return self._gate.skipped if self._gate is not None else 0

    def resume(self) -> None:
        """Frames are wanted again: ask the camera for a keyframe if any were skipped."""
        if self._gate is not None:
            self._gate.resume()

    def _on_state_change(self) -> None:
        pc = self._pc
        if pc is None:
            return
        log.debug("peer connection %s", pc.connectionState)
        if pc.connectionState in ("failed", "closed"):
            self._ended_by_peer()

    def _ended_by_peer(self) -> None:
        """The connection ended on its own: close it (in a task) and tell the owner once."""
        if self._closing:
            return
        self._close_task = asyncio.ensure_future(self.close())
        if self._on_closed is not None:
            try:
                self._on_closed()
            except Exception:
                log.exception("on_closed callback failed")

    async def close(self) -> None:
        """Stop the consumer, close the peer connection, leave ``peers``. Idempotent."""
        self._closing = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None and consumer is not asyncio.current_task():
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consumer
        pc = self._pc
        if pc is None:
            return
        if self._gate is not None:
            # pc.close() joins the decoder thread on the event loop once it has decoded all
            # that is queued: leave it nothing queued.
            self._gate.close()
        try:
            async with asyncio.timeout(5.0):
                await pc.close()
        except Exception:
            log.warning("peer connection did not close cleanly", exc_info=True)
        finally:
            self._peers.discard(pc)

    def __repr__(self) -> str:
        return f"<VideoIngest state={self.connection_state} frames={self.frames}>"
