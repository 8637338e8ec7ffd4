"""Template encryption (AES-GCM) and passphrase hashing (argon2id).

Both are CPU work: callers run argon2 in the executor, never on the event loop. AES-GCM over
a 512-byte template is microseconds and may run inline.

- ``TemplateCipher``: AES-256-GCM, a fresh 12-byte random nonce per template, the subject id
  as associated data (a blob moved to another subject id does not decrypt). The stored blob is
  ``nonce || ciphertext || tag``; the plaintext is the template as little-endian float32.
  The same key also seals the *links* between a subject and its account (a separate
  AES-GCM key and an HMAC "blinding" key, both derived from it with HKDF), so a copy of
  Redis without the key shows encrypted faces and named accounts but not which is whose.
  With the link key it also seals each account's argon2id hash, so such a copy holds no
  hash to crack offline either (OWASP's "encrypt the hashes" in place of a pepper: unlike
  a pepper, it can move to a new key without the passphrases).
- ``PassphraseHasher``: argon2id (argon2-cffi) with OWASP's minimum parameters by default.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import unicodedata

import numpy as np
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pipeline.errors import ConfigError, InvalidRequest
from pipeline.types import FloatArray

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
TEMPLATE_DIM = 128
PASSPHRASE_MIN = 6
PASSPHRASE_MAX = 128

#: Prefix of a passphrase hash sealed with :meth:`TemplateCipher.seal_passhash`.
SEALED_HASH = "sealed1:"

_FLOAT_LE = np.dtype("<f4")


def generate_key() -> bytes:
    """A fresh random 32-byte AES-256 key."""
    return os.urandom(KEY_BYTES)


def parse_key(secret: str) -> bytes:
    """A 32-byte key from hex (64 chars) or base64; ConfigError otherwise.

    The secret itself never appears in an error message.
    """
    if not isinstance(secret, str):
        raise ConfigError("template key must be a string (64 hex characters or base64)")
    text = secret.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass  # 64 characters that are not hex: may still be base64 of something else
    key = _b64decode(text)
    if key is None or len(key) != KEY_BYTES:
        raise ConfigError(
            "template key must be 32 bytes given as 64 hex characters or base64 "
            f"(got {len(text)} characters that decode to neither)"
        )
    return key


def _b64decode(text: str) -> bytes | None:
    """Standard or URL-safe base64 (padding optional), or None if it is neither."""
    if not text:
        return None
    padded = text + "=" * (-len(text) % 4)
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None


def _derive(key: bytes, info: bytes) -> bytes:
    """A 32-byte subkey of ``key`` for one purpose (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key)


AUDIT_KEY_PREFIX = "audit:"


class AuditSealKey:
    """The audit-seal subkey on its own: it makes and checks audit seals and opens nothing,
    so it can be kept after a key rotation without keeping the old template key."""

    def __init__(self, subkey: bytes) -> None:
        if not isinstance(subkey, bytes | bytearray) or len(subkey) != KEY_BYTES:
            raise ConfigError(f"audit seal key must be exactly {KEY_BYTES} bytes")
        self._key = bytes(subkey)
        #: Names the key in seal records, so a verifier holding another key can tell
        #: "sealed under a key I do not have" from "tampered with".
        self.key_id = hmac.new(self._key, b"key id", hashlib.sha256).hexdigest()[:16]

    def mac(self, data: bytes) -> str:
        """HMAC-SHA256 (hex) of audit records under this key."""
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def export(self) -> str:
        """The key as ``audit:`` and 64 hex characters (for :meth:`parse`)."""
        return AUDIT_KEY_PREFIX + self._key.hex()

    @classmethod
    def parse(cls, text: str) -> AuditSealKey:
        """An exported key; ConfigError if ``text`` is not one."""
        body = text.strip().removeprefix(AUDIT_KEY_PREFIX)
        try:
            subkey = bytes.fromhex(body)
        except ValueError:
            subkey = b""
        if len(subkey) != KEY_BYTES:
            raise ConfigError("an audit seal key is 'audit:' and 64 hex characters")
        return cls(subkey)


class TemplateCipher:
    """AES-256-GCM over float32 templates; the subject id is the associated data."""

    def __init__(self, key: bytes, *, dim: int = TEMPLATE_DIM) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            raise ConfigError(f"template key must be exactly {KEY_BYTES} bytes")
        self._aead = AESGCM(bytes(key))
        self._link_aead = AESGCM(_derive(bytes(key), b"facepay link seal v1"))
        self._blind_key = _derive(bytes(key), b"facepay link blind v1")
        #: The subkey of the audit stream's seals (session._store_audit).
        self.audit = AuditSealKey(_derive(bytes(key), b"facepay audit seal v1"))
        #: Names this key without revealing it (HMAC of a fixed label under a subkey of its
        #: own): kept in Redis beside the data it sealed (``fp:template_key_check``), so a
        #: process with another key is refused before it misreads or mis-seals anything.
        self.key_check = hmac.new(
            _derive(bytes(key), b"facepay key check v1"), b"template key check", hashlib.sha256
        ).hexdigest()[:32]
        self.dim = dim

    def seal_link(self, context: str, value: str) -> bytes:
        """``value`` (an id) encrypted for storage under ``context`` (its key name)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._link_aead.encrypt(nonce, value.encode("utf-8"), context.encode("utf-8"))
        return nonce + sealed

    def open_link(self, context: str, blob: bytes) -> str:
        """The id sealed by :meth:`seal_link`; ``InvalidRequest`` if tampered or another key."""
        if len(blob) <= NONCE_BYTES + TAG_BYTES:
            raise InvalidRequest("sealed link is too short")
        nonce, sealed = bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:])
        try:
            return self._link_aead.decrypt(nonce, sealed, context.encode("utf-8")).decode()
        except (InvalidTag, UnicodeDecodeError) as exc:
            raise InvalidRequest("sealed link failed authentication") from exc

    def seal_passhash(self, account_id: str, encoded: str) -> str:
        """An argon2 hash sealed for storage: ``sealed1:`` + base64(nonce || AES-GCM)."""
        sealed = self.seal_link(f"passhash:{account_id}", encoded)
        return SEALED_HASH + base64.b64encode(sealed).decode("ascii")

    def open_passhash(self, account_id: str, stored: str) -> str:
        """The argon2 hash from :meth:`seal_passhash`; InvalidRequest if it does not open.

        A hash stored before hashes were sealed (it starts ``$argon2``) is returned as it is;
        rotating the template key seals it.
        """
        if not stored.startswith(SEALED_HASH):
            return stored
        try:
            blob = base64.b64decode(stored[len(SEALED_HASH) :], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest("sealed passphrase hash is malformed") from exc
        return self.open_link(f"passhash:{account_id}", blob)

    def blind(self, value: str) -> str:
        """A keyed, stable stand-in for ``value`` in key names (HMAC-SHA256, 32 hex)."""
        mac = hmac.new(self._blind_key, value.encode("utf-8"), hashlib.sha256)
        return mac.hexdigest()[:32]

    def encrypt(self, subject_id: str, template: FloatArray) -> bytes:
        """nonce (12 bytes) || ciphertext+tag of the float32 bytes."""
        if not subject_id:
            raise InvalidRequest("subject id is empty")
        vector = np.asarray(template)
        if vector.shape != (self.dim,):
            raise InvalidRequest(f"template must have shape ({self.dim},), got {vector.shape}")
        if not np.all(np.isfinite(vector)):
            raise InvalidRequest("template holds non-finite values")
        plaintext = np.ascontiguousarray(vector, dtype=_FLOAT_LE).tobytes()
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, subject_id.encode("utf-8"))

    def decrypt(self, subject_id: str, blob: bytes) -> FloatArray:
        """The template back, or ``InvalidRequest`` if tampered, wrong key or wrong subject."""
        expected = NONCE_BYTES + self.dim * _FLOAT_LE.itemsize + TAG_BYTES
        if len(blob) != expected:
            raise InvalidRequest("encrypted template has the wrong length")
        nonce, sealed = bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:])
        try:
            plaintext = self._aead.decrypt(nonce, sealed, subject_id.encode("utf-8"))
        except InvalidTag as exc:
            raise InvalidRequest(
                "encrypted template failed authentication (tampered, wrong key or subject)"
            ) from exc
        return np.frombuffer(plaintext, dtype=_FLOAT_LE).astype(np.float32)


class PassphraseHasher:
    """argon2id with OWASP's minimum parameters (m=19 MiB, t=2, p=1) by default."""

    def __init__(self, time_cost: int = 2, memory_kib: int = 19456, parallelism: int = 1) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            type=Type.ID,
        )

    def hash(self, passphrase: str) -> str:
        """An encoded argon2id hash."""
        return self._hasher.hash(passphrase)

    def verify(self, encoded: str, passphrase: str) -> bool:
        """True if the passphrase matches (False on mismatch or a malformed hash)."""
        try:
            return self._hasher.verify(encoded, passphrase)
        except (VerificationError, InvalidHashError, ValueError, TypeError):
            return False

    def needs_rehash(self, encoded: str) -> bool:
        """True if ``encoded`` was made with other parameters than this hasher's."""
        try:
            return self._hasher.check_needs_rehash(encoded)
        except (InvalidHashError, ValueError):
            return True


class WrongAnswers:
    """The wrong answers already counted at one passphrase prompt, as keyed digests.

    A double press of Pay, or a terminal resending after a hiccup, delivers the same answer
    again. Counting it again would lock an account after one typo, and it tells a guesser
    nothing new, so the prompt answers it without another argon2id check and without
    counting. Only an HMAC under a key that lives as long as the prompt is kept, never the
    passphrase: the digests are useless once the prompt is gone.
    """

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._seen: set[bytes] = set()

    def _digest(self, passphrase: str) -> bytes:
        return hmac.new(self._key, passphrase.encode("utf-8", "surrogatepass"), "sha256").digest()

    def add(self, passphrase: str) -> None:
        """Remember ``passphrase`` as a counted wrong answer."""
        self._seen.add(self._digest(passphrase))

    def __contains__(self, passphrase: object) -> bool:
        return isinstance(passphrase, str) and self._digest(passphrase) in self._seen


def check_passphrase(passphrase: str) -> None:
    """InvalidRequest unless 6-128 characters with no control characters."""
    if not isinstance(passphrase, str):
        raise InvalidRequest("passphrase must be a string")
    if not PASSPHRASE_MIN <= len(passphrase) <= PASSPHRASE_MAX:
        raise InvalidRequest(
            f"passphrase must be {PASSPHRASE_MIN} to {PASSPHRASE_MAX} characters long"
        )
    if any(unicodedata.category(c) == "Cc" for c in passphrase):
        raise InvalidRequest("passphrase must not contain control characters")
