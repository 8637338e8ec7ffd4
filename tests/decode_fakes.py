"""Stand-ins for what a DecodeGate touches: a receiver that records keyframe requests, and
encoded frames of a named codec (unit tests of stream_server/decode_gate.py alone)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream_server.decode_gate import DecodeGate


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


def limited_gate(max_pixels: int) -> tuple[DecodeGate, FakeReceiver, list[Any], list[int]]:
    """A gate that always wants frames, with a size limit: (gate, its receiver, a list to
    collect what it passes, one entry per frame it reported too large)."""
    receiver = FakeReceiver()
    oversized: list[int] = []
    gate = DecodeGate(
        receiver,  # type: ignore[arg-type]
        lambda: True,
        retry_s=60,
        max_pixels=max_pixels,
        on_oversized=lambda: oversized.append(1),
    )
    return gate, receiver, [], oversized
