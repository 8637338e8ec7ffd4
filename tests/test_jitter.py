"""Frames released at their marked last packet (unit), and over real WebRTC on 127.0.0.1."""

from __future__ import annotations

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from stream_server import jitter
from stream_server.jitter import MarkerJitterBuffer
from tests.terminal import Gradient, connect_ingest, wait_for


def _stream(frames: int, per_frame: int = 3, first_seq: int = 65530) -> list[RtpPacket]:
    """Packets of ``frames`` frames, ``per_frame`` each, the last one marked; seq wraps."""
    out = []
    for f in range(frames):
        for i in range(per_frame):
            seq = (first_seq + f * per_frame + i) % 65536
            p = RtpPacket(payload_type=96, sequence_number=seq, timestamp=1000 + 6000 * f)
            p.marker = 1 if i == per_frame - 1 else 0
            p._data = bytes([f, i])  # type: ignore[attr-defined]
            out.append(p)
    return out


def _feed(buffer: JitterBuffer, packets: list[RtpPacket]) -> list[tuple[int, int, bytes]]:
    """(index of the packet that released it, timestamp, data) per frame released."""
    released = []
    for n, packet in enumerate(packets):
        _, frame = buffer.add(packet)
        if frame is not None:
            released.append((n, frame.timestamp, frame.data))
    return released


def test_a_frame_leaves_with_its_last_packet_not_with_the_next_frame() -> None:
    packets = _stream(5)
    ours = _feed(MarkerJitterBuffer(capacity=128, is_video=True), packets)
    theirs = _feed(JitterBuffer(capacity=128, is_video=True), packets)
    # The same frames, byte for byte, each released one packet-group earlier.
    assert [(t, d) for _, t, d in ours] == [(t, d) for _, t, d in _feed_all(packets)]
    assert [(t, d) for _, t, d in theirs] == [(t, d) for _, t, d in ours[:-1]]
    assert [n for n, _, _ in ours] == [2, 5, 8, 11, 14]  # the marked packets
    assert [n for n, _, _ in theirs] == [3, 6, 9, 12]  # the next frame's first packets


def _feed_all(packets: list[RtpPacket]) -> list[tuple[int, int, bytes]]:
    by_ts: dict[int, bytes] = {}
    for p in packets:
        by_ts[p.timestamp] = by_ts.get(p.timestamp, b"") + p._data  # type: ignore[attr-defined]
    return [(0, ts, data) for ts, data in by_ts.items()]


def test_a_missing_packet_holds_the_frame_until_it_comes() -> None:
    packets = _stream(3)
    buffer = MarkerJitterBuffer(capacity=128, is_video=True)
    late = packets.pop(1)  # frame 0's middle packet is late (a retransmission, say)
    released = _feed(buffer, packets[:2])
    assert released == []  # the marked packet is there, but the frame has a hole
    _, frame = buffer.add(late)
    assert frame is not None and frame.data == bytes([0, 0, 0, 1, 0, 2])


def test_a_lost_marker_still_releases_the_frame_when_the_next_begins() -> None:
    packets = _stream(3)
    packets[2].marker = 0  # frame 0's marked packet arrived without its marker bit
    released = _feed(MarkerJitterBuffer(capacity=128, is_video=True), packets)
    assert [d for _, _, d in released] == [bytes([f, 0, f, 1, f, 2]) for f in range(3)]
    assert released[0][0] == 3  # frame 0 left when frame 1 started, as aiortc's would


async def test_the_server_receiver_uses_it(
    loopback_ice: None, client_pc: RTCPeerConnection
) -> None:
    ingest, got = await connect_ingest(client_pc, Gradient())
    await wait_for(lambda: len(got) >= 10, 10)
    pc = ingest._pc
    assert pc is not None
    buffers = [getattr(r, jitter._ATTR) for r in pc.getReceivers()]
    assert any(isinstance(b, MarkerJitterBuffer) for b in buffers)
    await ingest.close()
