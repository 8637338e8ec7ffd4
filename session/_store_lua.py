"""Private helpers of ``session.store``: the payment Lua script, Redis error mapping, input
checks and reply decoding. Nothing here is part of the public interface.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.errors import InvalidRequest, NotFound, StoreUnavailable
from session.models import Account, Payment

AUDIT_MAXLEN = 100_000
DAILY_TTL_S = 2 * 24 * 3600
MAX_AUDIT_VALUE = 256
#: Most audit records one ``audit_after`` call returns.
MAX_AUDIT_PAGE = 10_000
#: A Redis stream id (milliseconds-sequence).
AUDIT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def stream_id(value: str) -> tuple[int, int]:
    """A stream id as a comparable pair (ids compare by number, not as text)."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


# Field names that could carry a secret or biometric data are refused by ``audit``.
FORBIDDEN_AUDIT_WORDS = (
    "passphrase",
    "pass",
    "hash",
    "embedding",
    "template",
    "image",
    "frame",
    "token",
)
RESERVED_AUDIT_FIELDS = frozenset({"event", "t"})

_ACCOUNT_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_PHONE = re.compile(r"\+?[0-9]{6,20}")
_ORDER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")

# KEYS: 1 pay hash, 2 payid key, 3 daily key, 4 audit stream, 5 account's lock, 6 account,
#       7 terminal, 8 the payment id's void mark (VOID_LUA)
# ARGV: 1 payment_id, 2 merchant_id, 3 order_id, 4 account_id, 5 terminal_id, 6 amount,
#       7 currency, 8 created, 9 daily_limit, 10 payid value, 11 daily ttl, 12 audit maxlen,
#       13 the account's ``created`` as the session read it ("" for none), 14 the sha256 of
#       the token the session's socket said hello with ("" for none)
# Returns {"ok", pid} | {"exists", existing_pid} | {"void", ""} | {"revoked", ""}
# | {"rotated", ""}
# | {"foreign", ""} | {"not_paying", mode} | {"locked", lock end}
# | {"inactive", ""} | {"limit", spent_today}. The terminal, the lock and the account are
# read here, in the same step as the write, because a session reads them once (the terminal
# at its hello, the account before a prompt that may stay open for half a minute): a
# revocation, a lockout or an erasure meanwhile (through any server) must still stop it.
# The terminal must also belong to the payment's merchant and be one that takes payments
# (checkout or gate): the sessions take both from the terminal's record today, and the
# ledger must not depend on every caller doing so (defence in depth). The account must be
# the one the session read (ARGV 13): an erased account id may be enrolled again by someone
# else, and a prompt opened for the first holder must not charge the second.
PAY_LUA = """
local existing = redis.call('HGET', KEYS[1], 'payment_id')
if existing then
  return {'exists', existing}
end
if redis.call('EXISTS', KEYS[8]) == 1 then
  return {'void', ''}
end
local terminal = redis.call('HMGET', KEYS[7], 'status', 'merchant_id', 'mode', 'token_sha256')
if terminal[1] ~= 'active' then
  return {'revoked', ''}
end
if ARGV[14] ~= '' and terminal[4] ~= ARGV[14] then
  return {'rotated', ''}
end
if terminal[2] ~= ARGV[2] then
  return {'foreign', ''}
end
if terminal[3] ~= 'checkout' and terminal[3] ~= 'gate' then
  return {'not_paying', terminal[3] or ''}
end
local lock = redis.call('GET', KEYS[5])
if lock then
  return {'locked', lock}
end
local account = redis.call('HMGET', KEYS[6], 'status', 'created')
if account[1] ~= 'active' then
  return {'inactive', ''}
end
if ARGV[13] ~= '' and tonumber(account[2]) ~= tonumber(ARGV[13]) then
  return {'inactive', ''}
end
local amount = tonumber(ARGV[6])
local spent = tonumber(redis.call('GET', KEYS[3]) or '0')
if spent + amount > tonumber(ARGV[9]) then
  return {'limit', tostring(spent)}
end
redis.call('HSET', KEYS[1],
  'payment_id', ARGV[1], 'merchant_id', ARGV[2], 'order_id', ARGV[3],
  'account_id', ARGV[4], 'terminal_id', ARGV[5], 'amount', ARGV[6],
  'currency', ARGV[7], 'created', ARGV[8], 'status', 'captured')
redis.call('SET', KEYS[2], ARGV[10])
redis.call('INCRBY', KEYS[3], ARGV[6])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[11]))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[12], '*',
  'event', 'payment', 't', ARGV[8], 'payment_id', ARGV[1], 'merchant_id', ARGV[2],
  'order_id', ARGV[3], 'account_id', ARGV[4], 'terminal_id', ARGV[5], 'amount', ARGV[6])
return {'ok', ARGV[1]}
"""


# KEYS: 1 payid key, 2 the payment id's void mark. ARGV: 1 mark ttl (s)
# Returns the payid value (the payment was written) or false, after marking the id void: a
# payment script still on its way with this id (its packets delayed past the client's
# timeout, then delivered) refuses to write. Without the mark, "not found" would not prove
# that nothing will be charged.
VOID_LUA = """
local ref = redis.call('GET', KEYS[1])
if ref then
  return ref
end
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[1]))
return false
"""
#: Far longer than TCP keeps retransmitting a closed connection's data (minutes).
VOID_TTL_S = 86_400


# KEYS: 1 failure counter, 2 lock, 3 lockouts so far, 4 failures today
# ARGV: 1 max_attempts, 2 lockout ms, 3 backoff factor, 4 max lockout ms, 5 lockout memory ms,
#       6 failures per day, 7 day window ms, 8 now (epoch ms)
# Returns {attempts left, lock ms (0: not locked), the lock's stored end or false}. One
# script: the counters, the escalation and the lock change together or not at all. A failure
# while the account is already locked (a prompt opened before the lock) counts nothing and
# answers the lock as stored, the same end a payment refused by that lock reports: counting
# it would start a fresh counter under the lock, offering more guesses, and an end computed
# from this server's clock would tell a wrong guess from a right one.
FAIL_LUA = """
local held = redis.call('PTTL', KEYS[2])
if held > 0 then
  return {0, held, redis.call('GET', KEYS[2])}
end
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local d = redis.call('INCR', KEYS[4])
if d == 1 or redis.call('PTTL', KEYS[4]) < 0 then
  redis.call('PEXPIRE', KEYS[4], ARGV[7])
end
local over_day = d >= tonumber(ARGV[6])
if n < tonumber(ARGV[1]) and not over_day then
  return {tonumber(ARGV[1]) - n, 0, false}
end
local k = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
local ms = tonumber(ARGV[2]) * tonumber(ARGV[3]) ^ (k - 1)
if over_day or ms > tonumber(ARGV[4]) then
  ms = tonumber(ARGV[4])
end
ms = math.floor(ms)
local stored = string.format('%.3f', (tonumber(ARGV[8]) + ms) / 1000)
redis.call('SET', KEYS[2], stored, 'PX', ms)
redis.call('DEL', KEYS[1])
return {0, ms, stored}
"""


# KEYS: 1 a key holding its holder's token. ARGV: 1 the token. Deletes the key only while
# it still holds that token: a holder whose key expired must not free the next holder's.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: 1 a gate entry claim. ARGV: 1 its holder's token, 2 ms it has left (<= 0: none).
# Cuts the claim to what is left of its entry window once its fare is written, only while
# it is still this holder's (session._store_ledger: a claim is held longer while a fare may
# be in flight).
SHORTEN_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""


@asynccontextmanager
async def held(r: Redis, key: str, ttl_ms: int) -> AsyncIterator[bool]:
    """A short lock shared by every server on ``key``: True inside when this one holds it,
    False when another does. It expires after ``ttl_ms`` should its holder die, and is
    released only by its holder (a late release never frees another server's lock)."""
    token = secrets.token_hex(8)
    if not await r.set(key, token, nx=True, px=ttl_ms):
        yield False
        return
    try:
        yield True
    finally:
        await r.eval(RELEASE_LUA, 1, key, token)


@contextmanager
def unavailable(what: str) -> Iterator[None]:
    """Turn any Redis (or socket) failure inside the block into ``StoreUnavailable``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        err = StoreUnavailable(f"redis unavailable during {what} ({type(exc).__name__})")
        err.unsent = _while_connecting(exc)
        raise err from exc


class Sent:
    """Whether a WATCH/MULTI transaction's EXEC has gone out (``unavailable_tx``)."""

    def __init__(self) -> None:
        self.exec = False


@contextmanager
def unavailable_tx(what: str, sent: Sent) -> Iterator[None]:
    """``unavailable`` for a transaction, which writes only with its EXEC: a failure before
    ``sent.exec`` is set certainly wrote nothing (``unsent``), one after it may have
    committed with only the reply lost, and says so."""
    try:
        with unavailable(what):
            yield
    except StoreUnavailable as exc:
        if not sent.exec:
            exc.unsent = True
            raise
        err = StoreUnavailable(
            f"redis failed after {what} was sent: it may have been done; look before trying again"
        )
        err.unsent = False
        raise err from exc


def _while_connecting(exc: BaseException) -> bool:
    """Whether redis-py failed before sending: no connection could be made, or none came
    free in the pool. The command then certainly never ran.

    redis-py says so only in its messages ("Error 111 connecting to host:port",
    "Timeout connecting to server", "No connection available."). That is safe only because
    the server's pool does not retry (stream_server.redis_client): with retries, a first
    attempt could have run the command before a reconnect failed. A message that changes
    reads as "maybe sent": the caller then says it cannot tell, which is true, never that
    nothing was written.
    """
    if not isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return False
    text = str(exc)
    return (text.startswith("Error ") and " connecting to " in text) or text.startswith(
        ("Timeout connecting to server", "No connection available")
    )


def new_id(kind: str, nbytes: int = 16) -> str:
    """A random id such as ``s_<22 url-safe chars>``; it says nothing about its owner."""
    return f"{kind}_{secrets.token_urlsafe(nbytes)}"


def token_sha256(token: str) -> str:
    """The hex sha256 under which a terminal token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_terminal_token() -> tuple[str, str]:
    """A new terminal token (shown once) and its sha256 (all that is stored).

    A prefix makes tokens recognisable in leaks and never starts with "-" (which command
    lines would read as an option).
    """
    token = "fpt_" + secrets.token_urlsafe(32)
    return token, token_sha256(token)


def text(value: object) -> str:
    """A Redis reply (bytes or str) as str."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8")
    return str(value)


def decode_hash(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    """HGETALL's bytes mapping as str -> str."""
    return {text(k): text(v) for k, v in (raw or {}).items()}


def has_control(value: str) -> bool:
    """True if ``value`` holds an ASCII/Unicode C0 or C1 control character."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value)


def check_account_fields(account_id: str, name: str, phone: str) -> tuple[str, str]:
    """Validate enrolment fields; returns the (name, phone) as stored. InvalidRequest."""
    check_account_id(account_id)
    name = name.strip() if isinstance(name, str) else ""
    if not 1 <= len(name) <= 100 or has_control(name):
        raise InvalidRequest("name must be 1 to 100 characters without control characters")
    # People type phone numbers with spaces, dashes, dots and brackets: keep only the digits
    # (and a leading +) so "+1 202-555-0101" and "+12025550101" are the same number.
    phone = phone.strip() if isinstance(phone, str) else ""
    phone = re.sub(r"[\s\-().]", "", phone)
    if not _PHONE.fullmatch(phone):
        raise InvalidRequest("phone must be 6 to 20 digits with an optional leading +")
    return name, phone


def check_account_id(account_id: str) -> None:
    """InvalidRequest unless 1-64 characters of ``[A-Za-z0-9_.@-]``."""
    if not isinstance(account_id, str) or not _ACCOUNT_ID.fullmatch(account_id):
        raise InvalidRequest("account id must be 1 to 64 characters of [A-Za-z0-9_.@-]")


def check_label(value: str, what: str, limit: int = 100) -> str:
    """A stripped 1..limit character label without control characters, or InvalidRequest."""
    value = value.strip() if isinstance(value, str) else ""
    if not 1 <= len(value) <= limit or has_control(value):
        raise InvalidRequest(f"{what} must be 1 to {limit} characters without control characters")
    return value


def check_payment_args(order_id: str, amount: int, currency: str, daily_limit: int) -> None:
    """InvalidRequest for a malformed order id, amount, currency or limit."""
    if not isinstance(order_id, str) or not _ORDER_ID.fullmatch(order_id):
        raise InvalidRequest("order id must be 1 to 64 characters of [A-Za-z0-9_.:-]")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidRequest("amount must be a positive integer (minor units)")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise InvalidRequest("currency must be three upper-case letters")
    if isinstance(daily_limit, bool) or not isinstance(daily_limit, int) or daily_limit < 0:
        raise InvalidRequest("daily limit must be a non-negative integer")


def audit_fields(event: str, t: float, fields: Mapping[str, str]) -> dict[str, str]:
    """The stream entry for an audit event; InvalidRequest for a secret-ish field name."""
    if not isinstance(event, str) or not event or len(event) > 64 or has_control(event):
        raise InvalidRequest("audit event must be a short name")
    entry = {"event": event, "t": repr(t)}
    for name, value in fields.items():
        lowered = name.lower()
        if lowered in RESERVED_AUDIT_FIELDS:
            raise InvalidRequest(f"audit field {name!r} is reserved")
        if any(word in lowered for word in FORBIDDEN_AUDIT_WORDS):
            raise InvalidRequest(f"audit field {name!r} could carry a secret; refused")
        if not isinstance(value, str):
            raise InvalidRequest(f"audit field {name!r} must be a string")
        if len(value) > MAX_AUDIT_VALUE:
            raise InvalidRequest(f"audit field {name!r} is longer than {MAX_AUDIT_VALUE}")
        entry[name] = value
    return entry


def by_operator(operator: str | None) -> dict[str, str]:
    """The audit field naming the operator behind a change: an admin API operator's name,
    or ``cli:`` and the name a command-line user gave (self-declared: see cli_admin)."""
    return {} if operator is None else {"operator": check_label(operator, "operator", limit=80)}


def account_from_hash(account_id: str, raw: Mapping[str, str]) -> Account:
    """An active ``Account`` from its decoded Redis hash; NotFound if gone or erased."""
    if raw.get("status") != "active":
        raise NotFound("no such account")
    return Account(account_id, raw["name"], raw["phone"], "active", float(raw["created"]))


def payment_from_hash(raw: Mapping[str, str]) -> Payment:
    """A ``Payment`` from its decoded Redis hash."""
    return Payment(
        payment_id=raw["payment_id"],
        merchant_id=raw["merchant_id"],
        order_id=raw["order_id"],
        account_id=raw["account_id"],
        terminal_id=raw["terminal_id"],
        amount=int(raw["amount"]),
        currency=raw["currency"],
        created=float(raw["created"]),
        status=raw.get("status", "captured"),
    )
