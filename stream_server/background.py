"""Background tasks that live as long as the app: start one, stop it cleanly.

Used by the directory sync (``stream_server.sync``), the owed-purge retry
(``stream_server.purge_retry``) and the audit sealer (``stream_server.audit_seal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from pipeline.errors import StoreUnavailable

log = logging.getLogger(__name__)


async def stop_background(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    """End a background task that watches ``stop`` and talks to Redis; wait for it."""
    # On Python 3.11 a cancel can be lost inside redis-py (asyncio.wait_for returns a
    # result that was ready instead of raising), so set the flag and repeat the cancel.
    stop.set()
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


async def every(
    interval_s: float, stop: asyncio.Event, job: Callable[[], Awaitable[object]], what: str
) -> None:
    """Run ``job`` now and then every ``interval_s`` until ``stop``; a failure is logged
    and the next run comes as planned (the task must outlive any one failure)."""
    while not stop.is_set():
        try:
            await job()
        except StoreUnavailable as exc:
            log.warning("%s: Redis unavailable, trying again: %s", what, exc)
        except Exception:
            log.exception("%s failed; trying again", what)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def periodic_ctx(
    name: str,
    job: Callable[[web.Application], Awaitable[object]],
    interval_s: Callable[[web.Application], float | None],
    final_s: float = 0.0,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` that runs ``job(app)`` every ``interval_s(app)`` seconds for the
    app's lifetime (not at all when that is None: the feature is turned off), and once more
    when the app stops if ``final_s`` > 0 (given at most that long; a failure is logged)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        interval = interval_s(app)
        if interval is None:
            yield
            return
        stop = asyncio.Event()
        task = asyncio.create_task(every(interval, stop, lambda: job(app), name), name=name)
        yield
        await stop_background(task, stop)
        if final_s > 0:
            try:
                await asyncio.wait_for(job(app), final_s)
            except Exception as exc:
                log.warning("%s: last run at shutdown failed: %r", name, exc)

    return ctx
