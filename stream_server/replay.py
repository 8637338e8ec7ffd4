"""``facepay replay``: a real terminal that streams a SOURCE over WebRTC in real time.

:func:`run_replay` speaks the terminal protocol (docs/protocol.md) on ``{server}/ws``,
streams SOURCE (see :mod:`stream_server.replay_source`) as its one video track, prints every
server event as one JSON line with ``t_ms`` (milliseconds since the first video frame was
sent; 0 before it) and ends with one ``{"type": "result", "outcome": ...}`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription

from pipeline.errors import AuthError, FacePayError
from stream_server.replay_source import (
    FRAME_H,
    FRAME_W,
    Box,
    Locate,
    ReplaySourceError,
    ReplayTrack,
    camera_rate,
    folder_frames,
    open_source,
    photo_frames,
    video_frames,
)
from stream_server.webrtc import rtc_configuration

__all__ = [
    "FRAME_H",
    "FRAME_W",
    "ReplayAuthError",
    "ReplayConnectionError",
    "ReplayProtocolError",
    "ReplaySourceError",
    "ReplayTrack",
    "folder_frames",
    "open_source",
    "photo_frames",
    "print_json_line",
    "run_replay",
    "video_frames",
    "ws_url",
]

log = logging.getLogger(__name__)

#: How long a gate replay waits for decisions still in flight after SOURCE ends.
GATE_TAIL_S = 1.5
Output = Callable[[dict[str, Any]], None]


class ReplayConnectionError(FacePayError):
    """The server cannot be reached, or dropped the connection before a session started."""

    code = "unreachable"


class ReplayAuthError(AuthError):
    """The server refused the terminal token (close code 4401)."""


class ReplayProtocolError(FacePayError):
    """The server refused the request before a session started (an ``error`` event)."""

    code = "protocol_error"


def print_json_line(obj: dict[str, Any]) -> None:
    """Write one JSON object as one line on stdout."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def ws_url(server_url: str) -> str:
    """``http://host:port`` -> ``ws://host:port/ws`` (https -> wss; ws/wss kept)."""
    url = server_url.strip().rstrip("/")
    for plain, secure in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(plain):
            url = secure + url[len(plain) :]
    if not url.startswith(("ws://", "wss://")):
        raise ReplayConnectionError(f"server URL must start with http(s):// or ws(s)://: {url}")
    return url if url.endswith("/ws") else url + "/ws"


_CLOSED = "__closed__"


class _Terminal:
    """One replay run: the WebSocket conversation and its outcome."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, track: ReplayTrack, out: Output):
        self.ws, self.track, self.out = ws, track, out
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.opened = self.denied = 0

    def t_ms(self) -> int:
        first = self.track.first_frame_at
        return 0 if first is None else round((time.monotonic() - first) * 1000)

    async def read(self) -> None:
        """Queue every JSON event; then one ``__closed__`` item with the close code."""
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    event = json.loads(msg.data)
                except ValueError:
                    log.warning("server sent a message that is not JSON")
                    continue
                if isinstance(event, dict):
                    await self.queue.put(event)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                break
        await self.queue.put({"type": _CLOSED, "code": self.ws.close_code})

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message))

    def show(self, event: dict[str, Any]) -> None:
        shown = dict(event)
        if "sdp" in shown:  # an SDP body is noise on a terminal's output
            shown["sdp_bytes"] = len(str(shown.pop("sdp")))
        shown["t_ms"] = self.t_ms()
        self.out(shown)

    def result(self, outcome: str, reason: str | None, **extra: Any) -> dict[str, Any]:
        res = {"type": "result", "outcome": outcome, "reason": reason, **extra}
        res.update(frames_sent=self.track.frames_sent, t_ms=self.t_ms())
        return res


async def run_replay(
    server_url: str,
    token: str,
    mode: str,
    source: str | Path | Iterable[np.ndarray],
    *,
    amount: str | float | None = None,
    order_id: str | None = None,
    passphrase: str | None = None,
    phone_last4: str | None = None,
    fps: float = 15.0,
    duration_s: float = 20.0,
    timeout_s: float = 60.0,
    focus: Box | None = None,
    locate: Locate | None = None,
    out: Output = print_json_line,
) -> dict[str, Any]:
    """Stream SOURCE to the server as a terminal; print events; return the result line.

    Raises :class:`ReplaySourceError`, :class:`ReplayConnectionError`,
    :class:`ReplayAuthError` or :class:`ReplayProtocolError` when no session could start.
    The passphrase is sent only in answer to ``confirm`` and never printed or logged.
    """
    if mode not in ("checkout", "gate"):
        raise ValueError(f"mode must be checkout or gate, got {mode!r}")
    if mode == "checkout" and amount is None:
        raise ValueError("checkout needs an amount")
    # In a thread: ``locate`` may run a face detector on a big photo.
    frames = (
        await asyncio.to_thread(
            open_source, source, fps=fps, seconds=duration_s, focus=focus, locate=locate
        )
        if isinstance(source, str | Path)
        else iter(source)
    )
    url = ws_url(server_url)
    deadline = time.monotonic() + timeout_s
    track = ReplayTrack(frames, fps)
    pc = RTCPeerConnection(rtc_configuration())
    http = aiohttp.ClientSession()
    reader: asyncio.Task[None] | None = None
    term: _Terminal | None = None
    try:
        try:
            async with asyncio.timeout(min(10.0, timeout_s)):
                ws = await http.ws_connect(url, max_msg_size=1 << 20)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ReplayConnectionError(f"cannot connect to {url}: {exc or 'timeout'}") from exc
        term = _Terminal(ws, track, out)
        reader = asyncio.ensure_future(term.read())
        await term.send({"type": "hello", "token": token})
        hello = await _await_hello(term, min(10.0, timeout_s), mode)
        term.show(hello)
        pc.addTransceiver(track, direction="sendonly")
        try:
            async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                await pc.setLocalDescription(await pc.createOffer())  # gathers all candidates
        except TimeoutError as exc:
            raise ReplayConnectionError("ICE candidate gathering did not finish") from exc
        offer = pc.localDescription
        await term.send({"type": "offer", "sdp": offer.sdp, "sdp_type": offer.type})
        order = order_id or f"replay-{secrets.token_hex(6)}"
        result = await _converse(term, pc, mode, deadline, amount, order, passphrase, phone_last4)
        if mode == "checkout":
            result["order_id"] = order
        out(result)
        return result
    finally:
        track.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await pc.close()
        if term is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3.0):
                    await term.ws.close()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        await http.close()


async def _await_hello(term: _Terminal, timeout_s: float, mode: str) -> dict[str, Any]:
    """The server's hello reply, or the matching error."""
    try:
        async with asyncio.timeout(timeout_s):
            event = await term.queue.get()
    except TimeoutError as exc:
        raise ReplayConnectionError("the server did not answer hello") from exc
    if event["type"] == _CLOSED:
        if event["code"] in (4401, 4408):
            raise ReplayAuthError("the server refused the terminal token (close code 4401)")
        raise ReplayConnectionError(f"the server closed the connection (code {event['code']})")
    if event.get("type") != "hello":
        raise ReplayProtocolError(f"expected the hello reply, got {event.get('type')!r}")
    if event.get("mode") not in (None, mode):
        raise ReplayProtocolError(f"this terminal is a {event['mode']} terminal, not {mode}")
    return event


async def _converse(
    term: _Terminal,
    pc: RTCPeerConnection,
    mode: str,
    deadline: float,
    amount: str | float | None,
    order_id: str,
    passphrase: str | None,
    phone_last4: str | None,
) -> dict[str, Any]:
    """Answer the server until the session ends; return the result line."""
    answered = started = False
    cancel_reason: str | None = None
    pending: tuple[dict[str, Any], float] | None = None  # state approved/declined, grace end
    source_end: float | None = None
    while True:
        now = time.monotonic()
        if mode == "gate" and term.track.source_done.is_set():
            source_end = source_end or now
            if now >= source_end + GATE_TAIL_S:
                return term.result(
                    "completed", "source_ended", opened=term.opened, denied=term.denied
                )
        if pending is not None and now >= pending[1]:
            return term.result(pending[0]["state"], pending[0].get("reason"))
        if now >= deadline:
            extra = {"opened": term.opened, "denied": term.denied} if mode == "gate" else {}
            return term.result("timeout", "client_timeout", **extra)
        try:
            async with asyncio.timeout(min(0.1, deadline - now)):
                event = await term.queue.get()
        except TimeoutError:
            continue
        kind = event.get("type")
        if kind == _CLOSED:
            return term.result("cancelled", "disconnected", close_code=event.get("code"))
        term.show(event)
        if kind == "answer" and not answered:
            try:
                answer = RTCSessionDescription(str(event.get("sdp")), "answer")
                await pc.setRemoteDescription(answer)
            except Exception as exc:  # aiortc raises many kinds on a bad SDP
                raise ReplayProtocolError(f"the server's answer is unusable: {exc}") from exc
            answered = True
            if mode == "checkout":
                start = {"type": "start_checkout", "amount": str(amount), "order_id": order_id}
                await term.send(start)
        elif kind == "error" and not (started if mode == "checkout" else answered):
            code, message = event.get("code"), event.get("message", "")
            raise ReplayProtocolError(f"the server refused: {code}: {message}")
        elif kind == "gate_open":
            term.opened += 1
        elif kind == "gate_deny":
            term.denied += 1
        elif kind == "camera":  # a checkout's cap, an idle gate's lower rate: as the pages
            term.track.set_max_fps(camera_rate(event.get("max_fps")))
        elif kind == "state":
            state = event.get("state")
            started = started or state not in (None, "idle")
            if state in ("cancelled", "timeout"):
                return term.result(state, cancel_reason or event.get("reason"))
            if state in ("approved", "declined") and pending is None:
                pending = (event, time.monotonic() + 1.0)  # wait for the detailed event
        elif kind == "approved":
            return term.result("approved", None, payment_id=event.get("payment_id"))
        elif kind == "declined":
            return term.result("declined", event.get("reason"))
        elif kind == "confirm":
            if passphrase is not None:
                prompt = event.get("prompt_id")
                await term.send(
                    {"type": "passphrase", "prompt_id": prompt, "passphrase": passphrase}
                )
            else:
                cancel_reason = "no_passphrase"
                await term.send({"type": "cancel"})
        elif kind == "wrong_passphrase":
            # One passphrase only: retyping it would just walk the account into a lockout.
            await term.send({"type": "cancel"})
            return term.result(
                "declined", "wrong_passphrase", attempts_left=event.get("attempts_left")
            )
        elif kind == "need_phone_digits":
            if phone_last4 is not None:
                await term.send({"type": "phone_digits", "digits": phone_last4})
            else:
                cancel_reason = "no_phone_digits"
                await term.send({"type": "cancel"})
