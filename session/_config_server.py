"""The ``server`` section of the FacePay configuration: network, storage and secrets.

Part of ``session.config`` (which re-exports it), kept apart for size.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from session._config_base import _Strict

#: Shortest admin token accepted. The admin API adds terminals, erases shoppers and reads
#: payments, and nothing slows down guessing its token (docs/api.md), so the token itself
#: must be unguessable: 32 characters of ``secrets.token_urlsafe`` carry 192 bits.
ADMIN_TOKEN_MIN_CHARS = 32
#: The operator name ``admin_token`` (and ``admin_token_previous``) stands for.
DEFAULT_OPERATOR = "admin"
OPERATOR_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def check_admin_token(token: SecretStr) -> None:
    """ValueError if ``token`` is too short to stand unguessed (ADMIN_TOKEN_MIN_CHARS)."""
    if len(token.get_secret_value()) < ADMIN_TOKEN_MIN_CHARS:
        raise ValueError(
            f"an admin token needs at least {ADMIN_TOKEN_MIN_CHARS} characters; make one "
            "with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )


class ServerConfig(_Strict):
    """Network, storage and secrets."""

    #: An empty host would listen on every interface (a config's unset variable, say).
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8080, ge=0, le=65535)
    #: None: start a private redis-server in ``data_dir`` (embedded default).
    redis_url: str | None = None
    #: Connections this server may open to Redis. The pool waits (up to 5 s) for a free one
    #: instead of failing: redis-py's own default pool refuses past 100, which refused
    #: passphrases when 100 terminals confirmed at once (tests/test_duplicate_confirms.py).
    redis_max_connections: int = Field(512, ge=8, le=10_000)
    data_dir: Path = Path("data")
    #: Dev mode generates and keeps a template key in data_dir; production must pass one.
    dev_mode: bool = False
    admin_token: SecretStr | None = None
    #: Also accepted while admin clients move to a new ``admin_token`` (rotation); remove it
    #: once they have.
    admin_token_previous: SecretStr | None = None
    #: One admin token per operator, by name: the audit stream then records which operator
    #: erased an account, enrolled one or created, rotated or revoked a terminal. The
    #: tokens follow the same rules as ``admin_token``, which acts as the operator "admin".
    admin_operators: dict[str, SecretStr] = Field(default_factory=dict, max_length=64)
    #: 32-byte AES-GCM key, hex or base64 (FACEPAY_TEMPLATE_KEY).
    template_key: SecretStr | None = None
    #: After each erasure, ask Redis to rewrite its append-only file, take a fresh snapshot
    #: and clear SLOWLOG, so the erased person's data leaves Redis's own files within
    #: seconds instead of at the next rewrite (docs/privacy.md). Each is one background job
    #: in Redis (a fork); turn this off if you schedule rewrites yourself on a big dataset.
    purge_history_on_erasure: bool = True
    #: How often each server checks for an erasure whose purge did not finish (a rewrite
    #: still busy, Redis unreachable, the server stopped in between) and runs it again.
    purge_retry_s: float = Field(60.0, ge=1.0, le=3600.0)
    #: About how many records the audit stream in Redis keeps (a payment's takes ~150 bytes
    #: of Redis memory; the default is about a day of a busy store's payments). Keep a
    #: longer history elsewhere: ``GET /api/audit?after=ID`` pages through it and flags
    #: records trimmed before they were read (docs/api.md, Audit).
    audit_max_records: int = Field(100_000, ge=1_000, le=100_000_000)
    #: Seal the audit records added since the last seal this often: an HMAC chain under a
    #: subkey of the template key, checked by ``facepay admin audit-verify``. Records newer
    #: than the last seal are not yet covered. None turns sealing off.
    audit_seal_s: float | None = Field(10.0, ge=1.0, le=3600.0)
    #: Inference/argon2 workers; None = number of cores.
    workers: int | None = Field(None, ge=1, le=64)
    #: The event loop that moves every RTP packet: on "uvloop" (libuv) the loop thread spends
    #: 10-20 % less CPU per received frame than on asyncio's own (docs/performance.md);
    #: "auto" uses uvloop where it is installed (not on Windows), "asyncio" forces the
    #: standard loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    max_message_bytes: int = Field(64 * 1024, ge=1024, le=4 * 1024 * 1024)
    #: Terminals connected (said hello) at once; more get 503 at the upgrade, or 1013 after
    #: a hello that raced past that check.
    max_sessions: int = Field(64, ge=1, le=10_000)
    #: Sockets waiting for their hello at once. A real terminal says hello within
    #: milliseconds; when this many wait, a new socket closes the one that has waited
    #: longest (1013), so sockets that never say hello cannot hold every slot.
    max_pending_hellos: int = Field(32, ge=1, le=10_000)
    #: Video frames larger than this (width x height) are dropped unanalysed (1080p).
    max_frame_pixels: int = Field(1920 * 1080, ge=320 * 240, le=7680 * 4320)
    #: WebSocket ``Origin`` values allowed besides the server's own origin (same origin is
    #: always allowed; "*" allows any). Clients that send no Origin (kiosk apps, replay)
    #: are not browsers and are let through: the terminal token authenticates them.
    allowed_origins: tuple[str, ...] = Field((), max_length=64)
    #: The addresses this server offers terminals for their video (its ICE host
    #: candidates). Empty: every address of the host (aioice's own discovery), so a host
    #: with several interfaces (docker0, a VPN) offers addresses terminals cannot reach and
    #: leaves them to try each. Process-wide; applied at start-up (docs/scaling.md).
    ice_addresses: tuple[str, ...] = Field((), max_length=16)

    @field_validator("admin_token", "admin_token_previous")
    @classmethod
    def _admin_token_long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            check_admin_token(token)
        return token

    @field_validator("ice_addresses")
    @classmethod
    def _ice_addresses_are_addresses(cls, addresses: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return tuple(str(ipaddress.ip_address(a)) for a in addresses)
        except ValueError as exc:
            raise ValueError(f"ice_addresses must be IP addresses: {exc}") from exc

    @field_validator("admin_operators")
    @classmethod
    def _operators_named_and_long_enough(
        cls, operators: dict[str, SecretStr]
    ) -> dict[str, SecretStr]:
        for name, token in operators.items():
            if not OPERATOR_NAME.fullmatch(name) or name == DEFAULT_OPERATOR:
                raise ValueError(
                    "an admin operator's name is 1-64 letters, digits or _.@- (and not "
                    f"{DEFAULT_OPERATOR!r}, the name of admin_token)"
                )
            check_admin_token(token)
        return operators

    @model_validator(mode="after")
    def _admin_tokens_distinct(self) -> ServerConfig:
        # A token shared by two operators would make the audit's operator a guess.
        tokens = [token.get_secret_value() for _, token in self.admin_tokens()]
        if len(set(tokens)) != len(tokens):
            raise ValueError(
                "every admin token (admin_token, its previous, each operator's) must differ"
            )
        return self

    def admin_tokens(self) -> list[tuple[str, SecretStr]]:
        """Every accepted admin token with the operator it stands for (``admin_token`` and
        ``admin_token_previous`` both stand for "admin"). Empty: the admin API is disabled."""
        out = [
            (DEFAULT_OPERATOR, token)
            for token in (self.admin_token, self.admin_token_previous)
            if token is not None and token.get_secret_value()
        ]
        return out + list(self.admin_operators.items())
