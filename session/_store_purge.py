"""Private part of ``session.store.Store``: making Redis's own files forget erased data.

An erasure deletes the live keys, but Redis's append-only file keeps the commands that
wrote them, its snapshot (``dump.rdb``) keeps what was live when it was taken, and SLOWLOG
may keep the start of an enrolment's HSET (docs/privacy.md). A rewrite or snapshot only
forgets the erasure's data if it *starts* after the erasure: one already running works
from a copy of the dataset taken before it. Redis queues a new job behind a running job of
the other kind, but refuses one behind a job of the same kind, so that case waits here for
the running job to end and asks again.

A purge that could not finish (a job still busy after the wait, Redis unreachable, the
server stopped between the erasure and the purge) must not be forgotten: every erasure
counts itself in ``purge:erasures`` in its own transaction, and a purge that finished
records the count it started from in ``purge:done``. While the first is ahead, a purge is
still owed, and every server retries it (stream_server.purge_retry).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from session import _store_lua as h
from session._store_ledger import StoreCore

log = logging.getLogger(__name__)

#: (name, command, the INFO persistence field that is 1 while a job of that kind runs)
_Job = tuple[str, tuple[str, ...], str]
_AOF: _Job = ("aof_rewrite", ("BGREWRITEAOF",), "aof_rewrite_in_progress")
_SNAPSHOT: _Job = ("snapshot", ("BGSAVE", "SCHEDULE"), "rdb_bgsave_in_progress")
_POLL_S = 0.05
#: Words in the replies of a Redis that will never run the command (lower case).
#: Not "not allowed" or "disabled": they also appear in passing errors (OOM, MISCONF).
_REFUSED_FOR_GOOD = ("unknown command", "noperm")
#: ``done := max(done, ARGV[1])``: purges may finish out of order, the mark only moves up.
_MARK_DONE_LUA = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""


async def purge_owed(r: Redis, erasures_key: str, done_key: str) -> tuple[int, bool]:
    """``(erasures so far, whether a purge is still owed for some of them)``."""
    erasures, done = await r.mget(erasures_key, done_key)
    count = int(erasures or 0)
    return count, count > int(done or 0)


async def mark_done(r: Redis, done_key: str, erasures: int) -> None:
    """Record that the erasures up to ``erasures`` are purged."""
    await r.eval(_MARK_DONE_LUA, 1, done_key, str(erasures))


async def purge_history(r: Redis, wait_s: float) -> tuple[tuple[str, ...], bool]:
    """Start an AOF rewrite (where AOF is on) and a snapshot (where snapshots are configured),
    and clear SLOWLOG; return the names of what was started and whether the purge finished.

    Waits at most ``wait_s`` in all for running jobs of the same kind. A command this Redis
    refuses for good (a managed service may disable or rename BGSAVE, an ACL may forbid it)
    is left out and logged; asking again would not help, so the purge still counts as
    finished. A job that could not start this time (Redis could not fork, or could not open
    a new AOF file: out of memory, disk full) or is still blocked after ``wait_s`` is left
    out too, and the purge did not finish: it stays owed and is asked again later. Lost
    connections propagate.
    """
    deadline = time.monotonic() + wait_s
    settings: dict[str, str] = {}
    try:
        raw = await r.config_get("appendonly", "save")
        settings = {h.text(k): h.text(v) for k, v in raw.items()}
    except ResponseError as exc:
        if not refused_for_good(exc):  # BUSY (a long script), LOADING...: ask again later
            log.warning("purge after erasure: cannot read the Redis config now: %s", exc)
            return (), False
        log.warning("purge after erasure: cannot read the Redis config: %s", exc)
    jobs: list[_Job] = []
    if settings.get("appendonly") == "yes":
        jobs.append(_AOF)
    if settings.get("save", "").strip():
        jobs.append(_SNAPSHOT)
    done: list[str] = []
    finished = True
    for name, command, busy in jobs:
        outcome = await _start(r, command, busy, deadline)
        if outcome == "started":
            done.append(name)
        finished = finished and outcome in ("started", "refused")
    try:
        await r.execute_command("SLOWLOG", "RESET")
        done.append("slowlog")
    except ResponseError as exc:
        log.warning("purge after erasure: Redis refused SLOWLOG RESET: %s", exc)
    return tuple(done), finished


def refused_for_good(exc: ResponseError) -> bool:
    """Whether Redis will refuse this command every time: an ACL denies it (NOPERM), or the
    command is disabled or renamed away ("unknown command", as managed services answer).
    Anything else, such as BGSAVE's bare ``ERR`` when the fork failed, may pass next time."""
    if isinstance(exc, NoPermissionError):
        return True
    text = str(exc).lower().removeprefix("err ")
    return text.startswith(_REFUSED_FOR_GOOD)


async def _start(
    r: Redis, command: tuple[str, ...], busy: str, deadline: float
) -> Literal["started", "refused", "failed", "busy"]:
    while True:
        try:
            await r.execute_command(*command)
            return "started"
        except ResponseError as exc:
            if refused_for_good(exc):
                log.warning("purge after erasure: Redis refused %s: %s", command[0], exc)
                return "refused"
            if "already in progress" not in str(exc):
                # Not running, so nothing to wait for: a later retry asks again.
                log.warning(
                    "purge after erasure: %s failed (%s); the purge is retried later",
                    command[0],
                    exc,
                )
                return "failed"
        # A job of the same kind runs from a copy taken before the erasure: wait for it.
        while int((await r.info("persistence")).get(busy, 0)):
            if time.monotonic() > deadline:
                log.warning(
                    "purge after erasure: %s still busy; the purge is retried later",
                    command[0],
                )
                return "busy"
            await asyncio.sleep(_POLL_S)


class StorePurge(StoreCore):
    """The store's side of purging: run one, and whether one is owed."""

    async def purge_history(
        self, wait_s: float = 10.0, *, exclusive: bool = False
    ) -> tuple[str, ...]:
        """Ask Redis to drop erased data from its own files and logs; return what it started.

        Starts an append-only file rewrite where AOF is on ("aof_rewrite"), a fresh snapshot
        where snapshots are configured ("snapshot") and clears SLOWLOG ("slowlog"); Redis
        writes the files in the background. Waits up to ``wait_s`` only if a job of the same
        kind is already running (it would keep the data). What this Redis refuses is left out
        and logged (session._store_purge); a lost connection raises StoreUnavailable.
        A purge that finished settles every erasure before it; one that did not stays owed
        (:meth:`purge_owed`). ``exclusive`` (the owed-purge retry) starts nothing while
        another server's exclusive purge runs, so that servers do not each start a rewrite.
        """
        erasures_key, done_key = self._purge_keys()
        ttl_ms = int((wait_s + 30) * 1000)
        with h.unavailable("purge_history"):
            async with h.held(self._r, self._k("purge", "running"), ttl_ms) as mine:
                if exclusive and not mine:
                    return ()
                erasures, _ = await purge_owed(self._r, erasures_key, done_key)
                started, finished = await purge_history(self._r, wait_s)
                if finished:
                    await mark_done(self._r, done_key, erasures)
                return started

    async def purge_owed(self) -> bool:
        """Whether an erasure has not yet been followed by a purge that finished."""
        with h.unavailable("purge_owed"):
            return (await purge_owed(self._r, *self._purge_keys()))[1]

    def _purge_keys(self) -> tuple[str, str]:
        return self._k("purge", "erasures"), self._k("purge", "done")
