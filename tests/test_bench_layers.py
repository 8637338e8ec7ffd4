"""A bench gate's camera lowering its frame rate: pre-encoded VP8 in temporal layers
(``encode_loop(..., layers=True)``) and :meth:`PacketTrack.set_max_fps` leaving out the
upper layers, with real libvpx encoding and decoding (PyAV) and over real WebRTC.

The track paces frames in real time, so these run it at 300 fps: the rate limits asked for
are fractions of that (``fps / 3`` is what 10 is at 30 fps: half the frames; ``fps / 6``
what 5 is: a quarter). Nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from stream_server.bench_camera import (
    TS_LAYER_IDS,
    PacketTrack,
    encode_layered,
    encode_loop,
    layer_share,
)
from stream_server.bench_gate import GateBenchTerminal
from stream_server.bench_report import camera_totals
from stream_server.bench_terminal import BenchTerminal
from stream_server.decode_gate import is_keyframe
from stream_server.replay_source import camera_rate, open_source
from stream_server.webrtc import frame_to_bgr
from tests.terminal import connect_ingest, wait_for

FPS = 300.0  # the track's clock in these tests (fast); the encoding's is 15 fps
HALF, QUARTER = FPS / 3, FPS / 6  # as 10 and 5 are at 30 fps
MOST = 0.75 * FPS  # as 11.2 is at 15 fps: layers 0+1 and half of layer 2's frames


def _scene(n: int) -> list[np.ndarray]:
    """A moving scene: a drifting gradient and a square crossing it (every frame differs,
    so inter frames carry data and a wrong reference shows)."""
    base = np.tile(np.linspace(0, 200, 640, dtype=np.uint8), (480, 1))
    frames = []
    for i in range(n):
        image = np.dstack([np.roll(base, 5 * i, axis=1), base, base[:, ::-1]])
        x, y = 40 + 13 * i, 100 + 4 * i
        image[y : y + 120, x : x + 90] = (30 + 5 * i % 200, 220, 90)
        frames.append(image)
    return frames


def _decode(packets: list[bytes]) -> list[np.ndarray]:
    """One picture per packet, in order (libvpx decodes without delay)."""
    decoder = av.CodecContext.create("libvpx", "r")
    out = []
    for data in packets:
        frames = decoder.decode(av.Packet(data))
        assert len(frames) == 1
        out.append(frames[0].to_ndarray(format="gray"))
    return out


@pytest.fixture(scope="module")
def layered() -> list[bytes]:
    return encode_loop(_scene(40), 15.0, layers=True)  # keyframes at 0, 16, 32


def test_a_layered_encoding_has_one_packet_a_frame_and_keyframes_on_the_base_layer(
    layered: list[bytes],
) -> None:
    assert len(layered) == 40
    assert [i for i, p in enumerate(layered) if is_keyframe("VP8", p)] == [0, 16, 32]
    at_30 = encode_loop(_scene(40), 30.0, layers=True)  # a second: 32 frames, not 30
    assert [i for i, p in enumerate(at_30) if is_keyframe("VP8", p)] == [0, 32]
    # Unlayered: as before, a keyframe every second to the frame.
    plain = encode_loop(_scene(40), 15.0)
    assert [i for i, p in enumerate(plain) if is_keyframe("VP8", p)] == [0, 15, 30]


def test_leaving_out_upper_layers_decodes_to_the_same_pictures(layered: list[bytes]) -> None:
    """The encoding itself: half and quarter of the frames decode as in a full decode."""
    full = _decode(layered)
    for step in (2, 4):
        kept = list(range(0, len(layered), step))
        assert {TS_LAYER_IDS[i % 4] for i in kept} == ({0, 1} if step == 2 else {0})
        for i, image in zip(kept, _decode([layered[i] for i in kept]), strict=True):
            assert np.array_equal(image, full[i]), f"frame {i} at 1/{step} of the frames"


async def test_a_layered_camera_sends_what_decodes_as_the_full_stream(
    layered: list[bytes],
) -> None:
    """Paced by :meth:`PacketTrack.recv`: full -> half -> full -> quarter -> full -> half,
    across keyframes (0, 16, 32) and two wraps of the loop, with a keyframe request at a
    quarter rate. The clock runs on over frames left out, and every frame sent decodes to
    exactly the picture a full decode gives for it."""
    index = {p: i for i, p in enumerate(layered)}
    assert len(index) == len(layered)  # a packet tells which frame of the loop it is
    full = _decode(layered)
    track = PacketTrack(layered, FPS, layered=True)
    # (clock tick from which it applies, max_fps; or "pli" for a keyframe request)
    schedule: list[tuple[int, float | str | None]] = [
        (9, HALF),
        (21, None),  # raised after an odd frame: layer 2 waits for the next base frame
        (30, QUARTER),
        (37, "pli"),  # seeks from frame 37 to the keyframe at 0 (the loop's next)
        (51, None),
        (66, HALF),
        (95, None),
    ]
    sent: list[tuple[int, int]] = []  # (clock tick, frame of the loop)
    phases: list[float | str | None] = []  # the rate asked for when each was sent
    limit: float | str | None = None
    while len(sent) < 80:
        packet = await track.recv()
        assert packet.pts is not None and packet.time_base is not None
        tick = round(float(packet.pts * packet.time_base) * FPS)
        sent.append((tick, index[bytes(packet)]))
        phases.append(limit)
        while schedule and schedule[0][0] <= tick + 1:
            _, change = schedule.pop(0)
            if change == "pli":
                track.request_keyframe()
            else:
                limit = change
                track.set_max_fps(limit)  # type: ignore[arg-type]
    track.stop()

    ticks, frames = [t for t, _ in sent], [i for _, i in sent]
    assert ticks == sorted(set(ticks)) and ticks[0] == 0  # one frame time each, sent or not
    assert track.frames_sent == len(sent) == 80
    assert track.frames_held == ticks[-1] + 1 - len(sent) > 0
    assert track.frames_sent + track.frames_held == ticks[-1] + 1  # every frame time played
    assert track.keyframes_requested == 1
    assert frames[frames.index(36) + 1] == 0  # the requested keyframe came next
    # Each lowered rate sent only its layers (and keyframes), and did leave frames out:
    # HALF is layer 0 and a third of layer 1's frames, QUARTER layer 0 alone.
    for rate, layers in ((HALF, {0, 1}), (QUARTER, {0})):
        during = [i for i, phase in zip(frames, phases, strict=True) if phase == rate]
        assert len(during) > 3 and {TS_LAYER_IDS[i % 4] for i in during} == layers
    # What a receiver decodes is the full decode's picture, frame by frame.
    for (tick, i), image in zip(sent, _decode([layered[i] for _, i in sent]), strict=True):
        assert np.array_equal(image, full[i]), f"frame {i} of the loop at tick {tick}"


@pytest.mark.parametrize("before", [None, MOST, HALF, QUARTER])
@pytest.mark.parametrize("after", [None, MOST, HALF, QUARTER])
def test_a_rate_change_at_any_frame_keeps_the_stream_decodable(
    layered: list[bytes], before: float | None, after: float | None
) -> None:
    """Without the pacing (:meth:`PacketTrack.next_frame`): the rate changes at every
    position of the layer pattern, and around a keyframe; nothing sent decodes wrong."""
    full = _decode(layered)
    for at in range(9, 19):
        track = PacketTrack(layered, FPS, layered=True)
        track.set_max_fps(before)
        sent = []
        for tick in range(len(layered) + 8):  # and on into the next pass
            if tick == at:
                track.set_max_fps(after)
            if (data := track.next_frame()) is not None:
                sent.append(tick % len(layered))
                assert data == layered[tick % len(layered)]
        assert track.frames_held == len(layered) + 8 - len(sent)
        assert {0, 16, 32} <= set(sent)  # keyframes are always sent
        for i, image in zip(sent, _decode([layered[i] for i in sent]), strict=True):
            assert np.array_equal(image, full[i]), f"{before} -> {after} at {at}: frame {i}"


def test_the_layers_and_the_share_of_the_next_that_give_the_rate_asked_for() -> None:
    at_30 = [layer_share(r, 30.0) for r in (None, 60, 30, 22.5, 15, 10, 7.5, 5, 1)]
    assert at_30 == [(3, 0), (3, 0), (3, 0), (2, 0.5), (2, 0), (1, 1 / 3), (1, 0), (1, 0), (1, 0)]
    assert layer_share(11.25, 15.0) == (2, 0.5)  # load pacing's 1.5x of 7.5 at 15 fps
    track = PacketTrack(encode_loop(_scene(8), 15.0, layers=True), 30.0, layered=True)
    assert track.sending_fps == 30.0
    track.set_max_fps(10)
    assert (track.max_fps, track.sending_fps) == (10, 10.0)  # lower: at once
    track.set_max_fps(5)
    assert track.sending_fps == 7.5  # the base layer is the least a layered camera sends
    track.set_max_fps(None)
    assert track.sending_fps == 7.5  # higher: from the next base frame sent


@pytest.mark.parametrize("rate", [0.9, MOST / FPS, 0.6, 0.5, 0.4, 1 / 3, 0.3, 0.25, 0.1])
def test_a_layered_camera_sends_about_the_rate_asked_for_and_all_of_it_decodes(
    layered: list[bytes], rate: float
) -> None:
    """Any rate, not only halves and quarters (a browser's ``maxFramerate`` is any number):
    over two passes of the loop the camera sends the share of frames asked for, to within
    a frame a period, and never fewer than the base layer's quarter; every frame sent
    decodes to the picture a full decode gives."""
    full = _decode(layered)
    track = PacketTrack(layered, FPS, layered=True)
    track.set_max_fps(rate * FPS)
    ticks = 2 * len(layered)
    sent = [t % len(layered) for t in range(ticks) if track.next_frame() is not None]
    expected = max(rate, 0.25) * ticks  # keyframes are of layer 0: none extra
    assert expected - 2 <= len(sent) <= expected + 2, (rate, len(sent))
    assert abs(track.sending_fps - max(rate, 0.25) * FPS) < 1e-6
    for i, image in zip(sent, _decode([layered[i] for i in sent]), strict=True):
        assert np.array_equal(image, full[i]), f"frame {i} at {rate} of the frames"


async def test_an_unlayered_camera_cannot_lower_its_rate_and_sends_every_frame() -> None:
    packets = encode_loop(_scene(20), 15.0)
    track = PacketTrack(packets, FPS)
    track.set_max_fps(QUARTER)
    assert track.max_fps == QUARTER and track.sending_fps == FPS
    got = [bytes(await track.recv()) for _ in range(25)]
    track.stop()
    assert got == packets + packets[:5]
    assert track.frames_sent == 25 and track.frames_held == 0


def test_a_keyframe_request_skips_frames_but_the_pass_and_its_clock_stay_exact(
    layered: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    """A gate's pass and the time since a walker's frame are read from the frames the
    camera played: a keyframe request (the loop jumps to its next keyframe) moves neither,
    where the time since the first frame, divided by the pass's length, would drift."""
    now = [0.0]
    track = PacketTrack(layered, FPS, layered=True, clock=lambda: now[0])
    track.set_max_fps(HALF)  # frames held back by the rate are played all the same
    gate = GateBenchTerminal({"reach_frames": [5, 12, 30]}, "token", 0, track, 0.0)

    sent = []

    def play(n: int) -> None:
        for _ in range(n):
            sent.append(track.next_frame())
            now[0] += 1.0

    assert track.since_played(0) is None  # nothing played yet
    play(10)  # frames 0-9, at 0-9 s
    track.request_keyframe()  # the next frame is the keyframe at 16: 10-15 are skipped
    play(5)  # frames 16-20, at 10-14 s
    assert track.passes == 0 and sum(p is not None for p in sent) + track.frames_held == 15
    assert track.since_played(5) == 15.0 - 5.0
    assert track.since_played(12) == track.since_played(16) == 15.0 - 10.0  # 12 skipped
    assert track.since_played(30) is None  # not yet in this pass
    gate._report({"type": "gate_open", "decision_ms": 210.0, "payment_id": "p_1"})
    rec = json.loads(capsys.readouterr().out)
    assert rec["pass"] == 0 and rec["since_reach_ms"] == {"5": 10_000.0, "12": 5_000.0}
    play(len(layered) - 21)  # frames 21-39: the first pass ends 6 frames early
    assert track.passes == 0
    play(1)  # frame 0 again
    assert track.passes == 1 and track.since_played(5) is None and track.since_played(0) == 1.0
    # The time since the camera's first frame says 34 of the loop's 40 frames, pass 0.
    assert int(now[0] // len(layered)) == 0
    gate._report({"type": "gate_deny", "reason": "unknown", "decision_ms": 180.0})
    rec = json.loads(capsys.readouterr().out)
    assert rec["pass"] == 1 and rec["since_reach_ms"] == {}


def test_a_gate_terminal_follows_and_counts_the_servers_camera_messages() -> None:
    track = PacketTrack(encode_loop(_scene(8), 15.0, layers=True), 30.0, layered=True)
    gate = GateBenchTerminal({}, "token", 0, track, 0.0)
    gate._camera({"type": "camera", "max_fps": 10})
    assert (track.max_fps, track.sending_fps) == (10.0, 10.0)
    gate._camera({"type": "camera", "max_fps": None})
    assert track.max_fps is None and gate.camera_changes == 2
    # A request it cannot make sense of keeps the full rate (never fewer frames).
    for bad in (0, -5, True, "10", [10]):
        gate._camera({"type": "camera", "max_fps": bad})
        assert track.max_fps is None, bad
    assert camera_rate(7) == 7.0 and camera_rate(None) is None
    ends = [
        {"terminal": 0, "frames_sent": 9, "camera_changes": 2, "frames_held": 5},
        {"terminal": 1, "frames_sent": 3},  # a checkout terminal's line
        {"terminal": 2, "camera_changes": 1, "frames_held": 0},
    ]
    assert camera_totals(ends) == {"camera_changes": 3, "frames_held": 5}


def test_a_checkout_terminal_hears_the_servers_cap() -> None:
    """A checkout terminal passes the server's cap (``checkout.camera_fps``) to its camera
    and counts it. A one-layer camera notes the cap and keeps its rate, as a camera that
    cannot cap itself; the bench's checkout camera is layered and halves."""
    track = PacketTrack(encode_loop(_scene(8), 15.0), 30.0)
    checkout = BenchTerminal({}, "token", 0, track)
    checkout._camera({"type": "camera", "max_fps": 15})
    assert (track.max_fps, track.sending_fps, checkout.camera_changes) == (15.0, 30.0, 1)
    layered = PacketTrack(encode_loop(_scene(8), 15.0, layers=True), 30.0, layered=True)
    BenchTerminal({}, "token", 1, layered)._camera({"type": "camera", "max_fps": 15})
    assert layered.sending_fps == 15.0


async def test_a_lowered_rate_over_real_webrtc_decodes_clean(
    loopback_ice: None, client_pc: RTCPeerConnection
) -> None:
    """At 30 fps over aiortc, lowered to 10 (layer 0 and a third of layer 1) and then to 5
    (7.5 sent: layer 0): every picture the server decodes is one of the loop's, exact to
    the pixel."""
    packets = await asyncio.to_thread(encode_loop, _scene(48), 30.0, layers=True)
    full = [np.asarray(image) for image in _decode(packets)]
    track = PacketTrack(packets, 30.0, layered=True)
    ingest, got = await connect_ingest(client_pc, track, wanted=lambda: True)
    await wait_for(lambda: len(got) >= 5, 10)
    track.set_max_fps(10)
    await wait_for(lambda: track.frames_held >= 12, 5)
    track.set_max_fps(5)
    held = track.frames_held
    await wait_for(lambda: track.frames_held >= held + 24, 5)
    track.set_max_fps(None)
    await wait_for(lambda: track.frames_sent >= 60, 5)
    await ingest.close()
    assert len(got) >= 20
    images = await asyncio.to_thread(lambda: [frame_to_bgr(f) for f in got])
    for n, image in enumerate(images):
        gray = av.VideoFrame.from_ndarray(image, format="bgr24").to_ndarray(format="gray")
        best = min(float(np.abs(gray.astype(int) - ref).mean()) for ref in full)
        # bgr and back loses a little; a wrong reference frame is far off.
        assert best < 2.0, f"picture {n} is none of the loop's ({best:.1f})"


def test_the_checkout_camera_is_layered_at_the_unlayered_cameras_bitrate(data_dir: Path) -> None:
    """The bench's checkout camera (:func:`encode_layered`) sends about what the unlayered
    one did, so that at its full rate the server's cost per frame is what the figures in
    docs/performance.md were measured with. libvpx's layered rate control alone falls well
    short of its target, which the correction makes up."""
    frames = list(open_source(str(data_dir / "faces/obama/obama3.jpg"), fps=15.0, seconds=4))

    def kbits(packets: list[bytes]) -> float:
        return sum(map(len, packets)) * 8 * 15.0 / len(packets) / 1000

    plain = kbits(encode_loop(frames, 15.0))
    layered = encode_layered(frames, 15.0)
    assert len(layered) == len(frames)
    assert abs(kbits(layered) - plain) < 0.1 * plain, (kbits(layered), plain)
    assert kbits(encode_loop(frames, 15.0, layers=True)) < 0.9 * plain
    # Layered as encode_loop lays it out: what a lowered rate leaves out still decodes.
    decoded = _decode([layered[i] for i in range(0, len(layered), 2)])
    assert len(decoded) == (len(layered) + 1) // 2
