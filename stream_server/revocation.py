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

A token rotation (``Store.rotate_terminal_token``, the answer to a stolen token) closes the
sockets opened with the old token the same way, through ``rotated:{terminal_id}``, but
keeps the terminal: each connection remembers its token's sha256, and only those whose
digest is no longer the terminal's current one are closed (4401), so a socket the terminal
opened with its new token stays up however late the event arrives. A hello whose token
check read the old token just before the rotation committed checks it again when a
rotation was announced here meanwhile (``TOKEN_ROTATIONS``, ws_hello); a rotation missed in
a subscription gap is caught by ``close_revoked_meanwhile`` too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from stream_server.app import CONNECTIONS, REVOKED_TERMINALS, STORE, TOKEN_ROTATIONS
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


def close_stale(app: web.Application, terminal_id: str, current: str) -> list[asyncio.Task[Any]]:
    """Start closing this server's sockets of ``terminal_id`` opened with a token other than
    the one whose sha256 is ``current`` (its token was rotated): 4401, the session stopped
    at once, as for a revocation; the terminal stays usable with its new token."""
    app[TOKEN_ROTATIONS][terminal_id] += 1  # a hello checking a token right now checks again
    stale = [c for c in terminal_connections(app, terminal_id) if c.token_sha256 != current]
    if stale:
        log.info("terminal %s token rotated: closing %d socket(s)", terminal_id, len(stale))
    return [conn.revoke(b"terminal token rotated") for conn in stale]


async def close_rotated(app: web.Application, terminal_id: str) -> list[asyncio.Task[Any]]:
    """``rotated:{terminal_id}`` arrived: close the sockets opened with its old token (or all
    of them, revoked since). StoreUnavailable propagates (the caller catches up)."""
    # Counted before the read: a hello that read the old token and answers while this
    # waits on Redis then checks its token again, and fails.
    app[TOKEN_ROTATIONS][terminal_id] += 1
    current = await app[STORE].current_token_sha256(terminal_id)
    if current is None:
        return close_revoked(app, terminal_id)
    return close_stale(app, terminal_id, current)


async def close_revoked_meanwhile(app: web.Application) -> int:
    """After a gap in ``fp:events``: close the sockets of every terminal connected here that
    is no longer active in Redis (revoked, or gone), and those opened with a token rotated
    since; returns how many terminals lost sockets.

    StoreUnavailable propagates (the caller retries after reconnecting).
    """
    # Any terminal's token may have been rotated unseen: a hello checking one right now
    # checks it again (as close_rotated does, before any read).
    app[TOKEN_ROTATIONS]["*"] += 1
    connections: set[Any] = app[CONNECTIONS]
    connected = sorted({c.terminal.terminal_id for c in connections if c.terminal is not None})
    closed = 0
    for terminal_id in connected:
        current = await app[STORE].current_token_sha256(terminal_id)
        tasks = (
            close_revoked(app, terminal_id)
            if current is None
            else close_stale(app, terminal_id, current)
        )
        closed += bool(tasks)
    return closed


def revoked_close(
    ws: web.WebSocketResponse, message: bytes = b"terminal revoked"
) -> asyncio.Task[bool]:
    """Close ``ws`` as revoked, or opened with a rotated token (4401), in a task."""
    task = asyncio.create_task(
        ws.close(code=CLOSE_UNAUTHENTICATED, message=message),
        name="facepay-revoked-close",
    )
    # Nobody may await it (a rotation answers after a second at most): its outcome is
    # retrieved here, so a failed close is not reported as never retrieved.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task
