"""Keep this instance's directory current with enrolments and erasures made elsewhere.

The store publishes ``enrolled:{sid}`` and ``erased:{sid}`` on the Redis channel
``fp:events`` after each commit (the CLI, the admin API of any instance, an enrolment
terminal). A background task subscribed to it adds or drops the subject here, normally within
milliseconds; ``revoked:{terminal_id}`` closes that terminal's sockets here, and
``rotated:{terminal_id}`` those opened with its old token (stream_server.revocation).

Pub/sub keeps no history, so whenever the subscription had to be re-made (Redis
restarted, network cut) the directory is reloaded from the store to catch what was missed;
events keep being applied during that reload (``Directory.load`` replays them onto the
reloaded gallery).

At start-up the subscription is made (and confirmed) first and the directory loaded after
it, so nothing committed during the load is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from pipeline.errors import FacePayError, NotFound, StoreUnavailable
from session.directory import Directory
from session.store import Store
from stream_server.app import DIRECTORY, REDIS, STORE
from stream_server.background import stop_background
from stream_server.revocation import close_revoked, close_revoked_meanwhile, close_rotated

log = logging.getLogger(__name__)

CHANNEL = "fp:events"
INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 10.0
#: How long Redis has to confirm a subscription before start-up gives up.
SUBSCRIBE_TIMEOUT_S = 10.0
#: At most this long at start-up applying what was committed during the load.
DRAIN_S = 2.0

_SYNC = web.AppKey("directory_sync", object)


async def apply_event(
    store: Store,
    directory: Directory,
    data: bytes | str,
    on_revoked: Callable[[str], object] | None = None,
    on_rotated: Callable[[str], Awaitable[object]] | None = None,
) -> str:
    """Apply one ``fp:events`` message to ``directory``; returns what was done.

    ``revoked:{terminal_id}`` is passed to ``on_revoked`` (which closes the terminal's
    sockets on this server, stream_server.revocation), ``rotated:{terminal_id}`` to
    ``on_rotated`` (which closes those opened with the token it replaced).

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
    if kind == "revoked":
        if on_revoked is not None:
            on_revoked(subject_id)  # a terminal id here
        return "revoked"
    if kind == "rotated":
        if on_rotated is not None:
            await on_rotated(subject_id)  # a terminal id here
        return "rotated"
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
    # Nothing if an enrolment in this process indexed it meanwhile, or it was erased while
    # its templates were read (Directory.add).
    directory.add(subject_id, templates, last4)
    return "added"


async def _subscribe(redis: Redis) -> PubSub:
    """A pub/sub connection on ``fp:events``, returned once Redis has confirmed it.

    Waiting for the confirmation is what makes "subscribe, then load" safe: every event
    published after it reaches this connection, so a load started after it misses nothing.
    """
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(CHANNEL)
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    return pubsub
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pubsub.aclose(), 1.0)
        raise


async def load_subscribed(app: web.Application) -> PubSub:
    """Start-up: subscribe to ``fp:events``, then load the directory; the live subscription.

    In that order, an enrolment or erasure committed during the load (a minute at a million
    subjects) waits on the subscription and is applied once the loop reads it, before this
    server answers anyone. StoreUnavailable when Redis cannot be reached: the server does
    not start without its directory; TemplateKeyMismatch when the key check in Redis names
    another template key, or a key rotation is open (session/_store_keycheck.py).
    """
    store, directory = app[STORE], app[DIRECTORY]
    # A key other than the one the data is sealed under would load no one and seal new
    # enrolments under a key that is then thrown away: TemplateKeyMismatch stops start-up.
    await store.check_template_key()
    try:
        pubsub = await _subscribe(app[REDIS])
    except (RedisError, OSError, TimeoutError) as exc:
        raise StoreUnavailable(f"cannot subscribe to {CHANNEL}: {exc}") from exc
    applied = 0
    try:
        count = await directory.load(store)
        applied = await _drain(app, pubsub)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pubsub.aclose(), 1.0)
        raise
    log.info("directory loaded: %s enrolled subjects, %s changes since", count, applied)
    return pubsub


async def _drain(app: web.Application, pubsub: PubSub) -> int:
    """Apply what was committed during the start-up load (it waits on the subscription)
    before this server answers anyone; returns how many events.

    Bounded by a deadline checked between events, never by cancelling one half-applied: a
    busy Redis may never fall silent, and the rest is applied by run_sync milliseconds
    later. A subscription cut meanwhile ends the drain too: redis-py re-subscribes, and
    run_sync catches up (reload) when it sees the new confirmation.
    """
    store, directory, on_revoked = app[STORE], app[DIRECTORY], _closer(app)
    on_rotated = _rotation_closer(app)
    end, applied = time.monotonic() + DRAIN_S, 0
    try:
        while time.monotonic() < end:
            message = await pubsub.get_message(timeout=0)
            if message is None:
                break
            if message["type"] == "message":
                await apply_event(store, directory, message["data"], on_revoked, on_rotated)
                applied += 1
    except (RedisError, OSError, StoreUnavailable) as exc:
        log.warning("directory sync: subscription cut after the load (%s); catching up", exc)
    return applied


def _closer(app: web.Application) -> Callable[[str], None]:
    def on_revoked(terminal_id: str) -> None:
        close_revoked(app, terminal_id)  # not awaited: a slow client's close blocks nothing

    return on_revoked


def _rotation_closer(app: web.Application) -> Callable[[str], Awaitable[None]]:
    async def on_rotated(terminal_id: str) -> None:
        await close_rotated(app, terminal_id)  # the closes themselves not awaited either

    return on_rotated


async def _catch_up(app: web.Application) -> int:
    """After a gap in the subscription: close sockets of terminals revoked meanwhile (and
    those opened with tokens rotated meanwhile), then reload the directory; returns how
    many subjects it holds."""
    await close_revoked_meanwhile(app)
    return await app[DIRECTORY].load(app[STORE])


async def run_sync(
    app: web.Application, stop: asyncio.Event | None = None, pubsub: PubSub | None = None
) -> None:
    """Apply every ``fp:events`` message to the directory, reconnecting with back-off.

    ``pubsub`` is the subscription the start-up load was made under (``load_subscribed``);
    without one the first subscription loads the directory too. Whenever the subscription
    had to be re-made, the directory is reloaded in a task of its own while events keep
    being applied, so an erasure takes effect at once rather than after the reload.
    Runs until cancelled or until ``stop`` is set (checked at least once a second).
    """
    store, directory, redis = app[STORE], app[DIRECTORY], app[REDIS]
    on_revoked, on_rotated = _closer(app), _rotation_closer(app)
    stop = stop or asyncio.Event()
    backoff = INITIAL_BACKOFF_S
    reload: asyncio.Task[int] | None = None
    try:
        while not stop.is_set():
            try:
                if pubsub is None:
                    pubsub = redis.pubsub()
                    await pubsub.subscribe(CHANNEL)
                while not stop.is_set():
                    if reload is not None and reload.done():
                        # A failed reload raises here: reconnect, and reload after that.
                        log.warning("directory sync: reloaded %s subjects", reload.result())
                        reload = None
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Every confirmation seen here follows a gap: load_subscribed read
                        # the first one, and redis-py re-subscribes after a reconnect; a
                        # subscription made here is a new one. Catch up on what was missed.
                        if reload is not None:
                            await _drop(reload)
                        reload = asyncio.create_task(
                            _catch_up(app), name="facepay-directory-reload"
                        )
                        backoff = INITIAL_BACKOFF_S
                    elif message["type"] == "message":
                        await apply_event(store, directory, message["data"], on_revoked, on_rotated)
            except (RedisError, OSError, FacePayError) as exc:
                log.warning(
                    "directory sync: %s (%s); retrying in %.1f s",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
            except Exception:
                log.exception("directory sync failed; retrying in %.1f s", backoff)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pubsub.aclose(), 1.0)
                    pubsub = None
                if reload is not None and reload.done():
                    await _drop(reload)
                    reload = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
    finally:
        if reload is not None:
            await _drop(reload)


async def _drop(task: asyncio.Task[int]) -> None:
    """Cancel a reload and wait (briefly) for it to end, or collect the failure of one that
    ended. A cancel lost inside redis-py leaves it running, but Directory.load lets only
    the newest load swap its gallery in, so an overtaken one can do no harm."""
    if not task.done():
        task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait({task}, timeout=1.0)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning("directory sync: reload failed: %s", task.exception())


def setup(app: web.Application) -> None:
    """Run the directory sync task for the app's lifetime (idempotent)."""
    if _SYNC in app:
        return
    app[_SYNC] = True

    async def sync_ctx(app: web.Application) -> AsyncIterator[None]:
        pubsub = await load_subscribed(app)
        stop = asyncio.Event()
        task = asyncio.create_task(run_sync(app, stop, pubsub), name="facepay-directory-sync")
        yield
        await stop_background(task, stop)

    app.cleanup_ctx.append(sync_ctx)
