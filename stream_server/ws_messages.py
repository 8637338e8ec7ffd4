"""The terminal protocol's messages (docs/protocol.md): pydantic models of what a terminal
may send, the close codes, the error event and the metrics observer. ``stream_server.ws``
serves them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from yarl import URL

from stream_server.metrics import Metrics

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TRY_LATER = 1013
#: This terminal token already holds ``limits.connections_per_terminal`` sockets.
CLOSE_TOO_MANY = 4429
#: The transport refuses frames above this outright (close 1009); between the configured
#: message limit and this, the terminal gets a ``too_large`` error and stays connected.
TRANSPORT_MAX_BYTES = 1024 * 1024


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hello(_Msg):
    type: Literal["hello"]
    token: str = Field(min_length=1, max_length=256)


class Offer(_Msg):
    type: Literal["offer"]
    sdp: str = Field(min_length=1, max_length=32_000)
    sdp_type: Literal["offer"] = "offer"


class StartCheckout(_Msg):
    type: Literal["start_checkout"]
    # Strict: lax mode would turn JSON true into 1 (an amount of 1.00) before parse_amount
    # could refuse a boolean.
    amount: Annotated[StrictStr | StrictInt | StrictFloat, Field(union_mode="left_to_right")]
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    order_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")


class Passphrase(_Msg):
    type: Literal["passphrase"]
    prompt_id: str = Field(min_length=1, max_length=64)
    passphrase: str = Field(min_length=1, max_length=256)


class PhoneDigits(_Msg):
    type: Literal["phone_digits"]
    digits: str = Field(pattern=r"^[0-9]{4}$")


class StartEnroll(_Msg):
    type: Literal["start_enroll"]
    consent: bool = Field(strict=True)
    account_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=100)
    phone: str = Field(min_length=1, max_length=32)


class EnrollPassphrase(_Msg):
    type: Literal["enroll_passphrase"]
    passphrase: str = Field(min_length=1, max_length=256)
    confirm: str = Field(min_length=1, max_length=256)


class Simple(_Msg):
    type: Literal["cancel", "ping"]


MESSAGES: dict[str, type[_Msg]] = {
    "offer": Offer,
    "start_checkout": StartCheckout,
    "passphrase": Passphrase,
    "phone_digits": PhoneDigits,
    "start_enroll": StartEnroll,
    "enroll_passphrase": EnrollPassphrase,
    "cancel": Simple,
    "ping": Simple,
}


class MetricsObserver:
    """Session observer feeding Prometheus metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def frame_processed(self, timings_ms: dict[str, float], *, detector_ran: bool = True) -> None:
        self.metrics.frames_processed.inc()
        if not detector_ran:
            self.metrics.frames_no_detector.inc()
        for stage, ms in timings_ms.items():
            self.metrics.stage_seconds.labels(stage).observe(ms / 1000.0)

    def confirm_latency(self, seconds: float) -> None:
        self.metrics.confirm_seconds.observe(seconds)

    def decision(self, mode: str, outcome: str, reason: str) -> None:
        self.metrics.decisions.labels(mode, outcome, reason).inc()

    def gate_decision(self, seconds: float) -> None:
        self.metrics.decision_seconds.observe(seconds)


def error_event(code: str, message: str) -> dict[str, Any]:
    """The ``error`` event the terminal gets for a refused message."""
    return {"type": "error", "code": code, "message": message}


def headers_decodable(request: web.Request) -> bool:
    """False if a header held bytes that are not UTF-8 (aiohttp keeps them as surrogates)."""
    try:
        for value in request.headers.values():
            value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """True if the WebSocket's ``Origin`` may connect.

    No Origin: not a browser (kiosk app, replay); the terminal token authenticates it. A
    browser's Origin must be the server's own host (the pages it serves) or be listed in
    ``server.allowed_origins`` ("*" allows any): a page on another site cannot drive a
    terminal from a visitor's browser.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    try:
        url = URL(origin)
    except ValueError:
        return False
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        return False
    # Same origin: the Origin's host[:port] is the Host the browser asked for. The scheme is
    # not compared: behind a TLS-terminating proxy the page is https, this hop is http.
    return url.raw_authority.lower() == request.host.lower()
