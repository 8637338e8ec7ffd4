"""Finish owed purges of Redis's own files after erasures.

``DELETE /api/accounts/{id}`` asks Redis to rewrite its files at once (session._store_purge),
but that can fail to finish: a rewrite of the same kind still running after the wait, Redis
unreachable for a moment, or the server stopping between the erasure and the purge. The
erasure itself is done and counted, so the purge is owed, and each server checks every
``server.purge_retry_s`` seconds and runs it again until one finishes. Two servers may
both retry at the same moment; the second then waits for the first one's rewrite and starts
another, which costs a rewrite and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import Gauge

from pipeline.errors import StoreUnavailable
from session.store import Store
from stream_server.app import CONFIG, METRICS, STORE
from stream_server.sync import stop_background

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
    started = await store.purge_history()
    log.info("owed purge after erasure: started %s", ", ".join(started) or "nothing")
    if owed is not None:
        owed.set(int(await store.purge_owed()))
    return started


async def _retry_forever(store: Store, owed: Gauge, interval_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await retry_owed_purge(store, owed)
        except StoreUnavailable as exc:
            log.warning("owed purge after erasure: Redis unavailable, trying again: %s", exc)
        except Exception:  # the task must outlive any one failure, or purges stay owed
            log.exception("owed purge after erasure failed; trying again")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def setup(app: web.Application) -> None:
    """Retry owed purges for the app's lifetime, where erasures purge at all (idempotent)."""
    if _STARTED in app:
        return
    app[_STARTED] = True

    async def purge_retry_ctx(app: web.Application) -> AsyncIterator[None]:
        server = app[CONFIG].server
        if not server.purge_history_on_erasure:
            yield
            return
        stop = asyncio.Event()
        task = asyncio.create_task(
            _retry_forever(app[STORE], app[METRICS].erasure_purge_owed, server.purge_retry_s, stop),
            name="facepay-purge-retry",
        )
        yield
        await stop_background(task, stop)

    app.cleanup_ctx.append(purge_retry_ctx)
