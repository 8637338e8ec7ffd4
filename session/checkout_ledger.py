"""The checkout's payment write, and the decline each refusal or failure stands for.

Kept apart from the session's state machine: this is the one step that moves money, and
what it may tell the till after a failure (docs/faults.md) is the subtle part.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pipeline.errors import (
    AccountLocked,
    AuthError,
    Conflict,
    Forbidden,
    LimitExceeded,
    NotFound,
    PaymentConflict,
    StoreUnavailable,
)
from session.models import Account, CheckoutRequest, Payment
from session.store import Store

log = logging.getLogger(__name__)


class Refused(Exception):
    """The payment was not taken: decline with ``reason`` (and the ``extra`` event fields)."""

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.extra = extra


async def checked(check: asyncio.Future[bool], bound_s: float, session_id: str) -> bool:
    """The passphrase check's result; Refused ``unavailable`` if it takes over ``bound_s``.

    argon2 takes tens of milliseconds; an executor so overloaded (or stuck) that the check
    outlasts a whole prompt's lifetime must give the terminal an answer, and that answer
    is a decline: nothing was charged and no failure is counted against the account.
    """
    try:
        return await asyncio.wait_for(asyncio.shield(check), bound_s)
    except TimeoutError:
        check.add_done_callback(lambda f: f.cancelled() or f.exception())
        log.warning("checkout %s: passphrase check took over %.0f s", session_id, bound_s)
        raise Refused("unavailable") from None
    except asyncio.CancelledError:
        check.cancel()
        raise


async def write_payment(
    store: Store, req: CheckoutRequest, account: Account, daily_limit: int
) -> Payment:
    """Write the checkout's payment; Refused with the decline reason when it was not taken.

    The ledger script checks the order, the terminal, the account's lock and status and the
    daily limit in the same step as the write: a prompt stays open for up to half a minute,
    and a revocation, lockout or erasure meanwhile (through any server) must still stop it,
    as must a new enrolment under the erased account's id (``account.created``). The payment
    id is chosen first, so a write whose reply was lost can be looked up.
    """
    payment_id = store.new_payment_id()
    try:
        return await store.create_payment(
            merchant_id=req.merchant_id,
            order_id=req.order_id,
            account_id=account.account_id,
            terminal_id=req.terminal_id,
            amount=req.amount,
            currency=req.currency,
            daily_limit=daily_limit,
            payment_id=payment_id,
            account_created=account.created,
            terminal_token_sha256=req.token_sha256 or None,
        )
    except StoreUnavailable as exc:
        if exc.unsent:  # never reached Redis: certainly nothing was written
            raise Refused("unavailable") from exc
        return await _written_after_all(store, req, payment_id)
    except PaymentConflict as exc:
        # Paid meanwhile by another session (a till that retried the order on a new
        # connection while this write was in flight): the till must learn which payment
        # settled the order (docs/protocol.md), as when the order was paid before the scan.
        raise Refused("duplicate_order", payment_id=exc.payment_id) from exc
    except Conflict as exc:
        raise Refused("duplicate_order") from exc
    except LimitExceeded as exc:
        raise Refused("limit") from exc
    except AccountLocked as exc:
        # Locked by wrong passphrases at another prompt while this one was open.
        until = {} if exc.until is None else {"locked_until": exc.until}
        raise Refused("locked", **until) from exc
    except NotFound as exc:
        # Erased while the prompt was open: as if never enrolled.
        raise Refused("no_match") from exc
    except AuthError as exc:
        # This terminal was revoked after its hello (through any server).
        raise Refused("terminal_revoked") from exc
    except Forbidden as exc:
        # The terminal's record does not allow this payment (another merchant's, or an
        # enrolment terminal): the session took both from that record, so this is a bug or
        # a tampered record. The till can only treat the terminal as out of service.
        log.error("checkout for order %s refused by the ledger: %s", req.order_id, exc)
        raise Refused("terminal_revoked") from exc


async def _written_after_all(store: Store, req: CheckoutRequest, payment_id: str) -> Payment:
    """After the write failed with Redis unreachable: the payment if it was written after all
    (only its reply was lost: approve, the shopper has paid). ``unavailable``, which
    promises nothing was charged, only when Redis says so (and the id is voided, so a write
    still on its way cannot charge later); when it cannot say, ``payment_unknown``: the
    till asks again with the same order id."""
    try:
        payment = await store.payment_or_void(payment_id)
    except StoreUnavailable as exc:
        log.warning("checkout payment %s for order %s unknown", payment_id, req.order_id)
        raise Refused("payment_unknown", order_id=req.order_id) from exc
    if payment is None:  # not written, and voided: it never will be
        raise Refused("unavailable")
    return payment
