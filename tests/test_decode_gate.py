"""Decoding only while a session wants frames: the slot's demand, keyframe detection, the gate
in front of aiortc's decoder (unit, with a fake receiver) and over real WebRTC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import fractions
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from session.frames import FrameSlot
from stream_server.bench_camera import PacketTrack, encode_loop
from stream_server.decode_gate import DecodeGate, is_keyframe
from stream_server.webrtc import (
    VideoIngest,
    frame_to_bgr,
)
from tests.decode_fakes import FakeCodec, FakeFrame, FakeReceiver
from tests.terminal import Gradient, connect_ingest, wait_for


def _frames(n: int) -> list[np.ndarray]:
    """Moving gradients: every frame differs from the last, so inter frames carry data."""
    base = np.tile(np.linspace(0, 200, 640, dtype=np.uint8), (480, 1))
    return [np.dstack([np.roll(base, 7 * i, axis=1), base, base]) for i in range(n)]


def _h264(n: int) -> list[bytes]:
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = 640, 480, "yuv420p"
    codec.time_base = fractions.Fraction(1, 15)
    codec.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "30"}
    out: list[bytes] = []
    for i, image in enumerate(_frames(n)):
        frame = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")
        frame.pts = i
        out.extend(bytes(p) for p in codec.encode(frame))
    out.extend(bytes(p) for p in codec.encode(None))
    return out


# --- the slot's demand -------------------------------------------------------------------
def test_demand_is_held_while_wanted_and_announced_once() -> None:
    slot: FrameSlot[int] = FrameSlot()
    calls: list[bool] = []
    slot.on_demand = lambda: calls.append(slot.in_demand)
    assert not slot.in_demand
    with slot.wanted():
        with slot.wanted():  # a nested hold does not announce again
            assert slot.in_demand
        assert slot.in_demand
    assert not slot.in_demand
    assert calls == [True]
    with pytest.raises(RuntimeError), slot.wanted():
        raise RuntimeError("a session failing releases its hold")
    assert not slot.in_demand and calls == [True, True]


def test_a_failing_demand_callback_does_not_end_the_session() -> None:
    slot: FrameSlot[int] = FrameSlot()

    def broken() -> None:
        raise ConnectionError("peer gone")

    slot.on_demand = broken
    with slot.wanted():
        assert slot.in_demand
    assert not slot.in_demand


# --- keyframes ---------------------------------------------------------------------------
def test_keyframes_are_told_from_inter_frames() -> None:
    vp8 = encode_loop(_frames(20), fps=15)  # a keyframe every 15 frames
    assert [i for i, p in enumerate(vp8) if is_keyframe("VP8", p)] == [0, 15]
    h264 = _h264(40)  # g=30
    assert [i for i, p in enumerate(h264) if is_keyframe("H264", p)] == [0, 30]
    assert not is_keyframe("VP8", b"")
    assert is_keyframe("AV1", b"\x12\x00")  # unknown codecs are never withheld


# --- the gate, with a fake receiver --------------------------------------------------------
KEY, INTER = b"\x10\x02\x00", b"\x11\x02\x00"


async def test_gate_passes_only_wanted_frames_and_restarts_on_a_keyframe() -> None:
    receiver = FakeReceiver()
    wanted = [True]
    skipped: list[int] = []
    gate = DecodeGate(receiver, lambda: wanted[0], lambda: skipped.append(1), retry_s=60)  # type: ignore[arg-type]
    decoded: list[Any] = []
    send = decoded.append

    for data in (KEY, INTER, INTER):
        gate.put((FakeCodec(), FakeFrame(data)), send)
    assert len(decoded) == 3 and gate.passed == 3

    wanted[0] = False
    for data in (INTER, KEY, INTER):
        gate.put((FakeCodec(), FakeFrame(data)), send)
    assert len(decoded) == 3 and gate.skipped == 3 == len(skipped)

    wanted[0] = True
    gate.resume()  # asks for a keyframe at once
    await asyncio.sleep(0)
    assert receiver.plis == [1234]
    for _ in range(5):  # inter frames whose reference was skipped never reach the decoder
        gate.put((FakeCodec(), FakeFrame(INTER)), send)
    await asyncio.sleep(0)
    assert len(decoded) == 3 and gate.skipped == 8
    assert receiver.plis == [1234]  # repeated only every retry_s
    gate.put((FakeCodec(), FakeFrame(KEY)), send)
    gate.put((FakeCodec(), FakeFrame(INTER)), send)
    assert [f.data for _, f in decoded[3:]] == [KEY, INTER]
    gate.put(None, send)  # the receiver stopping its decoder always gets through
    assert decoded[-1] is None


async def test_gate_repeats_an_unanswered_keyframe_request() -> None:
    receiver = FakeReceiver()
    gate = DecodeGate(receiver, lambda: True, retry_s=0.05)  # type: ignore[arg-type]
    decoded: list[Any] = []
    for _ in range(3):
        gate.put((FakeCodec(), FakeFrame(INTER)), decoded.append)
        await asyncio.sleep(0.06)
    assert decoded == [] and len(receiver.plis) == 3


# --- over real WebRTC --------------------------------------------------------------------
async def _pause_and_resume(ingest: VideoIngest, got: list[Any], wanted: list[bool]) -> None:
    await wait_for(lambda: len(got) >= 5, 10)
    wanted[0] = False
    await asyncio.sleep(0.2)  # frames in flight to the decoder thread still arrive
    paused_at = len(got)
    await wait_for(lambda: ingest.undecoded >= 10, 5)
    assert len(got) == paused_at  # nothing decoded while nobody looks
    wanted[0] = True
    ingest.resume()
    await wait_for(lambda: len(got) >= paused_at + 5, 3)


async def test_aiortc_camera_restarts_on_request(
    loopback_ice: None, client_pc: RTCPeerConnection
) -> None:
    track = Gradient()
    wanted = [True]
    ingest, got = await connect_ingest(client_pc, track, wanted=lambda: wanted[0])
    await _pause_and_resume(ingest, got, wanted)
    # The first picture after the pause is a clean, recent one: no stale reference behind it.
    n_resumed = track.n
    image = await asyncio.to_thread(frame_to_bgr, got[-1])
    lag = (n_resumed - round(float(image[240, :, 2].mean()))) % 256  # frames behind the camera
    assert lag <= 8
    assert np.abs(image[:, :, 0].astype(int) - track.base.astype(int)).mean() < 3
    await ingest.close()


async def test_hardware_like_camera_restarts_on_request(
    loopback_ice: None, client_pc: RTCPeerConnection
) -> None:
    track = PacketTrack(await asyncio.to_thread(encode_loop, _frames(60), 15.0), 15.0)
    wanted = [True]
    ingest, got = await connect_ingest(client_pc, track, wanted=lambda: wanted[0])
    await _pause_and_resume(ingest, got, wanted)
    assert track.keyframes_requested >= 1
    await ingest.close()


async def test_a_paused_camera_sends_nothing_and_restarts_at_a_keyframe() -> None:
    track = PacketTrack(await asyncio.to_thread(encode_loop, _frames(40), 15.0), 15.0)
    for _ in range(3):
        await track.recv()
    track.pause()
    assert track.paused
    pending = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.5)
    assert not pending.done()  # nothing is sent while paused
    track.resume()
    packet = await asyncio.wait_for(pending, 1.0)
    assert is_keyframe("VP8", bytes(packet))
    # The camera ran on: the timestamp is where the clock is, not the 4th frame's.
    assert packet.pts >= 0.5 * 90_000
    track.stop()


async def test_a_camera_paused_between_shoppers_costs_the_server_no_frames(
    loopback_ice: None, client_pc: RTCPeerConnection
) -> None:
    track = PacketTrack(await asyncio.to_thread(encode_loop, _frames(60), 15.0), 15.0)
    ingest, got = await connect_ingest(client_pc, track, wanted=lambda: True)
    await wait_for(lambda: len(got) >= 5, 10)
    track.pause()
    await asyncio.sleep(0.3)  # frames already in flight
    arrived, decoded = ingest.frames + ingest.undecoded, len(got)
    await asyncio.sleep(1.0)
    assert ingest.frames + ingest.undecoded == arrived  # not even received undecoded
    track.resume()
    await wait_for(lambda: len(got) >= decoded + 5, 3)  # the same connection, decoding again
    assert ingest.connection_state == "connected"
    await ingest.close()
