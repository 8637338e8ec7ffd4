"""Keep this instance's directory current with enrolments and erasures made elsewhere.

The store publishes ``enrolled:{sid}`` and ``erased:{sid}`` on the Redis channel
``fp:events`` after each commit (the CLI, the admin API of any instance, an enrolment
terminal). A background task subscribed to it adds or drops the subject here, normally within
milliseconds. Pub/sub keeps no history, so whenever the subscription had to be re-made (Redis
restarted, network cut) the directory is reloaded from the store to catch what was missed.

The directory is loaded at start-up just before the subscription is made; an enrolment
committed in those few milliseconds is picked up at the next reload (or restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from redis.exceptions import RedisError

from pipeline.errors import FacePayError, NotFound, StoreUnavailable
from session.directory import Directory
from session.store import Store
from stream_server.app import DIRECTORY, REDIS, STORE
from stream_server.background import stop_background

log = logging.getLogger(__name__)

CHANNEL = "fp:events"
INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 10.0
#: Start-up waits at most this long for the first subscription (Redis may be down).
READY_TIMEOUT_S = 2.0

_SYNC = web.AppKey("directory_sync", object)


async def apply_event(store: Store, directory: Directory, data: bytes | str) -> str:
    """Apply one ``fp:events`` message to ``directory``; returns what was done.

    StoreUnavailable propagates (the caller reconnects); other domain errors (a subject that
    cannot be decrypted with this instance's key, say) are logged and skipped.
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    kind, _, subject_id = text.partition(":")
    if not subject_id:
        log.debug("directory sync: ignoring malformed event %s", text[:80])
        return "ignored"
    if kind == "erased":
        directory.remove(subject_id)
        return "removed"
    if kind != "enrolled":
        log.debug("directory sync: ignoring event %s", text[:80])
        return "ignored"
    if subject_id in directory.gallery:
        return "known"
    try:
        templates, last4 = await store.get_subject(subject_id)
    except NotFound:
        return "gone"  # erased again before we looked
    except StoreUnavailable:
        raise
    except FacePayError as exc:
        log.warning("directory sync: cannot load subject %s: %s", subject_id, exc)
        return "failed"
    if subject_id not in directory.gallery:  # an enrolment in this process may have won
        directory.add(subject_id, templates, last4)
    return "added"


async def run_sync(
    app: web.Application, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Subscribe to ``fp:events`` and apply every message, reconnecting with back-off.

    Runs until cancelled or until ``stop`` is set (checked at least once a second).
    """
    store, directory, redis = app[STORE], app[DIRECTORY], app[REDIS]
    stop = stop or asyncio.Event()
    backoff = INITIAL_BACKOFF_S
    resync = False  # the directory was loaded at start-up; reload only after a gap
    while not stop.is_set():
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            while not stop.is_set():
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    # The first confirmation, or redis-py re-subscribing after a reconnect.
                    if resync:
                        count = await directory.load(store)
                        log.warning("directory sync: reconnected, reloaded %s subjects", count)
                    resync = True
                    backoff = INITIAL_BACKOFF_S
                    if ready is not None:
                        ready.set()
                elif message["type"] == "message":
                    await apply_event(store, directory, message["data"])
        except (RedisError, OSError, FacePayError) as exc:
            resync = True
            log.warning(
                "directory sync: %s (%s); retrying in %.1f s", type(exc).__name__, exc, backoff
            )
        except Exception:
            resync = True
            log.exception("directory sync failed; retrying in %.1f s", backoff)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)


def setup(app: web.Application) -> None:
    """Run the directory sync task for the app's lifetime (idempotent)."""
    if _SYNC in app:
        return
    app[_SYNC] = True

    async def sync_ctx(app: web.Application) -> AsyncIterator[None]:
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_sync(app, ready, stop), name="facepay-directory-sync")
        try:
            await asyncio.wait_for(ready.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            log.warning("directory sync: not subscribed yet; it keeps trying in the background")
        yield
        await stop_background(task, stop)

    app.cleanup_ctx.append(sync_ctx)
