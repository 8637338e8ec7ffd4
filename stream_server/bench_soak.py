"""Resource samples of the server under test, for ``facepay bench``'s load and soak runs.

Every ``every`` seconds: the server's resident memory and open file descriptors (psutil, when
the bench started the server; else its ``/metrics``), and the number of keys in its Redis.
The summary compares the first sample after warm-up with the last, so a leak shows as growth
that payments (which legitimately add ledger keys) do not explain.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

#: Samples taken in the first WARMUP_FRACTION of the run are not the baseline: model
#: sessions, allocator arenas and peer connections are still being set up.
WARMUP_FRACTION = 0.15


class Sampler:
    """Collects ``(t, rss_mb, fds, redis_keys)`` rows."""

    def __init__(self, pid: int | None, redis_url: str | None) -> None:
        self.pid = pid
        self.redis_url = redis_url
        self.rows: list[dict[str, Any]] = []
        self._redis: Any = None

    async def sample(self, rss_from_metrics: float | None = None) -> None:
        """Take one sample now."""
        # ``wall``: to tell which payments (records stamped with time.time()) fall inside.
        row: dict[str, Any] = {"t": time.monotonic(), "wall": time.time()}
        if self.pid is not None:
            import psutil

            proc = psutil.Process(self.pid)
            row["rss_mb"] = proc.memory_info().rss / 2**20
            row["fds"] = proc.num_fds()
        elif rss_from_metrics is not None:
            row["rss_mb"] = rss_from_metrics
        if self.redis_url:
            if self._redis is None:
                import redis.asyncio as aioredis

                self._redis = aioredis.from_url(self.redis_url, socket_timeout=5)
            row["redis_keys"] = int(await self._redis.dbsize())
        self.rows.append(row)

    async def close(self) -> None:
        """Release the Redis client."""
        if self._redis is not None:
            await self._redis.aclose()

    def summary(self, payment_times: Iterable[float]) -> dict[str, Any]:
        """Baseline (after warm-up) vs end, per resource.

        ``payment_times``: when each payment ended (``time.time()``). Key growth is divided
        by the payments between the baseline and the last sample only: the ones before the
        baseline wrote their keys before it was counted.
        """
        if len(self.rows) < 2:
            return {"samples": len(self.rows)}
        t0, t1 = self.rows[0]["t"], self.rows[-1]["t"]
        warm = t0 + WARMUP_FRACTION * (t1 - t0)
        base = next(r for r in self.rows if r["t"] >= warm)
        last = self.rows[-1]
        out: dict[str, Any] = {"samples": len(self.rows), "seconds": round(t1 - base["t"], 1)}
        for key in ("rss_mb", "fds", "redis_keys"):
            if key in base and key in last:
                out[key] = {
                    "start": round(base[key], 1),
                    "end": round(last[key], 1),
                    "max": round(max(r[key] for r in self.rows if key in r), 1),
                    "growth": round(last[key] - base[key], 1),
                }
        keys = out.get("redis_keys")
        payments = sum(1 for t in payment_times if base["wall"] < t <= last["wall"])
        out["payments_in_window"] = payments
        if keys is not None and payments:
            # Each payment writes its record and its order key; anything beyond that is a leak.
            out["redis_keys"]["per_payment"] = round(keys["growth"] / payments, 2)
        return out
