"""The one FacePay configuration object: pipeline, payment policy and server settings.

Loaded once at start-up (``load_config``) and passed down; nothing reads the environment at
import time. Every field is bounded, unknown keys are refused (a typo in a threshold must not
silently keep the default).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.config import ChangeConfig, EvidenceConfig, PipelineConfig
from pipeline.errors import ConfigError
from session._config_base import _Strict

# The server section lives in its own module for size; it is part of this one's interface.
from session._config_server import OPERATOR_NAME as OPERATOR_NAME
from session._config_server import ServerConfig as ServerConfig
from session._config_server import check_admin_token as check_admin_token

#: ISO 4217 codes whose minor unit is not a hundredth: none (JPY, KRW...), thousandths
#: (BHD, KWD...), ten-thousandths (CLF, UYW), or none defined (metals, special units).
#: Every amount is read, stored and shown in hundredths (session.models.parse_amount,
#: format_amount), so with one of these ``amount_minor`` would be wrong 10 or 100 times over.
NOT_TWO_DECIMAL_CURRENCIES: dict[str, str] = {
    **dict.fromkeys(
        [
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "UYI",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ],
        "no decimals",
    ),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], "three decimals"),
    **dict.fromkeys(["CLF", "UYW"], "four decimals"),
    **dict.fromkeys(
        ["XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XDR", "XPD", "XPT", "XSU", "XTS", "XUA", "XXX"],
        "no minor unit",
    ),
}


class PolicyConfig(_Strict):
    """Payment policy. Amounts are in minor units (cents, fen)."""

    #: ISO 4217 code of a currency with two decimals (amounts are kept in hundredths).
    currency: str = Field("CNY", pattern=r"^[A-Z]{3}$")
    #: Wrong passphrases before the account is locked, and for how long.
    passphrase_attempts: int = Field(3, ge=1, le=10)
    lockout_s: float = Field(900.0, ge=5.0, le=7 * 86400.0)
    #: From start_checkout to a confirm prompt (scanning + verifying).
    session_timeout_s: float = Field(60.0, ge=3.0, le=600.0)
    #: How long a confirm prompt stays valid (DESIGN: at most 30 s).
    prompt_expiry_s: float = Field(30.0, ge=3.0, le=30.0)
    #: Terminal has this long after connecting to send a valid hello (DESIGN: 5 s).
    hello_timeout_s: float = Field(5.0, ge=0.5, le=30.0)
    max_payment: int = Field(500_00, ge=1, le=10**9)
    daily_limit: int = Field(2000_00, ge=1, le=10**10)
    #: Phone-digit answers allowed when the match is ambiguous.
    phone_digit_attempts: int = Field(2, ge=1, le=5)
    #: A second face at least this share of the main face's area makes checkout ask for
    #: one person at a time (no paying for the person behind you).
    crowd_area_ratio: float = Field(0.5, ge=0.1, le=1.0)
    #: Gate mode: fare charged per entry, at most once per account per window.
    gate_fare: int = Field(3_00, ge=1, le=10**6)
    gate_limit: int = Field(20_00, ge=1, le=10**7)
    gate_entry_window_s: float = Field(60.0, ge=1.0, le=86400.0)
    #: Optional merchant offer pushed to the terminal after ``approved`` (None: none).
    offer_text: str | None = Field(None, min_length=1, max_length=200)
    offer_kind: Literal["membership", "coupon"] = "membership"

    @field_validator("currency")
    @classmethod
    def _two_decimals(cls, value: str) -> str:
        # Refused rather than converted: amounts in tills, in the ledger and in the admin
        # API's ``amount_minor`` would all have to change with it.
        kind = NOT_TWO_DECIMAL_CURRENCIES.get(value)
        if kind is not None:
            raise ValueError(
                f"{value} has {kind} in ISO 4217; FacePay keeps amounts in hundredths "
                "and supports only currencies with two decimals"
            )
        return value

    @model_validator(mode="after")
    def _gate_fare_fits(self) -> PolicyConfig:
        # A fare above the gate's daily limit denies every walker "limit": gates never open.
        if self.gate_fare > self.gate_limit:
            raise ValueError("policy.gate_fare must not exceed policy.gate_limit")
        return self


class Limit(_Strict):
    """At most ``count`` events per ``window_s`` seconds (a fixed window in Redis)."""

    count: int = Field(ge=1, le=100_000)
    window_s: float = Field(ge=1.0, le=7 * 86400.0)


class RateLimitConfig(_Strict):
    """Abuse controls (docs/protocol.md "Limits"). Counted in Redis, so every server
    instance sharing it enforces one budget; if Redis cannot count, the request is refused.
    """

    #: ``start_checkout`` per terminal: a kiosk serves a customer every ~20 s at best.
    session_starts_per_terminal: Limit = Limit(count=30, window_s=60.0)
    #: WebRTC offers per terminal (each one builds a peer connection).
    offers_per_terminal: Limit = Limit(count=30, window_s=60.0)
    #: ``passphrase`` answers per terminal (brute force across accounts from one kiosk).
    passphrase_attempts_per_terminal: Limit = Limit(count=20, window_s=300.0)
    #: ``phone_digits`` answers per terminal. A checkout allows ``policy.phone_digit_attempts``
    #: but a new checkout allowed as many again, so a look-alike could work through all
    #: 10,000 last-four values at a kiosk; this budget spans checkouts (and servers): at 10
    #: per 5 minutes that is ~40 hours of standing at one kiosk on average, where an honest
    #: one needs a few an hour (only look-alikes are asked).
    phone_digits_per_terminal: Limit = Limit(count=10, window_s=300.0)
    #: Wrong ``phone_digits`` answers counted against each person an ambiguous search named,
    #: from any terminal (session/phone_digits.py): once spent, such searches are declined
    #: before digits are checked. 20 a day: ~250 days on average for all 10,000 values.
    phone_digit_misses_per_subject: Limit = Limit(count=20, window_s=86400.0)
    #: Wrong passphrases per account over a day, on top of the lockout: reaching it locks
    #: the account for the longest lockout (``max_lockout_s``).
    passphrase_failures_per_account: Limit = Limit(count=12, window_s=86400.0)
    #: ``start_enroll`` per terminal and per account id.
    enrolments_per_terminal: Limit = Limit(count=10, window_s=3600.0)
    enrolments_per_account: Limit = Limit(count=5, window_s=3600.0)
    #: Open WebSockets per terminal token at once (a kiosk needs one; reconnects overlap).
    connections_per_terminal: int = Field(4, ge=1, le=1000)
    #: Each lockout of an account within ``lockout_memory_s`` lasts ``lockout_backoff``
    #: times the one before (policy.lockout_s, then x2, x4...), at most ``max_lockout_s``.
    lockout_backoff: float = Field(2.0, ge=1.0, le=10.0)
    max_lockout_s: float = Field(86400.0, ge=5.0, le=30 * 86400.0)
    lockout_memory_s: float = Field(86400.0, ge=60.0, le=30 * 86400.0)


class IdleCameraConfig(_Strict):
    """Ask an idle gate's camera for fewer frames (``{"type": "camera", "max_fps": N}``).

    An empty corridor is looked at ``idle_scan_fps`` times a second, but the camera sends its
    full rate (30 fps) and the server receives and decodes every frame: most of an idle
    gate's CPU. Once the corridor has been empty and still for ``after_s``, the gate terminal
    is asked to send at most ``fps`` frames a second; the first look that finds a face, a
    tracked person or a moved view asks for the full rate again (``max_fps: null``). With
    ``fps`` equal to ``idle_scan_fps`` the idle looks see the same frames as before; a
    terminal that cannot lower its rate just keeps sending, which costs only CPU.
    """

    enabled: bool = True
    #: The most frames a second an idle gate's camera is asked for.
    fps: float = Field(10.0, ge=1.0, le=60.0)
    #: How long the corridor must have been empty and still before asking (seconds): a gap
    #: in a queue of walkers is shorter, so a busy gate stays at full rate.
    after_s: float = Field(2.0, ge=0.2, le=600.0)


class GateConfig(_Strict):
    """Walk-through gate: less video per decision than checkout, larger faces for evidence.

    Measured on composited walk-through scenes: a live face reads p_real 0.58 at 50 px,
    0.82 at 90 px and ~1.0 from 110 px, while prints stay near 0 at every size; so gate
    evidence starts at ``min_face_px`` and the decision clock (``decision_ms``) starts
    there too. Four scored frames over 0.1 s keep the median decision near 0.33 s at 30 fps
    with 3-5 faces in view; the trimmed-mean fusion still forgives one dip among them.
    """

    min_face_px: float = Field(80.0, ge=40.0, le=400.0)
    #: Frames a second analysed while nobody is in view (no face, no open track); every
    #: frame once someone is. An empty corridor then gets a third of the looks at 30 fps.
    #: A walker's face enters small (~60 px) and needs ~0.5 s of walking to reach
    #: ``min_face_px``, when the decision clock starts, so 0.1 s between looks delays no
    #: decision; a face that appears at full size waits at most one interval (counted in
    #: ``decision_ms``).
    idle_scan_fps: float = Field(10.0, ge=1.0, le=120.0)
    #: ... and of those looks, the detector runs only on a view that has changed since it
    #: was last found empty, or once every ``max_still_s`` (``pipeline/motion.py``).
    idle_change: ChangeConfig = ChangeConfig()
    idle_camera: IdleCameraConfig = IdleCameraConfig()
    evidence: EvidenceConfig = EvidenceConfig(
        min_frames=4, min_span_s=0.1, spoof_fast_frames=3, window_s=2.0, spoof_min_frames=10
    )


class LoadPacingConfig(_Strict):
    """A checkout camera's rate under overload (``session/camera_load.py``)."""

    enabled: bool = True
    #: Seconds of frames (at the rate asked for) between two looks at how many were
    #: analysed: 15 frames at 15 fps, 5 at 5 fps (at least 4).
    window_s: float = Field(1.0, ge=0.2, le=10.0)
    #: Fewer analysed than this share of those received ...
    lower_below: float = Field(0.35, gt=0.0, lt=1.0)
    #: ... in this many windows in a row: ask for fewer frames.
    lower_after: int = Field(2, ge=1, le=10)
    #: This share or more analysed: ask for more again, up to ``checkout.camera_fps``.
    raise_above: float = Field(0.8, gt=0.0, le=1.0)
    #: A lowered rate is this many times the rate that was analysed.
    headroom: float = Field(1.5, ge=1.0, le=4.0)
    #: Each step back up multiplies the rate by this.
    raise_step: float = Field(1.5, gt=1.0, le=4.0)
    #: Never ask for less: a checkout's evidence still needs frames 0.3 s apart and more.
    min_fps: float = Field(5.0, ge=2.0, le=30.0)
    #: A lowered camera goes straight back to the full rate when its next checkout starts,
    #: if the server as a whole analysed ``raise_above`` or more of its checkout cameras'
    #: frames over the last ``window_s`` (or received too few to tell). Without it a rush's
    #: lowered rate outlasts the rush: on an idle server a 5 fps camera confirms in 970 ms
    #: against 373 ms at 15 fps, and steps back up only a window (a shopper) at a time.
    restart_full: bool = True

    @model_validator(mode="after")
    def _raise_above_lower(self) -> LoadPacingConfig:
        if self.raise_above <= self.lower_below:
            raise ValueError("raise_above must be above lower_below")
        return self


class CheckoutConfig(_Strict):
    """Checkout terminals (``checkout`` mode)."""

    #: The most frames a second a checkout terminal is asked to send, right after each video
    #: connection is answered (``{"type": "camera", "max_fps": N}``); None: ask nothing. A
    #: browser's camera sends 30 fps, but a checkout's evidence must span
    #: ``pipeline.evidence.min_span_s`` (0.3 s) whatever the rate, so frames beyond about 15
    #: a second do not bring the decision sooner; they are received, decoded and analysed
    #: for nothing (docs/performance.md: 2 terminals at 30 fps cost 279 ms of server CPU per
    #: checkout against 191 ms at 15, with the same time to ``confirm``). 15 is also the rate
    #: the evidence thresholds and the bench were measured at. A terminal that ignores the
    #: request keeps its rate: that costs only CPU.
    camera_fps: float | None = Field(15.0, ge=5.0, le=60.0)
    #: Fewer frames from a camera while the server cannot analyse what it sends (only with
    #: a ``camera_fps`` to come back to).
    load_pacing: LoadPacingConfig = LoadPacingConfig()


class EnrollmentConfig(_Strict):
    """Live enrolment at an ``enroll`` terminal (docs/protocol.md)."""

    #: Good-quality templates collected from different frames of the live face.
    templates: int = Field(3, ge=1, le=10)
    #: Minimum time between two collected frames (different frames, not one frame thrice).
    min_gap_s: float = Field(0.15, ge=0.0, le=5.0)
    #: From consent to enough live, good frames; then declined ``timeout``.
    timeout_s: float = Field(60.0, ge=3.0, le=600.0)
    #: How long the passphrase step may take; then declined ``timeout``.
    passphrase_timeout_s: float = Field(120.0, ge=3.0, le=600.0)
    #: The most frames a second an enroll terminal is asked to send, right after each video
    #: connection is answered; None: ask nothing. For the reasons of ``checkout.camera_fps``:
    #: the liveness evidence spans ``min_span_s`` whatever the rate and templates come at
    #: least ``min_gap_s`` apart, so a browser's 30 fps only doubles the frames received,
    #: decoded and analysed (and enrolment embeds every frame of the face).
    camera_fps: float | None = Field(15.0, ge=5.0, le=60.0)


class FacePayConfig(_Strict):
    """Everything, in one typed object."""

    pipeline: PipelineConfig = PipelineConfig()
    policy: PolicyConfig = PolicyConfig()
    server: ServerConfig = ServerConfig()
    gate: GateConfig = GateConfig()
    checkout: CheckoutConfig = CheckoutConfig()
    enrollment: EnrollmentConfig = EnrollmentConfig()
    limits: RateLimitConfig = RateLimitConfig()

    def with_server(self, **updates: Any) -> FacePayConfig:
        """This config with ``server`` fields replaced, validated as a loaded one is.

        Raises ConfigError where a value breaks a rule (values resolved after loading, such
        as an admin token from the environment, meet the same rules as the file's).
        """
        try:
            server = ServerConfig.model_validate(self.server.model_dump() | updates)
        except ValidationError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from exc
        return self.model_copy(update={"server": server})

    def camera_cap(self, mode: str) -> float | None:
        """The frame rate a ``mode`` terminal is asked for right after each answer (None:
        nothing is asked; a gate's camera is paced by its session, ``gate.idle_camera``)."""
        caps = {"checkout": self.checkout.camera_fps, "enroll": self.enrollment.camera_fps}
        return caps.get(mode)

    def gate_pipeline(self) -> PipelineConfig:
        """The pipeline config a gate session runs with (gate evidence and face size)."""
        quality = self.pipeline.quality.model_copy(update={"min_face_px": self.gate.min_face_px})
        return self.pipeline.model_copy(update={"evidence": self.gate.evidence, "quality": quality})


def read_config_data(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """A JSON config file's contents, not yet validated ({} without a path)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"cannot read config {path}: not a JSON object")
    return data


def with_sections(data: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``data`` with each section's keys in ``overrides`` set on top (None values skipped)."""
    out = dict(data)
    for section, values in overrides.items():
        given = out.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f'invalid configuration: "{section}" must be a JSON object')
        merged = dict(given)
        merged.update({k: v for k, v in values.items() if v is not None})
        out[section] = merged
    return out


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> FacePayConfig:
    """Read a JSON config file (optional) and apply section overrides on top.

    ``overrides`` are nested dicts by section, e.g. ``server={"port": 0}``; values that are
    None are ignored so command-line options that were not given keep the file's value.
    """
    data = with_sections(read_config_data(path), overrides)
    try:
        return FacePayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
