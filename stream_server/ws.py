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
from typing import Any

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from pipeline.errors import (
    FacePayError,
    InvalidRequest,
    RateLimited,
)
from pipeline.image import MIN_SIDE
from session.camera_load import LoadPacer, camera_event, pacer_for
from session.checkout import CheckoutSession
from session.enroll import EnrollRequest, EnrollSession
from session.frames import FrameSlot
from session.gate import GateSession, GateTerminal
from session.models import CheckoutRequest, Terminal, parse_amount
from session.services import SessionServices
from stream_server.app import (
    ANALYZER,
    CHECKOUT_LOAD,
    CONFIG,
    CONNECTIONS,
    DIRECTORY,
    EXECUTOR,
    FRAME_CONVERTER,
    HASHER,
    LIMITER,
    METRICS,
    PEERS,
    SEARCH_EXECUTOR,
    STORE,
)
from stream_server.revocation import revoked_close
from stream_server.ws_hello import admit, hello, make_room
from stream_server.ws_messages import (
    MESSAGES,
    TRANSPORT_MAX_BYTES,
    EnrollPassphrase,
    MetricsObserver,
    Offer,
    Passphrase,
    PhoneDigits,
    Simple,
    StartCheckout,
    StartEnroll,
    _Msg,
    error_event,
)

log = logging.getLogger(__name__)


class TerminalConnection:
    """One terminal's WebSocket, its video and its current session."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.app = request.app
        self.ws = ws
        self.config = self.app[CONFIG]
        self.metrics = self.app[METRICS]
        self.terminal: Terminal | None = None
        #: The sha256 of the token it said hello with: a rotation closes it unless current.
        self.token_sha256: str | None = None
        self.frames: FrameSlot[Any] = FrameSlot()
        self.frames.on_dropped = self.metrics.frames_dropped.inc
        self.ingest: Any = None
        self.session: CheckoutSession | GateSession | EnrollSession | None = None
        self.session_task: asyncio.Task[Any] | None = None
        self._send_lock = asyncio.Lock()
        self._notes: set[asyncio.Task[None]] = set()  # keeps _notify's tasks referenced
        self._revoked: asyncio.Task[bool] | None = None  # the 4401 close, once revoked
        self.opened_at = time.monotonic()
        #: Set to make room for a newer socket while this one still awaits its hello.
        self.evicted = asyncio.Event()

    async def send(self, event: dict[str, Any]) -> None:
        """Send one event (serialised: aiohttp must not interleave writes)."""
        if self.ws.closed:
            raise ConnectionError("terminal disconnected")
        async with self._send_lock:
            await self.ws.send_json(event)

    def revoke(self, message: bytes = b"terminal revoked") -> asyncio.Task[bool]:
        """Revoked, or its token rotated: stop the session now and close the socket (4401)."""
        if self._revoked is None:
            if self.session is not None:
                self.session.stop()
            self._revoked = revoked_close(self.ws, message)
        return self._revoked

    # --- connection life cycle ------------------------------------------------------------
    async def run(self) -> None:
        """Authenticate, then serve messages until the terminal goes away."""
        try:
            if not await hello(self):
                return
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    refused = error_event("invalid_request", "binary messages are not accepted")
                    await self.send(refused)
                elif msg.type == WSMsgType.ERROR:
                    log.info("terminal websocket error: %s", self.ws.exception())
                    break
        except ConnectionError:
            pass  # the socket closed under a send (a revocation, the terminal leaving)

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

    # --- messages -----------------------------------------------------------------------
    async def _on_text(self, data: str) -> None:
        if self._revoked is not None:
            return  # closing: nothing more from a revoked terminal
        if len(data.encode()) > self.config.server.max_message_bytes:
            await self.send(error_event("too_large", "message is larger than the server accepts"))
            return
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):
            await self.send(error_event("bad_json", "message is not valid JSON"))
            return
        kind = raw.get("type") if isinstance(raw, dict) else None
        model = MESSAGES.get(kind) if isinstance(kind, str) else None
        if model is None:
            await self.send(error_event("unknown_type", f"unknown message type {str(kind)[:40]!r}"))
            return
        try:
            message = model.model_validate(raw)
        except ValidationError as exc:
            fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            await self.send(error_event("invalid_request", f"invalid {kind}: {fields}"))
            return
        try:
            await self._dispatch(message)
        except RateLimited as exc:
            event = error_event(exc.code, str(exc))
            await self.send({**event, "retry_after_s": round(exc.retry_after_s, 3)})
        except FacePayError as exc:
            # Translate domain errors here, at the edge, and keep the connection.
            bad_sdp = isinstance(message, Offer) and isinstance(exc, InvalidRequest)
            await self.send(error_event("bad_sdp" if bad_sdp else exc.code, str(exc)))

    async def _limit(self, bucket: str, key: str) -> None:
        """Count one ``bucket`` event for ``key`` (RateLimited/StoreUnavailable: refuse)."""
        limit = getattr(self.config.limits, bucket)
        await self.app[LIMITER].hit(bucket, key, limit)

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
                raise InvalidRequest(f"no checkout in progress for {getattr(message, 'type', '?')}")
            if isinstance(message, Passphrase) and self.terminal is not None:
                await self._limit("passphrase_attempts_per_terminal", self.terminal.terminal_id)
            if isinstance(message, PhoneDigits) and self.terminal is not None:
                await self._limit("phone_digits_per_terminal", self.terminal.terminal_id)
            self.session.deliver(message.model_dump())

    async def _offer(self, offer: Offer) -> None:
        from stream_server.webrtc import VideoIngest, validate_offer

        assert self.terminal is not None
        validate_offer(offer.sdp, offer.sdp_type)  # a bad offer is refused before counting
        await self._limit("offers_per_terminal", self.terminal.terminal_id)
        if self.ingest is not None:
            await self.ingest.close()
        metrics = self.metrics
        max_pixels = self.config.server.max_frame_pixels
        warned = False
        pacer: LoadPacer | None = None  # set once the answer went out

        def too_large() -> None:
            # Analysing it would cost a worker seconds; a camera needs no more than HD.
            nonlocal warned
            metrics.frames_dropped.inc()
            if not warned:
                warned = True
                message = f"video frames above {max_pixels} pixels are dropped"
                self._notify(error_event("frame_too_large", message))

        def on_frame(frame: Any, t: float) -> None:
            if not self._wants_frames():
                return  # an enroll terminal keeps nothing before consent
            if frame.width * frame.height > max_pixels:
                too_large()  # VP8 is dropped before decoding; this catches other codecs
                return
            if min(frame.width, frame.height) < MIN_SIDE:
                # The pipeline refuses it (ImageError): a checkout would decline it as a bug
                # and a gate log a traceback per frame. Nothing to see in it anyway.
                metrics.frames_dropped.inc()
                return
            self.frames.put(frame, t)
            metrics.frames_received.inc()
            if pacer and (fps := pacer.update(self.frames.received, self.frames.taken)):
                self._notify(camera_event(fps))  # fewer or more frames

        def on_demand() -> None:
            ingest.resume()  # a keyframe to restart decoding from
            if pacer and (fps := pacer.new_scan(self.frames.received, self.frames.taken)):
                self._notify(camera_event(fps))  # the rush is over

        def on_closed() -> None:
            # The peer connection died on its own (ICE consent lost, DTLS failure, the
            # terminal's side went away). Without video every session here would just time
            # out: say so, so the terminal can send a new offer.
            self._notify(error_event("video_lost", "the video connection ended; send a new offer"))

        self.ingest = ingest = VideoIngest(
            on_frame=on_frame,
            peers=self.app[PEERS],
            on_closed=on_closed,
            wanted=lambda: self.frames.in_demand,
            on_skipped=metrics.frames_undecoded.inc,
            max_frame_pixels=max_pixels,
            on_oversized=too_large,
        )
        self.frames.on_demand = on_demand
        answer = await self.ingest.start(offer.sdp, offer.sdp_type)
        await self.send({"type": "answer", "sdp": answer.sdp, "sdp_type": answer.type})
        mode = self.terminal.mode
        if (cap := self.config.camera_cap(mode)) is not None:  # after the answer: for it
            await self.send(camera_event(cap))
        counts = self.frames.received, self.frames.taken
        pacer = pacer_for(self.config, mode, *counts, self.app[CHECKOUT_LOAD])
        if mode == "gate":
            if isinstance(self.session, GateSession):
                self.session.camera_restarted()  # a new connection sends at full rate
            self._start_gate()

    def _notify(self, event: dict[str, Any]) -> None:
        """Send ``event`` from a synchronous callback (a task; a gone terminal is ignored)."""

        async def send() -> None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send(event)

        task = asyncio.create_task(send())
        self._notes.add(task)
        task.add_done_callback(self._notes.discard)

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
            await self.send(error_event("busy", "an enrolment is already in progress"))
            return
        request = EnrollRequest(
            merchant_id=self.terminal.merchant_id,
            terminal_id=self.terminal.terminal_id,
            account_id=msg.account_id,
            name=msg.name,
            phone=msg.phone,
            token_sha256=self.token_sha256 or "",
        )
        session = EnrollSession(self._services(), request, self.frames, self.send)  # validates
        await self._limit("enrolments_per_terminal", self.terminal.terminal_id)
        await self._limit("enrolments_per_account", msg.account_id)
        self.frames.clear()  # nothing from before consent is kept
        self._begin(session, "enroll")

    def _services(self) -> SessionServices:
        app = self.app
        return SessionServices(
            config=self.config,
            store=app[STORE],
            directory=app[DIRECTORY],
            analyzer=app[ANALYZER],
            hasher=app[HASHER],
            executor=app[EXECUTOR],
            search_executor=app[SEARCH_EXECUTOR],
            to_bgr=app[FRAME_CONVERTER],
            observer=MetricsObserver(self.metrics),
            limiter=app[LIMITER],
        )

    def _start_gate(self) -> None:
        """A gate decides continuously while its video flows (started by the first offer)."""
        assert self.terminal is not None
        if self.session_task is not None and not self.session_task.done():
            return
        gate = GateTerminal(
            self.terminal.merchant_id, self.terminal.terminal_id, self.token_sha256 or ""
        )
        self._begin(GateSession(self._services(), gate, self.frames, self.send), "gate")

    async def _start_checkout(self, msg: StartCheckout) -> None:
        assert self.terminal is not None
        if self.terminal.mode != "checkout":
            raise InvalidRequest(f"a {self.terminal.mode} terminal cannot start a checkout")
        if self.session_task is not None and not self.session_task.done():
            await self.send(error_event("busy", "a checkout is already in progress"))
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
        await self._limit("session_starts_per_terminal", self.terminal.terminal_id)
        services = self._services()
        request = CheckoutRequest(
            merchant_id=self.terminal.merchant_id,
            terminal_id=self.terminal.terminal_id,
            order_id=msg.order_id,
            amount=amount,
            currency=currency,
            token_sha256=self.token_sha256 or "",
        )
        self.frames.clear()  # frames from before this checkout are not evidence for it
        self._begin(CheckoutSession(services, request, self.frames, self.send), "checkout")

    def _begin(self, session: CheckoutSession | GateSession | EnrollSession, kind: str) -> None:
        """Run ``session`` as this connection's session, unless the terminal was revoked
        while the start was being checked (rate limits are awaited: the close may be on its
        way, and a session started now would outlive it until the socket ends)."""
        if self._revoked is not None:
            return
        self.session = session
        self.metrics.sessions.labels(kind).inc()
        self.session_task = asyncio.create_task(session.run())


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """Upgrade to a WebSocket and serve one terminal."""
    admit(request)
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=TRANSPORT_MAX_BYTES)
    await ws.prepare(request)
    conn = TerminalConnection(request, ws)
    make_room(request.app[CONNECTIONS], request.app[CONFIG].server.max_pending_hellos)
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
