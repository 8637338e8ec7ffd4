"""The admin HTTP API (``/api/...``): merchants, terminals, back-office enrolment, erasure
and payment look-ups. See docs/api.md.

Every route needs ``Authorization: Bearer <admin token>`` (``server.admin_token`` or a named
operator's from ``server.admin_operators``, compared in constant time); what an operator
changes is audited under their name. With no admin token configured the API answers 503
``admin_disabled``: it is never open. One middleware turns domain errors
(``pipeline.errors``) into JSON error answers; anything unexpected becomes a 500 that says
nothing about the internals.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from pipeline.errors import (
    AccountLocked,
    AlreadyEnrolled,
    AuthError,
    Conflict,
    FacePayError,
    Forbidden,
    ImageError,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    QualityError,
    RateLimited,
    StoreUnavailable,
    TemplateKeyMismatch,
)
from pipeline.image import decode_image
from session.enrollment import ImageFileError, ImageQualityError, Photo, enroll_from_images
from session.models import Account
from stream_server.admin_bodies import (
    AccountForm,
    MerchantIn,
    PayloadTooLarge,
    TerminalIn,
    account_form,
    json_body,
)
from stream_server.app import (
    ANALYZER,
    CONFIG,
    DIRECTORY,
    EXECUTOR,
    HASHER,
    SEARCH_EXECUTOR,
    STORE,
)
from stream_server.revocation import close_revoked, close_stale

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The admin operator a request was authenticated as (set by :func:`admin_route`).
OPERATOR = web.RequestKey("operator", str)


class AdminDisabled(FacePayError):
    """No admin token is configured, so the admin API stays shut (HTTP 503)."""

    code = "admin_disabled"


#: Domain error -> HTTP status; the first matching class wins (subclasses first).
STATUS: tuple[tuple[type[FacePayError], int], ...] = (
    (PayloadTooLarge, 413),
    (AdminDisabled, 503),
    (TemplateKeyMismatch, 503),  # this server's key is not the data's (or a rotation is open)
    (InvalidRequest, 400),
    (QualityError, 400),
    (ImageError, 400),
    (AuthError, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (LimitExceeded, 422),
    (AccountLocked, 423),
    (RateLimited, 429),
    (StoreUnavailable, 503),
)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


# --- errors and authentication -----------------------------------------------------------------


def error_response(exc: FacePayError) -> web.Response:
    """The JSON answer for a domain error: {"error": code, "message", "reasons"?, ...}."""
    status = next((s for cls, s in STATUS if isinstance(exc, cls)), 500)
    body: dict[str, Any] = {"error": exc.code, "message": str(exc)}
    if isinstance(exc, QualityError):
        body["reasons"] = list(exc.reasons)
    if isinstance(exc, ImageQualityError | ImageFileError):
        body["image"] = exc.index
    if isinstance(exc, AccountLocked) and exc.until is not None:
        body["locked_until"] = exc.until
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if isinstance(exc, RateLimited):
        body["retry_after_s"] = round(exc.retry_after_s, 3)
        headers = {"Retry-After": str(exc.retry_after)}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate domain errors under ``/api/`` to HTTP; hide unexpected failures' details."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.json_response(
            {"error": code, "message": exc.reason}, status=exc.status, headers=headers
        )
    except FacePayError as exc:
        if isinstance(exc, StoreUnavailable):
            log.warning("%s %s: store unavailable: %s", request.method, request.path, exc)
        return error_response(exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(
            {"error": "internal", "message": "internal server error"}, status=500
        )


def check_admin(request: web.Request) -> str:
    """The operator whose admin token the bearer is; AdminDisabled if no admin token is
    configured, AuthError unless one matches.

    The admin token is its own secret: terminal tokens never open the admin API (they are
    looked up in Redis by the WebSocket, never here). ``server.admin_token`` (and, during a
    rotation, ``server.admin_token_previous``) stand for the operator "admin";
    ``server.admin_operators`` adds one token per named operator. Every configured token is
    compared, in constant time, whatever the first comparison gave: the answer's timing says
    nothing about which token, or how much of one, matched.
    """
    accepted = request.app[CONFIG].server.admin_tokens()
    if not accepted:
        raise AdminDisabled("admin API disabled: no admin token is configured")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    # surrogateescape: aiohttp keeps undecodable header bytes as surrogates; they never match.
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    operator: str | None = None
    for name, token in accepted:
        matched = hmac.compare_digest(given_bytes, token.get_secret_value().encode("utf-8"))
        if matched and operator is None:
            operator = name
    if scheme.lower() != "bearer" or operator is None:
        log.warning("admin API: bad or missing token from %s", request.remote)
        raise AuthError("missing or wrong admin token")
    return operator


def admin_route(handler: Handler) -> Handler:
    """Wrap a handler so that it runs only for an admin operator (``request[OPERATOR]``)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        request[OPERATOR] = check_admin(request)
        return await handler(request)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


# --- handlers ---------------------------------------------------------------------------------


async def add_merchant(request: web.Request) -> web.StreamResponse:
    """``POST /api/merchants {name}`` -> 201 {merchant_id, name, created}."""
    body = await json_body(request, MerchantIn)
    merchant = await request.app[STORE].add_merchant(body.name, operator=request[OPERATOR])
    return web.json_response(
        {"merchant_id": merchant.merchant_id, "name": merchant.name, "created": merchant.created},
        status=201,
    )


async def add_terminal(request: web.Request) -> web.StreamResponse:
    """``POST /api/terminals {merchant_id, mode}`` -> 201 {terminal_id, token, ...}."""
    body = await json_body(request, TerminalIn)
    store = request.app[STORE]
    await store.get_merchant(body.merchant_id)  # NotFound for an unknown merchant
    terminal, token = await store.add_terminal(
        body.merchant_id, body.mode, operator=request[OPERATOR]
    )
    return web.json_response(
        {
            "terminal_id": terminal.terminal_id,
            "merchant_id": terminal.merchant_id,
            "mode": terminal.mode,
            "token": token,
        },
        status=201,
    )


async def rotate_terminal(request: web.Request) -> web.StreamResponse:
    """``POST /api/terminals/{terminal_id}/rotate`` -> 200 {terminal_id, token} (new token).

    The old token stops working at once, and the sockets opened with it are closed (4401):
    here before this answer (no Redis read, so the new token is never lost to a failure
    after the rotation committed), on the other servers when ``rotated:{id}`` on
    ``fp:events`` tells them (revocation.py). The terminal reconnects with its new token.
    """
    terminal_id = request.match_info["terminal_id"]
    store = request.app[STORE]
    token = await store.rotate_terminal_token(terminal_id, operator=request[OPERATOR])
    stale = close_stale(request.app, terminal_id, store.token_sha256(token))
    if stale:
        # Their sessions are stopped already; a socket that does not read must not hold
        # back the new token, which is shown only in this answer.
        await asyncio.wait(stale, timeout=1.0)
    return web.json_response({"terminal_id": terminal_id, "token": token})


async def revoke_terminal(request: web.Request) -> web.StreamResponse:
    """``DELETE /api/terminals/{terminal_id}`` -> 200 {terminal_id, status: "revoked"}.

    The token stops working, and the terminal's open sockets are closed (4401): here before
    this answer, on the other servers when ``fp:events`` tells them (revocation.py).
    """
    terminal_id = request.match_info["terminal_id"]
    await request.app[STORE].revoke_terminal(terminal_id, operator=request[OPERATOR])
    await asyncio.gather(*close_revoked(request.app, terminal_id), return_exceptions=True)
    return web.json_response({"terminal_id": terminal_id, "status": "revoked"})


async def add_account(request: web.Request) -> web.StreamResponse:
    """``POST /api/accounts`` (multipart) -> 201 {account_id, templates}.

    Nothing is decoded before every field passed; then each photo is decoded in the
    executor when its turn comes and dropped once its template is made (session.enrollment).
    """
    form, blobs = await account_form(request)
    app = request.app
    photos = [functools.partial(decode_image, blob) for blob in blobs]
    try:
        account, count = await _enroll(app, form, photos, request[OPERATOR])
    except AlreadyEnrolled:
        # Each refusal tells the caller something about an enrolled person (that face, those
        # digits): it is on the record under the operator's name, like every admin change.
        await app[STORE].audit(
            "enroll_refused",
            reason="already_enrolled",
            account_id=form.account_id,
            operator=request[OPERATOR],
        )
        raise
    return web.json_response(
        {"account_id": account.account_id, "templates": count, "name": account.masked_name},
        status=201,
    )


async def _enroll(
    app: web.Application, form: AccountForm, images: Sequence[Photo], operator: str
) -> tuple[Account, int]:
    """``enroll_from_images`` with this app's services, consent given by ``operator``."""
    return await enroll_from_images(
        store=app[STORE],
        directory=app[DIRECTORY],
        analyzer=app[ANALYZER],
        hasher=app[HASHER],
        executor=app[EXECUTOR],
        search_executor=app[SEARCH_EXECUTOR],
        account_id=form.account_id,
        name=form.name,
        phone=form.phone,
        passphrase=form.passphrase,
        images=images,
        consent={
            "source": "admin_api",
            "given_at": f"{time.time():.3f}",
            "operator": operator,
        },
    )


async def erase_account(request: web.Request) -> web.StreamResponse:
    """``DELETE /api/accounts/{account_id}`` -> 200 {account_id, erased, history_purge}.

    ``erased`` counts the templates deleted. This instance's directory, like every other's,
    drops the subject when the store's ``erased:{sid}`` event arrives (stream_server.sync);
    a stale index entry meanwhile cannot pay, because the subject's link to the account is
    already gone. ``history_purge`` lists what Redis was asked to redo so that its own files
    lose the erased data too (``server.purge_history_on_erasure``; Store.purge_history).
    """
    account_id = request.match_info["account_id"]
    store = request.app[STORE]
    erased = await store.erase_account(account_id, reason="admin_api", operator=request[OPERATOR])
    purged: tuple[str, ...] = ()
    if request.app[CONFIG].server.purge_history_on_erasure:
        try:
            purged = await store.purge_history()
        except StoreUnavailable as exc:  # the erasure itself is done and must be reported
            log.warning("an erasure is done, but not the purge of Redis's files: %s", exc)
    body = {"account_id": account_id, "erased": erased, "history_purge": list(purged)}
    return web.json_response(body)


async def get_payment(request: web.Request) -> web.StreamResponse:
    """``GET /api/payments/{payment_id}`` -> the payment."""
    payment = await request.app[STORE].get_payment(request.match_info["payment_id"])
    return web.json_response(payment.to_json())


async def get_order(request: web.Request) -> web.StreamResponse:
    """``GET /api/merchants/{merchant_id}/orders/{order_id}`` -> the payment, or 404."""
    mid, oid = request.match_info["merchant_id"], request.match_info["order_id"]
    payment = await request.app[STORE].find_payment(mid, oid)
    if payment is None:
        raise NotFound(f"no payment for order {oid!r} of merchant {mid!r}")
    return web.json_response(payment.to_json())


async def read_audit(request: web.Request) -> web.StreamResponse:
    """``GET /api/audit?after=ID&limit=N`` -> 200 {records: [{id, event, t, ...}], next,
    missed}.

    Oldest first, after the record ``after`` (from the oldest kept without it), at most
    ``limit`` (1000 by default, 10,000 at most). ``next`` is the cursor for the next call:
    the last record's id, or ``after`` again when there was nothing new. ``missed``: records
    after ``after`` were trimmed or deleted before they could be read.
    """
    after = request.query.get("after") or None
    raw_limit = request.query.get("limit", "1000")
    if not (raw_limit.isascii() and raw_limit.isdigit()):
        raise InvalidRequest("limit must be a whole number")
    page = await request.app[STORE].audit_after(after, int(raw_limit))
    records = [{"id": rid, **fields} for rid, fields in page.records]
    last = page.records[-1][0] if page.records else after
    return web.json_response({"records": records, "next": last, "missed": page.missed})


def setup(app: web.Application) -> None:
    """Add the admin routes and the error middleware."""
    app.middlewares.append(errors_middleware)
    app.router.add_post("/api/merchants", admin_route(add_merchant))
    app.router.add_post("/api/terminals", admin_route(add_terminal))
    app.router.add_post("/api/terminals/{terminal_id}/rotate", admin_route(rotate_terminal))
    app.router.add_delete("/api/terminals/{terminal_id}", admin_route(revoke_terminal))
    app.router.add_post("/api/accounts", admin_route(add_account))
    app.router.add_delete("/api/accounts/{account_id}", admin_route(erase_account))
    app.router.add_get("/api/audit", admin_route(read_audit))
    app.router.add_get("/api/payments/{payment_id}", admin_route(get_payment))
    app.router.add_get("/api/merchants/{merchant_id}/orders/{order_id}", admin_route(get_order))
