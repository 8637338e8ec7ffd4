"""Finish owed purges of Redis's own files after erasures.

``DELETE /api/accounts/{id}`` asks Redis to rewrite its files at once (session._store_purge),
but that can fail to finish: a rewrite of the same kind still running after the wait, Redis
unreachable for a moment, or the server stopping between the erasure and the purge. The
erasure itself is done and counted, so the purge is owed, and each server checks every
``server.purge_retry_s`` seconds and runs it again until one finishes. A short lock in
Redis lets one server retry at a time (the others find it held and look again next time).
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import Gauge

from session.store import Store
from stream_server.app import CONFIG, METRICS, STORE
from stream_server.background import periodic_ctx

log = logging.getLogger(__name__)

_STARTED = web.AppKey("purge_retry_started", bool)


async def retry_owed_purge(store: Store, owed: Gauge | None = None) -> tuple[str, ...] | None:
    """Run the purge if one is owed; return what it started, or None if none was owed.

    ``owed`` (the ``facepay_erasure_purge_owed`` gauge) is left at 1 while a purge is still
    owed after this pass, so that an operator can alert on a purge that keeps failing.
    """
    if not await store.purge_owed():
        if owed is not None:
            owed.set(0)
        return None
    started = await store.purge_history(exclusive=True)
    log.info("owed purge after erasure: started %s", ", ".join(started) or "nothing")
    if owed is not None:
        owed.set(int(await store.purge_owed()))
    return started


def setup(app: web.Application) -> None:
    """Retry owed purges for the app's lifetime, where erasures purge at all (idempotent)."""
    if _STARTED in app:
        return
    app[_STARTED] = True

    def interval(app: web.Application) -> float | None:
        server = app[CONFIG].server
        return server.purge_retry_s if server.purge_history_on_erasure else None

    async def job(app: web.Application) -> None:
        await retry_owed_purge(app[STORE], app[METRICS].erasure_purge_owed)

    app.cleanup_ctx.append(periodic_ctx("facepay-purge-retry", job, interval))
