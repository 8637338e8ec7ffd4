"""A revoked terminal loses its open sockets on every server, not only on the one asked.

``Store.revoke_terminal`` stops the token in Redis at once and publishes
``revoked:{terminal_id}`` on ``fp:events`` in the same transaction. Each server then closes
that terminal's sockets (4401): the one that took ``DELETE /api/terminals/{id}`` directly,
every server (itself again, harmlessly) when the event arrives. Four gaps are closed too:

- a hello whose token check read "active" just before the revocation committed: the
  revoked id is remembered here and the hello checks it right after its token check, with
  no await between, so either the hello sees the id or the close sees the connection;
- the few milliseconds (or, with Redis' pub/sub cut, the seconds) before a socket is
  closed: the payment script itself refuses a revoked terminal (``session._store_lua``);
- messages the terminal sends while its socket closes: they are ignored;
- a revocation whose event this server missed (its subscription was down: pub/sub keeps no
  history): when the subscription is made again, the status of every terminal connected
  here is read back from Redis (``close_revoked_meanwhile``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from pipeline.errors import NotFound
from stream_server.app import CONNECTIONS, REVOKED_TERMINALS, STORE
from stream_server.ws_messages import CLOSE_UNAUTHENTICATED

log = logging.getLogger(__name__)


def terminal_connections(app: web.Application, terminal_id: str) -> list[Any]:
    """This server's connections that authenticated as ``terminal_id``."""
    connections: set[Any] = app[CONNECTIONS]
    return [
        conn
        for conn in list(connections)
        if conn.terminal is not None and conn.terminal.terminal_id == terminal_id
    ]


def close_revoked(app: web.Application, terminal_id: str) -> list[asyncio.Task[Any]]:
    """Remember ``terminal_id`` as revoked and start closing this server's sockets of it.

    Each connection's session is stopped at once (nothing more is charged or stored); the
    returned tasks finish when the sockets are closed (a caller may await them; the
    directory sync does not, so that erasures never wait on a slow client's close).
    """
    app[REVOKED_TERMINALS].add(terminal_id)
    tasks = [conn.revoke() for conn in terminal_connections(app, terminal_id)]
    if tasks:
        log.info("terminal %s revoked: closing %d socket(s)", terminal_id, len(tasks))
    return tasks


async def close_revoked_meanwhile(app: web.Application) -> int:
    """After a gap in ``fp:events``: close the sockets of every terminal connected here that
    is no longer active in Redis (revoked, or gone); returns how many terminals.

    StoreUnavailable propagates (the caller retries after reconnecting).
    """
    connections: set[Any] = app[CONNECTIONS]
    connected = sorted({c.terminal.terminal_id for c in connections if c.terminal is not None})
    closed = 0
    for terminal_id in connected:
        try:
            active = (await app[STORE].get_terminal(terminal_id)).status == "active"
        except NotFound:
            active = False
        if not active:
            close_revoked(app, terminal_id)
            closed += 1
    return closed


def revoked_close(ws: web.WebSocketResponse) -> asyncio.Task[bool]:
    """Close ``ws`` as revoked (4401), in a task."""
    return asyncio.create_task(
        ws.close(code=CLOSE_UNAUTHENTICATED, message=b"terminal revoked"),
        name="facepay-revoked-close",
    )
