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
from dataclasses import dataclass, field

from redis.asyncio import Redis

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
        records = [(h.text(i), h.decode_hash(f)) for i, f in rows or []]
        records = [rec for rec in records if rec[1].get("event") != SEAL_EVENT]
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
        rows += [(h.text(i), h.decode_hash(f)) for i, f in page]
        start = f"({rows[-1][0]}"
    data = [rec for rec in rows if rec[1].get("event") != SEAL_EVENT]
    ids = [h.stream_id(rid) for rid, _ in data]
    trimmed = bool(rows) and await _trimmed(r, stream)
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


async def _trimmed(r: Redis, stream: str) -> bool:
    """Whether the stream's cap has dropped records (and nobody XDEL'd any)."""
    info = await r.xinfo_stream(stream)
    if h.stream_id(h.text(info.get("max-deleted-entry-id", "0-0"))) != (0, 0):
        return False  # a deletion: let the seals over it fail
    return int(info.get("entries-added", 0)) > int(info.get("length", 0))
