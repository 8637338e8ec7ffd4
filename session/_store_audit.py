"""Private part of ``session.store.Store``: seals that make the audit stream tamper-evident.

Redis cannot edit a stream record in place, but anyone who can write to Redis can delete
records (XDEL) or delete the whole stream and write another history under the same ids. A
seal is an audit record of its own (``audit_sealed``) holding an HMAC, under a subkey of the
template key that Redis never sees, over the records since the previous seal and over that
seal's MAC: a chain. Without the key nobody can give a changed, removed or inserted record a
matching seal; with it, :func:`verify` recomputes the chain (``facepay admin audit-verify``).

What seals cannot show: records newer than the last seal (one every ``server.audit_seal_s``),
and a tail cut off together with its seals, which looks like a stream sealed less recently.
A copy shipped to write-once storage (``GET /api/audit``) covers both.
"""

from __future__ import annotations

import json
import secrets
import time
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from session import _store_lua as h
from session.crypto import TemplateCipher

SEAL_EVENT = "audit_sealed"
#: Most records one seal covers (a sealer far behind catches up over several passes).
MAX_SEAL_RECORDS = 10_000
_LOCK_MS = 30_000
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Record = tuple[str, dict[str, str]]


def stream_records(rows: Sequence[Any] | None) -> list[Record]:
    """XRANGE rows as (id, fields) text pairs."""
    return [(h.text(rid), h.decode_hash(fields)) for rid, fields in rows or []]


@dataclass(frozen=True, slots=True)
class StreamLosses:
    """What XINFO STREAM says about records that left a stream."""

    #: The newest id XDEL removed ((0, 0): none). Trimming does not set it (Redis 7.0).
    deleted_upto: tuple[int, int]
    #: Some records are gone, trimmed or deleted: more were ever added than are kept.
    gone: bool
    #: The oldest record kept, or None for an empty stream.
    oldest: tuple[int, int] | None
    #: The last id ever added.
    last: tuple[int, int]


async def stream_losses(r: Redis, key: str) -> StreamLosses | None:
    """XINFO STREAM of ``key`` as :class:`StreamLosses`; None when there is no stream."""
    try:
        info = await r.xinfo_stream(key)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    first = info.get("first-entry")
    return StreamLosses(
        deleted_upto=h.stream_id(h.text(info.get("max-deleted-entry-id", "0-0"))),
        gone=int(info.get("entries-added", 0)) > int(info.get("length", 0)),
        oldest=h.stream_id(h.text(first[0])) if first else None,
        last=h.stream_id(h.text(info.get("last-generated-id", "0-0"))),
    )


@dataclass
class AuditCheck:
    """What :func:`verify` found. ``broken`` lists the ids of seals that do not match."""

    seals: int = 0
    verified: int = 0
    records_sealed: int = 0
    unsealed: int = 0
    #: Seals that could not be checked: made under another template key (before a
    #: rotation), or covering records the stream's cap has since trimmed.
    not_checkable: int = 0
    broken: list[str] = field(default_factory=list)


def seal_mac(cipher: TemplateCipher, prev: str, records: list[Record]) -> str:
    """The chain MAC of ``records`` after the seal whose MAC is ``prev``."""
    lines = [f"{rid}\n{json.dumps(fields, sort_keys=True, separators=(',', ':'))}\n"
             for rid, fields in records]  # fmt: skip
    return cipher.audit_mac(f"{prev}\n{''.join(lines)}".encode())


async def seal(
    r: Redis, stream: str, state: str, lock: str, cipher: TemplateCipher, maxlen: int
) -> int:
    """Seal the records since the last seal; return how many (0: none new, or another
    server holds the sealing lock)."""
    token = secrets.token_hex(8)
    if not await r.set(lock, token, nx=True, px=_LOCK_MS):
        return 0
    try:
        last = h.decode_hash(await r.hgetall(state))
        after, prev = last.get("upto", "0-0"), last.get("mac", "")
        rows = await r.xrange(stream, min=f"({after}", count=MAX_SEAL_RECORDS)
        records = [rec for rec in stream_records(rows) if rec[1].get("event") != SEAL_EVENT]
        if not records:
            return 0
        upto = records[-1][0]
        mac = seal_mac(cipher, prev, records)
        fields = {
            "after": after,
            "upto": upto,
            "count": str(len(records)),
            "prev": prev,
            "mac": mac,
            "key": cipher.audit_key_id,
        }
        async with r.pipeline(transaction=True) as pipe:
            entry = h.audit_fields(SEAL_EVENT, time.time(), fields)
            pipe.xadd(stream, entry, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.hset(state, mapping={"upto": upto, "mac": mac})
            await pipe.execute()
        return len(records)
    finally:
        await r.eval(_RELEASE_LUA, 1, lock, token)


async def verify(r: Redis, stream: str, cipher: TemplateCipher) -> AuditCheck:
    """Recompute every seal the stream still holds (reads the whole stream, in pages)."""
    rows: list[Record] = []
    start = "-"
    while page := await r.xrange(stream, min=start, count=MAX_SEAL_RECORDS):
        rows += stream_records(page)
        start = f"({rows[-1][0]}"
    data = [rec for rec in rows if rec[1].get("event") != SEAL_EVENT]
    ids = [h.stream_id(rid) for rid, _ in data]
    # Trimmed by the cap, with no XDEL among the losses (a deletion must fail its seal).
    loss = await stream_losses(r, stream) if rows else None
    trimmed = loss is not None and loss.gone and loss.deleted_upto == (0, 0)
    check = AuditCheck()
    previous: dict[str, str] | None = None
    upto = (0, 0)
    for seal_id, s in (rec for rec in rows if rec[1].get("event") == SEAL_EVENT):
        check.seals += 1
        after, upto = h.stream_id(s.get("after", "0-0")), h.stream_id(s.get("upto", "0-0"))
        covered = data[bisect_right(ids, after) : bisect_right(ids, upto)]
        linked = previous is None or (
            s.get("prev") == previous.get("mac") and s.get("after") == previous.get("upto")
        )
        if s.get("key") != cipher.audit_key_id or (trimmed and ids and after < ids[0]):
            check.not_checkable += 1
        elif not linked or seal_mac(cipher, s.get("prev", ""), covered) != s.get("mac"):
            check.broken.append(seal_id)
        else:
            check.verified += 1
            check.records_sealed += len(covered)
        previous = s
    check.unsealed = len(data) - bisect_left(ids, (upto[0], upto[1] + 1))
    return check
