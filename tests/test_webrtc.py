"""WebRTC ingest and the replay terminal, over real aiortc on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
from aiohttp import WSMsgType, web
from aiortc import RTCPeerConnection, RTCSessionDescription

from pipeline.errors import InvalidRequest
from pipeline.image import load_image
from pipeline.streamgen import StreamSpec, make_stream
from stream_server import replay
from stream_server.bench_camera import send_video
from stream_server.webrtc import (
    BgrConverter,
    VideoIngest,
    add_bitrate_hints,
    frame_to_bgr,
    rtc_configuration,
)
from tests.terminal import Gradient, wait_for

OBAMA = "faces/obama/obama.jpg"


async def _offer(pc: RTCPeerConnection, kind: str = "video") -> RTCSessionDescription:
    if kind == "video":
        send_video(pc, Gradient())
    else:
        pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription


async def test_frames_arrive_at_full_size(loopback_ice: None, client_pc: RTCPeerConnection) -> None:
    got: list[tuple[av.VideoFrame, float]] = []
    peers: set[RTCPeerConnection] = set()
    ingest = VideoIngest(lambda f, t: got.append((f, t)), peers)
    offer = await _offer(client_pc)
    async with asyncio.timeout(10):
        answer = await ingest.start(offer.sdp, offer.type)
    assert len(peers) == 1
    assert "x-google-start-bitrate=1500" in answer.sdp
    await client_pc.setRemoteDescription(answer)
    await wait_for(lambda: len(got) >= 20, 10)
    assert ingest.frames >= 20
    times = [t for _, t in got]
    assert times == sorted(times)
    image = await asyncio.to_thread(frame_to_bgr, got[-1][0])
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    assert image.flags["C_CONTIGUOUS"]
    converted = await asyncio.to_thread(BgrConverter(), got[-1][0])
    assert np.array_equal(converted, image) and converted.flags["C_CONTIGUOUS"]
    await ingest.close()
    assert not peers and ingest.closed


def _vp8_frames(image: np.ndarray, count: int) -> list[av.VideoFrame]:
    """``count`` decoded VP8 frames of ``image`` (shifted a little each frame)."""
    height, width = image.shape[:2]
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = fractions.Fraction(1, 15)
    packets = []
    for i in range(count):
        frame = av.VideoFrame.from_ndarray(np.roll(image, 7 * i, axis=1), format="bgr24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = i
        packets += encoder.encode(frame)
    packets += encoder.encode(None)
    decoder = av.CodecContext.create("libvpx", "r")
    frames = [f for p in packets for f in decoder.decode(p)]
    return frames + list(decoder.decode(None))


def test_converter_gives_the_same_pixels_as_pyav(data_dir: Path) -> None:
    """The cached per-thread reformatter is an optimisation only: every pixel must agree with
    PyAV's own conversion, across size changes (the context is rebuilt) and threads."""
    photo = load_image(data_dir / OBAMA)
    sizes = [(640, 480), (1280, 720), (334, 500), (640, 480)]
    frames = [
        f for w, h in sizes for f in _vp8_frames(np.ascontiguousarray(cv2.resize(photo, (w, h))), 3)
    ]
    assert [(f.width, f.height) for f in frames[::3]] == sizes
    convert = BgrConverter()
    expected = [frame_to_bgr(f) for f in frames]
    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(convert, frames))
    for frame, want, have in zip(frames, expected, got, strict=True):
        assert have.shape == (frame.height, frame.width, 3) and have.flags["C_CONTIGUOUS"]
        assert np.array_equal(have, want)
    assert len({id(a) for a in got}) == len(got)  # no buffer shared between results


def test_bitrate_hints_on_every_picture_codec() -> None:
    sdp = "\r\n".join(
        [
            "v=0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=rtpmap:111 opus/48000/2",
            "a=fmtp:111 minptime=10",
            "m=video 9 UDP/TLS/RTP/SAVPF 96 97 98",
            "a=rtpmap:96 VP8/90000",
            "a=rtpmap:97 rtx/90000",
            "a=fmtp:97 apt=96",
            "a=rtpmap:98 H264/90000",
            "a=fmtp:98 packetization-mode=1",
            "",
        ]
    )
    out = add_bitrate_hints(sdp).split("\r\n")
    assert "a=fmtp:111 minptime=10" in out
    assert "a=fmtp:97 apt=96" in out
    assert out[out.index("a=rtpmap:96 VP8/90000") + 1].startswith("a=fmtp:96 x-google-start")
    assert any(line.startswith("a=fmtp:98 packetization-mode=1;x-google-") for line in out)
    assert add_bitrate_hints(add_bitrate_hints(sdp)) == add_bitrate_hints(sdp)


@pytest.mark.parametrize(
    ("sdp", "sdp_type"),
    [("this is not sdp", "offer"), ("", "offer"), ("v=0\r\nm=video nonsense\r\n", "offer")],
)
async def test_garbage_offer_is_refused(sdp: str, sdp_type: str) -> None:
    peers: set[RTCPeerConnection] = set()
    ingest = VideoIngest(lambda f, t: None, peers)
    with pytest.raises(InvalidRequest) as info:
        await ingest.start(sdp, sdp_type)
    assert info.value.code == "bad_sdp"
    assert not peers


async def test_audio_only_and_non_offer_are_refused(
    loopback_ice: None, client_pc: RTCPeerConnection
) -> None:
    peers: set[RTCPeerConnection] = set()
    audio = await _offer(client_pc, "audio")
    with pytest.raises(InvalidRequest, match="no video"):
        await VideoIngest(lambda f, t: None, peers).start(audio.sdp, "offer")
    with pytest.raises(InvalidRequest, match="bad_sdp"):
        await VideoIngest(lambda f, t: None, peers).start(audio.sdp, "answer")
    assert not peers


async def test_close_stops_consumer_and_leaves_peers(
    loopback_ice: None, client_pc: RTCPeerConnection
) -> None:
    closed: list[bool] = []
    peers: set[RTCPeerConnection] = set()
    ingest = VideoIngest(lambda f, t: None, peers, on_closed=lambda: closed.append(True))
    offer = await _offer(client_pc)
    await client_pc.setRemoteDescription(await ingest.start(offer.sdp, offer.type))
    await wait_for(lambda: ingest.frames >= 5, 10)
    async with asyncio.timeout(5):
        await ingest.close()
        await ingest.close()  # idempotent
    count = ingest.frames
    await asyncio.sleep(0.3)
    assert ingest.frames == count
    assert not peers and not closed  # close() by the owner does not call on_closed


async def test_peer_hangup_calls_on_closed(loopback_ice: None) -> None:
    closed: list[bool] = []
    peers: set[RTCPeerConnection] = set()
    ingest = VideoIngest(lambda f, t: None, peers, on_closed=lambda: closed.append(True))
    pc = RTCPeerConnection(rtc_configuration())
    offer = await _offer(pc)
    await pc.setRemoteDescription(await ingest.start(offer.sdp, offer.type))
    await wait_for(lambda: ingest.frames >= 3, 10)
    async with asyncio.timeout(5):
        await pc.close()
    await wait_for(lambda: closed and not peers, 10)
    assert closed == [True]


async def test_replay_track_paces_at_requested_fps() -> None:
    fps = 12.0
    track = replay.ReplayTrack((np.zeros((480, 640, 3), np.uint8) for _ in range(100)), fps)
    first = await track.recv()
    start, n = time.monotonic(), 0
    async with asyncio.timeout(5):
        while time.monotonic() - start < 1.0:
            frame = await track.recv()
            n += 1
    rate = n / (time.monotonic() - start)
    assert fps * 0.8 <= rate <= fps * 1.2
    assert frame.pts - first.pts == round(n * 90000 / fps)
    assert frame.time_base == fractions.Fraction(1, 90000)
    assert (frame.width, frame.height) == (640, 480)
    track.stop()


async def test_replay_track_holds_last_frame_after_source() -> None:
    frames = [np.full((480, 640, 3), v, np.uint8) for v in (10, 200)]
    track = replay.ReplayTrack(frames, fps=50)
    seen = [(await track.recv()).to_ndarray(format="bgr24")[0, 0, 0] for _ in range(4)]
    assert track.source_done.is_set() and track.frames_sent == 4
    assert abs(int(seen[-1]) - 200) <= 2 and abs(int(seen[0]) - 10) <= 2
    track.stop()


def _collect(frames: Iterator[np.ndarray]) -> list[np.ndarray]:
    return list(frames)


def test_photo_source(data_dir: Path) -> None:
    frames = _collect(replay.open_source(data_dir / OBAMA, fps=10, seconds=1.5))
    assert len(frames) == 15
    assert all(f.shape == (480, 640, 3) and f.dtype == np.uint8 for f in frames)


def test_video_source_loops_and_resizes(data_dir: Path, tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    spec = StreamSpec(width=320, height=240, fps=10, frames=8)  # 0.8 s, a quarter of the size
    make_stream(load_image(data_dir / OBAMA), video, spec)
    frames = _collect(replay.open_source(video, fps=15, seconds=2.0))
    assert len(frames) == 30
    assert all(f.shape == (480, 640, 3) for f in frames)


def test_folder_source(data_dir: Path) -> None:
    folder = data_dir / "faces" / "obama"
    n_photos = len(list(folder.glob("*.jp*g")))
    frames = _collect(replay.open_source(folder, fps=5, seconds=2.0))
    assert len(frames) == n_photos * 5  # at least 1 s per photo
    assert all(f.shape == (480, 640, 3) for f in frames)


def test_missing_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(replay.ReplaySourceError):
        replay.open_source(tmp_path / "nope.jpg", fps=10, seconds=1)
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(replay.ReplaySourceError):
        replay.open_source(tmp_path / "junk.mp4", fps=10, seconds=1)
    with pytest.raises(replay.ReplaySourceError):
        replay.open_source(tmp_path, fps=10, seconds=1)  # no photos there


# --- run_replay against a small stand-in server (the real /ws lives in ws.py) -----------------


SEEN = web.AppKey("seen", list)


def _fake_server(mode: str, frames_before_prompt: int = 10) -> web.Application:
    """Hello, offer/answer through VideoIngest, then the script of a checkout or a gate."""
    peers: set[RTCPeerConnection] = set()
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        ingest = VideoIngest(lambda f, t: None, peers)
        seen.clear()
        watcher: asyncio.Task[None] | None = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                seen.append(m)
                if m["type"] == "hello":
                    if m["token"] != "good":
                        await ws.close(code=4401)
                        break
                    await ws.send_json({"type": "hello", "terminal_id": "t1", "mode": mode})
                elif m["type"] == "offer":
                    answer = await ingest.start(m["sdp"], m["sdp_type"])
                    await ws.send_json({"type": "answer", "sdp": answer.sdp, "sdp_type": "answer"})
                    if mode == "gate":
                        watcher = asyncio.ensure_future(_gate_script(ws, ingest))
                elif m["type"] == "start_checkout":
                    await ws.send_json({"type": "state", "state": "scanning", "session_id": "s"})
                    watcher = asyncio.ensure_future(_prompt(ws, ingest, frames_before_prompt))
                elif m["type"] == "passphrase":
                    if m["passphrase"] == "right horse":
                        await ws.send_json({"type": "approved", "payment_id": "pay1"})
                    else:
                        await ws.send_json({"type": "wrong_passphrase", "attempts_left": 2})
                elif m["type"] == "cancel":
                    await ws.send_json({"type": "state", "state": "cancelled"})
        finally:
            if watcher is not None:
                watcher.cancel()
            await ingest.close()
        return ws

    app = web.Application()
    app[SEEN] = seen
    app.router.add_get("/ws", handle)
    return app


async def _prompt(ws: web.WebSocketResponse, ingest: VideoIngest, frames: int) -> None:
    """Ask for the passphrase once enough video came (the handler keeps reading meanwhile)."""
    await wait_for(lambda: ingest.frames >= frames, 30)
    await ws.send_json({"type": "confirm", "prompt_id": "p1", "account": "O****"})


async def _gate_script(ws: web.WebSocketResponse, ingest: VideoIngest) -> None:
    await wait_for(lambda: ingest.frames >= 5, 10)
    await ws.send_json({"type": "gate_open", "track_id": 1, "account": "B****"})
    await ws.send_json({"type": "gate_deny", "track_id": 2, "reason": "unknown"})


async def _replay(server: Any, mode: str, **kwargs: Any) -> tuple[dict[str, Any], list[dict]]:
    lines: list[dict[str, Any]] = []
    frames = (np.full((480, 640, 3), 90, np.uint8) for _ in range(15))
    kwargs.setdefault("amount", "12.50" if mode == "checkout" else None)
    async with asyncio.timeout(30):
        result = await replay.run_replay(
            str(server.make_url("/")), "good", mode, frames, fps=15, timeout_s=20,
            out=lines.append, **kwargs,
        )  # fmt: skip
    return result, lines


async def test_replay_checkout_approved(loopback_ice: None, aiohttp_server: Any) -> None:
    server = await aiohttp_server(_fake_server("checkout"))
    result, lines = await _replay(server, "checkout", passphrase="right horse", order_id="o-1")
    assert result["outcome"] == "approved" and result["payment_id"] == "pay1"
    assert result["order_id"] == "o-1"
    assert lines[-1] == result and all("t_ms" in line for line in lines)
    assert [line["type"] for line in lines[:2]] == ["hello", "answer"]
    assert "right horse" not in json.dumps(lines)
    confirm = next(line for line in lines if line["type"] == "confirm")
    assert confirm["t_ms"] > 0
    sent = server.app[SEEN]
    assert {"type": "start_checkout", "amount": "12.50", "order_id": "o-1"} in sent
    assert {"type": "passphrase", "prompt_id": "p1", "passphrase": "right horse"} in sent


async def test_replay_without_passphrase_cancels(loopback_ice: None, aiohttp_server: Any) -> None:
    server = await aiohttp_server(_fake_server("checkout"))
    result, _ = await _replay(server, "checkout")
    assert (result["outcome"], result["reason"]) == ("cancelled", "no_passphrase")
    result, _ = await _replay(server, "checkout", passphrase="wrong")
    assert (result["outcome"], result["reason"]) == ("declined", "wrong_passphrase")


async def test_replay_gate_counts_and_completes(loopback_ice: None, aiohttp_server: Any) -> None:
    server = await aiohttp_server(_fake_server("gate"))
    result, lines = await _replay(server, "gate")
    assert result["outcome"] == "completed"
    assert (result["opened"], result["denied"]) == (1, 1)
    assert [x["type"] for x in lines if x["type"].startswith("gate")] == ["gate_open", "gate_deny"]


async def test_replay_client_timeout(loopback_ice: None, aiohttp_server: Any) -> None:
    server = await aiohttp_server(_fake_server("checkout", frames_before_prompt=10**6))
    lines: list[dict[str, Any]] = []
    frames = (np.zeros((480, 640, 3), np.uint8) for _ in range(5))
    url = str(server.make_url("/"))
    async with asyncio.timeout(20):
        result = await replay.run_replay(
            url, "good", "checkout", frames, amount=1, timeout_s=1.5, out=lines.append
        )
    assert (result["outcome"], result["reason"]) == ("timeout", "client_timeout")


async def test_replay_auth_and_connection_errors(aiohttp_server: Any, unused_tcp_port: int) -> None:
    server = await aiohttp_server(_fake_server("checkout"))
    with pytest.raises(replay.ReplayAuthError):
        async with asyncio.timeout(10):
            await replay.run_replay(
                str(server.make_url("/")), "bad", "gate", iter(()), out=lambda e: None
            )
    with pytest.raises(replay.ReplayConnectionError):
        async with asyncio.timeout(15):
            await replay.run_replay(
                f"http://127.0.0.1:{unused_tcp_port}", "t", "gate", iter(()), out=lambda e: None
            )


def test_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unused_tcp_port: int):
    import argparse

    from stream_server import cli_replay

    parser = argparse.ArgumentParser()
    cli_replay.register(parser.add_subparsers(dest="command"))
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"")
    base = ["replay", "--server", f"http://127.0.0.1:{unused_tcp_port}", "--mode", "checkout"]

    def run(*extra: str) -> int:
        args = parser.parse_args([*base, *extra])
        return int(args.handler(args))

    monkeypatch.delenv(cli_replay.TOKEN_ENV, raising=False)
    assert run("--amount", "1", str(photo)) == 2  # no token
    monkeypatch.setenv(cli_replay.TOKEN_ENV, "tok")
    assert run(str(photo)) == 2  # no amount
    assert run("--amount", "1.234", str(photo)) == 2
    assert run("--amount", "1", str(tmp_path / "missing.jpg")) == 2
    assert run("--amount", "1", "--timeout", "5", str(tmp_path)) == 2  # folder without photos


async def test_a_video_connection_that_ends_on_its_own_is_reported_then_a_new_offer_recovers(
    make_env, analyzer, photo
):
    from stream_server.app import CONNECTIONS
    from tests.e2e import camera_frames

    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+12025550101", photo("faces/obama/obama.jpg"))
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo("faces/obama/obama3.jpg")))
    [conn] = list(env.app[CONNECTIONS])
    # What aiortc does when ICE consent or DTLS fails (seen in a soak on an overloaded
    # machine): the ingest ends by itself. The terminal must hear of it, not just time out.
    conn.ingest._ended_by_peer()
    lost = await term.expect("error", timeout=10)
    assert lost["code"] == "video_lost", term.events
    # A fresh offer on the same socket brings video back: a checkout reaches its prompt.
    await term.start_video(camera_frames(analyzer, photo("faces/obama/obama3.jpg"), seed=3))
    await term.checkout("1.00", "o-video-back")
    assert (await term.expect("confirm", "declined", timeout=30))["type"] == "confirm"
