"""Terminals for ``facepay bench``: one process runs K real checkout terminals.

Each terminal is what a kiosk is: one WebSocket to ``/ws`` (hello with its token) and one
aiortc peer connection sending VP8 video at ``fps`` in real time. It runs checkouts back to
back for the duration: ``start_checkout`` -> ``confirm`` -> passphrase -> ``approved``, and
reports one JSON line per session on stdout.

Like our web client's checkout page, a terminal stops sending video at the confirmation
prompt (or when a checkout ends) and starts again when the server says the next checkout is
``scanning`` (``pause_video`` in the spec; ``facepay bench --continuous-video`` keeps every
terminal streaming, as a camera that cannot pause would).

The video is encoded once per process (a few seconds of the SOURCE as a camera would see it,
keyframe every second) and the packets are replayed in a loop, as a camera with a hardware
encoder hands them over (``stream_server.bench_camera``). Encoding every frame in Python for
every terminal would spend the 2-core machine's CPU on the *clients* and measure them, not
the server. ``--live-encode`` keeps aiortc's per-frame software encoder when that is what
you want to see.

The server caps a checkout camera's rate right after each answer (``camera {max_fps}``,
``checkout.camera_fps``, 15), and every camera here obeys, as the web client does: a
``--live-encode`` one by skipping frames before the encoder, the pre-encoded one by leaving out
frames of its upper temporal layers (any rate down to a quarter of ``--fps``: at ``--fps
30`` a cap of 15 sends 15, one of 10 sends 10, one of 5 the base layer's 7.5). Requests and
frames held back are counted in ``camera``.

Run as ``python -m stream_server.bench_terminal SPEC_JSON`` (the bench does this).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription

from stream_server.bench_camera import PacketTrack, encode_layered, encode_loop, send_video
from stream_server.replay import ws_url
from stream_server.replay_source import ReplayTrack, camera_rate, open_source
from stream_server.webrtc import restrict_host_addresses, rtc_configuration

_PHONE = "need_phone_digits"
#: Seconds of SOURCE encoded once and looped (it restarts on its first frame, a keyframe).
LOOP_S = 4
#: A shopper steps up this long after the last one left (``--gap``; 0.3 s = saturation).
GAP_S = 0.3
#: A session with no outcome this long after it started is counted lost (longer than the
#: server's own session timeout, 60 s by default, so a timeout is seen as one).
SESSION_GUARD_S = 90.0


class BenchTerminal:
    """One checkout terminal running sessions back to back until ``end``."""

    def __init__(self, spec: dict[str, Any], token: str, index: int, track: Any) -> None:
        self.spec, self.token, self.index, self.track = spec, token, index, track
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.records: list[dict[str, Any]] = []
        self.pc: RTCPeerConnection | None = None
        self.video_lost = False  # the server said video_lost: re-offer before the next sale
        self.reconnects = 0  # new offers made because the video connection died
        self.camera_changes = 0  # the server's {"type": "camera"} messages

    async def run(self, http: aiohttp.ClientSession, end: float) -> None:
        """Connect and say hello, do this terminal's work until ``end``, hang up."""
        ws = await http.ws_connect(ws_url(self.spec["server"]), max_msg_size=1 << 20)
        reader = asyncio.ensure_future(self._read(ws))
        try:
            await ws.send_json({"type": "hello", "token": self.token})
            await self._expect({"hello"}, 10.0)
            await self._work(ws, end)
        finally:
            await self._hang_up(ws, reader)

    async def _work(self, ws: aiohttp.ClientWebSocketResponse, end: float) -> None:
        """Stream and run checkouts back to back; every session is reported."""
        await self._start_video(ws)
        # The camera runs before the first shopper arrives (a kiosk is always on).
        await asyncio.sleep(self.spec.get("warmup_s", 1.0))
        n = 0
        while time.monotonic() < end:
            if self.video_lost or self.pc is None or self.pc.connectionState == "failed":
                # As a kiosk would: the video connection died, so offer a new one.
                self.reconnects += 1
                await self._start_video(ws)
            n += 1
            await self._checkout(ws, f"bench-{self.spec['run']}-{self.index}-{n}")
            await asyncio.sleep(float(self.spec.get("gap_s", GAP_S)))

    async def _hang_up(self, ws: aiohttp.ClientWebSocketResponse, reader: asyncio.Future[None]
                       ) -> None:  # fmt: skip
        """Close the video and the socket, stop reading."""
        with contextlib.suppress(Exception):
            if self.pc is not None:
                await asyncio.wait_for(self.pc.close(), 5.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3.0)
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader

    async def _start_video(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """A (new) peer connection sending the track; the server answers on the socket."""
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), 5.0)
        self.video_lost = False
        if isinstance(self.track, PacketTrack):
            self.track.set_max_fps(None)  # a new connection starts at the full frame rate
        pc = self.pc = RTCPeerConnection(rtc_configuration())
        send_video(pc, self.track)
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription
        await ws.send_json({"type": "offer", "sdp": offer.sdp, "sdp_type": offer.type})
        answer = await self._expect({"answer"}, 15.0)
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))

    async def _checkout(self, ws: aiohttp.ClientWebSocketResponse, order: str) -> None:
        t0 = time.monotonic()
        rec: dict[str, Any] = {"terminal": self.index, "order_id": order, "outcome": "lost"}
        self.records.append(rec)
        await ws.send_json(
            {"type": "start_checkout", "amount": self.spec["amount"], "order_id": order}
        )
        deadline = t0 + SESSION_GUARD_S
        try:
            while True:
                event = await self._expect(
                    {"confirm", "approved", "declined", "state", "error", "_closed", _PHONE},
                    deadline - time.monotonic(),
                )
                kind = event["type"]
                if kind == "confirm":
                    rec["confirm_ms"] = round((time.monotonic() - t0) * 1000, 1)
                    # The rate the server asked of the camera then (load pacing), for --raw.
                    rec["camera_max_fps"] = getattr(self.track, "max_fps", None)
                    self._video(sending=False)  # recognised: no more video this checkout
                    await ws.send_json(
                        {
                            "type": "passphrase",
                            "prompt_id": event["prompt_id"],
                            "passphrase": self.spec["passphrase"],
                        }
                    )
                elif kind == _PHONE:  # a look-alike is enrolled: narrow by phone digits
                    await ws.send_json({"type": "phone_digits", "digits": self.spec["phone_last4"]})
                elif kind in ("approved", "declined"):
                    rec.update(outcome=kind, reason=event.get("reason"))
                    break
                elif kind == "state" and event.get("state") == "scanning":
                    # The server looks from now on: restart the camera (as the web client).
                    self._video(sending=True)
                elif kind == "state" and event.get("state") in ("timeout", "cancelled"):
                    rec.update(outcome=event["state"], reason=event.get("reason"))
                    break
                elif kind == "error" and event.get("code") == "video_lost":
                    self.video_lost = True  # this session will time out; the next re-offers
                    rec["video_lost"] = True
                elif kind == "error":
                    rec.update(outcome="error", reason=event.get("code"))
                    break
                elif kind == "_closed":
                    rec.update(outcome="lost", reason="disconnected")
                    raise ConnectionError("server closed the WebSocket")
        except TimeoutError:
            rec.update(outcome="lost", reason="no_outcome")
        finally:
            self._video(sending=False)
            rec["end_ms"] = round((time.monotonic() - t0) * 1000, 1)
            rec["t"] = round(time.time(), 3)
            print(json.dumps(rec), flush=True)

    def _video(self, *, sending: bool) -> None:
        """Pause or resume the camera between shoppers (when the spec says so and it can)."""
        if not self.spec.get("pause_video") or not isinstance(self.track, PacketTrack):
            return
        if sending:
            self.track.resume()
        else:
            self.track.pause()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                with contextlib.suppress(ValueError):
                    event = json.loads(msg.data)
                    if isinstance(event, dict) and event.get("type") == "camera":
                        self._camera(event)  # at once, whatever the terminal awaits
                        continue
                    await self.events.put(event)
        await self.events.put({"type": "_closed"})

    def _camera(self, event: dict[str, Any]) -> None:
        """Cap the camera's frame rate (``max_fps``) or lift the cap (None), as the server
        asks: a checkout's right after each answer, an idle gate's while its corridor is
        empty. Counted in ``camera_changes``."""
        self.camera_changes += 1
        set_max_fps = getattr(self.track, "set_max_fps", None)
        if set_max_fps is not None:
            set_max_fps(camera_rate(event.get("max_fps")))

    async def _expect(self, kinds: set[str], timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(max(0.0, timeout)):
            while True:
                event = await self.events.get()
                if event.get("type") in kinds:
                    return event


async def run_process(spec: dict[str, Any]) -> None:
    """Run this process's terminals (``spec["tokens"]``) until the duration ends."""
    # Both subclass BenchTerminal, so they import this module: imported here, not above.
    from stream_server.bench_gate import GateBenchTerminal
    from stream_server.bench_signal import SignallingTerminal

    if spec.get("loopback", True):
        restrict_host_addresses(["127.0.0.1"])
    fps = float(spec["fps"])
    focus = tuple(spec["focus"]) if spec.get("focus") else None
    gate = spec.get("mode") == "gate"
    packets: list[bytes] | None = None
    if gate:  # the whole looped scene, one pass (stream_server.bench_gate)
        frames = open_source(spec["source"], fps=fps, seconds=float(spec["period_s"]))
        # In temporal layers: the server lowers a gate's frame rate while its corridor is
        # empty (``{"type": "camera"}``), and packets can then be left out.
        packets = encode_loop(frames, fps, layers=True)
    elif not spec.get("live_encode") and spec["tokens"]:
        frames = open_source(spec["source"], fps=fps, seconds=LOOP_S, focus=focus)
        # In layers too, so the camera obeys the server's cap after each answer as a
        # browser's does; at the unlayered camera's bitrate, so that at its full rate it
        # costs the server what the figures in docs/performance.md were measured with.
        packets = encode_layered(list(frames), fps)
    start_at = float(spec["start_at"])  # wall clock, so every process starts together
    await asyncio.sleep(max(0.0, start_at - time.time()))
    end = time.monotonic() + float(spec["duration_s"])
    terminals: list[BenchTerminal] = []
    for index, token in spec["tokens"]:
        if packets is not None:
            track: Any = PacketTrack(packets, fps, layered=True)
        else:
            frames = open_source(
                spec["source"],
                fps=fps,
                seconds=spec["duration_s"] + 60,
                focus=focus,
            )
            track = ReplayTrack(frames, fps)
        if gate:
            delay = index * float(spec["stagger_s"])
            terminals.append(GateBenchTerminal(spec, token, index, track, delay))
        else:
            terminals.append(BenchTerminal(spec, token, index, track))
    for index, token in spec.get("signal_tokens", []):
        terminals.append(SignallingTerminal(spec, token, index, None))
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(t.run(http, end) for t in terminals), return_exceptions=True
        )
    for t, res in zip(terminals, results, strict=True):
        if isinstance(res, BaseException):
            print(json.dumps({"terminal": t.index, "terminal_error": repr(res)[:300]}), flush=True)
        sent = getattr(t.track, "frames_sent", 0)
        line = {"terminal": t.index, "frames_sent": sent, "reconnects": t.reconnects}
        held = getattr(t.track, "frames_held", None)
        if held is not None:
            line["frames_held"] = held  # left out at a capped rate
        if gate and isinstance(t.track, PacketTrack):
            line["passes"] = t.track.passes  # complete passes of the scene
        if t.track is not None:  # a video terminal
            line["camera_changes"] = t.camera_changes
        print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m stream_server.bench_terminal SPEC_JSON_FILE``."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    asyncio.run(run_process(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
