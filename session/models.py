"""Value types of the payment domain (frozen dataclasses; no biometric data in any of them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

TerminalMode = Literal["checkout", "gate", "enroll"]


@dataclass(frozen=True, slots=True)
class Merchant:
    """A shop or a transit operator."""

    merchant_id: str
    name: str
    created: float


@dataclass(frozen=True, slots=True)
class Terminal:
    """A kiosk, gate or enrolment station of one merchant. Its token is stored hashed."""

    terminal_id: str
    merchant_id: str
    mode: TerminalMode
    created: float
    status: str = "active"


@dataclass(frozen=True, slots=True)
class Account:
    """An enrolled shopper. ``status`` is ``active`` or ``erased``."""

    account_id: str
    name: str
    phone: str
    status: str
    created: float

    @property
    def phone_last4(self) -> str:
        """Last four digits of the phone number (narrows ambiguous searches)."""
        digits = "".join(c for c in self.phone if c.isdigit())
        return digits[-4:]

    @property
    def masked_name(self) -> str:
        """The name as a terminal may show it: first character, then asterisks."""
        return mask_name(self.name)


@dataclass(frozen=True, slots=True)
class Payment:
    """One captured payment: unique per (merchant, order id)."""

    payment_id: str
    merchant_id: str
    order_id: str
    account_id: str
    terminal_id: str
    amount: int
    currency: str
    created: float
    status: str = "captured"

    def to_json(self) -> dict[str, object]:
        """JSON-ready view (amount in minor units and as a decimal string)."""
        return {
            "payment_id": self.payment_id,
            "merchant_id": self.merchant_id,
            "order_id": self.order_id,
            "account_id": self.account_id,
            "terminal_id": self.terminal_id,
            "amount_minor": self.amount,
            "amount": format_amount(self.amount),
            "currency": self.currency,
            "created": self.created,
            "status": self.status,
        }


def mask_name(name: str) -> str:
    """``"Barack Obama"`` -> ``"B***********"``: enough to recognise, not to read aloud."""
    name = name.strip()
    if not name:
        return "*"
    return name[0] + "*" * max(1, len(name) - 1)


def format_amount(minor: int) -> str:
    """Minor units to a decimal string with two places: 1250 -> "12.50"."""
    sign = "-" if minor < 0 else ""
    minor = abs(minor)
    return f"{sign}{minor // 100}.{minor % 100:02d}"


_AMOUNT = re.compile(r"[0-9]{1,13}(\.[0-9]{1,2})?", re.ASCII)


def parse_amount(value: object) -> int:
    """A decimal amount ("12.50", 12.5, 12) in minor units; InvalidRequest if malformed.

    Floats are read through their shortest decimal repr, so 0.1 + 0.2 style noise is refused
    rather than rounded: money is never guessed.
    """
    from decimal import Decimal, InvalidOperation

    from pipeline.errors import InvalidRequest

    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRequest("amount must be a decimal string or number")
    text = repr(value) if isinstance(value, float) else str(value).strip()
    # Plain ASCII decimals only: Decimal() also reads full-width and other Unicode digits
    # ("１２"), exponents and underscores, none of which a till should send or a person see.
    if not _AMOUNT.fullmatch(text):
        raise InvalidRequest(f"amount {text[:20]!r} is not a plain decimal like 12.50")
    try:
        dec = Decimal(text)
    except InvalidOperation as exc:
        raise InvalidRequest(f"amount {text[:20]!r} is not a number") from exc
    if not dec.is_finite() or dec <= 0:
        raise InvalidRequest("amount must be positive")
    minor = dec * 100
    if minor != minor.to_integral_value():
        raise InvalidRequest("amount has more than two decimals")
    if minor > 10**12:
        raise InvalidRequest("amount is too large")
    return int(minor)


@dataclass(frozen=True, slots=True)
class AuditPage:
    """Audit records read after a cursor, oldest first, each as (stream id, fields).

    ``missed`` is True when records after the cursor may have left the stream before this
    read: deleted, or trimmed (the stream is capped) while the cursor is older than the
    oldest record kept. A copy built from these pages may then have a gap there. Redis
    trims whole nodes of ~100 records, so a cursor that was the last record of a trimmed
    node is flagged although nothing after it was lost: the reader was that far behind.
    """

    records: list[tuple[str, dict[str, str]]]
    missed: bool


@dataclass(frozen=True)
class CheckoutRequest:
    """What a checkout terminal asked for: an order to pay at a merchant."""

    merchant_id: str
    terminal_id: str
    order_id: str
    amount: int
    currency: str
    #: The sha256 of the token the terminal's socket said hello with ("": not checked): the
    #: payment script refuses it once the terminal's token was rotated.
    token_sha256: str = ""
