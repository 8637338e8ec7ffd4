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
    """A model file is missing, altered, or cannot be loaded."""

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
