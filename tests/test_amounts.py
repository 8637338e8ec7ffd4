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


@pytest.mark.parametrize("currency", ["JPY", "KRW", "KWD", "BHD", "CLF", "XAU"])
def test_a_currency_without_two_decimals_is_refused_by_the_config(currency: str) -> None:
    """Amounts are kept in hundredths: with a currency of 0, 3 or 4 decimals every
    ``amount_minor`` would be wrong 10 or 100 times over, so the config refuses it."""
    from pydantic import ValidationError

    from pipeline.errors import ConfigError
    from session.config import PolicyConfig, load_config

    with pytest.raises(ValidationError, match="supports only currencies with two decimals"):
        PolicyConfig(currency=currency)
    with pytest.raises(ConfigError, match=f"{currency} has"):  # as a server reads it
        load_config(policy={"currency": currency})


@pytest.mark.parametrize("currency", ["CNY", "EUR", "USD"])
def test_two_decimal_currencies_are_accepted(currency: str) -> None:
    from session.config import load_config

    assert load_config(policy={"currency": currency}).policy.currency == currency
