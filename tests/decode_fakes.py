"""Stand-ins for what a DecodeGate touches: a receiver that records keyframe requests, and
encoded frames of a named codec (unit tests of stream_server/decode_gate.py alone)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeCodec:
    name: str = "VP8"


@dataclass
class FakeFrame:
    data: bytes


@dataclass
class _Source:
    source: int


class FakeReceiver:
    """Records the SSRCs it was asked to send a keyframe request (PLI) for."""

    def __init__(self) -> None:
        self.plis: list[int] = []

    def getSynchronizationSources(self) -> list[_Source]:
        return [_Source(1234)]

    async def _send_rtcp_pli(self, ssrc: int) -> None:
        self.plis.append(ssrc)
