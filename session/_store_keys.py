"""Private part of ``session.store.Store``: rotating secrets (terminal tokens, the template
key). ``Store`` inherits these methods; code against ``Store`` only.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from redis.exceptions import WatchError

from pipeline.errors import Conflict, InvalidRequest, NotFound
from session import _store_lua as h
from session._store_keycheck import StoreKeyCheck
from session.crypto import SEALED_HASH, TemplateCipher

log = logging.getLogger(__name__)

_WATCH_RETRIES = 8


class StoreKeys(StoreKeyCheck):
    """Terminal token rotation and template re-encryption."""

    _cipher: TemplateCipher

    async def rotate_terminal_token(self, terminal_id: str, *, operator: str | None = None) -> str:
        """Give an active terminal a new token; the old one stops working at once, and
        ``rotated:{id}`` on the events channel tells every server to close the sockets
        opened with it (stream_server.revocation): a rotation answers a stolen token.

        Returns the new token (shown once). NotFound if unknown, Conflict if revoked.
        """
        key = self._k("terminal", terminal_id)
        token, digest = h.new_terminal_token()
        sent = h.Sent()
        with h.unavailable_tx("rotate_terminal_token", sent):
            async with self._r.pipeline(transaction=True) as pipe:
                for _ in range(_WATCH_RETRIES):
                    try:
                        await pipe.watch(key)
                        old, status = await pipe.hmget(key, ["token_sha256", "status"])
                        if old is None:
                            raise NotFound("no such terminal")
                        if status is None or h.text(status) != "active":
                            raise Conflict("terminal is revoked")
                        pipe.multi()
                        pipe.hset(key, "token_sha256", digest)
                        pipe.delete(self._k("termtok", h.text(old)))
                        pipe.set(self._k("termtok", digest), terminal_id)
                        entry = h.audit_fields(
                            "terminal_rotated",
                            time.time(),
                            {"terminal_id": terminal_id, **h.by_operator(operator)},
                        )
                        self._queue_audit(pipe, entry)
                        pipe.publish(self.events_channel, f"rotated:{terminal_id}")
                        sent.exec = True
                        await pipe.execute()
                        return token
                    except WatchError:
                        continue
        raise Conflict("terminal is being changed concurrently; try again")

    async def rekey_templates(
        self, new_cipher: TemplateCipher, *, operator: str | None = None
    ) -> tuple[int, int]:
        """Re-encrypt every subject's templates from this store's cipher to ``new_cipher``.

        Returns (subjects re-encrypted, templates re-encrypted); afterwards this store uses
        ``new_cipher``. Each subject is rewritten atomically (WATCH/MULTI) and a subject that
        already decrypts with the new key is skipped, so an interrupted run can simply be run
        again with the same two keys. A template that decrypts with neither key stops the run
        (InvalidRequest) before anything of that subject is written: a wrong old key never
        destroys data; its message names the subject (and the account, where its link
        opens). Audited as ``template_key_rotated`` (counts only).

        The key check (session._store_keycheck) must name this store's key or the new one
        (TemplateKeyMismatch otherwise, before anything is written); it is marked open for
        the run and moved to the new key once every subject is done.
        """
        await self.begin_rotation(new_cipher)
        subjects = templates = 0
        cursor: int = 0
        seen: set[str] = set()
        while True:
            with h.unavailable("rekey_templates"):
                cursor, batch = await self._r.sscan(self._k("subjects"), cursor, count=256)
            for sid in dict.fromkeys(h.text(b) for b in batch):
                if sid in seen:
                    continue
                seen.add(sid)
                done = await self._rekey_subject(sid, new_cipher)
                subjects += 1 if done else 0
                templates += done
            if int(cursor) == 0:
                break
        await self.finish_rotation(new_cipher)
        self._cipher = new_cipher
        await self.audit(
            "template_key_rotated",
            subjects=str(subjects),
            samples=str(templates),
            **h.by_operator(operator),
        )
        return subjects, templates

    async def _rekey_subject(self, sid: str, new_cipher: TemplateCipher) -> int:
        """Re-encrypt one subject's templates and re-seal its links and its account's
        passphrase hash; the number of templates rewritten (0: already done).

        The hash moves in the same transaction as the link, so a link under the new key
        means a hash under the new key too (an account with several subjects re-seals it
        once: the later subjects find it done).
        """
        key, s2a = self._k("tpl", sid), self._k("link", "s2a", sid)
        with h.unavailable("rekey_templates"):
            async with self._r.pipeline(transaction=True) as pipe:
                for _ in range(_WATCH_RETRIES):
                    try:
                        await pipe.watch(key, s2a)
                        owner, relink = self._relink(sid, await pipe.get(s2a), new_cipher)
                        raw = await pipe.hgetall(key)
                        blobs: dict[str, bytes] = {}
                        for slot, blob in cast(dict[bytes, bytes], raw).items():
                            try:
                                new_cipher.decrypt(sid, bytes(blob))
                                continue  # already under the new key
                            except InvalidRequest:
                                pass
                            try:
                                template = self._cipher.decrypt(sid, bytes(blob))
                            except InvalidRequest as exc:
                                raise InvalidRequest(
                                    f"subject {sid} (account {owner or 'unknown'}): template "
                                    f"{h.text(slot)} opens with neither key"
                                ) from exc
                            blobs[h.text(slot)] = new_cipher.encrypt(sid, template)
                        if not blobs and relink is None:
                            await pipe.unwatch()
                            return 0
                        passhash = None
                        if relink is not None:
                            # The account is known only now; WATCH adds to the keys watched.
                            akey = self._k("account", relink[0])
                            await pipe.watch(akey)
                            stored = await pipe.hget(akey, "passhash")
                            try:
                                passhash = self._resealed_passhash(relink[0], stored, new_cipher)
                            except InvalidRequest as exc:
                                raise InvalidRequest(
                                    f"account {relink[0]} (subject {sid}): its passphrase hash "
                                    "opens with neither key"
                                ) from exc
                        pipe.multi()
                        if blobs:
                            pipe.hset(key, mapping=blobs)  # type: ignore[arg-type]
                        if relink is not None:
                            account_id, sealed = relink
                            pipe.set(s2a, sealed)
                            old_set = self._k("link", "a2s", self._cipher.blind(account_id))
                            pipe.srem(old_set, sid)
                            pipe.sadd(self._k("link", "a2s", new_cipher.blind(account_id)), sid)
                            if passhash is not None:
                                pipe.hset(self._k("account", account_id), "passhash", passhash)
                        await pipe.execute()
                        return len(blobs)
                    except WatchError:
                        continue
        raise Conflict("templates are being changed concurrently; try again")

    def _resealed_passhash(
        self, account_id: str, stored: bytes | str | None, new_cipher: TemplateCipher
    ) -> str | None:
        """The account's passphrase hash sealed under the new key; None if there is none
        (an erased account) or it is sealed under the new key already. A hash that opens
        with neither key stops the run (InvalidRequest), like a template; one stored before
        hashes were sealed gets sealed now.
        """
        if stored is None:
            return None
        text = h.text(stored)
        if text.startswith(SEALED_HASH):
            try:
                new_cipher.open_passhash(account_id, text)
                return None
            except InvalidRequest:
                pass
        return new_cipher.seal_passhash(account_id, self._cipher.open_passhash(account_id, text))

    def _relink(
        self, sid: str, sealed: bytes | str | None, new_cipher: TemplateCipher
    ) -> tuple[str | None, tuple[str, bytes] | None]:
        """(the subject's account id or None, and (account id, link sealed under the new
        key) or None if already re-sealed or there is no link).

        A link that opens with neither key stops the run (InvalidRequest naming the
        subject), like a template.
        """
        if sealed is None:
            return None, None
        blob = sealed if isinstance(sealed, bytes) else sealed.encode("latin-1")
        context = f"s2a:{sid}"
        try:
            return new_cipher.open_link(context, blob), None  # already under the new key
        except InvalidRequest:
            pass
        try:
            account_id = self._cipher.open_link(context, blob)
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"subject {sid} (account unknown: its sealed link opens with neither key)"
            ) from exc
        return account_id, (account_id, new_cipher.seal_link(context, account_id))
