"""Private part of ``session.store.Store``: the template key's check value in Redis.

``fp:template_key_check`` holds ``TemplateCipher.key_check`` of the key the data is sealed
under (an HMAC of a fixed label under a subkey: it names the key without revealing it). The
first process that checks it on a Redis without one records its own (SET NX): a server at
start-up, or the first enrolment. A Redis that already holds sealed data but no check value
(written before the check existed) gets one only once a sample of its sealed links opens
with the key. Every later process with another key is refused (``TemplateKeyMismatch``):
a server does not start, an enrolment is not written, instead of every face going
unrecognised and new enrolments being sealed under a key that is then thrown away.

``fp:template_key_check:next`` holds the new key's check while a rotation
(``rekey_templates``) is unfinished: the data is then partly under each key, so servers and
enrolments are refused until the rotation is run again to its end; only the rotation itself
accepts either key. Its last step moves the check to the new key and drops ``next`` in one
transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import InvalidRequest, TemplateKeyMismatch
from session import _store_lua as h
from session._store_ledger import StoreCore
from session.crypto import TemplateCipher

#: Subjects whose sealed links are tried on a Redis holding data but no check value.
_SAMPLE = 8

UNFINISHED = (
    "a template key rotation is unfinished ({next} is set): run facepay rotate-template-key "
    "again with the same two keys before starting servers or enrolling"
)


class StoreKeyCheck(StoreCore):
    """The key check: recorded at first use, compared by servers, enrolments and rotation."""

    _cipher: TemplateCipher

    def _check_keys(self) -> tuple[str, str]:
        return self._k("template_key_check"), self._k("template_key_check", "next")

    def _mismatch(self) -> TemplateKeyMismatch:
        return TemplateKeyMismatch(
            f"the template key does not match the one the data in Redis is sealed under "
            f"({self._check_keys()[0]} differs): every enrolled face would go unrecognised "
            "and new enrolments would be sealed under the wrong key; use the deployment's "
            "key (FACEPAY_TEMPLATE_KEY, the config's server.template_key, or the dev "
            "DATA_DIR/template.key)"
        )

    def require_key_check(self, stored: Sequence[bytes | str | None]) -> None:
        """Raise unless ``stored`` (the check and next values, as read) accept this
        store's key outside a rotation: the check is this key's and no rotation is open."""
        check, nxt = stored
        if nxt is not None:
            raise TemplateKeyMismatch(UNFINISHED.format(next=self._check_keys()[1]))
        if check is None or h.text(check) != self._cipher.key_check:
            raise self._mismatch()

    async def check_template_key(self) -> None:
        """Refuse (TemplateKeyMismatch) unless the data in Redis is sealed under this
        store's key and no rotation is unfinished; on a Redis without a check value,
        record this key's (after a sample of any sealed links opened with it)."""
        check_key, next_key = self._check_keys()
        with h.unavailable("check_template_key"):
            stored = await self._r.mget([check_key, next_key])
            if stored[0] is None and stored[1] is None:
                bad = await self._unopened_sample([self._cipher])
                if bad is not None:
                    raise TemplateKeyMismatch(
                        f"the template key does not open the data in Redis (subject {bad}'s "
                        "link does not open with it); use the key it was sealed under"
                    )
                await self._r.set(check_key, self._cipher.key_check, nx=True)
                stored = await self._r.mget([check_key, next_key])
        self.require_key_check(stored)

    async def _unopened_sample(self, ciphers: Sequence[TemplateCipher]) -> str | None:
        """A sampled subject whose sealed link opens with none of ``ciphers``, else None."""
        sids = await self._r.srandmember(self._k("subjects"), _SAMPLE)
        for sid in sorted(h.text(s) for s in sids or []):
            sealed = await self._r.get(self._k("link", "s2a", sid))
            if sealed is None:
                continue  # a subject half gone: it says nothing about the key
            blob = sealed if isinstance(sealed, bytes) else sealed.encode("latin-1")
            if not any(_opens(c, sid, blob) for c in ciphers):
                return sid
        return None

    async def begin_rotation(self, new_cipher: TemplateCipher) -> None:
        """Before a rotation writes anything: refuse unless the data is under this store's
        key or already ``new_cipher``'s (a run resumed after its last step), and no
        rotation involving a third key is open; then mark the rotation open (``next``)."""
        check_key, next_key = self._check_keys()
        ours, theirs = self._cipher.key_check, new_cipher.key_check
        with h.unavailable("rekey_templates"):
            check, nxt = await self._r.mget([check_key, next_key])
            # An open rotation from the new key back to this one may be reversed, too.
            if nxt is not None and h.text(nxt) not in (ours, theirs):
                raise TemplateKeyMismatch(
                    f"an unfinished template key rotation to another new key is open "
                    f"({next_key} differs): finish it with the new key it was started with"
                )
            if check is None:
                bad = await self._unopened_sample([self._cipher, new_cipher])
                if bad is not None:
                    raise TemplateKeyMismatch(
                        f"neither the current nor the new template key opens the data in "
                        f"Redis (subject {bad}'s link); give the key it is sealed under"
                    )
            elif h.text(check) not in (ours, theirs):
                raise TemplateKeyMismatch(
                    f"the current template key given does not match the one the data in "
                    f"Redis is sealed under ({check_key} differs): nothing was changed"
                )
            await self._r.set(next_key, theirs)

    async def finish_rotation(self, new_cipher: TemplateCipher) -> None:
        """The rotation's last step: the check names the new key, and no rotation is open."""
        check_key, next_key = self._check_keys()
        with h.unavailable("rekey_templates"):
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.set(check_key, new_cipher.key_check)
                pipe.delete(next_key)
                await pipe.execute()


def _opens(cipher: TemplateCipher, sid: str, sealed: bytes) -> bool:
    try:
        cipher.open_link(f"s2a:{sid}", sealed)
    except InvalidRequest:
        return False
    return True
