"""What a terminal's offer and video may cost the server: one video m-line, a bounded number of
ICE candidates, no oversized VP8 frame decoded, a bounded decoder backlog (all on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import queue
import re
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, rtcrtpreceiver

from pipeline.errors import InvalidRequest
from stream_server.app import PEERS
from stream_server.bench_camera import PacketTrack, encode_loop, send_video
from stream_server.decode_gate import MAX_BACKLOG, DecodeGate, vp8_keyframe_size
from stream_server.webrtc import (
    MAX_REMOTE_CANDIDATES,
    VideoIngest,
    rtc_configuration,
    validate_offer,
)
from tests.decode_fakes import FakeCodec, FakeFrame, FakeReceiver, limited_gate
from tests.terminal import Gradient, connect_ingest, wait_for


async def _offer(*kinds: str) -> str:
    """A real aiortc offer with one sending m-line per entry of ``kinds``."""
    pc = RTCPeerConnection(rtc_configuration())
    for kind in kinds:
        if kind == "video":
            send_video(pc, Gradient())
        else:
            pc.addTransceiver(kind, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


def _with_candidates(sdp: str, n: int) -> str:
    """``sdp`` with its candidates replaced by ``n`` loopback host candidates."""
    lines = [f"a=candidate:{i} 1 udp 2130706431 127.0.0.1 {40000 + i} typ host" for i in range(n)]
    stripped = re.sub(r"a=candidate:[^\r\n]*\r\n", "", sdp)
    return stripped.replace(
        "a=end-of-candidates\r\n", "\r\n".join([*lines, "a=end-of-candidates\r\n"])
    )


# --- the offer ---------------------------------------------------------------------------
EXTRA_TRACKS = [("video", "video"), ("video", "audio"), ("audio", "video")]


@pytest.mark.parametrize("kinds", EXTRA_TRACKS)
async def test_an_offer_of_more_than_one_track_is_refused(
    loopback_ice: None, kinds: tuple[str, ...]
) -> None:
    sdp = await _offer(*kinds)
    assert sdp.count("m=") == 2
    peers: set[RTCPeerConnection] = set()
    with pytest.raises(InvalidRequest, match="2 m-lines") as info:
        await VideoIngest(lambda f, t: None, peers).start(sdp, "offer")
    assert info.value.code == "bad_sdp"
    assert not peers  # no peer connection, so no receivers and no decoder threads


async def test_ice_candidates_are_bounded_and_loopback_is_fine(loopback_ice: None) -> None:
    sdp = await _offer("video")
    assert "127.0.0.1" in sdp
    validate_offer(_with_candidates(sdp, MAX_REMOTE_CANDIDATES), "offer")  # loopback is fine
    for n in (MAX_REMOTE_CANDIDATES + 1, 100):
        with pytest.raises(InvalidRequest, match=f"{n} ICE candidates") as info:
            validate_offer(_with_candidates(sdp, n), "offer")
        assert info.value.code == "bad_sdp"


async def test_the_server_answers_bad_sdp_and_no_answer(make_env: Any) -> None:
    env = await make_env()
    term = await env.terminal()
    one = await _offer("video")
    refused = [
        await _offer("video", "video"),
        await _offer("video", "audio"),
        _with_candidates(one, 100),
    ]
    for sdp in refused:
        await term.send({"type": "offer", "sdp": sdp, "sdp_type": "offer"})
        error = await term.expect("error", "answer", timeout=10)
        assert error["type"] == "error" and error["code"] == "bad_sdp", error
        assert not env.app[PEERS]
    await term.send({"type": "ping"})
    await term.expect("pong")
    assert "answer" not in term.types()
    # The socket stays usable: a single video track is answered.
    await term.send({"type": "offer", "sdp": one, "sdp_type": "offer"})
    assert (await term.expect("error", "answer", timeout=10))["type"] == "answer"


# --- VP8 frame sizes before decoding -------------------------------------------------------
def _keyframe_header(width: int, height: int, scale: int = 0) -> bytes:
    """A VP8 key frame's first 10 bytes (RFC 6386 9.1) and some bytes after them."""
    tag = bytes([0x10, 0x02, 0x00])  # key frame, version 0, shown, first partition 0x1000
    size = b"".join((n | scale << 14).to_bytes(2, "little") for n in (width, height))
    return tag + b"\x9d\x01\x2a" + size + bytes(64)


INTER = b"\x11\x02\x00" + bytes(16)


@pytest.fixture(scope="module")
def vp8_640x480() -> list[bytes]:
    """Real libvpx frames (via PyAV): a keyframe, inter frames, a keyframe at 15."""
    base = np.tile(np.linspace(0, 200, 640, dtype=np.uint8), (480, 1))
    images = [np.dstack([np.roll(base, 7 * i, axis=1), base, base]) for i in range(20)]
    return encode_loop(images, fps=15)


def test_the_keyframe_header_gives_the_picture_size(vp8_640x480: list[bytes]) -> None:
    assert vp8_keyframe_size(vp8_640x480[0]) == (640, 480)
    assert vp8_keyframe_size(vp8_640x480[1]) is None  # an inter frame
    assert vp8_keyframe_size(_keyframe_header(16383, 16383)) == (16383, 16383)
    assert vp8_keyframe_size(_keyframe_header(16383, 16383, scale=3)) == (16383, 16383)
    assert vp8_keyframe_size(_keyframe_header(640, 480)[:9]) is None  # truncated
    assert vp8_keyframe_size(b"\x10\x02\x00\x00\x00\x00" + bytes(8)) is None  # no start code


async def test_an_oversized_keyframe_and_its_inter_frames_never_reach_the_decoder(
    vp8_640x480: list[bytes],
) -> None:
    gate, receiver, decoded, oversized = limited_gate(1920 * 1080)
    for data in (_keyframe_header(16383, 16383), INTER, INTER):
        gate.put((FakeCodec(), FakeFrame(data)), decoded.append)
    await asyncio.sleep(0)
    assert decoded == [] and gate.oversized == 3 == len(oversized) and gate.skipped == 0
    assert receiver.plis == [1234]  # a keyframe of an acceptable size is asked for
    good = vp8_640x480[:3]  # a real 640x480 keyframe and the inter frames after it
    for data in good:
        gate.put((FakeCodec(), FakeFrame(data)), decoded.append)
    assert [f.data for _, f in decoded] == good and gate.passed == 3
    # A sender switching to an oversized picture mid-stream is cut off at its keyframe.
    gate.put((FakeCodec(), FakeFrame(_keyframe_header(4096, 4096))), decoded.append)
    gate.put((FakeCodec(), FakeFrame(INTER)), decoded.append)
    assert len(decoded) == 3 and gate.oversized == 5
    # A key frame tag without a valid header (a frame cut short after a loss) is withheld
    # too, but not reported as too large: the terminal did nothing wrong.
    gate.put((FakeCodec(), FakeFrame(b"\x10\x02\x00" + bytes(16))), decoded.append)
    assert len(decoded) == 3 and gate.oversized == 5 == len(oversized) and gate.corrupt == 1


async def test_the_decoder_backlog_is_bounded(vp8_640x480: list[bytes]) -> None:
    receiver = FakeReceiver()
    waiting: queue.Queue[Any] = queue.Queue()
    gate = DecodeGate(receiver, lambda: True, retry_s=60, decoder_queue=waiting)  # type: ignore[arg-type]
    frames = vp8_640x480
    for data in frames[:MAX_BACKLOG]:  # a decoder thread that is not keeping up
        gate.put((FakeCodec(), FakeFrame(data)), waiting.put)
    assert waiting.qsize() == MAX_BACKLOG
    gate.put((FakeCodec(), FakeFrame(frames[2])), waiting.put)
    await asyncio.sleep(0)
    assert waiting.qsize() == MAX_BACKLOG and gate.overrun == 1 and receiver.plis == [1234]
    while not waiting.empty():  # the decoder catches up...
        waiting.get_nowait()
    gate.put((FakeCodec(), FakeFrame(frames[3])), waiting.put)
    assert waiting.empty() and gate.overrun == 2  # ...and restarts only at a keyframe
    gate.put((FakeCodec(), FakeFrame(frames[15])), waiting.put)
    assert waiting.qsize() == 1 and gate.passed == MAX_BACKLOG + 1


def test_close_leaves_the_decoder_nothing_to_decode(vp8_640x480: list[bytes]) -> None:
    waiting: queue.Queue[Any] = queue.Queue()
    gate = DecodeGate(FakeReceiver(), lambda: True, decoder_queue=waiting)  # type: ignore[arg-type]
    for data in vp8_640x480[:2]:
        gate.put((FakeCodec(), FakeFrame(data)), waiting.put)
    gate.close()
    assert waiting.empty()
    gate.put((FakeCodec(), FakeFrame(vp8_640x480[15])), waiting.put)
    assert waiting.empty()  # nothing after close either...
    gate.put(None, waiting.put)
    assert waiting.get_nowait() is None  # ...but the receiver's stop gets through


async def test_frames_over_the_limit_are_not_decoded_end_to_end(
    loopback_ice: None, client_pc: RTCPeerConnection, vp8_640x480: list[bytes]
) -> None:
    track = PacketTrack(vp8_640x480, 15.0)
    oversized: list[int] = []
    ingest, got = await connect_ingest(
        client_pc, track, max_frame_pixels=320 * 240, on_oversized=lambda: oversized.append(1)
    )
    await wait_for(lambda: len(oversized) >= 20, 10)
    assert got == [] and ingest.frames == 0  # 640x480 is over this limit: nothing decoded
    assert track.keyframes_requested >= 1  # it was asked for a keyframe it could send
    await ingest.close()


async def test_frames_within_the_limit_are_decoded_end_to_end(
    loopback_ice: None, client_pc: RTCPeerConnection, vp8_640x480: list[bytes]
) -> None:
    oversized: list[int] = []
    ingest, got = await connect_ingest(
        client_pc,
        PacketTrack(vp8_640x480, 15.0),
        max_frame_pixels=640 * 480,
        on_oversized=lambda: oversized.append(1),
    )
    await wait_for(lambda: len(got) >= 10, 10)
    assert oversized == [] and (got[0].width, got[0].height) == (640, 480)
    await ingest.close()


async def test_a_slow_decoder_is_not_given_a_backlog_to_finish_at_close(
    loopback_ice: None,
    client_pc: RTCPeerConnection,
    vp8_640x480: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decoder taking 0.25 s a frame gets 15 frames a second. Without a bound its queue
    grows by 11 a second, and closing joins its thread on the event loop after it has decoded
    them all (here over 8 s of a frozen loop); with it, close waits for one frame at most."""
    real = rtcrtpreceiver.get_decoder

    class SlowDecoder:
        def __init__(self, codec: Any) -> None:
            self._decoder = real(codec)

        def decode(self, frame: Any) -> Any:
            time.sleep(0.25)
            return self._decoder.decode(frame)

    monkeypatch.setattr(rtcrtpreceiver, "get_decoder", SlowDecoder)
    ingest, got = await connect_ingest(client_pc, PacketTrack(vp8_640x480, 15.0))
    await wait_for(lambda: len(got) >= 1, 10)
    await asyncio.sleep(3.0)
    started = time.monotonic()
    await ingest.close()
    assert time.monotonic() - started < 1.0


# --- sockets that never say hello ---------------------------------------------------------


async def test_sockets_that_never_say_hello_cannot_lock_terminals_out(make_env):
    """Silent sockets hold no terminal's place: when ``max_pending_hellos`` wait, a new
    socket closes the one that has waited longest (1013), and ``max_sessions`` counts only
    terminals that said hello (before, 64 silent sockets refused every terminal with 503
    for the hello timeout, again and again)."""
    env = await make_env(server={"max_sessions": 2, "max_pending_hellos": 3})
    async with aiohttp.ClientSession() as http:
        silent = []
        for _ in range(6):  # twice the pending room, thrice the sessions
            silent.append(await http.ws_connect(env.ws_url))
            await asyncio.sleep(0.05)
        for sock in silent[:3]:  # the three that waited longest made room for the rest
            msg = await sock.receive(timeout=2)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert sock.close_code == 1013
        terms = [await env.terminal() for _ in range(2)]  # hello answered at once
        assert all("hello" in t.types() for t in terms)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(env.ws_url)  # max_sessions terminals are connected
        assert refused.value.status == 503
        for sock in silent:
            await sock.close()
