"""The hello: the first message of every terminal connection (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import WSMessage, WSMsgType, web
from pydantic import ValidationError

from pipeline.errors import AuthError, StoreUnavailable
from session.models import Terminal
from stream_server.app import CONFIG, CONNECTIONS, REVOKED_TERMINALS, STORE, TOKEN_ROTATIONS
from stream_server.revocation import terminal_connections
from stream_server.ws_messages import (
    CLOSE_TOO_MANY,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHENTICATED,
    Hello,
    headers_decodable,
    origin_allowed,
)

if TYPE_CHECKING:
    from stream_server.ws import TerminalConnection

log = logging.getLogger(__name__)
#: Token checks one hello makes while rotations keep being announced before it gives up.
_TOKEN_CHECKS = 3


def admit(request: web.Request) -> None:
    """The upgrade's checks, before a socket exists: HTTP 400, 403 or 503 to refuse."""
    config = request.app[CONFIG]
    if not headers_decodable(request):
        # aiohttp's own handshake error quotes the header and fails to encode the undecodable
        # bytes (a 500 and a logged traceback; found by tests/test_fuzz): refuse first.
        raise web.HTTPBadRequest(text="malformed request headers")
    if not origin_allowed(request, config.server.allowed_origins):
        log.warning("websocket from origin %r refused", request.headers.get("Origin", "")[:100])
        raise web.HTTPForbidden(text="origin not allowed")
    if authenticated(request.app[CONNECTIONS]) >= config.server.max_sessions:
        raise web.HTTPServiceUnavailable(text="too many terminals connected")


def make_room(conns: set[TerminalConnection], limit: int) -> None:
    """Before a new socket joins ``conns``: if ``limit`` sockets already wait for their
    hello, close the one that has waited longest (1013, try later). An attacker's sockets
    wait the whole hello timeout; a terminal's hello follows its upgrade at once, so the
    oldest waiting socket is the likeliest to be holding a slot on purpose."""
    waiting = [c for c in conns if c.terminal is None and not c.evicted.is_set()]
    if len(waiting) >= limit:
        min(waiting, key=lambda c: c.opened_at).evicted.set()  # its hello() closes it


def authenticated(conns: set[TerminalConnection]) -> int:
    """How many of ``conns`` have said hello (``server.max_sessions`` counts these)."""
    return sum(1 for c in conns if c.terminal is not None)


async def _first_message(conn: TerminalConnection) -> WSMessage | None:
    """The socket's first message, or None once it is evicted (``make_room``)."""
    receive = asyncio.ensure_future(conn.ws.receive())
    evicted = asyncio.ensure_future(conn.evicted.wait())
    try:
        await asyncio.wait((receive, evicted), return_when=asyncio.FIRST_COMPLETED)
    finally:
        receive.cancel()
        evicted.cancel()
    if conn.evicted.is_set():
        return None
    return receive.result()


async def _authenticate(conn: TerminalConnection, token: str) -> Terminal:
    """The token's terminal (AuthError as ``Store.authenticate_terminal``); records the
    token's sha256 on ``conn``. A rotation announced here while the token was being checked
    (stream_server.revocation) may have committed after Redis read it: it is checked again,
    so an old token that lost that race is refused, and a new one is not."""
    store, rotations = conn.app[STORE], conn.app[TOKEN_ROTATIONS]
    for _ in range(_TOKEN_CHECKS):
        seen = rotations.copy()
        terminal = await store.authenticate_terminal(token)
        tid = terminal.terminal_id
        # Only this terminal's rotations (and catch-ups, "*") count: a script rotating many
        # terminals must not fail every other terminal's hello meanwhile.
        if (rotations[tid], rotations["*"]) == (seen[tid], seen["*"]):  # no await until used
            conn.token_sha256 = store.token_sha256(token)
            return terminal
    raise StoreUnavailable("terminal tokens keep changing; try again")


async def hello(conn: TerminalConnection) -> bool:
    """Authenticate the connection by its first message; False once the socket is closed.

    Sets ``conn.terminal``. The revoked-ids check comes right after the token check with no
    await between them (stream_server.revocation): either this sees a revocation that
    committed meanwhile, or the revocation's close sees this connection. A token rotation
    is met the same way (``_authenticate``).
    """
    timeout = conn.config.policy.hello_timeout_s
    try:
        # One deadline for the whole hello: receive(timeout=) restarts its timer after
        # every WebSocket ping it answers, so a client pinging without a hello would
        # hold a connection slot (server.max_sessions) for ever.
        async with asyncio.timeout(timeout):
            msg = await _first_message(conn)
    except TimeoutError:
        await conn.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"hello timeout")
        return False
    if msg is None:
        await conn.ws.close(code=CLOSE_TRY_LATER, message=b"too many sockets awaiting hello")
        return False
    if msg.type != WSMsgType.TEXT:
        await conn.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"hello required")
        return False
    try:
        greeting = Hello.model_validate(json.loads(msg.data))
        conn.terminal = await _authenticate(conn, greeting.token)
    except (ValueError, RecursionError, ValidationError, AuthError):
        # RecursionError: JSON nested deeper than the parser goes is not a hello either.
        await conn.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"unauthenticated")
        return False
    except StoreUnavailable:
        await conn.ws.close(code=CLOSE_TRY_LATER, message=b"store unavailable")
        return False
    tid = conn.terminal.terminal_id
    refusal: tuple[int, bytes] | None = None
    if tid in conn.app[REVOKED_TERMINALS]:  # revoked since its token was read
        refusal = (CLOSE_UNAUTHENTICATED, b"unauthenticated")
    elif authenticated(conn.app[CONNECTIONS]) > conn.config.server.max_sessions:
        # Several hellos raced past the upgrade's check (it cannot count sockets that have
        # not said hello yet); counted here with no await since this one's token was read.
        refusal = (CLOSE_TRY_LATER, b"too many terminals connected")
    elif (
        same := len(terminal_connections(conn.app, tid))
    ) > conn.config.limits.connections_per_terminal:
        log.warning("terminal %s: %d connections open; refused", tid, same)
        refusal = (CLOSE_TOO_MANY, b"too many connections")
    if refusal is not None:
        # Counted no more while the close waits for the peer (up to 10 s): a refused socket
        # must not hold a terminal's place (server.max_sessions, the per-terminal cap).
        conn.terminal = None
        await conn.ws.close(code=refusal[0], message=refusal[1])
        return False
    await conn.send(
        {
            "type": "hello",
            "terminal_id": conn.terminal.terminal_id,
            "merchant_id": conn.terminal.merchant_id,
            "mode": conn.terminal.mode,
            "server_time": time.time(),
        }
    )
    return True
