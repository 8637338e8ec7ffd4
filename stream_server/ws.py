"""``GET /ws``: the terminal protocol (docs/protocol.md).

The edge's job: authenticate the terminal, validate every message, translate domain errors
into ``error`` events or close codes, and wire WebRTC video into the session. A bad message
never kills the connection; a dropped connection cancels the session (nothing is charged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Annotated, Any, Literal

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import AuthError, FacePayError, InvalidRequest, StoreUnavailable
from session.checkout import CheckoutRequest, CheckoutSession
from session.enroll import EnrollRequest, EnrollSession
from session.frames import FrameSlot
from session.gate import GateSession, GateTerminal
from session.models import Terminal, parse_amount
from session.services import SessionServices
from stream_server.app import (
    ANALYZER,
    CONFIG,
    CONNECTIONS,
    DIRECTORY,
    EXECUTOR,
    HASHER,
    METRICS,
    PEERS,
    STORE,
)
from stream_server.metrics import Metrics

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TRY_LATER = 1013
#: The transport refuses frames above this outright (close 1009); between the configured
#: message limit and this, the terminal gets a ``too_large`` error and stays connected.
TRANSPORT_MAX_BYTES = 1024 * 1024


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hello(_Msg):
    type: Literal["hello"]
    token: str = Field(min_length=1, max_length=256)


class Offer(_Msg):
    type: Literal["offer"]
    sdp: str = Field(min_length=1, max_length=32_000)
    sdp_type: Literal["offer"] = "offer"


class StartCheckout(_Msg):
    type: Literal["start_checkout"]
    amount: Annotated[str | int | float, Field(union_mode="left_to_right")]
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    order_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")


class Passphrase(_Msg):
    type: Literal["passphrase"]
    prompt_id: str = Field(min_length=1, max_length=64)
    passphrase: str = Field(min_length=1, max_length=256)


class PhoneDigits(_Msg):
    type: Literal["phone_digits"]
    digits: str = Field(pattern=r"^[0-9]{4}$")


class StartEnroll(_Msg):
    type: Literal["start_enroll"]
    consent: bool = Field(strict=True)
    account_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=100)
    phone: str = Field(min_length=1, max_length=32)


class EnrollPassphrase(_Msg):
    type: Literal["enroll_passphrase"]
    passphrase: str = Field(min_length=1, max_length=256)
    confirm: str = Field(min_length=1, max_length=256)


class Simple(_Msg):
    type: Literal["cancel", "ping"]


MESSAGES: dict[str, type[_Msg]] = {
    "offer": Offer,
    "start_checkout": StartCheckout,
    "passphrase": Passphrase,
    "phone_digits": PhoneDigits,
    "start_enroll": StartEnroll,
    "enroll_passphrase": EnrollPassphrase,
    "cancel": Simple,
    "ping": Simple,
}


class MetricsObserver:
    """Session observer feeding Prometheus metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def frame_processed(self, timings_ms: dict[str, float]) -> None:
        self.metrics.frames_processed.inc()
        for stage, ms in timings_ms.items():
            self.metrics.stage_seconds.labels(stage).observe(ms / 1000.0)

    def confirm_latency(self, seconds: float) -> None:
        self.metrics.confirm_seconds.observe(seconds)

    def decision(self, mode: str, outcome: str, reason: str) -> None:
        self.metrics.decisions.labels(mode, outcome, reason).inc()

    def gate_decision(self, seconds: float) -> None:
        self.metrics.decision_seconds.observe(seconds)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


class TerminalConnection:
    """One terminal's WebSocket, its video and its current session."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.app = request.app
        self.ws = ws
        self.config = self.app[CONFIG]
        self.metrics = self.app[METRICS]
        self.terminal: Terminal | None = None
        self.frames: FrameSlot[Any] = FrameSlot()
        self.ingest: Any = None
        self.session: CheckoutSession | GateSession | EnrollSession | None = None
        self.session_task: asyncio.Task[Any] | None = None
        self._send_lock = asyncio.Lock()

    async def send(self, event: dict[str, Any]) -> None:
        """Send one event (serialised: aiohttp must not interleave writes)."""
        if self.ws.closed:
            raise ConnectionError("terminal disconnected")
        async with self._send_lock:
            await self.ws.send_json(event)

    # --- connection life cycle ------------------------------------------------------------
    async def run(self) -> None:
        """Authenticate, then serve messages until the terminal goes away."""
        if not await self._hello():
            return
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self.send(_error("invalid_request", "binary messages are not accepted"))
            elif msg.type == WSMsgType.ERROR:
                log.info("terminal websocket error: %s", self.ws.exception())
                break

    async def close(self) -> None:
        """Cancel the session (no charge), close video; called when the socket ends."""
        self.frames.close()
        if self.session is not None:
            self.session.stop()
        task = self.session_task
        if task is not None:
            # Repeat the cancel: redis-py on Python 3.11 can swallow one (see
            # CheckoutSession.stop); the stop flag guarantees no charge meanwhile.
            for _ in range(50):
                if task.done():
                    break
                task.cancel()
                await asyncio.wait({task}, timeout=0.2)
            if task.done() and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()
        if self.ingest is not None:
            await self.ingest.close()

    async def _hello(self) -> bool:
        timeout = self.config.policy.hello_timeout_s
        try:
            msg = await self.ws.receive(timeout=timeout)
        except TimeoutError:
            await self.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"hello timeout")
            return False
        if msg.type != WSMsgType.TEXT:
            await self.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"hello required")
            return False
        try:
            hello = Hello.model_validate(json.loads(msg.data))
            self.terminal = await self.app[STORE].authenticate_terminal(hello.token)
        except (ValueError, ValidationError, AuthError):
            await self.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"unauthenticated")
            return False
        except StoreUnavailable:
            await self.ws.close(code=CLOSE_TRY_LATER, message=b"store unavailable")
            return False
        await self.send(
            {
                "type": "hello",
                "terminal_id": self.terminal.terminal_id,
                "merchant_id": self.terminal.merchant_id,
                "mode": self.terminal.mode,
                "server_time": time.time(),
            }
        )
        return True

    # --- messages -----------------------------------------------------------------------
    async def _on_text(self, data: str) -> None:
        if len(data.encode()) > self.config.server.max_message_bytes:
            await self.send(_error("too_large", "message is larger than the server accepts"))
            return
        try:
            raw = json.loads(data)
        except ValueError:
            await self.send(_error("bad_json", "message is not valid JSON"))
            return
        kind = raw.get("type") if isinstance(raw, dict) else None
        model = MESSAGES.get(kind) if isinstance(kind, str) else None
        if model is None:
            await self.send(_error("unknown_type", f"unknown message type {str(kind)[:40]!r}"))
            return
        try:
            message = model.model_validate(raw)
        except ValidationError as exc:
            fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            await self.send(_error("invalid_request", f"invalid {kind}: {fields}"))
            return
        try:
            await self._dispatch(message)
        except FacePayError as exc:
            # Translate domain errors here, at the edge, and keep the connection.
            code = "bad_sdp" if isinstance(message, Offer) else exc.code
            await self.send(_error(code, str(exc)))

    async def _dispatch(self, message: _Msg) -> None:
        if isinstance(message, Simple) and message.type == "ping":
            await self.send({"type": "pong"})
        elif isinstance(message, Offer):
            await self._offer(message)
        elif isinstance(message, StartCheckout):
            await self._start_checkout(message)
        elif isinstance(message, StartEnroll):
            await self._start_enroll(message)
        elif isinstance(self.session, EnrollSession) and not isinstance(
            message, Passphrase | PhoneDigits
        ):
            self.session.deliver(message.model_dump())
        else:
            if isinstance(message, EnrollPassphrase):
                raise InvalidRequest("no enrolment in progress")
            if not isinstance(self.session, CheckoutSession):
                raise InvalidRequest(f"no checkout in progress for {message.type}")
            self.session.deliver(message.model_dump())

    async def _offer(self, offer: Offer) -> None:
        from stream_server.webrtc import VideoIngest

        if self.ingest is not None:
            await self.ingest.close()
        metrics = self.metrics

        def on_frame(frame: Any, t: float) -> None:
            if not self._wants_frames():
                return  # an enroll terminal keeps nothing before consent
            before = self.frames.dropped
            self.frames.put(frame, t)
            metrics.frames_received.inc()
            if self.frames.dropped > before:
                metrics.frames_dropped.inc()

        self.ingest = VideoIngest(on_frame=on_frame, peers=self.app[PEERS])
        answer = await self.ingest.start(offer.sdp, offer.sdp_type)
        await self.send({"type": "answer", "sdp": answer.sdp, "sdp_type": answer.type})
        if self.terminal is not None and self.terminal.mode == "gate":
            self._start_gate()

    def _wants_frames(self) -> bool:
        """Enroll terminals take frames only while a consented enrolment is capturing."""
        if self.terminal is None or self.terminal.mode != "enroll":
            return True
        return isinstance(self.session, EnrollSession) and self.session.capturing

    async def _start_enroll(self, msg: StartEnroll) -> None:
        """Consent given: validate, clear any earlier frames and start capturing."""
        assert self.terminal is not None
        if self.terminal.mode != "enroll":
            raise InvalidRequest(f"a {self.terminal.mode} terminal cannot start an enrolment")
        if not msg.consent:
            raise InvalidRequest("consent is required before any capture")
        if self.session_task is not None and not self.session_task.done():
            await self.send(_error("busy", "an enrolment is already in progress"))
            return
        request = EnrollRequest(
            merchant_id=self.terminal.merchant_id,
            terminal_id=self.terminal.terminal_id,
            account_id=msg.account_id,
            name=msg.name,
            phone=msg.phone,
        )
        session = EnrollSession(self._services(), request, self.frames, self.send)
        self.frames.clear()  # nothing from before consent is kept
        self.session = session
        self.metrics.sessions.labels("enroll").inc()
        self.session_task = asyncio.create_task(session.run())

    def _services(self) -> SessionServices:
        from stream_server.webrtc import frame_to_bgr

        app = self.app
        return SessionServices(
            config=self.config,
            store=app[STORE],
            directory=app[DIRECTORY],
            analyzer=app[ANALYZER],
            hasher=app[HASHER],
            executor=app[EXECUTOR],
            to_bgr=frame_to_bgr,
            observer=MetricsObserver(self.metrics),
        )

    def _start_gate(self) -> None:
        """A gate decides continuously while its video flows (started by the first offer)."""
        assert self.terminal is not None
        if self.session_task is not None and not self.session_task.done():
            return
        gate = GateTerminal(self.terminal.merchant_id, self.terminal.terminal_id)
        self.session = GateSession(self._services(), gate, self.frames, self.send)
        self.metrics.sessions.labels("gate").inc()
        self.session_task = asyncio.create_task(self.session.run())

    async def _start_checkout(self, msg: StartCheckout) -> None:
        assert self.terminal is not None
        if self.terminal.mode != "checkout":
            raise InvalidRequest(f"a {self.terminal.mode} terminal cannot start a checkout")
        if self.session_task is not None and not self.session_task.done():
            await self.send(_error("busy", "a checkout is already in progress"))
            return
        policy = self.config.policy
        amount = parse_amount(msg.amount)
        currency = msg.currency or policy.currency
        if currency != policy.currency:
            raise InvalidRequest(f"this server takes {policy.currency}, not {currency}")
        if amount > policy.max_payment:
            await self.send({"type": "declined", "reason": "limit"})
            self.metrics.decisions.labels("checkout", "declined", "limit").inc()
            return
        services = self._services()
        request = CheckoutRequest(
            merchant_id=self.terminal.merchant_id,
            terminal_id=self.terminal.terminal_id,
            order_id=msg.order_id,
            amount=amount,
            currency=currency,
        )
        self.frames.clear()  # frames from before this checkout are not evidence for it
        self.session = CheckoutSession(services, request, self.frames, self.send)
        self.metrics.sessions.labels("checkout").inc()
        self.session_task = asyncio.create_task(self.session.run())


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """Upgrade to a WebSocket and serve one terminal."""
    config = request.app[CONFIG]
    origin = request.headers.get("Origin")
    allowed = config.server.allowed_origins
    if origin and allowed and "*" not in allowed and origin not in allowed:
        raise web.HTTPForbidden(text="origin not allowed")
    if len(request.app[CONNECTIONS]) >= config.server.max_sessions:
        raise web.HTTPServiceUnavailable(text="too many terminals connected")
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=TRANSPORT_MAX_BYTES)
    await ws.prepare(request)
    conn = TerminalConnection(request, ws)
    request.app[CONNECTIONS].add(conn)
    request.app[METRICS].sessions_active.inc()
    try:
        await conn.run()
    finally:
        request.app[CONNECTIONS].discard(conn)
        request.app[METRICS].sessions_active.dec()
        await conn.close()
        if not ws.closed:
            await ws.close()
    return ws


def setup(app: web.Application) -> None:
    """Register ``GET /ws``."""
    app.router.add_get("/ws", ws_handler)
