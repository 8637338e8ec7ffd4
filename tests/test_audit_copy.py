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
    assert diverged(copy, live) == (0, [])
    assert diverged(_rows(6, 7), live) == (0, [])  # a copy from a cursor
    assert diverged(copy, _rows(5, 6, 7, 8, 9, changed=6)) == (1, ["6-0"])
    assert diverged(copy, _rows(5, 7, 8)) == (1, ["6-0"])  # removed from the live stream
    assert diverged(_rows(5, 7), live) == (1, ["6-0"])  # inserted (or missing from the copy)
    assert diverged([], live) == (0, []) and diverged(copy, []) == (0, [])


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
