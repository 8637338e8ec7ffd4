"""Walk-through gate: every face track gets exactly one decision, every account one fare per
entry window.

A gate session runs for as long as the gate's video flows. Each frame goes through the
stream analyzer (tracker + per-track evidence + frame selection) in the executor; a track
whose verdict becomes ``live`` or ``spoof`` is decided at once:
- spoof -> ``gate_deny spoof``;
- live -> 1:N search: no match -> ``unknown``, top-2 too close -> ``ambiguous`` (a gate
  cannot stop to ask for phone digits), locked account -> ``locked``, fare above the gate
  limit or over the daily limit -> ``limit``;
- match -> the account's entry is claimed for ``gate_entry_window_s`` (Redis SET NX of a
  token only this claim's holder may release) and the fare charged -> ``gate_open``. A
  second track of the same account inside the window (the track broke and re-formed) is
  not charged and not announced again.
A track that leaves before its evidence is enough gets no decision: no guess, ever.
``decision_ms`` runs from the first frame in which the track's face reached the gate's
minimum size to the decision; from the first of the frames skipped before that one, if the
session skipped any (newest frame wins), since the face may have been that size there.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from pipeline.errors import (
    AccountLocked,
    AuthError,
    FacePayError,
    Forbidden,
    LimitExceeded,
    NotFound,
    StoreUnavailable,
)
from pipeline.motion import ViewChange
from pipeline.stream import TrackReport
from session.camera_load import camera_event
from session.frames import FrameSlot
from session.models import Payment, format_amount
from session.services import SessionServices
from session.video import Emit, VideoSession

log = logging.getLogger(__name__)
#: While the camera sends a lowered rate, an idle look is due this share of the idle
#: interval after the last one (0.8: a frame up to 20 ms early at 10 a second is still seen).
IDLE_JITTER = 0.8
#: Why the ledger refused a fare, as the gate tells the walker.
_REFUSALS: tuple[tuple[type[FacePayError], str, str], ...] = (
    (LimitExceeded, "limit", "Daily limit reached: please use the ticket gate"),
    (AccountLocked, "locked", "Account locked: please use the ticket gate"),
    (NotFound, "unknown", "Not recognised: please use the ticket gate"),
    # The gate's own terminal was revoked (its socket is being closed): charge nobody.
    (AuthError, "revoked", "Gate out of service: please use the ticket gate"),
    # Its record does not allow the fare (another merchant's, or an enrolment terminal):
    # out of service as well; never expected, the session takes both from that record.
    (Forbidden, "revoked", "Gate out of service: please use the ticket gate"),
)
_REFUSED = tuple(kind for kind, _, _ in _REFUSALS)


@dataclass(frozen=True)
class GateTerminal:
    """Who the gate belongs to."""

    merchant_id: str
    terminal_id: str
    #: The sha256 of the token its socket said hello with ("": not checked); a fare is
    #: refused once the gate's token was rotated (a stolen token's socket cannot pay).
    token_sha256: str = ""


class GateSession(VideoSession):
    """Decides each person passing one gate."""

    label = "gate"

    def __init__(
        self, services: SessionServices, gate: GateTerminal, frames: FrameSlot[Any], emit: Emit
    ) -> None:
        super().__init__(services, frames, emit, services.config.gate_pipeline())
        self.gate = gate
        self.policy = services.config.policy
        #: Track id -> "open", "deny" or "repeat", for the tracks still in view (a gate's
        #: session lives for days: ended tracks are dropped, as the stream drops them).
        self.decisions: dict[int, str] = {}
        #: How many of each decision this session made (bounded: one counter per kind).
        self.outcomes: Counter[str] = Counter()
        self.idle_fps = services.config.gate.idle_scan_fps
        if services.config.gate.idle_change.enabled:
            self.stream.idle_check = ViewChange(services.config.gate.idle_change)
        self.idle_camera = services.config.gate.idle_camera
        #: The frame rate the gate's camera was last asked for; None: its full rate.
        self.camera_fps: float | None = None
        self._quiet_since: float | None = None
        #: (arrival, age at analysis ms, analysis ms, faces, detector ran) per analysed
        #: frame, bounded.
        self.trace: deque[tuple[float, float, float, int, bool]] = deque(maxlen=2000)

    async def run(self) -> None:
        """Process the newest frames until the stream ends or the session is stopped."""
        with self.frames.wanted():  # a gate watches all the time
            await self._watch()

    async def _watch(self) -> None:
        while not self._stopped:
            try:
                got = await self._analyse_next(0.5)
            except Exception:  # one bad frame must not stop the gate
                log.exception("gate %s: frame analysis failed", self.gate.terminal_id)
                continue
            if got is None:
                if self.frames.closed:
                    return
                continue
            reports, size, item = got
            timings = self.last_timings
            self.trace.append(
                (
                    item.t,
                    timings["frame_age"],
                    timings["frame"],
                    len(reports),
                    self.stream.detector_ran,
                )
            )
            for report in reports:
                if report.track_id not in self.decisions and report.verdict.status != "undecided":
                    await self._decide_or_deny(report)
            for track_id in self.stream.just_ended:
                self.decisions.pop(track_id, None)
            await self._faces_event(reports, size)
            await self._pace_camera(reports, item.t)
            if not reports and not self.stream.evidence:
                await self._idle(item.t)

    async def _pace_camera(self, reports: list[TrackReport], t: float) -> None:
        """Ask for fewer frames once the corridor has been empty and still for
        ``idle_camera.after_s``; ask for the full rate at the first face, track or movement.

        Errs towards frames: any sign of someone restores the full rate at once, and a
        terminal that ignores the request only costs CPU.
        """
        cfg = self.idle_camera
        if not cfg.enabled:
            return
        if reports or self.stream.evidence or self.stream.view_moved:
            self._quiet_since = None
            if self.camera_fps is not None:
                self.camera_fps = None
                await self._send(camera_event(None))
            return
        if self._quiet_since is None:
            self._quiet_since = t
        if self.camera_fps is None and t - self._quiet_since >= cfg.after_s:
            self.camera_fps = cfg.fps
            await self._send(camera_event(cfg.fps))

    def camera_restarted(self) -> None:
        """The terminal offered a new video connection, which starts at its full rate."""
        self.camera_fps = None
        self._quiet_since = None

    async def _idle(self, t: float) -> None:
        """Nobody in view: the next look is at a frame that arrived one idle interval after
        frame time ``t`` or later (at most ``idle_scan_fps`` looks a second).

        Frames that arrive meanwhile are dropped (and counted). Only speed is at stake: a
        skipped frame can delay a decision, never make one.
        """
        interval = 1.0 / self.idle_fps
        if self.camera_fps is not None:
            # The camera was asked for about ``idle_scan_fps`` frames: each is looked at, and
            # one that arrives a little early (network jitter) must not wait a whole interval.
            interval *= IDLE_JITTER
        due = t + interval
        wait = due - time.monotonic()
        if wait > 0 and not self._stopped:
            await asyncio.sleep(wait)
        self.frames.drop_older(due)

    async def _faces_event(self, reports: list[TrackReport], size: tuple[int, int]) -> None:
        if not self._faces_due():
            return
        tracks = [
            {
                "track_id": r.track_id,
                "box": r.face.box.as_list(),
                "decision": self.decisions.get(r.track_id),
            }
            for r in reports
        ]
        await self._send_faces(size, tracks=tracks)

    async def _written_after_all(
        self, account_id: str, payment_id: str, claim: str
    ) -> Payment | None:
        """After a fare's write failed with Redis unreachable: the payment if it was written
        after all (only its reply was lost), else None. Only a payment known not to exist
        releases the entry claim: with the claim gone a retry would charge again, so while
        Redis cannot say, the claim stays until the entry window ends (a retry inside it is
        a repeat, never a second fare)."""
        store = self.svc.store
        try:
            payment = await store.payment_or_void(payment_id)
        except StoreUnavailable:
            log.warning("gate %s: fare %s unknown; entry kept", self.gate.terminal_id, payment_id)
            return None
        if payment is None:  # not written, and voided: it never will be
            await store.release_gate_entry(self.gate.merchant_id, account_id, claim)
        return payment

    async def _settle(self, account_id: str, claim: str, age_s: float) -> None:
        """The fare is written: a claim held past a short entry window for the write's sake
        goes back to that window. If Redis cannot take that now, the claim simply lasts
        longer: a re-entry inside it is a repeat, never a second fare, and the person has
        paid, so the gate still opens."""
        try:
            await self.svc.store.settle_gate_entry(
                self.gate.merchant_id, account_id, claim, self.policy.gate_entry_window_s, age_s
            )
        except StoreUnavailable:
            log.warning("gate %s: entry claim kept past its window", self.gate.terminal_id)

    def _decision_ms(self, report: TrackReport) -> float:
        start = report.ready_since if report.ready_since is not None else report.first_seen
        return round((time.monotonic() - start) * 1000.0, 1)

    async def _deny(self, report: TrackReport, reason: str, message: str) -> None:
        self.decisions[report.track_id] = "deny"
        self.outcomes["deny"] += 1
        ms = self._decision_ms(report)
        await self._send(
            {
                "type": "gate_deny",
                "track_id": report.track_id,
                "reason": reason,
                "message": message,
                "decision_ms": ms,
            }
        )
        self.svc.observer.decision("gate", "deny", reason)
        self._observe_latency(ms)

    def _observe_latency(self, ms: float) -> None:
        self.svc.observer.gate_decision(ms / 1000.0)

    async def _decide_or_deny(self, report: TrackReport) -> None:
        """``_decide``, and a denial if it fails unexpectedly: one person's failed decision
        (a subject link that no longer opens during a key rotation, an answer from the
        ledger nobody foresaw) must not end the gate's loop and leave everyone after them
        undecided while the socket stays up. Fails closed: nobody passes for it."""
        try:
            await self._decide(report)
        except Exception:
            log.exception("gate %s: decision failed", self.gate.terminal_id)
            if report.track_id not in self.decisions:
                try:
                    await self._deny(report, "unavailable", "Please use the ticket gate")
                except Exception:  # the socket is gone: nobody to tell
                    log.warning("gate %s: could not send a denial", self.gate.terminal_id)

    async def _decide(self, report: TrackReport) -> None:
        """One decision for one track (called once per track)."""
        self.stream.mark_decided(report.track_id)
        if self._stopped:
            return
        if report.verdict.status == "spoof":
            await self._deny(
                report, "spoof", "Please remove any photo or screen and look at the camera"
            )
            return
        embedding = report.verdict.embedding
        assert embedding is not None  # a live verdict carries its embedding
        decision = await self.svc.identify(embedding)
        if decision.status == "ambiguous":
            await self._deny(report, "ambiguous", "Please use the ticket gate")
            return
        if decision.status != "match" or decision.subject_id is None:
            await self._deny(report, "unknown", "Not recognised: please use the ticket gate")
            return
        try:
            await self._admit(report, str(decision.subject_id))
        except StoreUnavailable:
            # Fail closed: without the ledger nobody passes for free.
            await self._deny(report, "unavailable", "Please use the ticket gate")

    async def _admit(self, report: TrackReport, subject_id: str) -> None:
        store = self.svc.store
        try:
            account_id = await store.account_for_subject(subject_id)
            account, locked = await store.account_with_lock(account_id)
        except NotFound:
            await self._deny(report, "unknown", "Not recognised: please use the ticket gate")
            return
        if locked is not None:
            await self._deny(report, "locked", "Account locked: please use the ticket gate")
            return
        fare = self.policy.gate_fare  # at most policy.gate_limit (checked with the config)
        merchant = self.gate.merchant_id
        window = self.policy.gate_entry_window_s
        claim = await store.claim_gate_entry(merchant, account.account_id, window)
        # Timed from the reply, after Redis set the claim: cut back to the window from here,
        # the claim ends no earlier than the window would have.
        claimed_at = time.monotonic()
        if claim is None:
            # Same person again inside the entry window (a re-formed track or a second gate):
            # never charge twice, and do not announce a second opening for one person.
            self.decisions[report.track_id] = "repeat"
            self.outcomes["repeat"] += 1
            self.svc.observer.decision("gate", "repeat", "entry_window")
            return
        if self._stopped:
            # The gate went away while the account was read and the entry claimed (a cancel
            # can be swallowed by redis-py): nobody to open for, so nobody is charged.
            await store.release_gate_entry(merchant, account.account_id, claim)
            return
        order_id = f"gate:{self.gate.terminal_id}:{secrets.token_hex(8)}"
        payment_id = store.new_payment_id()  # chosen first: a lost reply can be looked up
        try:
            payment = await store.create_payment(
                merchant_id=merchant,
                order_id=order_id,
                account_id=account.account_id,
                terminal_id=self.gate.terminal_id,
                amount=fare,
                currency=self.policy.currency,
                daily_limit=self.policy.daily_limit,
                payment_id=payment_id,
                account_created=account.created,
                terminal_token_sha256=self.gate.token_sha256 or None,
            )
        except _REFUSED as exc:
            # Refused by the ledger (locked or erased since the read above, through any
            # server): nothing was charged, so the person may try again.
            await store.release_gate_entry(merchant, account.account_id, claim)
            reason, text = next((r, t) for kind, r, t in _REFUSALS if isinstance(exc, kind))
            await self._deny(report, reason, text)
            return
        except StoreUnavailable:
            written = await self._written_after_all(account.account_id, payment_id, claim)
            if written is None:
                raise
            payment = written  # charged after all: the person has paid, so open
        self.decisions[report.track_id] = "open"
        self.outcomes["open"] += 1
        ms = self._decision_ms(report)
        try:
            await self._send(
                {
                    "type": "gate_open",
                    "track_id": report.track_id,
                    "account": account.masked_name,
                    "fare": format_amount(fare),
                    "currency": self.policy.currency,
                    "payment_id": payment.payment_id,
                    "decision_ms": ms,
                }
            )
            self.svc.observer.decision("gate", "open", "paid")
            self._observe_latency(ms)
        finally:
            # After the opening: the person has paid and must not wait on this round trip;
            # and settled even if the gate is going away meanwhile (the fare is written).
            await self._settle(account.account_id, claim, time.monotonic() - claimed_at)
