"""Release a video frame when its last RTP packet arrives, not one frame later.

aiortc's ``JitterBuffer`` knows a frame is complete only when the first packet of the *next*
frame arrives (a new RTP timestamp), so every frame reaches the decoder one frame interval
late: 67 ms at 15 fps, a fifth of a gate's decision budget. The sender already says where a
frame ends: the RTP marker bit is set on its last packet (RFC 7741 4.1 for VP8, RFC 6184 5.1
for H.264; browsers and aiortc set it). :class:`MarkerJitterBuffer` releases a frame at its
marked packet when every packet before it is there, and otherwise behaves as aiortc's: a frame
whose marked packet was lost is still released when the next frame starts.

Like :mod:`stream_server.decode_gate`, :func:`install` replaces a private attribute of
aiortc 1.16's receiver (``RTCRtpReceiver.__jitter_buffer``); without it, it logs a warning
and leaves aiortc's buffer in place.
"""

from __future__ import annotations

import logging

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

log = logging.getLogger(__name__)

_ATTR = "_RTCRtpReceiver__jitter_buffer"


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, releasing each frame at its marked last packet."""

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        # Walk the contiguous packets from the oldest: the first frame found complete (its
        # marked packet reached, or the next frame begun) is joined and removed.
        assert self._origin is not None
        packets: list[RtpPacket] = []
        timestamp: int | None = None
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None  # a gap: wait for the packet (or a retransmission)
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                return self._take(packets, timestamp, count)  # its marker was lost
            packets.append(packet)
            if packet.marker:
                return self._take(packets, timestamp, count + 1)
        return None

    def _take(self, packets: list[RtpPacket], timestamp: int, count: int) -> JitterFrame:
        frame = JitterFrame(data=b"".join(p._data for p in packets), timestamp=timestamp)  # type: ignore[attr-defined]
        self.remove(count)
        return frame


def install(receiver: RTCRtpReceiver) -> bool:
    """Give a video ``receiver`` a :class:`MarkerJitterBuffer` (before any packet arrives)."""
    current = getattr(receiver, _ATTR, None)
    if not isinstance(current, JitterBuffer) or not current._is_video:
        log.warning("aiortc's receiver has no video jitter buffer here: frames arrive a frame late")
        return False
    setattr(receiver, _ATTR, MarkerJitterBuffer(capacity=current.capacity, is_video=True))
    return True
