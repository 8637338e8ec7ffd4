"""Instruments for the fault tests (tests/test_faults.py, docs/faults.md).

- ``ledger``: every payment in Redis, after checking that none is half-written;
- ``Monitor``: Redis ``MONITOR`` (what Redis executed) and ``pending_at_redis`` (what a
  process sent to a frozen Redis that it has not read yet);
- ``DropProxy``: a TCP relay that fails like a terminal's network;
- ``Stall``: holds an executor's jobs (a slow or stuck worker pool);
- ``fail_payment_writes``: a payment write that fails with Redis unreachable (after
  writing, or not) and, optionally, a lookup that cannot answer either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

PAY_FIELDS = {
    "payment_id", "merchant_id", "order_id", "account_id", "terminal_id",
    "amount", "currency", "created", "status",
}  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def ledger(r: aioredis.Redis) -> list[dict[str, str]]:
    """Every payment, after checking that none is half-written.

    Each ``fp:pay:{merchant}:{order}`` hash has exactly the payment fields and its
    ``fp:payid:{id}`` index; no index without its payment; one ``payment`` audit entry per
    payment and none without one; each account's daily total is the sum of its payments.
    """
    pays: dict[str, dict[str, str]] = {}
    async for key in r.scan_iter("fp:pay:*"):
        raw = {_text(k): _text(v) for k, v in (await r.hgetall(key)).items()}
        assert set(raw) == PAY_FIELDS, (key, raw)
        assert _text(key) == f"fp:pay:{raw['merchant_id']}:{raw['order_id']}"
        index = await r.get(f"fp:payid:{raw['payment_id']}")
        assert index is not None and _text(index) == f"{raw['merchant_id']}:{raw['order_id']}"
        pays[raw["payment_id"]] = raw
    async for key in r.scan_iter("fp:payid:*"):
        assert _text(key).removeprefix("fp:payid:") in pays, key
    audited = [
        _text(fields[b"payment_id"])
        for _, fields in await r.xrange("fp:audit")
        if fields.get(b"event") == b"payment"
    ]
    assert sorted(audited) == sorted(pays), "payment audit entries do not match payments"
    totals: dict[str, int] = defaultdict(int)
    for p in pays.values():
        day = datetime.fromtimestamp(float(p["created"]), UTC).strftime("%Y%m%d")
        totals[f"fp:daily:{p['account_id']}:{day}"] += int(p["amount"])
    async for key in r.scan_iter("fp:daily:*"):
        assert int(await r.get(key) or 0) == totals.pop(_text(key), 0), key
    assert not totals, f"daily totals missing: {totals}"
    return list(pays.values())


async def until(predicate: Callable[[], Any], bound_s: float, what: str) -> None:
    """Poll ``predicate`` every 10 ms; fail with ``what`` after ``bound_s`` seconds."""
    deadline = time.monotonic() + bound_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {bound_s} s"
        await asyncio.sleep(0.01)


# --- Redis watching: commands it executed, commands waiting for it ----------------------------


class Monitor:
    """Redis MONITOR on a raw socket: every command Redis executes, as a text line."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lines: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(b"MONITOR\r\n")
        await self._writer.drain()
        assert (await reader.readline()).startswith(b"+OK")
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.lines.append(line.decode("utf-8", "replace"))

    def seen(self, needle: str) -> bool:
        return any(needle in line for line in self.lines)

    async def attempt_counted(self, quiet_s: float = 0.2) -> None:
        """Until the edge has counted the passphrase attempt and Redis went quiet.

        Counting is the last Redis work before the session checks the passphrase. After a
        Redis restart the script cache is empty: redis-py answers NOSCRIPT with SCRIPT LOAD
        and a second EVALSHA, hence waiting for ``quiet_s`` without a command too.
        """
        await until(lambda: self.seen("passphrase_attempts_per_terminal"), 20, "counted")
        count, quiet_since = len(self.lines), time.monotonic()
        while time.monotonic() - quiet_since < quiet_s:
            await asyncio.sleep(0.01)
            if len(self.lines) != count:
                count, quiet_since = len(self.lines), time.monotonic()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _tcp_rows() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, rx queue bytes, inode) of every IPv4 TCP socket."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, queues, inode = parts[1], parts[2], parts[4], parts[9]
        rows.append(
            (
                int(local.split(":")[1], 16),
                int(remote.split(":")[1], 16),
                int(queues.split(":")[1], 16),
                int(inode),
            )
        )
    return rows


def pending_at_redis(redis_port: int, pid: int) -> int:
    """Bytes that process ``pid`` sent to Redis and Redis has not read yet (it is stopped)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    rows = _tcp_rows()
    ports = {local for local, remote, _, inode in rows if inode in inodes and remote == redis_port}
    return sum(rx for local, remote, rx, _ in rows if local == redis_port and remote in ports)


class DropProxy:
    """A TCP relay on 127.0.0.1 between terminals and the server that can fail like a network.

    ``cut()`` resets every relayed connection at once (both ends see it); with
    ``mute_replies`` set, what the server sends is read and thrown away (the terminal's
    downlink is dead; the server does not know).
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.mute_replies = False
        self.forwarded_up = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [c_writer, s_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if not up and self.mute_replies:
                        continue
                    dst.write(data)
                    await dst.drain()
                    if up:
                        self.forwarded_up += len(data)

        await asyncio.gather(pump(c_reader, s_writer, True), pump(s_reader, c_writer, False))

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Stall:
    """Makes the app's executor hold every job for ``hold_s`` while ``on`` (released at exit)."""

    def __init__(self, pool: Any, hold_s: float) -> None:
        self.pool, self.hold_s = pool, hold_s
        self.on = False
        self.release = threading.Event()
        self._submit = pool.submit

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if not self.on:
            return self._submit(fn, *args, **kwargs)

        def held() -> Any:
            self.release.wait(self.hold_s)
            return fn(*args, **kwargs)

        return self._submit(held)

    def __enter__(self) -> Stall:
        self.pool.submit = self.submit
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        del self.pool.submit


def fail_payment_writes(monkeypatch: Any, store: Any, *, written: bool, lookup_fails: bool) -> None:
    """Make ``store.create_payment`` raise StoreUnavailable, after the real write when
    ``written`` (only the reply was lost), and ``store.payment_or_void`` too when
    ``lookup_fails`` (Redis cannot say either way). Undone by ``monkeypatch.undo()``."""
    from pipeline.errors import StoreUnavailable

    write = store.create_payment

    async def failing(**payment: Any) -> Any:
        if written:
            await write(**payment)
        raise StoreUnavailable("redis unavailable during create_payment (ConnectionError)")

    async def unreachable(payment_id: str) -> Any:
        raise StoreUnavailable("redis unavailable during payment_or_void (ConnectionError)")

    monkeypatch.setattr(store, "create_payment", failing)
    if lookup_fails:
        monkeypatch.setattr(store, "payment_or_void", unreachable)
