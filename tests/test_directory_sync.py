"""Directory loads racing enrolments and erasures (stream_server/sync.py, session/directory.py).

A load reads the whole store (a minute at a million subjects). Whatever is committed while
it reads must still hold once it is done:

- at start-up the server subscribes to ``fp:events`` first and loads after, so an erasure
  committed during the load is applied before the server answers anyone;
- a reload after a lost subscription runs beside the event loop: an erasure takes effect at
  once, not when the reload ends, and the reloaded gallery does not bring it back.

Real redis-server; the load is held open at a chosen point by wrapping the store's own
``iter_subjects`` (it still reads Redis), so the race is hit every time rather than by luck.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.config import MatchConfig
from session.config import FacePayConfig, ServerConfig
from session.crypto import PassphraseHasher, TemplateCipher, generate_key
from session.directory import ERASED_MEMORY_S, Directory
from session.store import Store
from stream_server.app import DIRECTORY, create_app

CONSENT = {"source": "test"}


def _template(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return v / np.linalg.norm(v)


async def _until(check: Callable[[], bool], bound_s: float) -> float:
    """Seconds until ``check()`` holds; fails past ``bound_s``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < bound_s, f"not within {bound_s} s"
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


@pytest.fixture
async def shop(redis_url: str) -> AsyncIterator[tuple[Store, TemplateCipher, list[str]]]:
    """Three enrolled accounts (acct-0..2) written by another client, as the CLI would."""
    cipher = TemplateCipher(generate_key())
    client = aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
    store = Store(client, cipher)
    passhash = PassphraseHasher(time_cost=1, memory_kib=64).hash("open sesame 42")
    sids = []
    for i in range(3):
        _, sid = await store.create_account(
            f"acct-{i}", "A Person", f"+86138000000{i:02d}", passhash, [_template(i)], CONSENT
        )
        sids.append(sid)
    yield store, cipher, sids
    await client.aclose()


def _hold_loads(
    monkeypatch: pytest.MonkeyPatch, after: int, skip_loads: int = 0
) -> tuple[asyncio.Event, asyncio.Event]:
    """Make a load (past the first ``skip_loads``) pause after reading ``after`` subjects.

    Returns (paused, release): the load sets ``paused`` there and waits for ``release``.
    """
    paused, release = asyncio.Event(), asyncio.Event()
    real = Store.iter_subjects
    calls = 0

    async def held(self: Store) -> AsyncIterator[Any]:
        nonlocal calls
        calls += 1
        hold = calls > skip_loads
        n = 0
        async for row in real(self):
            yield row
            n += 1
            if hold and n == after:
                paused.set()
                await release.wait()

    monkeypatch.setattr(Store, "iter_subjects", held)
    return paused, release


async def test_an_erasure_during_the_start_up_load_is_applied_before_serving(
    shop, redis_url, models_dir, aiohttp_client, monkeypatch
):
    store, cipher, sids = shop
    paused, release = _hold_loads(monkeypatch, after=3)
    app = create_app(
        FacePayConfig(server=ServerConfig(workers=1)),
        cipher=cipher,
        redis_url=redis_url,
        models_dir=models_dir,
    )
    starting = asyncio.create_task(aiohttp_client(app))
    await asyncio.wait_for(paused.wait(), 30)
    # Every subject has been read; now one is erased (another server, the CLI).
    await store.erase_account("acct-1")
    release.set()
    await asyncio.wait_for(starting, 30)
    directory = app[DIRECTORY]
    # The event waited on the subscription made before the load, and start-up applied it
    # before serving. Loaded first and subscribed after, it would be lost for good.
    assert sids[1] not in directory.gallery
    assert sids[0] in directory.gallery and sids[2] in directory.gallery
    assert directory.identify(_template(1)).status != "match"
    assert directory.identify(_template(2)).subject_id == sids[2]


async def test_an_erasure_during_a_reload_takes_effect_at_once_and_stays(
    shop, redis_url, models_dir, aiohttp_client, monkeypatch
):
    store, cipher, sids = shop
    paused, release = _hold_loads(monkeypatch, after=3, skip_loads=1)  # not the start-up one
    app = create_app(
        FacePayConfig(server=ServerConfig(workers=1)),
        cipher=cipher,
        redis_url=redis_url,
        models_dir=models_dir,
    )
    await aiohttp_client(app)
    directory = app[DIRECTORY]
    assert all(sid in directory.gallery for sid in sids)
    admin = aioredis.from_url(redis_url)
    try:
        # Cut the subscription (as a Redis restart or a network cut would): it is re-made and
        # the directory reloaded to catch what was missed; the reload is held half-way.
        assert await admin.client_kill_filter(_type="pubsub") >= 1
        await asyncio.wait_for(paused.wait(), 30)
        await store.erase_account("acct-0")
        took = await _until(lambda: sids[0] not in directory.gallery, bound_s=1.0)
        _, new_sid = await store.create_account(
            "acct-9",
            "A Person",
            "+8613800000099",
            PassphraseHasher(time_cost=1, memory_kib=64).hash("open sesame 42"),
            [_template(9)],
            CONSENT,
        )
        await _until(lambda: new_sid in directory.gallery, bound_s=1.0)
        reloading = directory.gallery
        release.set()
        await _until(lambda: directory.gallery is not reloading, bound_s=10.0)
    finally:
        await admin.aclose()
    # The reloaded gallery read acct-0 before its erasure, and missed acct-9: both replayed.
    assert sids[0] not in directory.gallery and new_sid in directory.gallery
    assert directory.identify(_template(0)).status != "match"
    assert directory.identify(_template(9)).subject_id == new_sid
    assert took < 1.0


class _SlowStore:
    """Just ``iter_subjects``: yields the rows, pausing after the first until released."""

    def __init__(self, rows: list[tuple[str, list[np.ndarray], str]]) -> None:
        self.rows, self.paused, self.release = rows, asyncio.Event(), asyncio.Event()

    async def iter_subjects(self) -> AsyncIterator[tuple[str, list[np.ndarray], str]]:
        for i, row in enumerate(self.rows):
            yield row
            if i == 0:
                self.paused.set()
                await self.release.wait()


@pytest.mark.parametrize("concurrent_loads", [1, 2])
async def test_changes_during_a_load_are_replayed_onto_the_loaded_gallery(concurrent_loads):
    """Unit test of Directory.load alone: adds and removals made while it reads, in order."""
    directory = Directory(MatchConfig())
    directory.add("a", [_template(0)], "0000")
    rows = [("a", [_template(0)], "0000"), ("b", [_template(1)], "0001")]
    stores = [_SlowStore(rows) for _ in range(concurrent_loads)]
    loads = [asyncio.create_task(directory.load(s)) for s in stores]  # type: ignore[arg-type]
    await asyncio.gather(*(s.paused.wait() for s in stores))
    directory.remove("a")  # read already: must not come back with the swap
    directory.add("c", [_template(2)], "0002")  # not in the rows read
    directory.remove("c")  # added, then removed: the replay keeps the order
    directory.add("c", [_template(2)], "0002")  # an erased subject never comes back
    directory.add("d", [_template(3)], "0003")
    directory.add("e", [_template(4)], "0004")
    directory.remove("b")  # not read yet: it is read, then removed by the replay
    assert "a" not in directory.gallery  # at once, on the gallery being served
    assert "c" not in directory.gallery
    for s in stores:
        s.release.set()
    assert await asyncio.gather(*loads) == [2] * concurrent_loads
    assert set(directory.gallery.subjects()) == {"d", "e"}
    assert directory._journals == []


async def test_an_erased_subject_is_not_put_back_by_a_late_add(monkeypatch):
    """An erasure's event can overtake the add that follows an enrolment's own write (an
    erasure through another server a moment later), or a sync's read of the templates: the
    add must not put the erased subject back in this server's index. Subject ids are never
    reused; the memory of erased ones is bounded in time."""
    clock = [1000.0]
    monkeypatch.setattr("session.directory.time.monotonic", lambda: clock[0])
    directory = Directory(MatchConfig())
    directory.remove("s_late")  # the erasure's event first
    directory.add("s_late", [_template(0)], "0000")  # then the enrolment's own add
    assert "s_late" not in directory.gallery
    assert directory.identify(_template(0)).status == "no_match"
    clock[0] += ERASED_MEMORY_S + 1
    directory.remove("s_next")  # forgets what is older than the memory
    assert set(directory._erased) == {"s_next"}


async def test_a_load_overtaken_by_a_later_one_swaps_nothing():
    """A reconnect during a reload starts another; if the first one's cancel is lost and it
    ends last, its older copy of the store must not replace the newer one."""
    directory = Directory(MatchConfig())
    older = _SlowStore([("gone", [_template(0)], "0000"), ("kept", [_template(1)], "0001")])
    newer = _SlowStore([("kept", [_template(1)], "0001"), ("new", [_template(2)], "0002")])
    first = asyncio.create_task(directory.load(older))  # type: ignore[arg-type]
    await older.paused.wait()
    second = asyncio.create_task(directory.load(newer))  # type: ignore[arg-type]
    await newer.paused.wait()
    newer.release.set()
    assert await second == 2
    assert set(directory.gallery.subjects()) == {"kept", "new"}
    older.release.set()
    assert await first == 2
    assert set(directory.gallery.subjects()) == {"kept", "new"}  # not "gone" again
