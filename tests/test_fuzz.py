"""Adversarial input against a real in-process server (real Redis, models, WebRTC on
127.0.0.1): property-based fuzzing of terminal messages, hellos, SDP offers, admin HTTP
requests and raw bytes, plus hostile video and a terminal opening hundreds of sessions.

Per input: a clear answer (an ``error`` event with a documented code, a documented close
code, or an HTTP 4xx with a JSON error; never a 500 or a server-side exception), the server
still answers ``/healthz``, and nothing was written to Redis (keys and the audit stream).

The normal suite draws ``FACEPAY_FUZZ_EXAMPLES`` (default 200) inputs per fuzz test;
``scripts/fuzz`` runs thousands and prints the totals from ``FACEPAY_FUZZ_REPORT``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp.http_exceptions import HttpProcessingError
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack, VideoStreamTrack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_server.app import CONNECTIONS, METRICS, PEERS, REDIS
from stream_server.replay_source import ReplayTrack
from stream_server.webrtc import rtc_configuration
from stream_server.ws_messages import TRANSPORT_MAX_BYTES
from tests import fuzz_strategies as fs
from tests.e2e import PASSPHRASE, Env, camera_frames, start_env
from tests.terminal import TestTerminal

ADMIN = "fuzz-admin-token-0123456789abcdef"
ENROLL = "faces/obama/obama.jpg"
SHOPPER = "faces/obama/obama3.jpg"
EXAMPLES = int(os.environ.get("FACEPAY_FUZZ_EXAMPLES") or 200)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
#: docs/protocol.md: every error code and close code a terminal can get.
ERROR_CODES = {
    "bad_json",
    "unknown_type",
    "invalid_request",
    "too_large",
    "bad_sdp",
    "illegal_transition",
    "busy",
    "unavailable",
    "rate_limited",
    "frame_too_large",
}
#: Events a terminal of each mode may receive (docs/protocol.md, docs/gate.md).
COMMON_EVENTS = {"error", "pong", "state", "answer", "declined", "faces"}
EVENTS = {
    "checkout": COMMON_EVENTS
    | {"confirm", "need_phone_digits", "wrong_passphrase", "approved", "merchant_offer"},
    "enroll": COMMON_EVENTS | {"enroll_feedback", "enrolled"},
    "gate": COMMON_EVENTS | {"gate_open", "gate_deny"},
}
#: Limits high enough that the fuzz exercises parsing, not the rate limiter.
FUZZ_LIMITS = {
    name: {"count": 100_000, "window_s": 1}
    for name in ("session_starts_per_terminal", "offers_per_terminal")
}
TOTALS: Counter[str] = Counter()

pytestmark = pytest.mark.usefixtures("loopback_ice")


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    """Write the totals to ``FACEPAY_FUZZ_REPORT`` (JSON) when the module is done."""
    yield
    path = os.environ.get("FACEPAY_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps(dict(TOTALS), indent=1, sort_keys=True) + "\n")


class ServerErrors(logging.Handler):
    """Collects ERROR records (unhandled handler exceptions, lost task exceptions)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            return  # aiohttp answered 400 to an unparseable request and logged it: no crash
        self.records.append(record)


@pytest.fixture
def server_errors() -> Iterator[ServerErrors]:
    handler = ServerErrors()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


@pytest.fixture
async def fuzz_env(aiohttp_server, redis_url, models_dir):  # type: ignore[no-untyped-def]
    """A running server (admin token, fuzz limits) with one merchant and checkout terminal."""
    # The sealer runs every second (10 s by default), so that the fuzz also shows that it
    # and the input never disturb each other.
    server = {"admin_token": ADMIN, "audit_seal_s": 1.0}
    env = await start_env(aiohttp_server, redis_url, models_dir, server=server, limits=FUZZ_LIMITS)
    yield env
    await env.close()


#: The audit sealer's state and lock: the server writes them on its own timer, whatever the
#: input (stream_server.audit_seal).
SEALER = b"fp:audit:seal"
#: Keys input may touch without changing anything: rate-limit counters. And the sealer's.
HOUSEKEEPING = (b"fp:rl:", SEALER)


async def key_count(env: Env) -> int:
    """DBSIZE without the sealer's keys (rate-limit counters included)."""
    return sum(1 for k in await env.app[REDIS].keys("*") if not k.startswith(SEALER))


async def snapshot(env: Env) -> tuple[list[bytes], int]:
    """Every key but the housekeeping ones, and the number of audit records that are not
    the sealer's own ``audit_sealed`` ones (it seals every 10 s, input or not)."""
    r = env.app[REDIS]
    keys = sorted(k for k in await r.keys("*") if not k.startswith(HOUSEKEEPING))
    records = await r.xrange("fp:audit")
    return keys, sum(1 for _, fields in records if fields.get(b"event") != b"audit_sealed")


async def healthy(env: Env, http: aiohttp.ClientSession) -> None:
    async with http.get(env.server.make_url("/healthz")) as resp:
        assert resp.status == 200


async def fuzz(
    name: str,
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], Awaitable[None]],
    errors: ServerErrors,
) -> None:
    """Run ``check`` on every drawn input (on this loop; hypothesis drives from a thread)."""
    loop = asyncio.get_running_loop()

    @FUZZ
    @given(strategy)
    def run(value: Any) -> None:
        TOTALS["inputs"] += 1
        TOTALS[f"inputs.{name}"] += 1
        future = asyncio.run_coroutine_threadsafe(check(value), loop)
        try:
            future.result(timeout=120)
            assert not errors.records, [r.getMessage() for r in errors.records]
        except BaseException:
            future.cancel()
            TOTALS["crashes"] += 1
            TOTALS[f"crashes.{name}"] += 1
            errors.records.clear()
            raise

    await loop.run_in_executor(None, run)


# --- terminal protocol --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["checkout", "enroll", "gate"])
async def test_fuzz_terminal_messages(
    fuzz_env: Env, server_errors: ServerErrors, mode: str
) -> None:
    env = fuzz_env
    if mode != "checkout":
        _, env.token = await env.store.add_terminal(env.merchant.merchant_id, mode)  # type: ignore[arg-type]
    state = [await snapshot(env)]
    async with aiohttp.ClientSession() as http:
        ws: list[aiohttp.ClientWebSocketResponse] = []

        async def connect() -> aiohttp.ClientWebSocketResponse:
            sock = await http.ws_connect(env.ws_url, max_msg_size=0)
            await sock.send_json({"type": "hello", "token": env.token})
            assert (await sock.receive_json(timeout=10))["type"] == "hello"
            return sock

        ws.append(await connect())

        async def check(value: tuple[str, Any, bool]) -> None:
            kind, payload, must_fail = value
            sock = ws[-1]
            if kind == "binary":
                await sock.send_bytes(payload)
            else:
                await sock.send_str(payload)
            size = len(payload if kind == "binary" else payload.encode("utf-8", "surrogatepass"))
            if size > TRANSPORT_MAX_BYTES:
                # Refused by the transport: documented close 1009, then the terminal reconnects.
                async with asyncio.timeout(30):
                    while (msg := await sock.receive()).type == aiohttp.WSMsgType.TEXT:
                        assert json.loads(msg.data)["type"] in EVENTS[mode], msg  # a session's
                assert msg.type == aiohttp.WSMsgType.CLOSE and sock.close_code == 1009, msg
                TOTALS["ws_closed_1009"] += 1
                ws.append(await connect())
                assert await snapshot(env) == state[-1]
                return
            # A barrier whose answer is unique: everything before it answers the input.
            barrier = f"sync-{TOTALS['inputs']}"
            await sock.send_json({"type": barrier})
            replies = []
            async with asyncio.timeout(30):
                while True:
                    msg = await sock.receive()
                    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, sock.close_code)
                    event = json.loads(msg.data)
                    if event.get("code") == "unknown_type" and barrier in event["message"]:
                        break
                    replies.append(event)
            for event in replies:
                assert event.get("type") in EVENTS[mode], event
                if event["type"] == "error":
                    assert event["code"] in ERROR_CODES and event["message"], event
            if must_fail:
                assert any(e["type"] == "error" for e in replies), (payload, replies)
            if _accepted_enrolment(payload, replies):
                # The session task audits consent, then says "capturing": wait for that.
                async with asyncio.timeout(30):
                    while not any(e.get("state") == "capturing" for e in replies):
                        replies.append(await sock.receive_json())
            if any(e["type"] == "state" and e.get("state") == "capturing" for e in replies):
                # Valid enrolment fields by chance: consent is audited (an authorised
                # write). End the enrolment, then take the new state as the baseline.
                TOTALS["enrolments_started"] += 1
                await sock.send_json({"type": "cancel"})
                async with asyncio.timeout(30):
                    while (await sock.receive_json()).get("state") not in ("cancelled", "declined"):
                        pass
                state.append(await snapshot(env))
            assert await snapshot(env) == state[-1]
            await healthy(env, http)

        await fuzz(f"ws_messages_{mode}", fs.ws_inputs, check, server_errors)
        await ws[-1].close()


def _accepted_enrolment(payload: Any, replies: list[dict[str, Any]]) -> bool:
    """A start_enroll that got no error: an enrolment is starting."""
    if not isinstance(payload, str) or any(e["type"] == "error" for e in replies):
        return False
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("type") == "start_enroll"


async def test_fuzz_hello(fuzz_env: Env, server_errors: ServerErrors) -> None:
    env = fuzz_env
    before = await snapshot(env)
    dbsize = await key_count(env)
    async with aiohttp.ClientSession() as http:

        async def check(value: tuple[str, Any]) -> None:
            kind, payload = value
            async with http.ws_connect(env.ws_url, max_msg_size=0) as sock:
                if kind == "binary":
                    await sock.send_bytes(payload)
                else:
                    await sock.send_str(payload)
                msg = await sock.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.CLOSE, msg
                assert sock.close_code == 4401, sock.close_code
            assert await snapshot(env) == before
            assert await key_count(env) == dbsize  # not even a rate-limit counter
            await healthy(env, http)

        await fuzz("hello", fs.hello_inputs, check, server_errors)
    assert not env.app[CONNECTIONS]


async def _real_offer() -> str:
    pc = RTCPeerConnection(rtc_configuration())
    pc.addTrack(ReplayTrack(iter([]), fps=5))
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


async def test_fuzz_sdp_offers(fuzz_env: Env, server_errors: ServerErrors) -> None:
    env = fuzz_env
    before = await snapshot(env)
    base = await _real_offer()
    term = await env.terminal()

    async def check(sdp: str) -> None:
        await term.send({"type": "offer", "sdp": sdp, "sdp_type": "offer"})
        reply = await term.expect("answer", "error", timeout=30)
        while reply["type"] == "error" and reply["code"] == "video_lost":
            # Not this offer's reply: an answered fuzz offer has no one to connect to, so its
            # connection fails on its own, and that report may come before or after the
            # answer (or during the next offer). The offer's own reply is still to come.
            reply = await term.expect("answer", "error", timeout=30)
        if reply["type"] == "error":
            assert reply["code"] in {"bad_sdp", "invalid_request"}, reply
            TOTALS["sdp_refused"] += 1
        else:
            assert reply["sdp"].startswith("v=0") and reply["sdp_type"] == "answer"
            TOTALS["sdp_answered"] += 1
        assert len(env.app[PEERS]) <= 1  # a new offer replaces the connection
        assert await snapshot(env) == before
        async with aiohttp.ClientSession() as http:
            await healthy(env, http)

    await fuzz("sdp", fs.sdp_inputs(base), check, server_errors)
    await term.close()
    await _settled(env)


# --- admin HTTP ---------------------------------------------------------------------------------


async def test_fuzz_admin_http(fuzz_env: Env, server_errors: ServerErrors) -> None:
    env = fuzz_env
    state = [await snapshot(env)]
    async with aiohttp.ClientSession() as http:

        async def check(req: dict[str, Any]) -> None:
            url = env.server.make_url("/").with_path(req["path"], encoded=True)
            async with http.request(
                req["method"], url, headers=req["headers"], data=req["body"]
            ) as resp:
                status, body = resp.status, await resp.read()
            assert status < 500, (status, body[:200])
            if status >= 400 and req["method"] != "HEAD":
                assert "error" in json.loads(body), body[:200]
            after = await snapshot(env)
            if not req["authorised"]:
                assert status in (401, 404, 405), status
            if not (req["authorised"] and status < 300):
                assert after == state[-1], (req["method"], req["path"], status)
            state.append(after)
            await healthy(env, http)

        await fuzz("http", fs.http_request(ADMIN), check, server_errors)
    # The admin API was hammered while the sealer ran every second: the chain still holds.
    audit = await env.store.verify_audit()
    assert audit.broken == [] and audit.seals >= 1


async def test_fuzz_raw_http_bytes(fuzz_env: Env, server_errors: ServerErrors) -> None:
    env = fuzz_env
    before = await snapshot(env)
    host, port = env.server.host, env.server.port
    async with aiohttp.ClientSession() as http:

        async def check(data: bytes) -> None:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(data)
                await writer.drain()
                writer.write_eof()
                async with asyncio.timeout(10):
                    answer = await reader.read()
            finally:
                writer.close()
            assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
            assert await snapshot(env) == before
            await healthy(env, http)

        await fuzz("raw_http", fs.raw_http, check, server_errors)


# --- hostile video and session floods -------------------------------------------------------------


class RawTrack(ReplayTrack):
    """Plays frames at their own size (ReplayTrack fits them to 640x480)."""

    async def _next_image(self) -> np.ndarray:
        image = next(self._frames, None)
        if image is not None:
            self._last = image
        assert self._last is not None
        return self._last


class SilentTrack(VideoStreamTrack):
    """A video track that never produces a frame."""

    async def recv(self) -> Any:
        await asyncio.Event().wait()


async def _start_video(term: TestTerminal, track: MediaStreamTrack) -> None:
    term.pc = RTCPeerConnection(rtc_configuration())
    term.pc.addTrack(track)
    await term.pc.setLocalDescription(await term.pc.createOffer())
    local = term.pc.localDescription
    await term.send({"type": "offer", "sdp": local.sdp, "sdp_type": local.type})
    answer = await term.expect("answer")
    await term.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["sdp_type"]))


async def _settled(env: Env) -> None:
    """Every socket and peer connection of the server is gone (bounded wait)."""
    async with asyncio.timeout(20):
        while env.app[CONNECTIONS] or env.app[PEERS]:
            await asyncio.sleep(0.05)


def _sized(frames: Iterator[np.ndarray], sizes: list[tuple[int, int]], every: int) -> Iterator:
    for i, frame in enumerate(frames):
        w, h = sizes[(i // every) % len(sizes)]
        yield cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)


async def test_oversized_frames_are_dropped_with_a_clear_error(make_env, analyzer, photo):
    env = await make_env(session_timeout_s=4.0)
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await env.terminal()
    frames = _sized(camera_frames(analyzer, photo(SHOPPER), seconds=10), [(2560, 1440)], 1)
    await _start_video(term, RawTrack(frames, fps=5))
    await term.checkout("5.00", "o-1")
    error = await term.expect("error", timeout=30)
    assert error["code"] == "frame_too_large"
    end = await term.until_end()
    assert end["state"] == "timeout" and await env.payments() == []
    await term.close()
    await _settled(env)


async def test_frames_below_the_pipeline_minimum_are_dropped(make_env, analyzer, photo):
    # A 640x8 frame made the pipeline raise ImageError: the checkout declined it as a bug
    # (internal_error) and a gate logged a traceback per frame. Now it is dropped, counted.
    env = await make_env(session_timeout_s=3.0)
    term = await env.terminal()
    frames = _sized(camera_frames(analyzer, photo(SHOPPER), seconds=10), [(640, 8)], 1)
    await _start_video(term, RawTrack(frames, fps=5))
    await term.checkout("5.00", "o-1")
    end = await term.until_end()
    assert end["state"] == "timeout", term.events
    assert env.app[METRICS].frames_dropped._value.get() > 0
    assert await env.payments() == []
    await term.close()
    await _settled(env)


async def test_resolution_changes_mid_stream(make_env, analyzer, photo):
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await env.terminal()
    sizes = [(640, 480), (1280, 720), (480, 640), (320, 240)]
    frames = _sized(camera_frames(analyzer, photo(SHOPPER), seconds=30), sizes, every=4)
    await _start_video(term, RawTrack(frames, fps=10))
    await term.checkout("5.00", "o-1")
    confirm = await term.expect("confirm", "declined", timeout=40)
    assert confirm["type"] == "confirm", term.events
    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    assert (await term.until_end())["state"] == "approved", term.events
    assert len(await env.payments()) == 1
    await term.close()
    await _settled(env)


async def test_a_stream_without_frames_times_out_and_charges_nothing(make_env):
    env = await make_env(session_timeout_s=3.0)
    term = await env.terminal()
    await _start_video(term, SilentTrack())
    await term.checkout("5.00", "o-1")
    end = await term.until_end()
    assert end["state"] == "timeout" and end.get("reason") == "session_timeout", term.events
    assert await env.payments() == []
    await term.close()
    await _settled(env)


async def test_a_terminal_opening_hundreds_of_sessions_is_limited(make_env):
    env = await make_env()
    tasks_before = len(asyncio.all_tasks())
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def open_one() -> tuple[str, Any]:
            try:
                sock = await http.ws_connect(env.ws_url)
            except aiohttp.WSServerHandshakeError as exc:
                return "refused", exc.status
            await sock.send_json({"type": "hello", "token": env.token})
            msg = await sock.receive(timeout=20)
            if msg.type == aiohttp.WSMsgType.TEXT:
                return "open", sock
            return "closed", sock.close_code

        results = await asyncio.gather(*(open_one() for _ in range(300)))
        kinds = Counter(kind for kind, _ in results)
        socks = [s for kind, s in results if kind == "open"]
        codes = Counter(c for kind, c in results if kind != "open")
        assert 1 <= len(socks) <= 4, kinds  # limits.connections_per_terminal
        # server.max_sessions (503), server.max_pending_hellos (1013: hundreds of sockets
        # at once outnumber the room for hellos), then the per-terminal cap (4429).
        assert set(codes) <= {503, 1013, 4429}, codes
        # Each open socket: a flood of session starts gets one session and clear refusals.
        for sock in socks:
            for i in range(100):
                await sock.send_json({"type": "start_checkout", "amount": "1", "order_id": f"o{i}"})
            await sock.send_json({"type": "ping"})
            seen: Counter[str] = Counter()
            # The session's own "scanning" may come after the pong: wait for both.
            while not (seen["pong"] and seen["scanning"]):
                event = await sock.receive_json(timeout=20)
                seen[event.get("code") or event.get("state") or event["type"]] += 1
            assert seen["scanning"] == 1 and seen["busy"] + seen["rate_limited"] == 99, seen
        for sock in socks:
            await sock.close()
        await _settled(env)
        await healthy(env, http)
    await asyncio.sleep(0.5)  # let closed sockets' tasks finish
    assert len(asyncio.all_tasks()) <= tasks_before + 2


# --- what the fuzz found, pinned -------------------------------------------------------------


async def test_inputs_that_once_gave_500s(fuzz_env: Env, server_errors: ServerErrors) -> None:
    env = fuzz_env
    before = await snapshot(env)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        url = env.server.make_url("/api/merchants")
        # JSON nested deeper than the parser's stack (RecursionError, not ValueError).
        async with http.post(url, data=fs.nested(3_000, "array"), headers=auth) as resp:
            assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
        # A multipart body without its boundary (aiohttp raises ValueError).
        headers = {**auth, "Content-Type": "multipart/form-data; boundary=xyz"}
        url = env.server.make_url("/api/accounts")
        async with http.post(url, data=b"garbage", headers=headers) as resp:
            assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
        # Deep JSON as a terminal message and as a hello.
        term = await env.terminal()
        await term.send_raw(fs.nested(20_000, "array"))
        assert (await term.expect("error"))["code"] == "bad_json"
        async with http.ws_connect(env.ws_url) as sock:
            await sock.send_str(fs.nested(20_000, "array"))
            await sock.receive(timeout=10)
            assert sock.close_code == 4401
    # Header bytes that are not UTF-8: on the WebSocket upgrade and on the admin token.
    for raw in (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: \x80\r\nConnection: Upgrade\r\n\r\n",
        b"POST /api/merchants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Length: 0\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(env.server.host, env.server.port)
        writer.write(raw)
        answer = await asyncio.wait_for(reader.readline(), 10)  # the status line
        writer.close()
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 401")), answer[:100]
    assert await snapshot(env) == before
    assert not server_errors.records
