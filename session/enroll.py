"""Live enrolment at an ``enroll`` terminal: consent, capture, passphrase, account.

One asyncio task per enrolment, like ``CheckoutSession``: newest frames in, CPU work
(frame conversion, inference, argon2) in the executor. Nothing is captured before consent;
a face is enrolled only from a track whose multi-frame verdict is ``live`` (a photo or a
screen is declined ``spoof``), with several good-quality templates from different frames.

The passphrase is never logged or echoed; templates are dropped once stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from pipeline.errors import (
    AlreadyEnrolled,
    AuthError,
    Conflict,
    IllegalTransition,
    InvalidRequest,
    StoreUnavailable,
    TemplateKeyMismatch,
)
from pipeline.stream import TrackReport
from pipeline.types import FloatArray
from session import _store_lua as _store_rules
from session.crypto import check_passphrase
from session.enrollment import refuse_duplicate, refuse_taken_id
from session.frames import FrameSlot
from session.hints import enrol_hint
from session.models import Account
from session.phone_digits import lookalikes, spend_answer
from session.services import SessionServices
from session.video import Emit, VideoSession, nearest

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"enrolled", "declined", "cancelled"})


@dataclass(frozen=True)
class EnrollRequest:
    """What the terminal asked for (after consent)."""

    merchant_id: str
    terminal_id: str
    account_id: str
    name: str
    phone: str
    #: The sha256 of the token the terminal's socket said hello with ("": not checked): no
    #: account is written for a socket whose token has since been rotated.
    token_sha256: str = ""


class _Ended(Exception):
    """Internal: the enrolment reached a final state."""


class EnrollSession(VideoSession):
    """capturing -> passphrase -> enrolled / declined / cancelled."""

    label = "enrolment"

    def __init__(
        self,
        services: SessionServices,
        request: EnrollRequest,
        frames: FrameSlot[Any],
        emit: Emit,
    ) -> None:
        """Validate the fields with the store's rules (InvalidRequest) before anything else."""
        _store_rules.check_account_fields(request.account_id, request.name, request.phone)
        pipeline = services.config.pipeline
        # Embed every frame of the face (the default stops after a few): templates must
        # come from frames at least ``min_gap_s`` apart.
        selection = pipeline.selection.model_copy(update={"max_embeddings": 60})
        super().__init__(
            services, frames, emit, pipeline.model_copy(update={"selection": selection})
        )
        self.req = request
        self.cfg = services.config.enrollment
        self.session_id = "e_" + secrets.token_urlsafe(9)
        self.state = "idle"
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=16)
        self._templates: list[FloatArray] = []
        self._track: int | None = None
        self._last_take = -1e9
        self.consent_time = time.time()

    @property
    def capturing(self) -> bool:
        """True while frames are wanted (only after consent, until capture ends)."""
        return self.state == "capturing" and not self._stopped

    @property
    def finished(self) -> bool:
        """True once the enrolment reached a final state."""
        return self.state in FINAL_STATES

    # --- input from the terminal --------------------------------------------------------
    def deliver(self, message: dict[str, Any]) -> None:
        """Queue a terminal message (enroll_passphrase, cancel); IllegalTransition if late."""
        kind = message.get("type")
        if self.finished:
            raise IllegalTransition(f"the enrolment has ended ({self.state})")
        if kind == "enroll_passphrase" and self.state != "passphrase":
            raise IllegalTransition(f"enroll_passphrase is not expected while {self.state}")
        try:
            self.inbox.put_nowait(message)
        except asyncio.QueueFull as exc:
            raise InvalidRequest("too many messages; wait for the session") from exc

    # --- life cycle ---------------------------------------------------------------------
    async def run(self) -> str:
        """Run to a final state; never raises (except cancellation)."""
        try:
            await self._run()
        except _Ended:
            pass
        except StoreUnavailable:
            log.warning("enrolment %s: store unavailable; declining", self.session_id)
            with contextlib.suppress(_Ended):
                await self._finish("declined", "unavailable")
        except asyncio.CancelledError:
            if not self.finished:
                self.state = "cancelled"
            raise
        except Exception:  # a bug must decline, never enrol half
            log.exception("enrolment %s failed; declining", self.session_id)
            if not self.finished:
                with contextlib.suppress(_Ended):
                    await self._finish("declined", "internal_error")
        finally:
            self._templates = []
            self._forget_faces()
        return self.state

    async def _run(self) -> None:
        try:  # a taken id would fail at the write: find out before any face is captured
            await refuse_taken_id(self.svc.store, self.req.account_id)
        except Conflict:
            await self._finish("declined", "conflict")
        await self.svc.store.audit(
            "consent",
            method="live",
            account_id=self.req.account_id,
            terminal=self.req.terminal_id,
            time=repr(self.consent_time),
        )
        await self._set("capturing")
        with self.frames.wanted():
            await self._capture(time.monotonic() + self.cfg.timeout_s)
        await self._set("passphrase")
        await self._passphrase(time.monotonic() + self.cfg.passphrase_timeout_s)

    async def _set(self, state: str) -> None:
        self.state = state
        await self._send({"type": "state", "state": state, "session_id": self.session_id})

    async def _finish(self, state: str, reason: str) -> NoReturn:
        """Move to a final state, tell the terminal, and stop the session."""
        self.state = state
        self._templates = []
        if state == "declined":
            await self._send({"type": "declined", "reason": reason})
        await self._send(
            {"type": "state", "state": state, "reason": reason, "session_id": self.session_id}
        )
        self.svc.observer.decision("enroll", state, reason)
        raise _Ended

    async def _check(self) -> None:
        """Stopped (terminal gone) or a queued cancel ends the session."""
        why = self._gone_or_cancelled()
        if why is not None:
            await self._end(why)

    def _gone_or_cancelled(self) -> str | None:
        """Why the session must end now, without sending anything: "disconnected" (the
        terminal is gone), "cancelled" (a cancel was queued; the inbox is emptied, as
        nothing else is expected meanwhile), or None."""
        if self._stopped and not self.finished:
            return "disconnected"
        cancelled = False
        while not self.inbox.empty():
            cancelled |= self.inbox.get_nowait().get("type") == "cancel"
        return "cancelled" if cancelled else None

    async def _end(self, why: str) -> NoReturn:
        """End for ``why``: "disconnected" (nobody to tell), "cancelled", or a decline."""
        if why == "disconnected":
            self.state = "cancelled"
            self.svc.observer.decision("enroll", "cancelled", "disconnected")
            raise _Ended
        if why == "cancelled":
            await self._finish("cancelled", "cancelled")
        await self._finish("declined", why)

    # --- capture ------------------------------------------------------------------------
    async def _capture(self, deadline: float) -> None:
        """Frames until enough good templates of one live face (or spoof / timeout)."""
        while True:
            await self._check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._finish("declined", "timeout")
            got = await self._analyse_next(min(remaining, 0.5))
            if got is None:
                continue
            reports, size, item = got
            hint, main = self._main_face(reports)
            if main is not None:
                if main.verdict.status == "spoof":
                    await self._finish("declined", "spoof")
                self._collect(main, item.t)
            await self._feedback(reports, size, hint)
            enough = len(self._templates) >= self.cfg.templates
            if main is not None and enough and main.verdict.status == "live":
                return

    def _main_face(self, reports: list[TrackReport]) -> tuple[str, TrackReport | None]:
        """(hint, the one main face or None when nobody or several people are in view)."""
        main = nearest(reports)
        if main is None:
            return "no_face", None
        ratio = self.svc.config.policy.crowd_area_ratio
        if any(r is not main and r.face.box.area >= ratio * main.face.box.area for r in reports):
            return "one_person", None
        return enrol_hint(main.analysis.quality.reasons), main

    def _collect(self, main: TrackReport, t: float) -> None:
        """Keep the main track's embedding from a good frame (another track starts over)."""
        if main.track_id != self._track:
            self._track = main.track_id
            self._templates = []
            self._last_take = -1e9
        analysis = main.analysis
        if not analysis.quality.ok or analysis.embedding is None:
            return
        # Only frames scored live themselves: one that scores as a photo may show someone
        # else in the same box (as for a checkout's identity, pipeline/evidence.py).
        threshold = self.svc.config.pipeline.liveness.threshold
        if analysis.p_real is None or analysis.p_real < threshold:
            return
        if self._templates and not self._same_person(analysis.embedding):
            # Someone else in this track's box (the tracker keeps a face on its track down to
            # cosine 0.3): their templates would let them pay from this account. Start over
            # from them, as a checkout's evidence does (pipeline/evidence.py).
            self._templates = []
            self._last_take = -1e9
        if len(self._templates) >= self.cfg.templates or t - self._last_take < self.cfg.min_gap_s:
            return
        self._templates.append(analysis.embedding)
        self._last_take = t

    def _same_person(self, embedding: FloatArray) -> bool:
        """Whether ``embedding`` scores ``evidence.same_person_min_cos`` or more against the
        mean of the templates kept so far."""
        mean = np.mean(self._templates, axis=0)
        norm = float(np.linalg.norm(mean))
        if norm == 0.0:
            return False
        floor = self.svc.config.pipeline.evidence.same_person_min_cos
        return float(mean @ embedding) / norm >= floor

    async def _feedback(self, reports: list[TrackReport], size: tuple[int, int], hint: str) -> None:
        if not self._faces_due():
            return
        await self._send_faces(size, boxes=[r.face.box.as_list() for r in reports])
        progress = min(1.0, len(self._templates) / self.cfg.templates)
        await self._send({"type": "enroll_feedback", "hint": hint, "progress": round(progress, 3)})

    # --- passphrase and account ---------------------------------------------------------
    async def _passphrase(self, deadline: float) -> None:
        """Wait for two equal, valid passphrases; then create the account."""
        while True:
            msg = await self._next_message(deadline)
            passphrase = str(msg.get("passphrase", ""))
            confirm = str(msg.get("confirm", ""))
            del msg
            try:
                if passphrase != confirm:
                    raise InvalidRequest("passphrase and confirmation differ")
                check_passphrase(passphrase)
            except InvalidRequest as exc:
                await self._send({"type": "error", "code": "invalid_request", "message": str(exc)})
                continue
            break
        loop = asyncio.get_running_loop()
        passhash = await loop.run_in_executor(self.svc.executor, self.svc.hasher.hash, passphrase)
        del passphrase, confirm  # keep the secret's lifetime short
        await self._create(passhash)

    async def _next_message(self, deadline: float) -> dict[str, Any]:
        while True:
            if self._stopped:
                await self._check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._finish("declined", "timeout")
            try:
                msg = await asyncio.wait_for(self.inbox.get(), min(remaining, 0.5))
            except TimeoutError:
                continue
            if msg.get("type") == "cancel":
                await self._finish("cancelled", "cancelled")
            if msg.get("type") == "enroll_passphrase":
                return msg

    async def _create(self, passhash: str) -> None:
        await self._check()  # a gone or cancelling terminal gets no account
        templates, self._templates = self._templates, []
        consent = {
            "method": "live",
            "terminal": self.req.terminal_id,
            "time": repr(self.consent_time),
        }
        result = await self._write_once(passhash, templates, consent)
        if isinstance(result, str):
            await self._end(result)
        account, _ = result
        count = len(templates)
        del templates
        log.info("enrolled account %s live with %s templates", account.account_id, count)
        self.state = "enrolled"
        await self._send({"type": "enrolled", "account_id": account.account_id, "templates": count})
        await self._send({"type": "state", "state": "enrolled", "session_id": self.session_id})
        self.svc.observer.decision("enroll", "enrolled", "enrolled")

    async def _write_once(
        self, passhash: str, templates: list[FloatArray], consent: dict[str, str]
    ) -> tuple[Account, str] | str:
        """The duplicate check, the write and the index, one enrolment at a time on this
        server (``Directory.enrolling``: two of one face, from two kiosks or a double
        submit, cannot both pass the check). Returns (account, subject), or why not; the
        caller tells the terminal, outside the lock, so that a slow socket does not hold up
        the server's other enrolments."""
        async with self.svc.directory.enrolling:
            try:
                if not await self._spend_answer(templates):
                    return "ambiguous"
                await refuse_duplicate(
                    self.svc.directory, self.svc.search_executor, templates, self.req.phone
                )
            except AlreadyEnrolled:
                return "already_enrolled"
            # The check awaited Redis, where a disconnect's cancel can be lost
            # (session/video.py): nothing may be written for a terminal that has gone.
            why = self._gone_or_cancelled()
            if why is not None:
                return why
            try:
                account, subject = await self.svc.store.create_account(
                    self.req.account_id,
                    self.req.name,
                    self.req.phone,
                    passhash,
                    templates,
                    consent,
                    terminal_id=self.req.terminal_id,
                    terminal_token_sha256=self.req.token_sha256 or None,
                )
            except AuthError:
                return "terminal_revoked"
            except TemplateKeyMismatch:
                # This server's key is not the data's (a rotation begun while it runs):
                # nothing is written, as when Redis is down.
                log.warning("enrolment refused: the template key check in Redis names another key")
                return "unavailable"
            except Conflict:
                return "conflict"
            except StoreUnavailable as exc:
                if exc.unsent:
                    raise
                # The write was sent and its reply lost: the account may exist, so the
                # person must not be told that nothing was stored.
                log.warning("enrolment %s: the account's write may have been made", self.session_id)
                return "enrolment_unknown"
            self.svc.directory.add(subject, templates, account.phone_last4)
            return account, subject

    async def _spend_answer(self, templates: list[FloatArray]) -> bool:
        """Spend one phone-digit answer of every look-alike the face matches; False if one
        had none left (session/phone_digits.py). The duplicate check compares the face only
        with enrolled people whose phone ends in the digits given, so whether it refuses
        answers a guess of those digits, like a checkout's. Spent before it is given, in
        one atomic count per look-alike, so that enrolments at the same moment on several
        kiosks cannot all pass one last check."""
        budget, limiter = self.svc.config.limits.phone_digit_misses_per_subject, self.svc.limiter
        named = await self.svc.search(lookalikes, templates)
        return named is not None and await spend_answer(limiter, named, budget)
