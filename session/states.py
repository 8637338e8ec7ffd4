"""The checkout state machine: explicit states, explicit transitions, nothing implicit.

An illegal transition is a bug in the caller and raises ``IllegalTransition``; terminal
states (approved, declined, cancelled, timeout) have no way out.
"""

from __future__ import annotations

from enum import StrEnum

from pipeline.errors import IllegalTransition


class CheckoutState(StrEnum):
    """States a checkout session moves through (names are the protocol's)."""

    IDLE = "idle"
    SCANNING = "scanning"
    VERIFYING = "verifying"
    AWAITING_PHONE = "awaiting_phone_digits"
    AWAITING_PASSPHRASE = "awaiting_passphrase"
    APPROVED = "approved"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"


S = CheckoutState
_ENDS = {S.DECLINED, S.CANCELLED, S.TIMEOUT}
TRANSITIONS: dict[CheckoutState, frozenset[CheckoutState]] = {
    S.IDLE: frozenset({S.SCANNING, *_ENDS}),
    S.SCANNING: frozenset({S.VERIFYING, *_ENDS}),
    # Verifying may go back to scanning when the face left before the search finished.
    S.VERIFYING: frozenset({S.SCANNING, S.AWAITING_PHONE, S.AWAITING_PASSPHRASE, *_ENDS}),
    S.AWAITING_PHONE: frozenset({S.AWAITING_PASSPHRASE, *_ENDS}),
    S.AWAITING_PASSPHRASE: frozenset({S.APPROVED, *_ENDS}),
    S.APPROVED: frozenset(),
    S.DECLINED: frozenset(),
    S.CANCELLED: frozenset(),
    S.TIMEOUT: frozenset(),
}
TERMINAL_STATES = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


class CheckoutMachine:
    """Current state and the reason it ended (if it did)."""

    def __init__(self) -> None:
        self.state = CheckoutState.IDLE
        self.reason: str | None = None
        self.history: list[CheckoutState] = [self.state]

    @property
    def finished(self) -> bool:
        """True in a terminal state."""
        return self.state in TERMINAL_STATES

    def can(self, target: CheckoutState) -> bool:
        """Whether ``target`` is reachable in one step."""
        return target in TRANSITIONS[self.state]

    def move(self, target: CheckoutState, reason: str | None = None) -> None:
        """Go to ``target`` or raise IllegalTransition."""
        if not self.can(target):
            raise IllegalTransition(f"checkout cannot go from {self.state} to {target}")
        self.state = target
        self.history.append(target)
        if target in TERMINAL_STATES:
            self.reason = reason
