"""FacePay domain errors, in one place.

Rooms raise these; only the edge (``stream_server``) translates them into HTTP statuses,
WebSocket close codes or command-line exit codes.
"""

from __future__ import annotations


class FacePayError(Exception):
    """Base of every FacePay domain error. ``code`` is a stable machine-readable reason."""

    code = "error"


class ImageError(FacePayError):
    """An input image is empty, corrupt, too large or in an unsupported layout."""

    code = "bad_image"


class ModelError(FacePayError):
    """A model file is missing, altered or cannot be loaded, or a model gave unusable output."""

    code = "model_error"


class ModelMissingError(ModelError):
    """A model file named by the manifest is not in the models folder."""

    code = "model_missing"


class ModelChecksumError(ModelError):
    """A model file's sha256 differs from the manifest."""

    code = "model_checksum"


class DownloadRefused(ModelError):
    """A server answered, but its file was refused (HTTP error, too large, wrong sha256)."""

    code = "download_refused"


class DownloadUnreachable(ModelError):
    """No HTTP answer came back from a URL (refused connection, DNS, timeout, reset)."""

    code = "download_unreachable"


class ConfigError(FacePayError):
    """Configuration is invalid or names an unknown component."""

    code = "bad_config"


class QualityError(FacePayError):
    """A face is unusable for enrolment: none, several, or failing a quality check."""

    code = "bad_quality"

    def __init__(self, message: str, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reasons = reasons


# --- session and payment errors (raised by session/, translated at the edge) -----------------


class StoreUnavailable(FacePayError):
    """Redis cannot be reached or failed mid-operation.

    A single command (such as the payment script) may still have run when only its reply
    was lost; ``unsent`` is True only when it certainly never reached Redis (no connection
    could be made), so a caller may say "nothing was written" only then.
    """

    code = "unavailable"
    unsent: bool = False


class NotFound(FacePayError):
    """A merchant, terminal, account or payment does not exist (or is not yours)."""

    code = "not_found"


class AuthError(FacePayError):
    """A token is missing, unknown or revoked."""

    code = "unauthorized"


class Forbidden(FacePayError):
    """Authenticated, but not allowed (another merchant's data, wrong terminal mode)."""

    code = "forbidden"


class Conflict(FacePayError):
    """The thing already exists (account id taken, order already paid)."""

    code = "conflict"


class AlreadyEnrolled(Conflict):
    """This face is already enrolled with a phone ending in the same four digits: a checkout
    could never tell the two accounts apart."""

    code = "already_enrolled"


class PaymentConflict(Conflict):
    """Conflict raised when an order is already paid; ``payment_id`` names that payment.

    A ``Conflict`` for every caller that catches ``Conflict``; the message ends with the
    existing payment id as well.
    """

    def __init__(self, message: str, payment_id: str) -> None:
        super().__init__(message)
        self.payment_id = payment_id


class InvalidRequest(FacePayError):
    """A request is malformed or out of bounds (amount, order id, message shape)."""

    code = "invalid_request"


class TemplateKeyMismatch(InvalidRequest, ConfigError):
    """The template key given is not the one the data in Redis is sealed under (its key
    check differs), or a key rotation is unfinished. A configuration error: the command line
    exits 2, a server does not start."""

    code = "template_key_mismatch"


class IllegalTransition(FacePayError):
    """A session was asked to move between states that are not connected."""

    code = "illegal_transition"


class AccountLocked(FacePayError):
    """Too many wrong passphrases; the account is locked until ``until`` (epoch seconds)."""

    code = "locked"

    def __init__(self, message: str, until: float | None = None) -> None:
        super().__init__(message)
        self.until = until


class LimitExceeded(FacePayError):
    """The payment is above the per-payment or the daily limit."""

    code = "limit"


class RateLimited(FacePayError):
    """Too many requests of one kind (session/ratelimit.py); retry after ``retry_after_s``."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> int:
        """Whole seconds for an HTTP ``Retry-After`` header (at least 1)."""
        return max(1, -(-int(self.retry_after_s * 1000) // 1000))
