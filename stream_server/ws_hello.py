"""The hello: the first message of every terminal connection (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import WSMsgType
from pydantic import ValidationError

from pipeline.errors import AuthError, StoreUnavailable
from stream_server.app import REVOKED_TERMINALS, STORE
from stream_server.revocation import terminal_connections
from stream_server.ws_messages import (
    CLOSE_TOO_MANY,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHENTICATED,
    Hello,
)

if TYPE_CHECKING:
    from stream_server.ws import TerminalConnection

log = logging.getLogger(__name__)


async def hello(conn: TerminalConnection) -> bool:
    """Authenticate the connection by its first message; False once the socket is closed.

    Sets ``conn.terminal``. The revoked-ids check comes right after the token check with no
    await between them (stream_server.revocation): either this sees a revocation that
    committed meanwhile, or the revocation's close sees this connection.
    """
    timeout = conn.config.policy.hello_timeout_s
    try:
        # One deadline for the whole hello: receive(timeout=) restarts its timer after
        # every WebSocket ping it answers, so a client pinging without a hello would
        # hold a connection slot (server.max_sessions) for ever.
        async with asyncio.timeout(timeout):
            msg = await conn.ws.receive()
    except TimeoutError:
        await conn.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"hello timeout")
        return False
    if msg.type != WSMsgType.TEXT:
        await conn.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"hello required")
        return False
    try:
        greeting = Hello.model_validate(json.loads(msg.data))
        conn.terminal = await conn.app[STORE].authenticate_terminal(greeting.token)
    except (ValueError, RecursionError, ValidationError, AuthError):
        # RecursionError: JSON nested deeper than the parser goes is not a hello either.
        await conn.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"unauthenticated")
        return False
    except StoreUnavailable:
        await conn.ws.close(code=CLOSE_TRY_LATER, message=b"store unavailable")
        return False
    tid = conn.terminal.terminal_id
    if tid in conn.app[REVOKED_TERMINALS]:  # revoked since its token was read
        await conn.ws.close(code=CLOSE_UNAUTHENTICATED, message=b"unauthenticated")
        return False
    same = len(terminal_connections(conn.app, tid))
    if same > conn.config.limits.connections_per_terminal:
        log.warning("terminal %s: %d connections open; refused", tid, same)
        await conn.ws.close(code=CLOSE_TOO_MANY, message=b"too many connections")
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
