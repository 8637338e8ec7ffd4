"""The copy comparison on its own: only ids both sides could hold are compared."""

from __future__ import annotations

import pytest

from pipeline.errors import InvalidRequest
from session.audit_copy import diverged, parse_copy


def _rows(*ids: int, changed: int | None = None) -> list[tuple[str, dict[str, str]]]:
    return [(f"{i}-0", {"event": "login", "n": "x" if i == changed else str(i)}) for i in ids]


def test_only_the_overlap_is_compared() -> None:
    live = _rows(5, 6, 7, 8, 9)  # older records trimmed, newer ones written since the copy
    copy = _rows(1, 2, 3, 4, 5, 6, 7)  # read earlier, from the start
    trimmed = {"head_trimmed": True}  # the live stream is long enough for the cap to trim
    assert diverged(copy, live, **trimmed) == (0, [])
    assert diverged(_rows(6, 7), live, **trimmed) == (0, [])  # a copy from a cursor
    assert diverged(_rows(6, 7), live, head_trimmed=False) == (0, [])
    assert diverged(copy, _rows(5, 6, 7, 8, 9, changed=6), **trimmed) == (1, ["6-0"])
    assert diverged(copy, _rows(5, 7, 8), **trimmed) == (1, ["6-0"])  # removed from the live
    assert diverged(_rows(5, 7), live, **trimmed) == (1, ["6-0"])  # inserted (or not copied)
    assert diverged([], live, **trimmed) == (0, [])  # an empty copy holds nothing to compare
    # A copy is compared up to its own last record: live records newer than it were written
    # since, but the copy's newest records missing from the live stream (cut off, with or
    # without their seals) diverge, and against an empty or missing stream every record does.
    assert diverged(copy, _rows(5, 6), **trimmed) == (1, ["7-0"])
    assert diverged(copy, _rows(5, 6, 10), **trimmed) == (1, ["7-0"])  # newer written since
    assert diverged(copy, [], **trimmed) == (7, [f"{i}-0" for i in range(1, 8)])
    assert diverged(copy, [], head_trimmed=False)[0] == 7
    # Records missing from the live head count as trimmed only while the cap can have
    # trimmed it, and only those newer than the newest record XDEL removed.
    assert diverged(copy, live, head_trimmed=False) == (4, ["1-0", "2-0", "3-0", "4-0"])
    assert diverged(copy, live, head_trimmed=True, deleted_upto=(2, 0)) == (2, ["1-0", "2-0"])


def test_a_copy_must_be_records_in_id_order() -> None:
    assert parse_copy(['{"id": "1-0", "event": "login"}', "", '{"id": "2-0", "event": "x"}']) == [
        ("1-0", {"event": "login"}),
        ("2-0", {"event": "x"}),
    ]
    for lines, what in (
        (["[1]"], "no record id"),
        (['{"id": "1-0", "n": 5}'], "text"),
        (['{"id": "2-0"}', '{"id": "1-0"}'], "increase"),
        (['{"id": "2-0"}', '{"id": "2-0"}'], "increase"),
        (["{"], "not JSON"),
    ):
        with pytest.raises(InvalidRequest, match=what):
            parse_copy(lines)
