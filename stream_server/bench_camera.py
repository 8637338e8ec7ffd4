"""The bench's camera: pre-encoded VP8 packets sent in a loop, as a hardware encoder would.

``facepay bench`` encodes a few seconds of its SOURCE once per terminal process
(:func:`encode_loop`) and every terminal replays the packets (:class:`PacketTrack`): encoding
every frame in Python for every terminal would spend the 2-core machine's CPU on the
*clients*. The packets are in temporal layers, so that a camera can lower its frame rate when
the server asks (``{"type": "camera", "max_fps": N}``: a checkout's cap after each answer, an
idle gate's lower rate) by leaving out frames of the upper layers, as a browser's
``maxFramerate`` does.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections.abc import Callable, Iterable, Sequence

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from stream_server.decode_gate import is_keyframe

_CLOCK = 90_000

#: Temporal layer of each frame in a layered encoding, by frame index % TS_PERIOD (libvpx's
#: 3-layer pattern 0-2-1-2): layer 0 is a quarter of the frame rate, layers 0+1 half of it.
TS_LAYER_IDS = (0, 2, 1, 2)
TS_PERIOD = len(TS_LAYER_IDS)
#: Share of the frames (and of the bitrate) of layers 0, 0+1 and 0+1+2.
TS_DECIMATORS = (4, 2, 1)


def encode_loop(
    frames: Iterable[np.ndarray], fps: float, bitrate: int = 1_000_000, *, layers: bool = False
) -> list[bytes]:
    """VP8 packets of ``frames``, one per frame, a keyframe every second (so a loop restarts
    cleanly).

    With ``layers`` the packets form three temporal layers (:data:`TS_LAYER_IDS`: frame i is
    of layer ``TS_LAYER_IDS[i % 4]``), so that a camera can lower its frame rate by dropping
    the upper layers of pre-encoded packets (:meth:`PacketTrack.set_max_fps`) and what is
    left still decodes to the same pictures. For that the encoding is error resilient (no
    entropy context carried from frame to frame) and the keyframe interval is a multiple of
    4 (libvpx's layer pattern does not restart at a keyframe: keyframes then fall on layer 0).
    """
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = 640, 480
    codec.pix_fmt = "yuv420p"
    codec.bit_rate = bitrate
    codec.time_base = fractions.Fraction(1, round(fps))
    options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    if layers:
        codec.gop_size = TS_PERIOD * max(1, math.ceil(fps / TS_PERIOD))
        kbits = ",".join(str(max(1, bitrate // 1000 // d)) for d in TS_DECIMATORS)
        options["error-resilient"] = "1"
        options["ts-parameters"] = (
            f"ts_number_layers={len(TS_DECIMATORS)}:ts_target_bitrate={kbits}"
            f":ts_rate_decimator={','.join(map(str, TS_DECIMATORS))}:ts_periodicity={TS_PERIOD}"
            f":ts_layer_id={','.join(map(str, TS_LAYER_IDS))}:ts_layering_mode=3"
        )
    else:
        codec.gop_size = round(fps)
    codec.options = options
    packets: list[bytes] = []
    n = 0
    for n, image in enumerate(frames, 1):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = n - 1
        packets.extend(bytes(p) for p in codec.encode(frame))
    packets.extend(bytes(p) for p in codec.encode(None))
    if layers and len(packets) != n:  # a frame's layer is known only from its index
        raise RuntimeError(f"libvpx gave {len(packets)} packets for {n} frames")
    return packets


def encode_layered(
    frames: Sequence[np.ndarray], fps: float, bitrate: int = 1_000_000
) -> list[bytes]:
    """``encode_loop(frames, fps, layers=True)`` carrying about ``bitrate`` bits a second.

    libvpx's layered rate control undershoots its target (on the bench's checkout photo, by a
    quarter at 15 fps and 15 % at 30 fps), so a layered camera would send fewer bytes than the
    unlayered one the checkout figures in docs/performance.md were taken with, and its
    receiver would spend less on each frame for a reason that is not the server's. One first
    pass measures the undershoot, the second corrects the target by it.
    """
    first = encode_loop(frames, fps, bitrate, layers=True)
    sent = sum(map(len, first)) * 8 * fps / max(1, len(first))
    if sent <= 0:
        return first
    return encode_loop(frames, fps, max(1_000, round(bitrate * bitrate / sent)), layers=True)


class PacketTrack(MediaStreamTrack):
    """Sends pre-encoded VP8 packets in a loop at ``fps`` (aiortc packs them, no encoding).

    Like a hardware encoder it answers the server's keyframe requests (RTCP PLI): once
    :meth:`attach`-ed to its sender, a request makes the next packet sent the next keyframe
    of the loop. :meth:`pause` stops sending (the camera runs on: timestamps keep wall-clock
    time) and :meth:`resume` restarts with the next keyframe, since the receiver cannot
    decode an inter frame whose references it never got.

    :meth:`set_max_fps` lowers the frame rate as a browser's ``maxFramerate`` does: the
    camera keeps its clock (``fps``, and the timestamps with it) and frames are left out.
    Only ``layered`` packets (``encode_loop(..., layers=True)``) can be left out without
    breaking the frames after them; an unlayered track is a camera that cannot lower its
    rate and sends every frame whatever it is told.

    A layered track sends the layers whose rate fits in ``max_fps`` in full and some of the
    frames of the next layer up, so that it sends about ``max_fps`` frames a second (asked
    for 11.2 at 15 fps: 7.5 of layers 0+1 and every other frame of layer 2), as a browser
    would, and never less than its base layer. That works because no frame refers to one of
    its own layer or above except layer 2's second frame of a period, which refers to the
    layer 1 frame before it (checked by decoding, ``tests/test_bench_layers.py``): a layer 2
    frame can be left out alone, and a layer 1 frame with the layer 2 frame after it.
    """

    kind = "video"

    def __init__(
        self,
        packets: list[bytes],
        fps: float,
        *,
        layered: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._clock = clock  # when frames are played (:meth:`since_played`)
        self.fps = fps
        self.layered = layered
        self._packets = packets
        self._keyframes = [i for i, p in enumerate(packets) if is_keyframe("VP8", p)]
        self._is_key = set(self._keyframes)
        self._i = 0
        self._t0: float | None = None
        self._n = 0
        self.frames_sent = 0
        #: Frames of the loop not sent because of :meth:`set_max_fps` (their time passed).
        self.frames_held = 0
        self.keyframes_requested = 0
        #: Passes of the loop completed (back at its first frame, by playing or by seeking).
        self.passes = 0
        # When each frame of the current pass was played (sent or held back), by index.
        self._played_at: list[float | None] = [None] * len(packets)
        self.max_fps: float | None = None
        #: Layers sent in full and the share of the next layer's frames sent: now, and as
        #: asked for (see :meth:`set_max_fps`); what is left of the next frame's share.
        self._share = self._wanted = (len(TS_DECIMATORS), 0.0)
        self._credit = 0.0
        self._sending = asyncio.Event()
        self._sending.set()

    def attach(self, sender: RTCRtpSender) -> None:
        """Answer ``sender``'s keyframe requests (aiortc would ask an encoder this has not)."""
        sender._send_keyframe = self.request_keyframe  # type: ignore[method-assign]

    def request_keyframe(self) -> None:
        """Send the loop's next keyframe next (the loop starts with one)."""
        self.keyframes_requested += 1
        self._seek_keyframe()

    def pause(self) -> None:
        """Stop sending until :meth:`resume` (between shoppers)."""
        self._sending.clear()

    def resume(self) -> None:
        """Send again, starting with a keyframe."""
        self._sending.set()

    def set_max_fps(self, max_fps: float | None) -> None:
        """Send about ``max_fps`` frames a second (None: every frame).

        A layered track sends :func:`layer_share`'s layers and share of the next one (at 30
        fps, 10 is layer 0 and a third of layer 1's frames; never fewer than layer 0's
        frames). A lower rate takes effect at once; a higher one from the next base-layer
        frame or keyframe, since an upper-layer frame may refer to one that was left out. An
        unlayered track notes ``max_fps`` and sends every frame.
        """
        self.max_fps = max_fps
        self._wanted = layer_share(max_fps, self.fps)
        self._share = min(self._share, self._wanted)

    @property
    def sending_fps(self) -> float:
        """Frames sent a second at the current rate limit (``fps`` when unlimited)."""
        if not self.layered:
            return self.fps
        full, extra = self._share
        rates = [self.fps / d for d in TS_DECIMATORS]
        if full == len(rates):
            return self.fps
        return rates[full - 1] + extra * (rates[full] - rates[full - 1])

    def since_played(self, index: int) -> float | None:
        """Seconds since the first frame at or after ``index`` of the current pass was
        played (sent or held back: the camera's clock), None if none has been yet. A
        keyframe request skips frames, so the pass's position is read from the frames
        played, not from the time since it started."""
        played = [t for t in self._played_at[max(0, index) :] if t is not None]
        return self._clock() - played[0] if played else None

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return not self._sending.is_set()

    def _seek_keyframe(self) -> None:
        later = [k for k in self._keyframes if k >= self._i]
        self._i = later[0] if later else 0

    async def _tick(self) -> None:
        """Wait for the camera's next frame time (and for :meth:`resume` when paused)."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            self._n += 1
            wait = self._t0 + self._n / self.fps - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        if not self._sending.is_set():
            await self._sending.wait()
            if self.readyState != "live":
                raise MediaStreamError
            # The camera ran on while nothing was sent: the timestamps move on with the
            # clock, and the receiver can only restart from a keyframe.
            self._n = max(self._n, math.ceil((time.monotonic() - self._t0) * self.fps))
            self._seek_keyframe()

    def next_frame(self) -> bytes | None:
        """The camera's next frame: its packet, or None if the rate limit leaves it out.

        :meth:`recv` calls this once a frame time (``1 / fps``); called directly it plays
        the loop without the pacing.
        """
        i = self._i
        self._i = (i + 1) % len(self._packets)
        if i == 0 and any(t is not None for t in self._played_at):
            self.passes += 1
            self._played_at = [None] * len(self._packets)
        self._played_at[i] = self._clock()
        if not self.layered:
            return self._packets[i]
        key = i in self._is_key
        if key or i % TS_PERIOD == 0:  # later frames refer to none before this one
            self._share = self._wanted
        full, extra = self._share
        layer = TS_LAYER_IDS[i % TS_PERIOD]
        if key or layer < full:
            return self._packets[i]
        if layer == full and extra > 0:
            # Spread the share over the layer's frames: with layer 2 partial the layer 1
            # frame its second frame refers to was sent; with layer 1 partial, no layer 2.
            self._credit = min(1.0 + extra, self._credit + extra)
            if self._credit >= 1.0 - 1e-9:
                self._credit -= 1.0
                return self._packets[i]
        self.frames_held += 1
        return None

    async def recv(self) -> av.Packet:
        """The next packet sent, paced at ``fps`` (frames held back take their time)."""
        data = None
        while data is None:
            await self._tick()
            data = self.next_frame()
        packet = av.Packet(data)
        packet.pts = round(self._n * _CLOCK / self.fps)
        packet.time_base = fractions.Fraction(1, _CLOCK)
        self.frames_sent += 1
        return packet


def layer_share(max_fps: float | None, fps: float) -> tuple[int, float]:
    """What a layered ``fps`` camera sends to keep to about ``max_fps`` frames a second:
    how many temporal layers (of :data:`TS_DECIMATORS`) in full, and which share of the next
    layer's frames. All layers for None or ``fps`` or more; at least layer 0, whose rate is
    the lowest a layered camera can send."""
    rates = [fps / d for d in TS_DECIMATORS]
    if max_fps is None or max_fps >= fps:
        return len(rates), 0.0
    full = 1
    while full < len(rates) and rates[full] <= max_fps:
        full += 1
    if full == len(rates):
        return full, 0.0
    extra = (max_fps - rates[full - 1]) / (rates[full] - rates[full - 1])
    return full, min(1.0, max(0.0, extra))


def send_video(pc: RTCPeerConnection, track: MediaStreamTrack) -> RTCRtpSender:
    """Add ``track`` to ``pc`` as a send-only camera; a :class:`PacketTrack` answers PLI."""
    sender = pc.addTransceiver(track, direction="sendonly").sender
    if isinstance(track, PacketTrack):
        track.attach(sender)
    return sender
