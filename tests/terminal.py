"""A real test terminal: aiohttp WebSocket + aiortc video, on 127.0.0.1 only.

Not a fake: it speaks the same protocol over the same transports as a kiosk, with frames
from the stream generator. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from stream_server.bench_camera import send_video
from stream_server.replay_source import ReplayTrack, camera_rate
from stream_server.webrtc import VideoIngest, rtc_configuration


class TestTerminal:
    """One terminal connection; events are collected in ``events`` as they arrive."""

    __test__ = False  # not a pytest class

    def __init__(self, ws_url: str, token: str, origin: str | None = None) -> None:
        self.ws_url = ws_url
        self.token = token
        #: The ``Origin`` a browser page would send (None: a kiosk app or tool sends none).
        self.origin = origin
        self.events: list[dict[str, Any]] = []
        #: (time.monotonic(), max_fps) of every ``camera`` request, as it arrived.
        self.camera: list[tuple[float, float | None]] = []
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pc: RTCPeerConnection | None = None
        self.track: ReplayTrack | None = None
        self._reader: asyncio.Task[None] | None = None
        self.close_code: int | None = None

    async def connect(self, hello: bool = True) -> dict[str, Any] | None:
        """Open the socket and (by default) authenticate; returns the hello reply."""
        self.http = aiohttp.ClientSession()
        # ws_close only: a receive timeout (what a bare ClientWSTimeout(5) sets) ended the
        # reader silently whenever the server was quiet for 5 s, e.g. while it waited out a
        # dead Redis, and the events that followed were never seen.
        self.ws = await self.http.ws_connect(
            self.ws_url, timeout=aiohttp.ClientWSTimeout(ws_close=5), origin=self.origin
        )
        self._reader = asyncio.create_task(self._read())
        if not hello:
            return None
        await self.send({"type": "hello", "token": self.token})
        return await self.expect("hello")

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    event = msg.json()
                    self.events.append(event)
                    if event.get("type") == "camera":
                        self.camera.append((time.monotonic(), event["max_fps"]))
                        if hasattr(self.track, "set_max_fps"):
                            # as the pages do (a checkout's or enrolment's cap, a gate's idle rate)
                            self.track.set_max_fps(camera_rate(event["max_fps"]))
                    await self._queue.put(event)
        finally:  # however the reading ends, a waiting test hears about it
            self.close_code = self.ws.close_code
            self._queue.put_nowait({"type": "_closed", "code": self.ws.close_code})

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_json(message)

    async def send_raw(self, text: str) -> None:
        assert self.ws is not None
        await self.ws.send_str(text)

    async def next(self, timeout: float = 20.0) -> dict[str, Any]:
        """The next event (or a ``_closed`` marker)."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def expect(self, *types: str, timeout: float = 20.0) -> dict[str, Any]:
        """Skip events until one of ``types`` arrives; fails on close or timeout."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self._queue.get()
                if event["type"] in types:
                    return event
                if event["type"] == "_closed":
                    raise AssertionError(f"closed ({event['code']}) while waiting for {types}")

    async def until_end(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the session's final state event (approved/declined/cancelled/timeout)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.expect("state", timeout=timeout)
                if event["state"] in ("approved", "declined", "cancelled", "timeout"):
                    return event

    async def start_video(
        self, frames: Iterable[np.ndarray] | None, fps: float = 15.0, track: Any = None
    ) -> None:
        """Negotiate WebRTC over the socket and start streaming ``frames`` (or ``track``:
        e.g. pre-encoded packets, which cost the test process no encoding)."""
        self.pc = RTCPeerConnection(rtc_configuration())
        self.track = track if track is not None else ReplayTrack(frames or [], fps=fps)
        send_video(self.pc, self.track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        local = self.pc.localDescription
        await self.send({"type": "offer", "sdp": local.sdp, "sdp_type": local.type})
        answer = await self.expect("answer")
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["sdp_type"]))

    async def checkout(self, amount: str, order_id: str) -> dict[str, Any]:
        await self.send({"type": "start_checkout", "amount": amount, "order_id": order_id})
        return await self.expect("state")

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self.http is not None:
            await self.http.close()


class Gradient(VideoStreamTrack):
    """640x480 gradient whose brightness encodes a frame counter, at 30 fps."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.base = np.tile(np.linspace(0, 200, 640, dtype=np.uint8), (480, 1))

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        img = np.dstack([self.base, self.base, np.full((480, 640), self.n % 256, np.uint8)])
        self.n += 1
        frame = av.VideoFrame.from_ndarray(img, format="bgr24")
        frame.pts, frame.time_base = pts, time_base
        return frame


async def wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``predicate`` until it holds; TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def connect_ingest(
    client_pc: RTCPeerConnection, track: Any, **ingest_args: Any
) -> tuple[VideoIngest, list[av.VideoFrame]]:
    """A server-side :class:`VideoIngest` receiving ``track`` from ``client_pc``; its frames."""
    got: list[av.VideoFrame] = []
    ingest = VideoIngest(lambda f, t: got.append(f), set(), **ingest_args)
    send_video(client_pc, track)
    await client_pc.setLocalDescription(await client_pc.createOffer())
    offer = client_pc.localDescription
    async with asyncio.timeout(10):
        answer = await ingest.start(offer.sdp, offer.type)
    await client_pc.setRemoteDescription(answer)
    return ingest, got
