"""Amounts: plain ASCII decimals with at most two places; money is never guessed."""

from __future__ import annotations

import pytest

from pipeline.errors import InvalidRequest
from session.models import parse_amount


@pytest.mark.parametrize(
    ("value", "minor"), [("12.50", 1250), ("12", 1200), (12.5, 1250), (7, 700), (" 0.01 ", 1)]
)
def test_plain_decimals_are_read_exactly(value: object, minor: int) -> None:
    assert parse_amount(value) == minor


@pytest.mark.parametrize(
    "value",
    [
        "１２",  # full-width digits: Decimal() would read them as 12
        "١٢",  # Arabic-Indic digits
        "1e3",
        "1_000",
        "+5",
        "-1",
        "0",
        "0.00",
        "12.505",
        "nan",
        "Infinity",
        "",
        0.30000000000000004,
        True,
        None,
        "99999999999999",
    ],
)
def test_anything_else_is_refused(value: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_amount(value)
