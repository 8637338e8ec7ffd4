"""Private part of ``session.store.Store``: merchants and terminals (tokens stored as
sha256 only). ``Store`` inherits these methods; code against ``Store`` only.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from typing import cast, get_args

from pipeline.errors import AuthError, InvalidRequest, NotFound
from session import _store_lua as h
from session._store_keys import StoreKeys
from session.models import Merchant, Terminal, TerminalMode


class StoreTerminals(StoreKeys):
    """Merchants, terminals and terminal authentication."""

    async def add_merchant(self, name: str, *, operator: str | None = None) -> Merchant:
        """Create a merchant with a new random id; audit ``merchant_added``."""
        name = h.check_label(name, "merchant name")
        merchant = Merchant(h.new_id("m", 12), name, time.time())
        fields = {"merchant_id": merchant.merchant_id, **h.by_operator(operator)}
        with h.unavailable("add_merchant"):
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._k("merchant", merchant.merchant_id),
                    mapping={"name": name, "created": repr(merchant.created)},
                )
                self._queue_audit(pipe, h.audit_fields("merchant_added", merchant.created, fields))
                await pipe.execute()
        return merchant

    async def get_merchant(self, merchant_id: str) -> Merchant:
        """The merchant, or NotFound."""
        with h.unavailable("get_merchant"):
            raw = h.decode_hash(await self._r.hgetall(self._k("merchant", merchant_id)))
        if not raw:
            raise NotFound("no such merchant")
        return Merchant(merchant_id, raw["name"], float(raw["created"]))

    async def add_terminal(
        self, merchant_id: str, mode: TerminalMode, *, operator: str | None = None
    ) -> tuple[Terminal, str]:
        """Create a terminal; returns it and its token (shown once, stored only as sha256).

        Audit ``terminal_added`` (ids and mode, never the token).
        """
        if mode not in get_args(TerminalMode):
            raise InvalidRequest(f"terminal mode must be one of {get_args(TerminalMode)}")
        await self.get_merchant(merchant_id)
        terminal = Terminal(h.new_id("t", 12), merchant_id, mode, time.time())
        token, digest = h.new_terminal_token()
        fields = {
            "terminal_id": terminal.terminal_id,
            "merchant_id": merchant_id,
            "mode": mode,
            **h.by_operator(operator),
        }
        with h.unavailable("add_terminal"):
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._k("terminal", terminal.terminal_id),
                    mapping={
                        "merchant_id": merchant_id,
                        "mode": mode,
                        "token_sha256": digest,
                        "created": repr(terminal.created),
                        "status": terminal.status,
                    },
                )
                pipe.set(self._k("termtok", digest), terminal.terminal_id)
                self._queue_audit(pipe, h.audit_fields("terminal_added", terminal.created, fields))
                await pipe.execute()
        return terminal, token

    async def get_terminal(self, terminal_id: str) -> Terminal:
        """The terminal (active or revoked), or NotFound."""
        with h.unavailable("get_terminal"):
            raw = h.decode_hash(await self._r.hgetall(self._k("terminal", terminal_id)))
        if not raw:
            raise NotFound("no such terminal")
        return self._terminal(terminal_id, raw)

    async def revoke_terminal(self, terminal_id: str, *, operator: str | None = None) -> None:
        """Revoke a terminal: its token stops working at once, and ``revoked:{id}`` on the
        events channel tells every server to close its sockets. NotFound if unknown."""
        with h.unavailable("revoke_terminal"):
            key = self._k("terminal", terminal_id)
            digest = await self._r.hget(key, "token_sha256")
            if digest is None:
                raise NotFound("no such terminal")
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"status": "revoked", "revoked": repr(time.time())})
                pipe.delete(self._k("termtok", h.text(digest)))
                entry = h.audit_fields(
                    "terminal_revoked",
                    time.time(),
                    {"terminal_id": terminal_id, **h.by_operator(operator)},
                )
                self._queue_audit(pipe, entry)
                # Every server closes the terminal's open sockets (stream_server.revocation).
                pipe.publish(self.events_channel, f"revoked:{terminal_id}")
                await pipe.execute()

    @staticmethod
    def token_sha256(token: str) -> str:
        """The digest a terminal token is stored under. A connection keeps its token's, to
        tell after a rotation whether it was opened with the terminal's current token."""
        return h.token_sha256(token)

    async def current_token_sha256(self, terminal_id: str) -> str | None:
        """The digest of the terminal's current token; None if it is revoked or unknown."""
        with h.unavailable("current_token_sha256"):
            digest, status = await self._r.hmget(
                self._k("terminal", terminal_id), ["token_sha256", "status"]
            )
        if digest is None or status is None or h.text(status) != "active":
            return None
        return h.text(digest)

    async def authenticate_terminal(self, token: str) -> Terminal:
        """The active terminal whose token this is, or AuthError (constant-time compare)."""
        if not isinstance(token, str) or not token or len(token) > 256:
            raise AuthError("missing or malformed terminal token")
        digest = h.token_sha256(token)
        with h.unavailable("authenticate_terminal"):
            tid = await self._r.get(self._k("termtok", digest))
            if tid is None:
                raise AuthError("unknown terminal token")
            terminal_id = h.text(tid)
            raw = h.decode_hash(await self._r.hgetall(self._k("terminal", terminal_id)))
        stored = raw.get("token_sha256", "")
        if not hmac.compare_digest(stored.encode(), digest.encode()):
            raise AuthError("unknown terminal token")
        if raw.get("status") != "active":
            raise AuthError("terminal revoked")
        return self._terminal(terminal_id, raw)

    @staticmethod
    def _terminal(terminal_id: str, raw: Mapping[str, str]) -> Terminal:
        mode = raw["mode"]
        if mode not in get_args(TerminalMode):
            raise InvalidRequest("stored terminal has an unknown mode")
        return Terminal(
            terminal_id=terminal_id,
            merchant_id=raw["merchant_id"],
            mode=cast(TerminalMode, mode),
            created=float(raw["created"]),
            status=raw.get("status", "active"),
        )
