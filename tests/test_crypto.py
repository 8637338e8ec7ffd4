"""Template encryption (AES-256-GCM, subject id as AAD) and passphrase hashing (argon2id)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from pipeline.errors import ConfigError, InvalidRequest
from pipeline.types import FloatArray
from session.crypto import (
    AuditSealKey,
    PassphraseHasher,
    TemplateCipher,
    WrongAnswers,
    check_passphrase,
    generate_key,
    parse_key,
)

SID = "s_Zm9vYmFyYmF6cXV4cXV1eA"


def _template(seed: int = 0) -> FloatArray:
    v = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


# --- keys --------------------------------------------------------------------------------------


def test_generate_key_is_32_random_bytes() -> None:
    a, b = generate_key(), generate_key()
    assert len(a) == len(b) == 32
    assert a != b


def test_parse_key_accepts_hex_and_base64_forms() -> None:
    key = generate_key()
    assert parse_key(key.hex()) == key
    assert parse_key(key.hex().upper()) == key
    assert parse_key(f"  {key.hex()}\n") == key
    assert parse_key(base64.b64encode(key).decode()) == key
    assert parse_key(base64.urlsafe_b64encode(key).decode()) == key
    assert parse_key(base64.b64encode(key).decode().rstrip("=")) == key


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "00" * 31,  # 31 bytes of hex
        "0" * 63,
        "zz" * 32,  # 64 characters, not hex, and not 32 bytes of base64 either
        base64.b64encode(b"k" * 16).decode(),
        base64.b64encode(b"k" * 33).decode(),
        "not a key at all!",
    ],
)
def test_parse_key_rejects_everything_else(secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_key(secret)
    if len(secret) > 4:
        assert secret not in str(info.value)


def test_cipher_refuses_a_key_of_the_wrong_length() -> None:
    with pytest.raises(ConfigError):
        TemplateCipher(b"k" * 16)


# --- AES-GCM -----------------------------------------------------------------------------------


def test_round_trip_is_exact() -> None:
    cipher = TemplateCipher(generate_key())
    template = _template()
    blob = cipher.encrypt(SID, template)
    assert len(blob) == 12 + 128 * 4 + 16
    assert template.tobytes() not in blob
    back = cipher.decrypt(SID, blob)
    assert back.dtype == np.float32
    assert back.shape == (128,)
    assert np.array_equal(back, template)
    back[0] = 5.0  # the result is a writable array of its own


def test_nonce_is_fresh_for_every_encryption() -> None:
    cipher = TemplateCipher(generate_key())
    template = _template()
    a, b = cipher.encrypt(SID, template), cipher.encrypt(SID, template)
    assert a[:12] != b[:12]
    assert a != b


@pytest.mark.parametrize("position", [0, 11, 12, 300, -1])
def test_any_flipped_byte_fails(position: int) -> None:
    cipher = TemplateCipher(generate_key())
    blob = bytearray(cipher.encrypt(SID, _template()))
    blob[position] ^= 0x01
    with pytest.raises(InvalidRequest):
        cipher.decrypt(SID, bytes(blob))


def test_a_sealed_passphrase_hash_opens_only_with_its_key_and_account() -> None:
    hasher = PassphraseHasher(time_cost=1, memory_kib=64)
    encoded = hasher.hash("correct horse 42")
    cipher = TemplateCipher(generate_key())
    sealed = cipher.seal_passhash("alice", encoded)
    assert sealed.startswith("sealed1:") and "argon2" not in sealed
    assert sealed != cipher.seal_passhash("alice", encoded)  # a fresh nonce each time
    assert cipher.open_passhash("alice", sealed) == encoded
    assert hasher.verify(cipher.open_passhash("alice", sealed), "correct horse 42")
    for wrong in (
        lambda: TemplateCipher(generate_key()).open_passhash("alice", sealed),  # another key
        lambda: cipher.open_passhash("bob", sealed),  # moved to another account
        lambda: cipher.open_passhash("alice", sealed[:-4]),  # cut
        lambda: cipher.open_passhash("alice", "sealed1:not base64!"),
    ):
        with pytest.raises(InvalidRequest):
            wrong()
    # A hash stored before hashes were sealed is read as it is.
    assert cipher.open_passhash("alice", encoded) == encoded


def test_wrong_key_fails() -> None:
    blob = TemplateCipher(generate_key()).encrypt(SID, _template())
    with pytest.raises(InvalidRequest):
        TemplateCipher(generate_key()).decrypt(SID, blob)


def test_wrong_subject_id_fails() -> None:
    cipher = TemplateCipher(generate_key())
    blob = cipher.encrypt(SID, _template())
    with pytest.raises(InvalidRequest):
        cipher.decrypt(SID + "x", blob)


@pytest.mark.parametrize("cut", [0, 12, 27, 539])
def test_truncated_blob_fails(cut: int) -> None:
    cipher = TemplateCipher(generate_key())
    blob = cipher.encrypt(SID, _template())
    with pytest.raises(InvalidRequest):
        cipher.decrypt(SID, blob[:cut])


def test_encrypt_refuses_malformed_templates() -> None:
    cipher = TemplateCipher(generate_key())
    with pytest.raises(InvalidRequest):
        cipher.encrypt(SID, np.zeros(64, dtype=np.float32))
    with pytest.raises(InvalidRequest):
        cipher.encrypt(SID, np.zeros((2, 128), dtype=np.float32))
    bad = _template()
    bad[3] = np.nan
    with pytest.raises(InvalidRequest):
        cipher.encrypt(SID, bad)
    with pytest.raises(InvalidRequest):
        cipher.encrypt("", _template())


def test_float64_input_is_stored_as_float32() -> None:
    cipher = TemplateCipher(generate_key())
    template = _template().astype(np.float64)
    back = cipher.decrypt(SID, cipher.encrypt(SID, template))  # type: ignore[arg-type]
    assert np.array_equal(back, template.astype(np.float32))


# --- argon2id ----------------------------------------------------------------------------------


def test_default_hasher_uses_argon2id_with_owasp_parameters() -> None:
    encoded = PassphraseHasher().hash("correct horse")
    assert encoded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert "correct horse" not in encoded


def test_hash_and_verify() -> None:
    hasher = PassphraseHasher(time_cost=1, memory_kib=64)
    encoded = hasher.hash("correct horse")
    assert encoded.startswith("$argon2id$")
    assert hasher.hash("correct horse") != encoded  # salted
    assert hasher.verify(encoded, "correct horse")
    assert not hasher.verify(encoded, "correct horsE")
    assert not hasher.verify(encoded, "")


@pytest.mark.parametrize("encoded", ["", "plain", "$argon2id$v=19$m=64,t=1,p=1$broken", "$2b$x"])
def test_verify_never_raises_on_a_malformed_hash(encoded: str) -> None:
    assert PassphraseHasher(time_cost=1, memory_kib=64).verify(encoded, "whatever") is False


def test_needs_rehash_when_parameters_change() -> None:
    weak = PassphraseHasher(time_cost=1, memory_kib=64).hash("correct horse")
    assert PassphraseHasher(time_cost=1, memory_kib=128).needs_rehash(weak)
    assert not PassphraseHasher(time_cost=1, memory_kib=64).needs_rehash(weak)


# --- passphrase rules --------------------------------------------------------------------------


@pytest.mark.parametrize("ok", ["sixsix", "x" * 128, "pass phrase with spaces", "密码密码密码"])
def test_check_passphrase_accepts(ok: str) -> None:
    check_passphrase(ok)


@pytest.mark.parametrize("bad", ["", "five5", "y" * 129, "tab\there", "new\nline", "nul\x00byte"])
def test_check_passphrase_refuses_without_echoing(bad: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_passphrase(bad)
    if bad:
        assert bad not in str(info.value)


def test_sealed_links_open_only_with_their_key_and_context() -> None:
    from session.crypto import TemplateCipher, generate_key

    cipher, other = TemplateCipher(generate_key()), TemplateCipher(generate_key())
    sealed = cipher.seal_link("s2a:s_1", "acct-alice")
    assert b"acct-alice" not in sealed
    assert cipher.seal_link("s2a:s_1", "acct-alice") != sealed  # fresh nonce
    assert cipher.open_link("s2a:s_1", sealed) == "acct-alice"
    for attempt in (
        lambda: other.open_link("s2a:s_1", sealed),  # another key
        lambda: cipher.open_link("s2a:s_2", sealed),  # moved to another subject
        lambda: cipher.open_link("s2a:s_1", sealed[:-1] + bytes([sealed[-1] ^ 1])),
        lambda: cipher.open_link("s2a:s_1", sealed[:20]),
    ):
        with pytest.raises(InvalidRequest):
            attempt()
    # The blind is stable per key, differs between keys and does not contain the id.
    assert cipher.blind("acct-alice") == cipher.blind("acct-alice")
    assert cipher.blind("acct-alice") != other.blind("acct-alice")
    assert cipher.blind("acct-alice") != cipher.blind("acct-bob")
    assert "alice" not in cipher.blind("acct-alice")


def test_the_audit_seal_key_travels_alone_and_opens_nothing() -> None:
    key = generate_key()
    cipher = TemplateCipher(key)
    kept = cipher.audit.export()
    assert kept.startswith("audit:") and key.hex() not in kept
    again = AuditSealKey.parse(kept)
    assert again.key_id == cipher.audit.key_id and again.mac(b"x") == cipher.audit.mac(b"x")
    # The same bytes as a template key are another key altogether.
    assert TemplateCipher(bytes.fromhex(kept[6:])).audit.key_id != cipher.audit.key_id
    assert TemplateCipher(generate_key()).audit.mac(b"x") != cipher.audit.mac(b"x")
    for bad in ("audit:", "audit:zz", "audit:" + "00" * 31):
        with pytest.raises(ConfigError):
            AuditSealKey.parse(bad)


def test_wrong_answers_remember_digests_of_one_prompt_only():
    first, second = WrongAnswers(), WrongAnswers()
    first.add("correct horse 41")
    assert "correct horse 41" in first
    assert "correct horse 42" not in first  # near misses are new answers
    assert "Correct horse 41" not in first
    assert "correct horse 41" not in second  # another prompt counts it again
    assert 41 not in first
    assert not any(b"correct horse 41" in d for d in first._seen)  # digests, not text
