"""Check a copy of the audit stream, as ``facepay admin audit`` ships it, without Redis.

The copy on write-once storage is what covers the seals' blind spots (a tail cut off with
its seals, a history rewritten while every server was stopped), so it must be checkable on
its own: ``facepay admin audit-verify --file COPY`` recomputes the seals it holds with the
same code that checks the live stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from pipeline.errors import InvalidRequest
from session import _store_audit as _audit
from session import _store_lua as h
from session.crypto import AuditSealKey

#: What a check found (seals verified, broken, restarted, ...), for the live stream or a copy.
AuditCheck = _audit.AuditCheck


def parse_copy(lines: Iterable[str]) -> list[_audit.Record]:
    """Records from JSON lines ``{"id": ..., field: text, ...}``, checked to be in id order;
    InvalidRequest names the first line that is not one."""
    rows: list[_audit.Record] = []
    last = (-1, -1)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise InvalidRequest(f"line {number}: not JSON") from None
        rid = obj.pop("id", None) if isinstance(obj, dict) else None
        if not isinstance(rid, str) or not h.AUDIT_ID.fullmatch(rid):
            raise InvalidRequest(f"line {number}: no record id")
        if not all(isinstance(v, str) for v in obj.values()):
            raise InvalidRequest(f"line {number}: every field of a record is text")
        if h.stream_id(rid) <= last:
            raise InvalidRequest(f"line {number}: record ids must increase")
        last = h.stream_id(rid)
        rows.append((rid, obj))
    return rows


def check_copy(rows: Sequence[_audit.Record], keys: Sequence[AuditSealKey]) -> AuditCheck:
    """The seals of a copy recomputed with ``keys``. A copy may start at any cursor, so a
    seal that reaches before its first record counts as not checkable."""
    return _audit.check_chain(rows, keys, head_missing=True)


#: Most differing record ids a comparison lists (the count is always complete).
MAX_LISTED = 100


def diverged(copy: Sequence[_audit.Record], live: Sequence[_audit.Record]) -> tuple[int, list[str]]:
    """Where a copy and the live stream disagree, over the ids both could hold: from the
    later of their first records (older live records may be trimmed, and a copy may start
    at a cursor) to the earlier of their last (each may have been read before the other).

    Returns how many ids differ and the first :data:`MAX_LISTED` of them: a record changed
    (same id, other fields), missing from one side, or inserted into the other. A history
    rewritten while every server was stopped seals cleanly, and only shows here.
    """
    if not copy or not live:
        return 0, []
    start = max(h.stream_id(copy[0][0]), h.stream_id(live[0][0]))
    end = min(h.stream_id(copy[-1][0]), h.stream_id(live[-1][0]))

    def window(rows: Sequence[_audit.Record]) -> dict[str, dict[str, str]]:
        return {rid: f for rid, f in rows if start <= h.stream_id(rid) <= end}

    mine, theirs = window(copy), window(live)
    differing = sorted(
        (rid for rid in mine.keys() | theirs.keys() if mine.get(rid) != theirs.get(rid)),
        key=h.stream_id,
    )
    return len(differing), differing[:MAX_LISTED]
