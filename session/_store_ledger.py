"""Private base of ``session.store.Store``: key naming, the audit stream, passphrase lockout
and the payment ledger. ``Store`` inherits these methods; code against ``Store`` only.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from pipeline.errors import (
    AccountLocked,
    AuthError,
    Conflict,
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PaymentConflict,
)
from session import _store_audit as _audit
from session import _store_lua as h
from session.config import RateLimitConfig
from session.models import Account, AuditPage, Payment


class StoreCore:
    """Shared state and the ledger/lockout/audit half of ``Store``."""

    _r: Redis
    _p: str
    _pay_script: AsyncScript
    #: The pub/sub channel of enrolments, erasures and revocations (stream_server.sync).
    events_channel: str
    _fail_script: AsyncScript
    _void_script: AsyncScript
    _release_script: AsyncScript
    _shorten_script: AsyncScript
    #: Lockout back-off and per-account failure budget (Store takes it from the config).
    limits: RateLimitConfig = RateLimitConfig()
    #: About how many records the audit stream keeps (Redis trims whole nodes, so a few
    #: more); the server takes it from ``server.audit_max_records``.
    audit_maxlen: int = h.AUDIT_MAXLEN
    #: The least a gate entry claim lasts, whatever ``policy.gate_entry_window_s``: longer
    #: than the fare's write can still land after the claim. The server's Redis client
    #: (stream_server.redis_client) waits up to 5 s for a pooled connection, 2 s to connect
    #: and 5 s for a reply: 12 s a command; the write and, should it fail, the lookup that
    #: fences it off (``payment_or_void``) take at most 24 s. A shorter window (a bench's
    #: few seconds) is restored once the fare is written (``settle_gate_entry``).
    gate_claim_hold_s: float = 30.0

    def _init_core(self, redis: Redis, prefix: str) -> None:
        self._r = redis
        self._p = prefix
        self._pay_script = redis.register_script(h.PAY_LUA)
        self._fail_script = redis.register_script(h.FAIL_LUA)
        self._void_script = redis.register_script(h.VOID_LUA)
        self._release_script = redis.register_script(h.RELEASE_LUA)
        self._shorten_script = redis.register_script(h.SHORTEN_LUA)

    def _k(self, *parts: str) -> str:
        """A key under this store's prefix: ``_k("pay", mid, order)`` -> ``fp:pay:mid:order``."""
        return self._p + ":".join(parts)

    def _queue_audit(self, pipe: Pipeline, entry: dict[str, str]) -> None:
        """Queue an XADD of a checked audit entry into a MULTI/EXEC pipeline."""
        pipe.xadd(self._k("audit"), entry, maxlen=self.audit_maxlen, approximate=True)  # type: ignore[arg-type]

    # --- audit --------------------------------------------------------------------------
    async def audit(self, event: str, **fields: str) -> None:
        """Append to the audit stream (refuses field names that could carry secrets)."""
        entry = h.audit_fields(event, time.time(), fields)
        with h.unavailable("audit"):
            await self._r.xadd(
                self._k("audit"),
                entry,  # type: ignore[arg-type]
                maxlen=self.audit_maxlen,
                approximate=True,
            )

    async def publish_audit_cap(self) -> None:
        """Record the cap this store trims the audit stream to (``fp:audit:maxlen``), so that
        the command line, which may run without the servers' configuration, trims to it and
        judges trimmed seals by it (``adopt_audit_cap``)."""
        with h.unavailable("publish_audit_cap"):
            await self._r.set(self._k("audit:maxlen"), str(self.audit_maxlen))

    async def adopt_audit_cap(self, configured: int | None) -> int:
        """Trim to, and judge seals by, the cap the servers published (what they actually
        trim to), else ``configured`` (a command given the configuration), else the default.
        A stream trimmed at a smaller cap than the one assumed would read as tampered with,
        and a command trimming at a smaller cap than the servers' would cut their records."""
        with h.unavailable("adopt_audit_cap"):
            raw = await self._r.get(self._k("audit:maxlen"))
        published = int(h.text(raw)) if raw is not None and h.text(raw).isdigit() else 0
        if published > 0:
            self.audit_maxlen = published
        elif configured is not None:
            self.audit_maxlen = configured
        return self.audit_maxlen

    async def read_audit(self, count: int = 100) -> list[dict[str, str]]:
        """The newest ``count`` audit records, oldest first."""
        if count <= 0:
            return []
        with h.unavailable("read_audit"):
            rows = await self._r.xrevrange(self._k("audit"), count=count)
        return [h.decode_hash(fields) for _, fields in reversed(rows or [])]

    async def audit_after(self, after: str | None = None, count: int = 1000) -> AuditPage:
        """Up to ``count`` audit records after the one with stream id ``after`` (from the
        oldest kept when None), oldest first, each with its id: a cursor for shipping the
        stream elsewhere. ``missed`` says whether records after the cursor may be gone
        (:class:`AuditPage`). InvalidRequest for a malformed id or count."""
        if after is not None and not h.AUDIT_ID.fullmatch(after):
            raise InvalidRequest("an audit cursor is a stream id such as 1732406400000-0")
        if not 1 <= count <= h.MAX_AUDIT_PAGE:
            raise InvalidRequest(f"an audit page holds 1 to {h.MAX_AUDIT_PAGE} records")
        start = "-" if after is None else f"({after}"
        key = self._k("audit")
        with h.unavailable("audit_after"):
            # The stream's state first: a trim between the two reads then shows next time.
            missed = await self._audit_lost_after(key, h.stream_id(after or "0-0"))
            rows = await self._r.xrange(key, min=start, count=count)
        return AuditPage(_audit.stream_records(rows), missed)

    async def _audit_lost_after(self, key: str, cursor: tuple[int, int]) -> bool:
        """Whether records newer than ``cursor`` may have left the stream unread."""
        loss = await _audit.stream_losses(self._r, key)
        if loss is None:
            return False
        # XDEL (never done by FacePay) records the newest id it removed.
        if loss.deleted_upto > cursor:
            return True
        # Trimming drops the oldest records and records nothing, but every record ever
        # added is counted. If some are gone and the cursor is older than the oldest kept
        # (of an empty stream: the last added), records after the cursor may be among them.
        # (Only "may": Redis trims whole nodes of ~100 records, and the cursor may have been
        # the last of its node.)
        return loss.gone and cursor < (loss.oldest or loss.last)

    # --- passphrase lockout ---------------------------------------------------------------
    async def locked_until(self, account_id: str) -> float | None:
        """Epoch seconds the account stays locked, or None."""
        with h.unavailable("locked_until"):
            raw = await self._r.get(self._k("lock", account_id))
        return self._lock_end(raw)

    @staticmethod
    def _lock_end(raw: Any) -> float | None:
        """The lock key's value as its end (epoch seconds), None if the key is unset.

        Whether the account is locked is whether the key exists: Redis expires it on its own
        clock, and the scripts that count failures and write payments go by the key. The
        end it stores is the locking server's clock; comparing it with this server's clock
        too would, on a server whose clock runs ahead, end the lock early here alone: a
        prompt for a locked account, whose wrong answers the failure script then does not
        count, and whose right answer alone came back without ``locked_until``.
        """
        if raw is None:
            return None
        return float(h.text(raw))

    async def account_with_lock(self, account_id: str) -> tuple[Account, float | None]:
        """The account (NotFound as ``get_account``) and when its lock ends (None: not
        locked), in one round trip: a payment reads both at once."""
        with h.unavailable("account_with_lock"):
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._k("account", account_id))
                pipe.get(self._k("lock", account_id))
                raw_account, raw_lock = await pipe.execute()
        return h.account_from_hash(account_id, h.decode_hash(raw_account)), self._lock_end(raw_lock)

    async def record_failure(
        self, account_id: str, max_attempts: int, lockout_s: float
    ) -> tuple[int, float | None]:
        """Count a wrong passphrase; returns (attempts left, locked_until if now locked).

        The counter lives ``lockout_s`` after the latest failure; reaching ``max_attempts``
        locks the account (``fp:lock:{aid}``) and resets the counter. The lock backs off:
        each lockout within ``limits.lockout_memory_s`` of the previous one lasts
        ``limits.lockout_backoff`` times longer, up to ``limits.max_lockout_s``; and
        ``limits.passphrase_failures_per_account`` failures within its window lock for the
        longest time at once, however they were spread (session/config.py RateLimitConfig).
        A failure while the account is already locked counts nothing and returns that lock.
        """
        if max_attempts < 1 or not lockout_s > 0 or not math.isfinite(lockout_s):
            raise InvalidRequest("max_attempts must be >= 1 and lockout_s > 0")
        lim = self.limits
        lockout_ms = max(1, math.ceil(lockout_s * 1000))
        now_ms = int(time.time() * 1000)
        keys = [self._k(kind, account_id) for kind in ("fail", "lock", "lockouts", "failday")]
        args = [
            max_attempts,
            lockout_ms,
            lim.lockout_backoff,
            max(lockout_ms, math.ceil(lim.max_lockout_s * 1000)),
            math.ceil(lim.lockout_memory_s * 1000),
            lim.passphrase_failures_per_account.count,
            math.ceil(lim.passphrase_failures_per_account.window_s * 1000),
            now_ms,
        ]
        with h.unavailable("record_failure"):
            left, lock_ms, stored = await self._fail_script(keys=keys, args=args)
        if int(lock_ms) == 0:
            return int(left), None
        return 0, float(h.text(stored))

    async def clear_failures(self, account_id: str) -> None:
        """Reset the wrong-passphrase counter after a correct one."""
        with h.unavailable("clear_failures"):
            await self._r.delete(self._k("fail", account_id))

    # --- gate entries -----------------------------------------------------------------------
    async def claim_gate_entry(
        self, merchant_id: str, account_id: str, window_s: float
    ) -> str | None:
        """Atomically claim this account's entry at this merchant for ``window_s`` seconds.

        The claim's token for the first claim in the window (charge the fare, then
        ``settle_gate_entry`` or ``release_gate_entry`` with it), None if the account already
        entered (a track that broke and re-formed, or a second gate): never charge twice.
        SET NX with an expiry, so concurrent gates cannot both win. The claim lasts at
        least ``gate_claim_hold_s``, however short the window: it must not lapse while its
        fare may still be written, or another gate would claim and charge the same person.
        """
        token = h.new_id("g", 12)
        ttl_ms = max(1, math.ceil(max(window_s, self.gate_claim_hold_s) * 1000))
        with h.unavailable("claim_gate_entry"):
            won = await self._r.set(
                self._k("gate", merchant_id, account_id), token, nx=True, px=ttl_ms
            )
        return token if won else None

    async def settle_gate_entry(
        self, merchant_id: str, account_id: str, token: str, window_s: float, age_s: float
    ) -> None:
        """The claim's fare is written: cut a claim held past its window (one shorter than
        ``gate_claim_hold_s``) to what is left of ``window_s``, the claim being ``age_s``
        seconds old. Only the holder's claim is touched."""
        if window_s >= self.gate_claim_hold_s:
            return  # it expires with its window already
        left_ms = math.floor((window_s - age_s) * 1000)
        with h.unavailable("settle_gate_entry"):
            await self._shorten_script(
                keys=[self._k("gate", merchant_id, account_id)], args=[token, left_ms]
            )

    async def release_gate_entry(self, merchant_id: str, account_id: str, token: str) -> None:
        """Undo a claim whose fare could not be charged (limit, outage): the person may retry.

        Compare-and-delete: a claim that expired (its fare's write outlasted it) may have been
        taken by another gate since, and freeing that one would let a third charge again.
        """
        with h.unavailable("release_gate_entry"):
            await self._release_script(
                keys=[self._k("gate", merchant_id, account_id)], args=[token]
            )

    # --- payments -------------------------------------------------------------------------
    async def find_payment(self, merchant_id: str, order_id: str) -> Payment | None:
        """The payment for this order, if any."""
        with h.unavailable("find_payment"):
            raw = await self._r.hgetall(self._k("pay", merchant_id, order_id))
        return h.payment_from_hash(h.decode_hash(raw)) if raw else None

    @staticmethod
    def new_payment_id() -> str:
        """A fresh payment id, for a caller that must know it before the write (to look
        the payment up after a lost reply)."""
        return h.new_id("p", 16)

    async def create_payment(
        self,
        *,
        merchant_id: str,
        order_id: str,
        account_id: str,
        terminal_id: str,
        amount: int,
        currency: str,
        daily_limit: int,
        payment_id: str | None = None,
        account_created: float | None = None,
        terminal_token_sha256: str | None = None,
    ) -> Payment:
        """Write one payment atomically (Lua): Conflict if the order is already paid,
        AuthError if the terminal is revoked (or unknown), Forbidden if it belongs to another
        merchant or is not a checkout or gate terminal, AccountLocked if the account is
        locked, NotFound if it is erased or missing,
        LimitExceeded if the account's daily total would pass ``daily_limit``. Audit ``payment``.

        ``account_created`` (a session passes the ``created`` of the account it read, and
        every session does): NotFound as well if the account id now belongs to a later
        enrolment (erased and enrolled again, by someone else, while a prompt was open).
        ``terminal_token_sha256`` (the sessions pass the digest of the token their socket
        said hello with): AuthError as well once the terminal's token was rotated, so a
        stolen token's socket cannot pay, even before its close reaches it.

        ``payment_id`` (new random id by default) is chosen before the script runs, so a call
        that redis-py retries after a lost reply finds its own payment and succeeds. The
        Conflict for an order paid by another payment is a ``PaymentConflict`` whose
        ``payment_id`` attribute (and message) names the existing payment.
        """
        h.check_payment_args(order_id, amount, currency, daily_limit)
        pid = payment_id or self.new_payment_id()
        now = time.time()
        day = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
        keys = [
            self._k("pay", merchant_id, order_id),
            self._k("payid", pid),
            self._k("daily", account_id, day),
            self._k("audit"),
            self._k("lock", account_id),
            self._k("account", account_id),
            self._k("terminal", terminal_id),
            self._k("voided", pid),
        ]
        args: list[Any] = [
            pid,
            merchant_id,
            order_id,
            account_id,
            terminal_id,
            str(amount),
            currency,
            repr(now),
            str(daily_limit),
            f"{merchant_id}:{order_id}",
            str(h.DAILY_TTL_S),
            str(self.audit_maxlen),
            "" if account_created is None else repr(account_created),
            terminal_token_sha256 or "",
        ]
        with h.unavailable("create_payment"):
            status, value = await self._pay_script(keys=keys, args=args)
        status, value = h.text(status), h.text(value)
        if status == "void":
            raise Conflict(f"payment id {pid} was voided after a lost reply")
        if status == "revoked":
            raise AuthError("terminal revoked")
        if status == "rotated":
            raise AuthError("terminal token rotated")
        if status == "foreign":
            raise Forbidden(f"terminal {terminal_id} does not belong to merchant {merchant_id}")
        if status == "not_paying":
            raise Forbidden(f"a {value or 'modeless'} terminal cannot take payments")
        if status == "locked":
            raise AccountLocked("the account is locked", until=self._lock_end(value))
        if status == "inactive":
            raise NotFound("no such account")
        if status == "limit":
            raise LimitExceeded("daily limit reached for this account")
        if status == "exists" and value != pid:
            raise PaymentConflict(f"order already paid by payment {value}", value)
        if status == "ok":
            # The script wrote exactly these values (``created`` as repr, which round-trips):
            # no second and third round trip to read them back.
            return Payment(
                payment_id=pid,
                merchant_id=merchant_id,
                order_id=order_id,
                account_id=account_id,
                terminal_id=terminal_id,
                amount=amount,
                currency=currency,
                created=now,
                status="captured",
            )
        # "exists" with our own id: a retried call whose first attempt committed.
        return await self.get_payment(pid)

    async def payment_or_void(self, payment_id: str) -> Payment | None:
        """After a payment's write failed with its outcome unknown: the payment if it was
        written, else None, and then it never will be (the id is marked void in the same
        step, so a write with this id still on its way is refused). StoreUnavailable if
        Redis cannot say."""
        with h.unavailable("payment_or_void"):
            ref = await self._void_script(
                keys=[self._k("payid", payment_id), self._k("voided", payment_id)],
                args=[h.VOID_TTL_S],
            )
        if ref is None:
            return None
        return await self.get_payment(payment_id)

    async def get_payment(self, payment_id: str) -> Payment:
        """A payment by id, or NotFound."""
        with h.unavailable("get_payment"):
            ref = await self._r.get(self._k("payid", payment_id))
            if ref is None:
                raise NotFound("no such payment")
            merchant_id, _, order_id = h.text(ref).partition(":")
            raw = await self._r.hgetall(self._k("pay", merchant_id, order_id))
        if not raw:
            raise NotFound("no such payment")
        return h.payment_from_hash(h.decode_hash(raw))
