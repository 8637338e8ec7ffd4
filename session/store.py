"""FacePay's records on Redis: merchants, terminals, accounts, encrypted templates, links,
payments, lockouts and the audit stream.

INTERFACE CONTRACT (implemented by the store owner; other modules code against it).

Key layout (prefix ``fp:``), chosen so that a stolen dump does not join faces to people:
- ``fp:merchant:{mid}`` hash {name, created}
- ``fp:terminal:{tid}`` hash {merchant_id, mode, token_sha256, created, status}
- ``fp:termtok:{sha256(token)}`` -> tid
- ``fp:account:{aid}`` hash {name, phone, phone_last4, passhash, status, created}; passhash
  is the argon2id hash sealed under the template key (``TemplateCipher.seal_passhash``)
- ``fp:tpl:{sid}`` hash {0: blob, 1: blob, ...}: AES-GCM(nonce || ciphertext), AAD = sid;
  ``sid`` is random and says nothing about the account
- ``fp:subjects`` set of sids; ``fp:link:s2a:{sid}`` -> the aid sealed with AES-GCM (a
  subkey of the template key, AAD = "s2a:{sid}"); ``fp:link:a2s:{blind(aid)}`` set of sids,
  where ``blind`` is an HMAC under another subkey. These are the only place where a face and
  a person meet, and without the key neither direction can be followed.
- ``fp:pay:{mid}:{order_id}`` hash (the payment); ``fp:payid:{pid}`` -> "{mid}:{order_id}"
- ``fp:daily:{aid}:{YYYYMMDD}`` spent today (minor units), expires after 2 days
- ``fp:fail:{aid}`` failed passphrase counter; ``fp:lock:{aid}`` -> locked-until (TTL);
  ``fp:lockouts:{aid}`` lockouts lately (back-off), ``fp:failday:{aid}`` failures today
- ``fp:rl:{bucket}:{sha256(key)}`` rate-limit counters (session/ratelimit.py), with TTLs
- ``fp:audit`` stream: event, time and ids only; never a passphrase, hash, embedding or image;
  ``audit_sealed`` records chain an HMAC over it (session/_store_audit.py), ``fp:audit:seal``
  hash {upto, mac, seal} of the last seal, ``fp:audit:sealing`` the sealer's short lock
- ``fp:template_key_check`` names the template key the data is sealed under (an HMAC, not
  the key); ``fp:template_key_check:next`` the new key's while a rotation is open
  (session/_store_keycheck.py)
- ``fp:purge:erasures`` erasures so far; ``fp:purge:done`` the count the last finished purge
  of Redis's own files started from (session/_store_purge.py); ``fp:purge:running`` the
  purge's short lock
- ``fp:gate:{mid}:{aid}`` a gate entry claim: the claiming gate's token, for the entry window
  (at least ``gate_claim_hold_s`` until its fare is written); ``fp:voided:{pid}`` a payment
  id fenced off after a lost reply

After an enrolment or an erasure commits, the store PUBLISHes ``enrolled:{sid}`` or
``erased:{sid}`` on channel ``fp:events`` so every server instance updates its directory;
a revocation publishes ``revoked:{tid}`` and a token rotation ``rotated:{tid}``, so every
server closes the terminal's sockets (those opened with the old token, for a rotation).

Every Redis failure becomes ``StoreUnavailable`` (chained); multi-key writes are atomic
(MULTI/EXEC or a Lua script) so a failure leaves nothing half-written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from redis.exceptions import WatchError

from pipeline.errors import AuthError, Conflict, InvalidRequest, NotFound, PaymentConflict
from pipeline.types import FloatArray
from session import _store_audit as _audit
from session import _store_lua as h
from session._store_purge import StorePurge
from session._store_terminals import StoreTerminals
from session.config import RateLimitConfig
from session.crypto import AuditSealKey, TemplateCipher
from session.models import Account

__all__ = ["PaymentConflict", "Store"]

log = logging.getLogger(__name__)

_WATCH_RETRIES = 8
_PII_FIELDS = ("name", "phone", "phone_last4", "passhash")


class Store(StoreTerminals, StorePurge):
    """Async access to FacePay's Redis records.

    Lockout (``locked_until``, ``record_failure``, ``clear_failures``), payments
    (``find_payment``, ``create_payment``, ``get_payment``) and the audit stream (``audit``,
    ``read_audit``) are inherited from ``session._store_ledger.StoreCore``; secret rotation
    (``rotate_terminal_token``, ``rekey_templates``) from ``session._store_keys.StoreKeys``;
    merchants and terminals from ``session._store_terminals.StoreTerminals``; purging
    erased data from Redis's own files (``purge_history``, ``purge_owed``) from
    ``session._store_purge.StorePurge``.
    """

    def __init__(
        self,
        redis: Redis,
        cipher: TemplateCipher,
        prefix: str = "fp:",
        limits: RateLimitConfig | None = None,
        audit_maxlen: int | None = None,
    ) -> None:
        self._init_core(redis, prefix)
        if limits is not None:
            self.limits = limits
        if audit_maxlen is not None:
            self.audit_maxlen = audit_maxlen
        self._cipher = cipher
        self.events_channel = f"{prefix}events"
        self._seal_anchor = _audit.Anchor()  # the newest audit-chain state this store saw

    async def ping(self) -> bool:
        """True if Redis answers (never raises)."""
        try:
            return bool(await self._r.ping())
        except Exception:
            return False

    # --- accounts and templates ---------------------------------------------------------------
    async def create_account(
        self,
        account_id: str,
        name: str,
        phone: str,
        passphrase_hash: str,
        templates: list[FloatArray],
        consent: Mapping[str, str],
        *,
        terminal_id: str | None = None,
        terminal_token_sha256: str | None = None,
    ) -> tuple[Account, str]:
        """Create an account with its encrypted templates under a new subject id, atomically.

        Returns (account, subject_id). Conflict if the account id exists (and is not erased).
        Records ``consent`` and ``enrolled`` audit events (no biometric data). With
        ``terminal_id`` (a live enrolment), AuthError unless that terminal is still active
        when the account is written: a terminal revoked while its socket's close was missed
        (a gap in the events channel) enrols no one; with ``terminal_token_sha256`` too,
        unless its token is still that one (a socket opened with a token rotated since, a
        stolen one say, enrols no one). TemplateKeyMismatch unless Redis's key
        check (watched with the account) names this store's key and no rotation is open.
        """
        name, phone = h.check_account_fields(account_id, name, phone)
        if not isinstance(passphrase_hash, str) or not passphrase_hash.startswith("$argon2"):
            raise InvalidRequest("passphrase hash must be an encoded argon2 hash")
        if not templates or len(templates) > 64:
            raise InvalidRequest("an enrolment needs 1 to 64 templates")
        now = time.time()
        sid = h.new_id("s", 16)
        blobs = {str(i): self._cipher.encrypt(sid, t) for i, t in enumerate(templates)}
        # Built (and so checked) before anything is written. No subject id in the audit: the
        # link keys are the only place where a face and a person meet.
        consent_entry = h.audit_fields("consent", now, {**consent, "account_id": account_id})
        enrolled_entry = h.audit_fields(
            "enrolled",
            now,
            {"account_id": account_id, "subjects": "1", "samples": str(len(blobs))},
        )
        account = Account(account_id, name, phone, "active", now)
        akey, a2s = self._k("account", account_id), self._a2s_key(account_id)
        watched = [akey, a2s, *self._check_keys()]
        if terminal_id is not None:
            watched.append(self._k("terminal", terminal_id))
        sent = h.Sent()
        with h.unavailable_tx("create_account", sent):
            # Inside: a failure of this read (or its first-use write of the key check) is
            # before the account's EXEC, so it is known that no account was written.
            await self.check_template_key()
            async with self._r.pipeline(transaction=True) as pipe:
                for _ in range(_WATCH_RETRIES):
                    try:
                        await pipe.watch(*watched)
                        self.require_key_check(await pipe.mget(watched[2:4]))
                        status = await pipe.hget(akey, "status")
                        if status is not None and h.text(status) != "erased":
                            if await pipe.sismember(a2s, sid):
                                break  # our EXEC committed but its reply was lost
                            raise Conflict("account id already taken")
                        if terminal_id is not None:
                            t_status, t_digest = await pipe.hmget(
                                watched[4], ["status", "token_sha256"]
                            )
                            if t_status is None or h.text(t_status) != "active":
                                raise AuthError("terminal revoked")
                            if terminal_token_sha256 is not None and (
                                t_digest is None or h.text(t_digest) != terminal_token_sha256
                            ):
                                raise AuthError("terminal token rotated")
                        pipe.multi()
                        pipe.delete(akey)
                        pipe.hset(
                            akey,
                            mapping={
                                "name": name,
                                "phone": phone,
                                "phone_last4": account.phone_last4,
                                "passhash": self._cipher.seal_passhash(account_id, passphrase_hash),
                                "status": "active",
                                "created": repr(now),
                            },
                        )
                        pipe.hset(self._k("tpl", sid), mapping=blobs)  # type: ignore[arg-type]
                        pipe.set(self._k("link", "s2a", sid), self._seal_s2a(sid, account_id))
                        pipe.sadd(a2s, sid)
                        pipe.sadd(self._k("subjects"), sid)
                        self._queue_audit(pipe, consent_entry)
                        self._queue_audit(pipe, enrolled_entry)
                        pipe.publish(self.events_channel, f"enrolled:{sid}")
                        sent.exec = True
                        await pipe.execute()
                        break
                    except WatchError:
                        continue
                else:
                    raise Conflict("account id is being changed concurrently; try again")
        return account, sid

    async def get_account(self, account_id: str) -> Account:
        """The account, or NotFound (an erased account is NotFound)."""
        with h.unavailable("get_account"):
            raw = h.decode_hash(await self._r.hgetall(self._k("account", account_id)))
        return h.account_from_hash(account_id, raw)

    async def passphrase_hash(self, account_id: str) -> str:
        """The account's argon2id hash (stored sealed under the template key), or NotFound.

        InvalidRequest if the sealed hash does not open with this store's key.
        """
        with h.unavailable("passphrase_hash"):
            status, passhash = await self._r.hmget(
                self._k("account", account_id), ["status", "passhash"]
            )
        if status is None or h.text(status) != "active" or passhash is None:
            raise NotFound("no such account")
        return self._cipher.open_passhash(account_id, h.text(passhash))

    async def account_for_subject(self, subject_id: str) -> str:
        """The account a subject id belongs to, or NotFound."""
        with h.unavailable("account_for_subject"):
            sealed = await self._r.get(self._k("link", "s2a", subject_id))
        aid = self._open_s2a(subject_id, sealed)
        if aid is None:
            raise NotFound("no such subject")
        return aid

    async def iter_subjects(self) -> AsyncIterator[tuple[str, list[FloatArray], str]]:
        """Every enrolled subject: (subject_id, decrypted templates, phone_last4).

        Subjects whose link, account or templates are missing (or fail to decrypt) are
        skipped with a warning.
        """
        cursor: int = 0
        seen: set[str] = set()
        while True:
            with h.unavailable("iter_subjects"):
                cursor, batch = await self._r.sscan(self._k("subjects"), cursor, count=256)
                sids = [s for s in dict.fromkeys(h.text(b) for b in batch) if s not in seen]
                seen.update(sids)
                rows = await self._subject_rows(sids)
            for sid, raw, last4 in rows:
                if raw is None or last4 is None:
                    log.warning("skipping subject %s: link, account or templates missing", sid)
                    continue
                try:
                    templates = self._decrypt_all(sid, raw)
                except InvalidRequest:
                    log.warning("skipping subject %s: templates fail to decrypt", sid)
                    continue
                yield sid, templates, last4
            if int(cursor) == 0:
                return

    async def get_subject(self, subject_id: str) -> tuple[list[FloatArray], str]:
        """One subject's decrypted templates and phone_last4 (for live directory updates)."""
        with h.unavailable("get_subject"):
            [(_, raw, last4)] = await self._subject_rows([subject_id])
        if raw is None or last4 is None:
            raise NotFound("no such subject")
        return self._decrypt_all(subject_id, raw), last4

    async def _subject_rows(
        self, sids: list[str]
    ) -> list[tuple[str, dict[bytes, bytes] | None, str | None]]:
        """(sid, encrypted templates, phone_last4) per sid; None where a piece is missing."""
        if not sids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(self._k("tpl", sid))
                pipe.get(self._k("link", "s2a", sid))
            replies = await pipe.execute()
        tpls = replies[0::2]
        aids = [self._open_s2a(sid, a) for sid, a in zip(sids, replies[1::2], strict=True)]
        async with self._r.pipeline(transaction=False) as pipe:
            for aid in aids:
                pipe.hmget(self._k("account", aid or "-"), ["status", "phone_last4"])
            accounts = await pipe.execute()
        rows: list[tuple[str, dict[bytes, bytes] | None, str | None]] = []
        for sid, tpl, aid, (status, last4) in zip(sids, tpls, aids, accounts, strict=True):
            active = aid is not None and status is not None and h.text(status) == "active"
            rows.append((sid, tpl or None, h.text(last4) if active and last4 else None))
        return rows

    def _a2s_key(self, account_id: str) -> str:
        """The key of an account's subject set: named by a keyed blind, not the account id."""
        return self._k("link", "a2s", self._cipher.blind(account_id))

    def _seal_s2a(self, subject_id: str, account_id: str) -> bytes:
        return self._cipher.seal_link(f"s2a:{subject_id}", account_id)

    def _open_s2a(self, subject_id: str, sealed: bytes | str | None) -> str | None:
        """The account behind a subject's sealed link; None if missing or unreadable."""
        if sealed is None:
            return None
        blob = sealed if isinstance(sealed, bytes) else sealed.encode("latin-1")
        try:
            return self._cipher.open_link(f"s2a:{subject_id}", blob)
        except InvalidRequest:
            log.warning("subject %s: link does not open with this key", subject_id)
            return None

    def _decrypt_all(self, subject_id: str, raw: Mapping[bytes, bytes]) -> list[FloatArray]:
        """The templates of one subject in slot order; InvalidRequest if any is damaged."""
        try:
            slots = sorted(raw.items(), key=lambda kv: int(h.text(kv[0])))
        except ValueError as exc:
            raise InvalidRequest("a stored template slot is malformed") from exc
        return [self._cipher.decrypt(subject_id, bytes(blob)) for _, blob in slots]

    async def erase_account(
        self, account_id: str, reason: str = "request", *, operator: str | None = None
    ) -> int:
        """Delete templates, links, subject ids and the PII of an account; mark it erased.

        Returns the number of templates deleted; audit ``erased`` (with the admin operator,
        where one asked). NotFound if unknown.
        """
        reason = h.check_label(reason, "erasure reason", limit=64)
        by = h.by_operator(operator)
        akey, a2s = self._k("account", account_id), self._a2s_key(account_id)
        sent = h.Sent()
        with h.unavailable_tx("erase_account", sent):
            async with self._r.pipeline(transaction=True) as pipe:
                for _ in range(_WATCH_RETRIES):
                    try:
                        await pipe.watch(akey, a2s)
                        status = await pipe.hget(akey, "status")
                        if status is None or h.text(status) != "active":
                            raise NotFound("no such account")
                        sids = sorted(h.text(s) for s in await pipe.smembers(a2s))
                        count = 0
                        for sid in sids:
                            count += int(await pipe.hlen(self._k("tpl", sid)))
                        now = time.time()
                        pipe.multi()
                        for sid in sids:
                            pipe.delete(self._k("tpl", sid), self._k("link", "s2a", sid))
                            pipe.srem(self._k("subjects"), sid)
                        pipe.delete(
                            a2s,
                            *(
                                self._k(k, account_id)
                                for k in ("fail", "lock", "lockouts", "failday")
                            ),
                            # Its daily totals not expired yet: the id may be enrolled again,
                            # by someone else, who must not start with this one's spending.
                            *(self._k("daily", account_id, day) for day in _recent_days(now)),
                        )
                        pipe.hdel(akey, *_PII_FIELDS)
                        pipe.hset(akey, mapping={"status": "erased", "erased": repr(now)})
                        fields = {
                            "account_id": account_id,
                            "reason": reason,
                            "subjects": str(len(sids)),
                            "samples": str(count),
                            **by,
                        }
                        self._queue_audit(pipe, h.audit_fields("erased", now, fields))
                        pipe.incr(self._k("purge", "erasures"))  # a purge is owed for it
                        for sid in sids:
                            pipe.publish(self.events_channel, f"erased:{sid}")
                        sent.exec = True
                        await pipe.execute()
                        return count
                    except WatchError:
                        continue
        raise Conflict("account is being changed concurrently; try again")

    async def seal_audit(self) -> int:
        """Append a seal over the audit records since the last one (session._store_audit);
        return how many it covers (0: nothing new, or another server is sealing)."""
        names = (self._k("audit"), self._k("audit", "seal"), self._k("audit", "sealing"))
        with h.unavailable("seal_audit"):
            return await _audit.seal(
                self._r, names, self._cipher.audit, self.audit_maxlen, self._seal_anchor
            )

    @property
    def audit_chain_restarts(self) -> int:
        """Restart seals this store wrote (it found the chain's state reset or altered)."""
        return self._seal_anchor.restarts

    async def audit_records(self) -> _audit.LiveAudit:
        """Every audit record, seals included, oldest first, and what left the stream."""
        with h.unavailable("audit_records"):
            return await _audit.read_live(self._r, self._k("audit"), self.audit_maxlen)

    async def verify_audit(self, retired: Sequence[AuditSealKey] = ()) -> _audit.AuditCheck:
        """Recompute the audit stream's seals with this store's template key and, for seals
        made before a key rotation, the ``retired`` audit keys. ``audit_maxlen`` decides
        whether records gone from the head can have been trimmed (_store_audit.trimmed_by_cap)."""
        with h.unavailable("verify_audit"):
            keys = [self._cipher.audit, *retired]
            names = (self._k("audit"), self._k("audit", "seal"))
            return await _audit.verify(self._r, names, keys, maxlen=self.audit_maxlen)


def _recent_days(now: float) -> list[str]:
    """The UTC days (``YYYYMMDD``) whose daily totals may still exist at ``now``: a total
    expires ``DAILY_TTL_S`` (two days) after its last payment."""
    today = datetime.fromtimestamp(now, UTC)
    days = range(h.DAILY_TTL_S // 86400 + 1)
    return [(today - timedelta(days=n)).strftime("%Y%m%d") for n in days]
