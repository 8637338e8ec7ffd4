"""One checkout: newest frames in, one decision out, exactly one payment at most.

The session runs as one asyncio task per terminal checkout. All CPU work (frame conversion,
inference, argon2) goes to the executor; the event loop only waits and routes messages.
Every failure closes: Redis down, a timeout, a dropped terminal or an unexpected error
declines, and no payment is written without a correct passphrase.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any, NoReturn

from pipeline.errors import (
    IllegalTransition,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
)
from pipeline.gallery import Decision
from pipeline.stream import TrackReport
from pipeline.types import FloatArray
from session.checkout_ledger import Refused, checked, write_payment
from session.crypto import WrongAnswers
from session.frames import FrameSlot
from session.hints import checkout_hint
from session.models import Account, CheckoutRequest, format_amount
from session.phone_digits import ambiguous_subjects, budget_spent, count_miss
from session.services import SessionServices
from session.states import CheckoutMachine, CheckoutState
from session.video import Emit, VideoSession, nearest

log = logging.getLogger(__name__)
S = CheckoutState
#: After a frame with several comparable faces, no decision for this long: sizes flicker
#: around the crowd ratio from frame to frame, and one frame below it must not let the
#: session pick a face.
CROWD_HOLD_S = 1.0


class _Ended(Exception):
    """Internal: the session reached a terminal state."""


class CheckoutSession(VideoSession):
    """Scanning -> verifying -> awaiting passphrase -> approved / declined."""

    label = "checkout"

    def __init__(
        self,
        services: SessionServices,
        request: CheckoutRequest,
        frames: FrameSlot[Any],
        emit: Emit,
    ) -> None:
        super().__init__(services, frames, emit, services.config.pipeline)
        self.req = request
        self.machine = CheckoutMachine()
        self.session_id = "c_" + secrets.token_urlsafe(9)
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=16)
        self.policy = services.config.policy
        self._first_frame_t: float | None = None
        self.payment_id: str | None = None
        self._crowded = False
        self._crowd_until = 0.0
        #: The face hint last sent while scanning (session.hints), sent on change.
        self._face_hint: str | None = None
        #: A cancel arrived (it may wait in the inbox while the passphrase is checked).
        self._cancel_asked = False

    # --- input from the terminal --------------------------------------------------------
    def deliver(self, message: dict[str, Any]) -> None:
        """Queue a terminal message (passphrase, phone_digits, cancel) for the session.

        A message that does not fit the current state is refused with IllegalTransition
        (the edge answers with an error event; the session is unaffected).
        """
        kind = message.get("type")
        expected = {"passphrase": S.AWAITING_PASSPHRASE, "phone_digits": S.AWAITING_PHONE}
        if self.machine.finished:
            raise IllegalTransition(f"the checkout has ended ({self.machine.state})")
        if kind in expected and self.machine.state is not expected[kind]:
            raise IllegalTransition(f"{kind} is not expected while {self.machine.state}")
        if kind == "cancel":
            # Noted at once, not only queued: nothing reads the inbox while a correct
            # passphrase goes on to the payment, and a cancel before approval must hold.
            self._cancel_asked = True
        try:
            self.inbox.put_nowait(message)
        except asyncio.QueueFull as exc:
            raise InvalidRequest("too many messages; wait for the session") from exc

    # --- life cycle ---------------------------------------------------------------------
    async def _check_stopped(self) -> None:
        if self._stopped and not self.machine.finished:
            self.machine.move(S.CANCELLED, "disconnected")
            self.svc.observer.decision("checkout", "cancelled", "disconnected")
            raise _Ended

    async def run(self) -> CheckoutState:
        """Run to a terminal state; never raises (except cancellation)."""
        try:
            await self._run()
        except _Ended:
            pass
        except StoreUnavailable:
            log.warning("checkout %s: store unavailable; declining", self.session_id)
            # _finish ends by raising _Ended: caught here, or run() would raise after all.
            if not self.machine.finished:
                with contextlib.suppress(_Ended):
                    await self._finish(S.DECLINED, "unavailable")
        except asyncio.CancelledError:
            if not self.machine.finished:
                self.machine.move(S.CANCELLED, "disconnected")
                self.svc.observer.decision("checkout", "cancelled", "disconnected")
            raise
        except Exception:  # a bug must decline, never approve or hang
            log.exception("checkout %s failed; declining", self.session_id)
            if not self.machine.finished:
                with contextlib.suppress(_Ended):
                    await self._finish(S.DECLINED, "internal_error")
        finally:
            self._forget_faces()
        return self.machine.state

    async def _run(self) -> None:
        paid = await self.svc.store.find_payment(self.req.merchant_id, self.req.order_id)
        if paid is not None:
            await self._finish(S.DECLINED, "duplicate_order", payment_id=paid.payment_id)
        await self._set(S.SCANNING)
        deadline = time.monotonic() + self.policy.session_timeout_s
        with self.frames.wanted():  # the video is decoded only while a checkout scans
            embedding = await self._live_embedding(deadline)
        # Identified without video: a phone-digit prompt decodes no frames while it waits.
        account, subject = await self._identify(embedding)
        await self._confirm(account, subject)

    async def _set(self, state: CheckoutState, **extra: Any) -> None:
        self.machine.move(state)
        await self._send_state(state, **extra)

    async def _send_state(self, state: CheckoutState, **extra: Any) -> None:
        """The ``state`` event the terminal shows (``extra``: a reason or a hint)."""
        await self._send(
            {"type": "state", "state": str(state), "session_id": self.session_id, **extra}
        )

    async def _finish(self, state: CheckoutState, reason: str, **extra: Any) -> NoReturn:
        """Move to a terminal state, tell the terminal, and stop the session."""
        self.machine.move(state, reason)
        outcome = str(state)
        if state is S.DECLINED:
            await self._send({"type": "declined", "reason": reason, **extra})
        await self._send_state(state, reason=reason)
        self.svc.observer.decision("checkout", outcome, reason)
        raise _Ended

    def _check_inbox_for_cancel(self) -> None:
        while not self.inbox.empty():
            msg = self.inbox.get_nowait()
            if msg.get("type") == "cancel":
                raise _CancelRequested

    # --- recognition --------------------------------------------------------------------
    async def _live_embedding(self, deadline: float) -> FloatArray:
        """Frames until one live, single face: returns its embedding (declines a spoof)."""
        while True:
            await self._check_stopped()
            try:
                self._check_inbox_for_cancel()
            except _CancelRequested:
                await self._finish(S.CANCELLED, "cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._finish(S.TIMEOUT, "session_timeout")
            got = await self._analyse_next(min(remaining, 0.5), analysis_timeout=remaining)
            if got is None:
                continue
            reports, size, item = got
            if self._first_frame_t is None:
                self._first_frame_t = item.t
            await self._faces_event(reports, size)
            live = self._single_live_face(reports)
            if live is None:
                continue
            if live.verdict.status == "spoof":
                await self._finish(S.DECLINED, "spoof")
            embedding = live.verdict.embedding
            assert embedding is not None  # a live verdict carries its embedding
            return embedding

    def _single_live_face(self, reports: list[TrackReport]) -> TrackReport | None:
        """The one decided face, or None while undecided or while several people are in view."""
        main = nearest(reports)
        if main is None:
            return None
        crowd = [
            r
            for r in reports
            if r is not main
            and r.face.box.area >= self.policy.crowd_area_ratio * main.face.box.area
        ]
        now = time.monotonic()
        if crowd:
            self._crowded = True
            self._crowd_until = now + CROWD_HOLD_S
            return None
        if now < self._crowd_until:
            return None
        return main if main.verdict.status in ("live", "spoof") else None

    async def _scanning_hint(self, hint: str | None) -> None:
        """A ``state`` event that shows (or, with None, clears) a hint while scanning."""
        await self._send_state(self.machine.state, **({} if hint is None else {"hint": hint}))

    async def _faces_event(self, reports: list[TrackReport], size: tuple[int, int]) -> None:
        if self._crowded:
            self._crowded = False
            await self._scanning_hint("one_person_at_a_time")
        # A face too close for liveness, cut off by the frame's edge or upside down adds no
        # evidence: without a word the shopper would wait for a timeout, so say why (and
        # say when it has passed).
        main = nearest(reports)
        reasons = () if main is None else main.analysis.quality.reasons
        hint = checkout_hint(reasons)
        if hint != self._face_hint:
            self._face_hint = hint
            await self._scanning_hint(hint)
        if not self._faces_due():
            return
        await self._send_faces(size, boxes=[r.face.box.as_list() for r in reports])

    async def _identify(self, embedding: FloatArray) -> tuple[Account, str]:
        await self._set(S.VERIFYING)
        decision = await self.svc.identify(embedding)
        if decision.status == "ambiguous":
            decision = await self._narrow_by_phone(embedding)
        if decision.status != "match" or decision.subject_id is None:
            await self._finish(S.DECLINED, "no_match")
        subject = str(decision.subject_id)
        try:
            account_id = await self.svc.store.account_for_subject(subject)
            account, locked = await self.svc.store.account_with_lock(account_id)
        except NotFound:
            # Erased between the search and now: behave as if never enrolled.
            await self._finish(S.DECLINED, "no_match")
        if locked is not None:
            await self._finish(S.DECLINED, "locked", locked_until=locked)
        return account, subject

    async def _narrow_by_phone(self, embedding: FloatArray) -> Decision:
        """Ambiguous top-2: ask for the last four phone digits and search again, within the
        wrong-digit budget of every person the search named (session/phone_digits.py)."""
        self.machine.move(S.AWAITING_PHONE)
        budget, limiter = self.svc.config.limits.phone_digit_misses_per_subject, self.svc.limiter
        named = await self.svc.search(ambiguous_subjects, embedding)
        attempts = self.policy.phone_digit_attempts
        deadline = time.monotonic() + self.policy.prompt_expiry_s
        while attempts > 0 and not await budget_spent(limiter, named, budget):
            await self._send({"type": "need_phone_digits", "attempts_left": attempts})
            await self._send_state(S.AWAITING_PHONE)
            msg = await self._next_message(deadline, "phone_digits")
            if await budget_spent(limiter, named, budget):  # spent elsewhere meanwhile
                break
            digits = str(msg.get("digits", ""))
            decision = await self.svc.identify(embedding, phone_last4=digits)
            if decision.status == "match":
                return decision
            await count_miss(limiter, named, budget)
            attempts -= 1
        await self._finish(S.DECLINED, "ambiguous")

    async def _next_message(self, deadline: float, wanted: str) -> dict[str, Any]:
        """The next terminal message of type ``wanted`` (or cancel) before ``deadline``."""
        while True:
            await self._check_stopped()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._finish(S.TIMEOUT, "prompt_expired")
            try:
                # Short waits so a stop() is noticed even if a cancel was lost.
                msg = await asyncio.wait_for(self.inbox.get(), min(remaining, 0.5))
            except TimeoutError:
                continue
            if msg.get("type") == "cancel":
                await self._finish(S.CANCELLED, "cancelled")
            if msg.get("type") == wanted:
                return msg
            await self._send(
                {
                    "type": "error",
                    "code": "illegal_transition",
                    "message": f"expected {wanted} now, got {msg.get('type')}",
                }
            )

    # --- confirmation and payment -------------------------------------------------------
    async def _confirm(self, account: Account, subject: str) -> None:
        prompt_id = "q_" + secrets.token_urlsafe(9)
        expires_in = self.policy.prompt_expiry_s
        deadline = time.monotonic() + expires_in
        self.machine.move(S.AWAITING_PASSPHRASE)
        await self._send(
            {
                "type": "confirm",
                "prompt_id": prompt_id,
                "account": account.masked_name,
                "amount": format_amount(self.req.amount),
                "currency": self.req.currency,
                "expires_in_s": expires_in,
                "session_id": self.session_id,
            }
        )
        if self._first_frame_t is not None:
            self.svc.observer.confirm_latency(time.monotonic() - self._first_frame_t)
        await self._send_state(S.AWAITING_PASSPHRASE)
        try:
            stored_hash = await self.svc.store.passphrase_hash(account.account_id)
        except NotFound:  # erased since recognition: as if never enrolled
            await self._finish(S.DECLINED, "no_match")
        loop = asyncio.get_running_loop()
        wrong, left = WrongAnswers(), self.policy.passphrase_attempts
        while True:
            msg = await self._next_message(deadline, "passphrase")
            if msg.get("prompt_id") != prompt_id:
                await self._send(
                    {
                        "type": "error",
                        "code": "invalid_request",
                        "message": "unknown or stale prompt_id",
                    }
                )
                continue
            passphrase = str(msg.get("passphrase", ""))
            # A lock set since the prompt opened (wrong answers at another prompt, any
            # server) ends it before any check: a checked answer would be one more guess.
            locked_until = await self.svc.store.locked_until(account.account_id)
            if locked_until is not None:
                await self._finish(S.DECLINED, "locked", locked_until=locked_until)
            if passphrase in wrong:  # the same wrong answer again: not checked, counted once
                del passphrase, msg
                await self._send({"type": "wrong_passphrase", "attempts_left": left})
                continue
            check = loop.run_in_executor(
                self.svc.executor, self.svc.hasher.verify, stored_hash, passphrase
            )
            try:
                ok = await checked(check, expires_in, self.session_id)
            except Refused as refused:
                await self._finish(S.DECLINED, refused.reason)
            await self._check_stopped()
            if ok:
                del passphrase, msg  # keep the secret's lifetime short
                break
            wrong.add(passphrase)
            del passphrase, msg
            left, locked_until = await self.svc.store.record_failure(
                account.account_id, self.policy.passphrase_attempts, self.policy.lockout_s
            )
            await self.svc.store.audit(
                "passphrase_failed", account=account.account_id, terminal=self.req.terminal_id
            )
            if locked_until is not None:
                await self._finish(S.DECLINED, "locked", locked_until=locked_until)
            await self._send({"type": "wrong_passphrase", "attempts_left": left})
        await self.svc.store.clear_failures(account.account_id)
        await self._pay(account)

    async def _pay(self, account: Account) -> None:
        await self._check_stopped()  # last chance: a gone terminal is never charged
        if self._cancel_asked:
            # Cancelled while the passphrase was being checked: not approved yet, so the
            # shopper's cancel wins (docs/protocol.md: cancel any time before approval).
            await self._finish(S.CANCELLED, "cancelled")
        try:
            payment = await write_payment(
                self.svc.store, self.req, account, self.policy.daily_limit
            )
        except Refused as refused:
            await self._finish(S.DECLINED, refused.reason, **refused.extra)
        self.payment_id = payment.payment_id
        self.machine.move(S.APPROVED, "paid")
        await self._send(
            {
                "type": "approved",
                "payment_id": payment.payment_id,
                "amount": format_amount(payment.amount),
                "currency": payment.currency,
                "account": account.masked_name,
                "order_id": payment.order_id,
            }
        )
        await self._send_state(S.APPROVED)
        if self.policy.offer_text:
            await self._send(
                {
                    "type": "merchant_offer",
                    "text": self.policy.offer_text,
                    "kind": self.policy.offer_kind,
                }
            )
        self.svc.observer.decision("checkout", "approved", "paid")


class _CancelRequested(Exception):
    """Internal: a cancel arrived while scanning."""
