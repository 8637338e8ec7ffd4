"""A Redis-backed fixed-window rate limiter for the abuse controls (session/config.py
``RateLimitConfig``).

One Lua script increments the window's counter and sets its expiry atomically, so every
server instance sharing the Redis counts against one budget and a crash between the two
steps cannot leave a counter that never expires. Failures close: if Redis cannot count,
:meth:`RateLimiter.hit` raises ``StoreUnavailable`` and the caller refuses the request.

Keys: ``fp:rl:{bucket}:{sha256(key)[:32]}`` (a hash, so a hostile key such as a 64-character
account id of the caller's choosing cannot shape key names), expiring with the window.
"""

from __future__ import annotations

import hashlib
import math

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from pipeline.errors import InvalidRequest, RateLimited
from session import _store_lua as h
from session.config import Limit

__all__ = ["RateLimited", "RateLimiter"]

# KEYS: 1 counter. ARGV: 1 window in ms. Returns {count in this window, ms until it ends}.
HIT_LUA = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if n == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


class RateLimiter:
    """Count events per (bucket, key) in fixed windows on Redis."""

    def __init__(self, redis: Redis, prefix: str = "fp:") -> None:
        self._r = redis
        self._p = prefix
        self._script: AsyncScript = redis.register_script(HIT_LUA)

    def key(self, bucket: str, key: str) -> str:
        """The Redis key counting ``key`` in ``bucket``."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"{self._p}rl:{bucket}:{digest}"

    async def hit(self, bucket: str, key: str, limit: Limit) -> int:
        """Count one event; return how many remain in this window.

        Raises :class:`RateLimited` once ``limit.count`` is passed (the refused event counts
        too, so hammering does not help) and ``StoreUnavailable`` if Redis cannot count.
        """
        if not bucket.isidentifier():
            raise InvalidRequest("rate-limit bucket must be an identifier")
        window_ms = max(1000, math.ceil(limit.window_s * 1000))
        with h.unavailable(f"rate limit {bucket}"):
            count, ttl_ms = await self._script(keys=[self.key(bucket, key)], args=[window_ms])
        count, ttl_ms = int(count), int(ttl_ms)
        if count > limit.count:
            raise RateLimited(
                f"too many {bucket.replace('_', ' ')}: at most {limit.count} per "
                f"{limit.window_s:g} s",
                retry_after_s=max(ttl_ms, 0) / 1000.0,
            )
        return limit.count - count

    async def remaining(self, bucket: str, key: str, limit: Limit) -> int:
        """How many events ``key`` has left in ``bucket``'s current window (counts none)."""
        with h.unavailable(f"rate limit {bucket}"):
            count = await self._r.get(self.key(bucket, key))
        return limit.count - (0 if count is None else int(count))

    async def reset(self, bucket: str, key: str) -> None:
        """Forget the count of ``key`` in ``bucket`` (tests, an operator's unlock)."""
        with h.unavailable(f"rate limit reset {bucket}"):
            await self._r.delete(self.key(bucket, key))
