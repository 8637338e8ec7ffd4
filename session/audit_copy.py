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
#: What each of its ``state_fault`` values says.
STATE_FAULTS = _audit.STATE_FAULTS


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
    seal that reaches before its first record counts as not checkable. The age of its
    oldest unsealed record (``oldest_unsealed_s``) is counted to the copy's newest record,
    not to now: a copy ends where it was read, but a record older than its end by more than
    a few seal intervals would have been sealed before the end, in the copy."""
    end = h.stream_id(rows[-1][0])[0] / 1000 if rows else None
    return _audit.check_chain(rows, keys, head_missing=True, now=end)


#: Most differing record ids a comparison lists (the count is always complete).
MAX_LISTED = 100


def diverged(
    copy: Sequence[_audit.Record],
    live: Sequence[_audit.Record],
    *,
    head_trimmed: bool,
    deleted_upto: tuple[int, int] = (0, 0),
) -> tuple[int, list[str]]:
    """Where a copy and the live stream disagree, over the copy's ids: from its first record
    (it may start at a cursor; older live records are not compared) to its last. The copy
    is read before the live stream, and trimming cuts only the head, so a copy record
    missing from the live stream or different there, or a live record in that range missing
    from the copy, is divergence; live records newer than the copy's last were written
    since. One exception: copy records older than the live stream's first, when its head
    can have been trimmed by the cap (``head_trimmed``, ``_store_audit.trimmed_by_cap``)
    and they are newer than the newest record XDEL removed (``deleted_upto``). A copy is
    never excused against an empty or missing live stream: the cap keeps records.

    Returns how many ids differ and the first :data:`MAX_LISTED` of them: a record changed
    (same id, other fields), missing from one side, or inserted into the other. A history
    rewritten while every server was stopped seals cleanly, and only shows here.
    """
    if not copy:
        return 0, []
    start, end = h.stream_id(copy[0][0]), h.stream_id(copy[-1][0])
    live_first = h.stream_id(live[0][0]) if live else None

    def trimmed(rid: str) -> bool:
        at = h.stream_id(rid)
        return head_trimmed and live_first is not None and deleted_upto < at < live_first

    theirs = {rid: f for rid, f in live if start <= h.stream_id(rid) <= end}
    mine = {rid: f for rid, f in copy if rid in theirs or not trimmed(rid)}
    differing = sorted(
        (rid for rid in mine.keys() | theirs.keys() if mine.get(rid) != theirs.get(rid)),
        key=h.stream_id,
    )
    return len(differing), differing[:MAX_LISTED]
