"""Request bodies of the admin HTTP API (``stream_server.admin``): pydantic models and
size-limited readers for JSON bodies and the multipart enrolment upload. Every failure is a
domain error (``InvalidRequest``, ``PayloadTooLarge``) that the admin middleware turns into
a 4xx JSON answer.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import InvalidRequest

#: Largest JSON body, text form field, image file, and number of images per enrolment.
MAX_JSON_BYTES = 16 * 1024
MAX_FIELD_BYTES = 1024
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGES = 10
MAX_UPLOAD_BYTES = 40 * 1024 * 1024


_M = TypeVar("_M", bound=BaseModel)


class PayloadTooLarge(InvalidRequest):
    """A body, field or file is larger than the API accepts (HTTP 413)."""

    code = "too_large"


# --- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    # No whitespace stripping: a passphrase is taken exactly as typed (the store trims names).
    model_config = ConfigDict(extra="forbid", frozen=True)


class MerchantIn(_Body):
    """``POST /api/merchants``."""

    name: str = Field(min_length=1, max_length=100)


class TerminalIn(_Body):
    """``POST /api/terminals``."""

    merchant_id: str = Field(min_length=1, max_length=64)
    mode: Literal["checkout", "gate", "enroll"]


class AccountForm(_Body):
    """The text fields of ``POST /api/accounts`` (multipart/form-data)."""

    account_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=100)
    phone: str = Field(min_length=4, max_length=32)
    passphrase: str = Field(min_length=1, max_length=256)
    consent: Literal["true"]


def _validation_message(exc: ValidationError) -> str:
    """A short description of what is wrong, without echoing any input (passphrases)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _validate(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(_validation_message(exc)) from None


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """The raw body, or PayloadTooLarge once it passes ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes")
    buf = bytearray()
    while chunk := await request.content.readany():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes")
    return bytes(buf)


async def json_body(request: web.Request, model: type[_M]) -> _M:
    raw = await _read_limited(request, MAX_JSON_BYTES)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the parser's stack (found by tests/test_fuzz).
        raise InvalidRequest("body must be a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return _validate(model, data)


async def _read_part(part: BodyPartReader, limit: int, what: str) -> bytes:
    buf = bytearray()
    while True:
        try:
            chunk = await part.read_chunk(64 * 1024)
        except (ValueError, AssertionError):
            raise InvalidRequest(f"{what}: malformed multipart part") from None
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"{what} is larger than {limit} bytes")
    return bytes(buf)


async def account_form(request: web.Request) -> tuple[AccountForm, list[bytes]]:
    """Text fields and image files of an enrolment upload, each size-limited."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequest("expected multipart/form-data with the fields and image files")
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
        raise PayloadTooLarge(f"upload is larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError):
        raise InvalidRequest("malformed multipart body") from None
    fields: dict[str, str] = {}
    images: list[bytes] = []
    total = 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError, KeyError):
            # No or broken boundary lines: aiohttp raises ValueError (found by tests/test_fuzz).
            raise InvalidRequest("malformed multipart body") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not accepted")
        name = part.name or ""
        if name == "image":
            if len(images) >= MAX_IMAGES:
                raise InvalidRequest(f"at most {MAX_IMAGES} images per enrolment")
            data = await _read_part(part, MAX_IMAGE_BYTES, f"image {len(images)}")
            images.append(data)
        elif name in AccountForm.model_fields:
            if name in fields:
                raise InvalidRequest(f"field {name!r} given twice")
            data = await _read_part(part, MAX_FIELD_BYTES, f"field {name!r}")
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"field {name!r} is not UTF-8 text") from None
        else:
            raise InvalidRequest(f"unknown field {name!r}")
        total += len(data)
        if total > MAX_UPLOAD_BYTES:
            raise PayloadTooLarge(f"upload is larger than {MAX_UPLOAD_BYTES} bytes")
    if fields.get("consent", "").strip().lower() != "true":
        raise InvalidRequest("consent required: send consent=true after the person agreed")
    form = _validate(AccountForm, {**fields, "consent": "true"})
    if not images:
        raise InvalidRequest("at least one image file is required (field 'image')")
    return form, images
