"""Private part of ``session.store.Store``: seals that make the audit stream tamper-evident.

Redis cannot edit a stream record in place, but anyone who can write to Redis can delete
records (XDEL) or delete the whole stream and write another history under the same ids. A
seal is an audit record of its own (``audit_sealed``) holding an HMAC, under a subkey of the
template key that Redis never sees, over the records since the previous seal and over that
seal's MAC: a chain. Without the key nobody can give a changed, removed or inserted record a
matching seal; with it, :func:`verify` recomputes the chain (``facepay admin audit-verify``).

The chain's state (the last seal's ``upto`` and ``mac``) is kept in Redis, where the same
writer could reset it so that the next seal starts a fresh chain over a rewritten history.
The sealer therefore checks that the state names a seal that is in the stream and is not
behind what this server saw last (:class:`Anchor`). When it is not, the sealer does not stop
(new records still need seals): it writes a *restart* seal, which :func:`verify` reports and
``audit-verify`` fails on.

A tail cut off together with its seals looks, to the seals alone, like a stream sealed less
recently; :func:`verify` still catches it when it was cut with XDEL (Redis records the newest
id deleted, and FacePay never deletes one) or when the chain state still names the newest
seal. What it cannot show: records newer than the last seal (one every
``server.audit_seal_s``; a server seals once more when it stops), and a stream written anew
without its tail, its counters forged and the chain state pointed at the newest seal kept. A
copy shipped to write-once storage (``GET /api/audit``) covers those, and a history
rewritten while every server was stopped.
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from session import _store_lua as h
from session.crypto import AuditSealKey

log = logging.getLogger(__name__)

SEAL_EVENT = "audit_sealed"
#: Most records one seal covers (a sealer far behind catches up over several passes).
MAX_SEAL_RECORDS = 10_000
_LOCK_MS = 30_000

#: The seal and the chain state in one step; the state names the seal's id.
_APPEND_LUA = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
redis.call('HSET', KEYS[2], 'upto', ARGV[2], 'mac', ARGV[3], 'seal', id)
return id
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
    #: How many records the stream holds now.
    length: int = 0


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
        length=int(info.get("length", 0)),
    )


@dataclass
class AuditCheck:
    """What :func:`verify` found. ``broken`` lists the ids of seals that do not match."""

    seals: int = 0
    verified: int = 0
    records_sealed: int = 0
    unsealed: int = 0
    #: Age in seconds of the oldest record no seal covers yet (None: every record is sealed).
    oldest_unsealed_s: float | None = None
    #: Seals whose records the stream's cap has since trimmed: nothing left to check.
    not_checkable: int = 0
    #: Seals made under a template key that was not given (before a rotation).
    unknown_key: int = 0
    broken: list[str] = field(default_factory=list)
    #: Restart seals: a sealer found the chain's state reset or altered and began anew.
    restarts: list[str] = field(default_factory=list)
    #: The live stream only. The newest id deleted with XDEL (Redis's max-deleted-entry-id;
    #: trimming does not set it), which FacePay never does: None when none was.
    deleted_upto: str | None = None
    #: The live stream only. What is wrong with the chain's state (:func:`state_fault`).
    state_fault: str | None = None


@dataclass
class Anchor:
    """The newest chain state one server has seen, so that it notices the state going back."""

    upto: tuple[int, int] = (0, 0)
    mac: str = ""
    #: Restart seals written by this server.
    restarts: int = 0


def seal_mac(key: AuditSealKey, prev: str, records: list[Record]) -> str:
    """The chain MAC of ``records`` after the seal whose MAC is ``prev``."""
    lines = [f"{rid}\n{json.dumps(fields, sort_keys=True, separators=(',', ':'))}\n"
             for rid, fields in records]  # fmt: skip
    return key.mac(f"{prev}\n{''.join(lines)}".encode())


async def _chain_fault(
    r: Redis, stream: str, last: dict[str, str], records: list[Record], anchor: Anchor
) -> str | None:
    """Why the chain state ``last`` cannot be continued, or None when it can."""
    after, mac = last.get("upto", "0-0"), last.get("mac", "")
    at = h.stream_id(after)
    if at < anchor.upto or (at == anchor.upto and mac != anchor.mac):
        return "state_behind"  # this server saw a newer seal than the state names
    if after == "0-0":
        # A state that was never written: no seal may exist yet.
        return "state_reset" if any(f.get("event") == SEAL_EVENT for _, f in records) else None
    seal_id = last.get("seal")
    if seal_id is None:
        return None  # a state written before seals recorded their own id
    named = stream_records(await r.xrange(stream, min=seal_id, max=seal_id))
    if not named or named[0][1].get("upto") != after or named[0][1].get("mac") != mac:
        return "state_mismatch"  # the seal the state names is gone or says otherwise
    return None


async def seal(
    r: Redis,
    names: tuple[str, str, str],
    key: AuditSealKey,
    maxlen: int,
    anchor: Anchor,
) -> int:
    """Seal the records since the last seal; return how many (0: none new, or another
    server holds the sealing lock). ``names``: the stream, the chain state and the lock."""
    stream, state, lock = names
    async with h.held(r, lock, _LOCK_MS) as mine:
        return await _seal_held(r, stream, state, key, maxlen, anchor) if mine else 0


async def _seal_held(
    r: Redis, stream: str, state: str, key: AuditSealKey, maxlen: int, anchor: Anchor
) -> int:
    last = h.decode_hash(await r.hgetall(state))
    after, prev = last.get("upto", "0-0"), last.get("mac", "")
    rows = stream_records(await r.xrange(stream, min=f"({after}", count=MAX_SEAL_RECORDS))
    fault = await _chain_fault(r, stream, last, rows, anchor)
    if fault is None:
        anchor.upto, anchor.mac = h.stream_id(after), prev
    else:
        # The state cannot be trusted, not even where it points: start after the newest
        # seal the stream holds (or from the start), so every record gets a seal again.
        after, prev = await _after_newest_seal(r, stream), ""
        rows = stream_records(await r.xrange(stream, min=f"({after}", count=MAX_SEAL_RECORDS))
    records = [rec for rec in rows if rec[1].get("event") != SEAL_EVENT]
    if not records:
        return 0
    fields = {"after": after, "upto": records[-1][0], "count": str(len(records))}
    if fault is not None:
        log.error("audit chain state %s: starting a new chain with a restart seal", fault)
        fields |= {"restart": fault}
        anchor.restarts += 1
    mac = seal_mac(key, prev, records)
    fields |= {"prev": prev, "mac": mac, "key": key.key_id}
    entry = h.audit_fields(SEAL_EVENT, time.time(), fields)
    flat = [part for pair in entry.items() for part in pair]
    await r.eval(_APPEND_LUA, 2, stream, state, maxlen, fields["upto"], mac, *flat)
    anchor.upto, anchor.mac = h.stream_id(fields["upto"]), mac
    return len(records)


async def _after_newest_seal(r: Redis, stream: str) -> str:
    """The ``upto`` of the newest seal among the last MAX_SEAL_RECORDS records, else "0-0"."""
    start, seen = "+", 0
    while seen < MAX_SEAL_RECORDS and (page := await r.xrevrange(stream, max=start, count=500)):
        for _, fields in stream_records(page):
            if fields.get("event") == SEAL_EVENT:
                return fields.get("upto", "0-0")
        seen += len(page)
        start = f"({h.text(page[-1][0])}"
    return "0-0"


def _named_key(s: dict[str, str], keys: Sequence[AuditSealKey]) -> AuditSealKey | None:
    return next((k for k in keys if k.key_id == s.get("key")), None)


async def read_all(r: Redis, stream: str) -> list[Record]:
    """Every record ``stream`` holds, oldest first, read in pages."""
    rows: list[Record] = []
    start = "-"
    while page := await r.xrange(stream, min=start, count=MAX_SEAL_RECORDS):
        rows += stream_records(page)
        start = f"({rows[-1][0]}"
    return rows


@dataclass(frozen=True, slots=True)
class LiveAudit:
    """The live stream as read: its records, and whether records missing from its head can
    have been trimmed by the cap (:func:`trimmed_by_cap`)."""

    rows: list[Record]
    #: What XINFO STREAM said, read after the records; None when there is no stream.
    losses: StreamLosses | None
    head_trimmed: bool

    @property
    def deleted_upto(self) -> tuple[int, int]:
        """The newest id XDEL removed ((0, 0): none, or no stream)."""
        return self.losses.deleted_upto if self.losses is not None else (0, 0)


async def read_live(r: Redis, stream: str, maxlen: int) -> LiveAudit:
    """Every record ``stream`` holds and what Redis says left it; ``maxlen``: its cap."""
    rows = await read_all(r, stream)
    loss = await stream_losses(r, stream)
    return LiveAudit(rows, loss, loss is not None and trimmed_by_cap(loss, maxlen))


async def verify(
    r: Redis,
    names: tuple[str, str],
    keys: Sequence[AuditSealKey],
    *,
    maxlen: int,
    now: float | None = None,
) -> AuditCheck:
    """Recompute every seal the stream still holds (reads the whole stream, in pages), each
    with the one of ``keys`` (the current template key's, then retired ones) it names, and
    check what Redis says about the stream against the chain's state. ``names``: the stream
    and the chain state. ``maxlen``: the stream's cap (``server.audit_max_records``), which
    decides whether records missing from its head can have been trimmed (:func:`trimmed_by_cap`)."""
    stream, state = names
    # The state first: it is written with its seal in one step, so a seal written while the
    # stream is read is named only by a later state, and the state read names a seal that
    # the stream read afterwards holds, unless someone removed it.
    chain = h.decode_hash(await r.hgetall(state))
    live = await read_live(r, stream, maxlen)
    deleted = live.deleted_upto if live.head_trimmed else (0, 0)
    check = check_chain(
        live.rows, keys, head_missing=live.head_trimmed, deleted_upto=deleted, now=now
    )
    if live.deleted_upto != (0, 0):
        check.deleted_upto = "{}-{}".format(*live.deleted_upto)
    check.state_fault = state_fault(chain, live)
    return check


#: What each :func:`state_fault` says, for messages.
STATE_FAULTS = {
    "stream_missing": "the stream is gone (deleted or renamed) while its chain state remains",
    "seal_missing": "the newest seal the chain state names is gone: the newest records were "
    "cut off with their seals",
    "seal_mismatch": "the seal the chain state names says otherwise: the state or the seal "
    "was altered",
}


def state_fault(chain: dict[str, str], live: LiveAudit) -> str | None:
    """What is wrong with the chain's state ``chain`` (the last seal's ``upto``, ``mac`` and
    id, ``seal``) given the stream read after it, or None: ``stream_missing`` (a state but no
    stream: the stream was deleted or renamed), ``seal_missing`` (the newest seal it names
    is gone, and not with a head the cap trimmed: the tail was cut with its seals) or
    ``seal_mismatch`` (that seal says otherwise). A state written before seals recorded
    their own id cannot be checked so."""
    if not chain:
        return None  # never sealed (a state removed since gives the next seal a restart)
    if live.losses is None:
        return "stream_missing"
    seal_id = chain.get("seal")
    if seal_id is None:
        return None
    named = next((f for rid, f in live.rows if rid == seal_id), None)
    if named is None:
        trimmed = live.head_trimmed and h.AUDIT_ID.fullmatch(seal_id) is not None
        if trimmed and (not live.rows or h.stream_id(seal_id) < h.stream_id(live.rows[0][0])):
            return None  # trimmed with the head (records came after it faster than seals)
        return "seal_missing"
    if named.get("upto") != chain.get("upto") or named.get("mac") != chain.get("mac"):
        return "seal_mismatch"
    return None


def trimmed_by_cap(loss: StreamLosses, maxlen: int) -> bool:
    """Whether the records missing from a stream can have been trimmed by its cap.

    Every writer trims approximately (``XADD MAXLEN ~ maxlen``): Redis then drops whole
    nodes from the head, and only while the records left still number at least ``maxlen``
    ("never less", as XADD's documentation puts it; a scratch run over caps of 1 to 1,000
    and records of 5 to 2,000 bytes never saw fewer). So a stream the cap has trimmed holds
    at least ``maxlen`` records, and keeps that many: it only grows afterwards, save for
    XDEL, which Redis records apart (``deleted_upto``). No slack of a node is needed,
    because approximate trimming leaves more than the cap, never less. A shorter stream
    that lost records lost them another way (XDEL, XTRIM, or a history rewritten under
    the same ids with XSETID forging the counters to look trimmed): none of its seals is
    excused. A cap raised since the trim makes the old trimmed head look broken until the
    stream reaches the new cap (security.md says what to do)."""
    return loss.gone and loss.length >= maxlen


def check_chain(
    rows: Sequence[Record],
    keys: Sequence[AuditSealKey],
    *,
    head_missing: bool,
    deleted_upto: tuple[int, int] = (0, 0),
    now: float | None = None,
) -> AuditCheck:
    """Recompute the seals among ``rows`` (audit records in id order, seals included): a
    live stream, or a copy shipped with ``facepay admin audit``. ``head_missing``: records
    older than the first row may exist (trimmed by the cap, or a copy that starts at a
    cursor), so a seal that reaches before it cannot be checked, unless a record was
    deleted (XDEL) in its range or after it (``deleted_upto``, the newest deleted id): then
    its missing records may have been deleted rather than trimmed, and it must match.
    Without ``head_missing`` nothing older can have gone, so every seal must match and the
    oldest (other than a restart seal) must start the chain."""
    data = [rec for rec in rows if rec[1].get("event") != SEAL_EVENT]
    ids = [h.stream_id(rid) for rid, _ in data]
    check = AuditCheck()
    previous: dict[str, str] | None = None
    upto = (0, 0)
    for seal_id, s in (rec for rec in rows if rec[1].get("event") == SEAL_EVENT):
        check.seals += 1
        after, upto = h.stream_id(s.get("after", "0-0")), h.stream_id(s.get("upto", "0-0"))
        covered = data[bisect_right(ids, after) : bisect_right(ids, upto)]
        if "restart" in s:
            check.restarts.append(seal_id)
            linked = s.get("prev") == ""
        elif previous is None:
            # The oldest seal kept starts the chain, unless the head went: then the records
            # before it went with the seal that covered them (the cap trims from the start),
            # or else that seal was deleted.
            linked = after == (0, 0) or (head_missing and (not ids or after < ids[0]))
        else:
            linked = s.get("prev") == previous.get("mac") and s.get("after") == previous.get("upto")
        key = _named_key(s, keys)
        went_before = head_missing and ids and after < ids[0] and deleted_upto <= after
        if went_before and str(len(covered)) != s.get("count"):
            check.not_checkable += 1  # some of its records went before the first one kept
        elif key is None:
            check.unknown_key += 1
        elif not linked or seal_mac(key, s.get("prev", ""), covered) != s.get("mac"):
            check.broken.append(seal_id)
        else:
            check.verified += 1
            check.records_sealed += len(covered)
        previous = s
    first_unsealed = bisect_left(ids, (upto[0], upto[1] + 1))
    check.unsealed = len(data) - first_unsealed
    if check.unsealed:
        at_ms = ids[first_unsealed][0]
        check.oldest_unsealed_s = max(0.0, (now if now is not None else time.time()) - at_ms / 1000)
    return check
