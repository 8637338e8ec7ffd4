"""The server's Redis client: one place that decides how its connections are pooled.

A payment must not fail because Redis restarted a moment ago. redis-py hands out a pooled
connection only after checking that the server has not closed it (the check reconnects
one that it has), but recent redis-py (8.1 here) skips that check while "maintenance
notifications" are enabled, and their default, ``"auto"``, counts as enabled. Those
notifications come from managed Redis clusters that announce failovers; a plain Redis
sends none. With the default, every connection pooled before a restart failed its first
command after it, and a shopper's passphrase came back ``unavailable``
(docs/faults.md). Turning the notifications off restores the check.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

try:  # older redis-py has no maintenance notifications and always checks
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - depends on the installed redis-py
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]


def _checked_connections() -> dict[str, Any]:
    """Pool options under which redis-py checks each connection before handing it out."""
    if MaintNotificationsConfig is None:  # pragma: no cover
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def connect(url: str, *, max_connections: int, socket_timeout: float = 5) -> aioredis.Redis:
    """A client on a bounded pool: callers wait up to 5 s for a free connection.

    Timeouts are short on purpose: a session declines ``unavailable`` when Redis is slow
    rather than holding a shopper (the command line allows longer: an operator waits, and
    an audit read or a key rotation reads more per command). The client owns the pool
    (``aclose()`` closes both). ValueError for a URL that is not a Redis URL.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2,
        health_check_interval=10,
        # No retries (also against a URL's retry_on_timeout): a command either ran once or
        # failed, and a failure while connecting proves it never ran (session._store_lua:
        # the checkout says "nothing charged" only then). A pooled connection that Redis
        # closed is replaced before use by the check described above.
        retry=Retry(NoBackoff(), 0),
        **_checked_connections(),
    )
    return aioredis.Redis.from_pool(pool)
