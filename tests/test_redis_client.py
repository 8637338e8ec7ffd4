"""The server's Redis client after a Redis restart (a real redis-server, stopped and started)."""

from __future__ import annotations

import asyncio
from typing import Any

from stream_server.redis_client import connect


async def test_no_command_fails_after_a_redis_restart(redis_server: Any, redis_url: str) -> None:
    """Connections pooled before a restart are replaced before use, not failed on.

    Before the client turned redis-py's maintenance notifications off, 16 of these 24
    commands failed with "Connection closed by server" (all 8 after the first and the third
    restart: a connection that failed is reconnected, so it survives the next restart).
    """
    client = connect(redis_url, max_connections=8)
    try:
        await asyncio.gather(*(client.incr("n") for _ in range(8)))  # 8 pooled connections
        for _ in range(3):
            # In threads, so that the event loop runs on while Redis is down, as a
            # server's does, and sees its old connections closed.
            await asyncio.to_thread(redis_server.stop)
            await asyncio.to_thread(redis_server.start)
            results = await asyncio.gather(
                *(client.incr("n") for _ in range(8)), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            assert not failed, failed
        # each command ran exactly once (the append-only file keeps the count over restarts)
        assert int(await client.get("n")) == 32
    finally:
        await client.aclose()


async def test_a_gate_entry_claim_outlasts_a_fare_write_and_its_lookup(redis_url: str) -> None:
    """A gate's entry claim must not expire while its fare may still be written
    (docs/gate.md): the hold covers the longest the server's client can spend on the write
    and then on the lookup that fences it off (pool wait, connect, reply; twice)."""
    from session.store import Store

    client = connect(redis_url, max_connections=8)
    try:
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        one_command = pool.timeout + kwargs["socket_connect_timeout"] + kwargs["socket_timeout"]
        assert 2 * one_command <= Store.gate_claim_hold_s, (one_command, Store.gate_claim_hold_s)
    finally:
        await client.aclose()
