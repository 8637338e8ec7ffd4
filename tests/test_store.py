"""The Redis store on a real redis-server: records, encryption at rest, links, lockout, the
payment ledger, the audit stream and behaviour when Redis goes away."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.errors import (
    AccountLocked,
    AuthError,
    Conflict,
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    StoreUnavailable,
)
from pipeline.types import FloatArray
from session import _store_lua as h
from session.crypto import PassphraseHasher, TemplateCipher, generate_key
from session.store import PaymentConflict, Store
from stream_server.redis_client import connect
from tests.privacy_scan import aof_bytes, aof_settled

PASSPHRASE = "open sesame 42"
CONSENT = {"terminal": "t_enrol", "method": "kiosk-checkbox", "time": "2024-05-01T10:00:00Z"}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
    yield r
    await r.aclose()


@pytest.fixture
def db(client: aioredis.Redis) -> Store:
    return Store(client, TemplateCipher(generate_key()))


@pytest.fixture
async def till(client: aioredis.Redis) -> str:
    """The terminal ``_pay`` pays from (t_till of shop m_shop): an active terminal record, as
    add_terminal writes it; the payment script refuses a revoked or unknown terminal."""
    await client.hset(
        "fp:terminal:t_till",
        mapping={"merchant_id": "m_shop", "mode": "checkout", "status": "active"},
    )
    return "t_till"


@pytest.fixture(scope="module")
def passhash() -> str:
    return PassphraseHasher(time_cost=1, memory_kib=64).hash(PASSPHRASE)


def _templates(n: int = 3, seed: int = 0) -> list[FloatArray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v = rng.standard_normal(128).astype(np.float32)
        out.append((v / np.linalg.norm(v)).astype(np.float32))
    return out


async def _enrol(
    db: Store, passhash: str, aid: str = "alice", seed: int = 0, n: int = 3
) -> tuple[str, list[FloatArray]]:
    templates = _templates(n, seed)
    _, sid = await db.create_account(
        aid, "Alice Liddell", "+8613800001234", passhash, templates, CONSENT
    )
    return sid, templates


async def _dump(client: aioredis.Redis) -> dict[str, list[bytes]]:
    """Every key with every byte string stored under it (hash fields, members, entries)."""
    out: dict[str, list[bytes]] = {}
    async for key in client.scan_iter(count=500):
        kind = (await client.type(key)).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [await client.get(key)]
        elif kind == "hash":
            for f, v in (await client.hgetall(key)).items():
                values += [f, v]
        elif kind == "set":
            values = list(await client.smembers(key))
        elif kind == "stream":
            for _, fields in await client.xrange(key):
                for f, v in fields.items():
                    values += [f, v]
        else:  # pragma: no cover - the store writes no other kind
            pytest.fail(f"unexpected key type {kind} for {key!r}")
        out[key.decode()] = values
    return out


# --- merchants and terminals ---------------------------------------------------------------------


async def test_merchant_round_trip(db: Store) -> None:
    m = await db.add_merchant("Corner Shop")
    assert m.merchant_id.startswith("m_")
    assert await db.get_merchant(m.merchant_id) == m
    with pytest.raises(NotFound):
        await db.get_merchant("m_nope")
    with pytest.raises(InvalidRequest):
        await db.add_merchant("  ")


async def test_terminal_token_authenticates_and_is_stored_hashed(
    db: Store, client: aioredis.Redis
) -> None:
    m = await db.add_merchant("Corner Shop")
    terminal, token = await db.add_terminal(m.merchant_id, "checkout")
    assert terminal.terminal_id.startswith("t_") and len(token) >= 43
    assert await db.authenticate_terminal(token) == terminal
    assert await db.get_terminal(terminal.terminal_id) == terminal
    dump = await _dump(client)
    assert all(token not in k for k in dump)
    assert all(token.encode() not in v for vs in dump.values() for v in vs)


async def test_terminal_auth_refuses_wrong_empty_and_revoked_tokens(db: Store) -> None:
    m = await db.add_merchant("Corner Shop")
    terminal, token = await db.add_terminal(m.merchant_id, "gate")
    for bad in ["", token[:-1], token + "x", "x" * 1000]:
        with pytest.raises(AuthError):
            await db.authenticate_terminal(bad)
    await db.revoke_terminal(terminal.terminal_id)
    with pytest.raises(AuthError):
        await db.authenticate_terminal(token)
    assert (await db.get_terminal(terminal.terminal_id)).status == "revoked"
    with pytest.raises(NotFound):
        await db.revoke_terminal("t_nope")


async def test_terminal_needs_a_merchant_and_a_known_mode(db: Store) -> None:
    with pytest.raises(NotFound):
        await db.add_terminal("m_nope", "checkout")
    m = await db.add_merchant("Corner Shop")
    with pytest.raises(InvalidRequest):
        await db.add_terminal(m.merchant_id, "vending")  # type: ignore[arg-type]


# --- accounts ------------------------------------------------------------------------------------


async def test_account_create_get_and_duplicate(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    account, sid = await db.create_account(
        "alice", " Alice Liddell ", "+8613800001234", passhash, _templates(), CONSENT
    )
    assert sid.startswith("s_") and len(sid) >= 2 + 22
    assert account.name == "Alice Liddell" and account.phone_last4 == "1234"
    assert await db.get_account("alice") == account
    assert await db.passphrase_hash("alice") == passhash
    stored = (await client.hget("fp:account:alice", "passhash")).decode()
    assert stored.startswith("sealed1:") and "argon2" not in stored  # nothing to crack
    assert await db.account_for_subject(sid) == "alice"
    with pytest.raises(Conflict):
        await db.create_account("alice", "Other", "123456", passhash, _templates(1, 9), CONSENT)
    with pytest.raises(NotFound):
        await db.get_account("bob")
    with pytest.raises(NotFound):
        await db.passphrase_hash("bob")
    with pytest.raises(NotFound):
        await db.account_for_subject("s_nope")


@pytest.mark.parametrize(
    ("aid", "name", "phone"),
    [
        ("", "Alice", "123456"),
        ("a" * 65, "Alice", "123456"),
        ("al ice", "Alice", "123456"),
        ("al:ice", "Alice", "123456"),
        ("alice", "", "123456"),
        ("alice", "x" * 101, "123456"),
        ("alice", "Al\x00ice", "123456"),
        ("alice", "Alice", "12345"),
        ("alice", "Alice", "1" * 21),
        ("alice", "Alice", "12-34-5"),  # separators are allowed, but only 5 digits remain
        ("alice", "Alice", "12ab3456"),
        ("alice", "Alice", "++123456"),
    ],
)
async def test_account_fields_are_validated(
    db: Store, client: aioredis.Redis, passhash: str, aid: str, name: str, phone: str
) -> None:
    with pytest.raises(InvalidRequest):
        await db.create_account(aid, name, phone, passhash, _templates(), CONSENT)
    assert await client.dbsize() == 0


async def test_account_refuses_no_templates_a_plain_passphrase_and_secret_consent(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    with pytest.raises(InvalidRequest):
        await db.create_account("alice", "Alice", "123456", passhash, [], CONSENT)
    with pytest.raises(InvalidRequest):
        await db.create_account("alice", "Alice", "123456", PASSPHRASE, _templates(), CONSENT)
    with pytest.raises(InvalidRequest):
        await db.create_account(
            "alice", "Alice", "123456", passhash, _templates(), {"passphrase": PASSPHRASE}
        )
    assert await client.dbsize() == 0


async def test_concurrent_enrolments_of_one_id_create_one_account(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    results = await asyncio.gather(
        *(
            db.create_account("alice", "Alice", "123456", passhash, _templates(1, i), CONSENT)
            for i in range(10)
        ),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
    assert await client.scard("fp:subjects") == 1


# --- templates and links -------------------------------------------------------------------------


async def test_templates_round_trip_through_iter_and_get_subject(db: Store, passhash: str) -> None:
    sid_a, tpl_a = await _enrol(db, passhash, "alice", seed=1, n=3)
    _, sid_b = await db.create_account(
        "bob", "Bob", "5550009876", passhash, _templates(2, 2), CONSENT
    )
    seen = {sid: (templates, last4) async for sid, templates, last4 in db.iter_subjects()}
    assert set(seen) == {sid_a, sid_b}
    for got, want in zip(seen[sid_a][0], tpl_a, strict=True):
        assert got.dtype == np.float32 and np.array_equal(got, want)
    assert seen[sid_a][1] == "1234" and seen[sid_b][1] == "9876"
    assert len(seen[sid_b][0]) == 2
    templates, last4 = await db.get_subject(sid_a)
    assert last4 == "1234"
    assert all(np.array_equal(g, w) for g, w in zip(templates, tpl_a, strict=True))
    with pytest.raises(NotFound):
        await db.get_subject("s_nope")


async def test_iter_subjects_pages_through_many(db: Store, passhash: str) -> None:
    sids = set()
    for i in range(300):
        _, sid = await db.create_account(
            f"user{i}", "User", f"+1555{i:07d}", passhash, _templates(1, i), CONSENT
        )
        sids.add(sid)
    got = [sid async for sid, _, _ in db.iter_subjects()]
    assert len(got) == 300 and set(got) == sids


async def test_iter_subjects_skips_broken_subjects_with_a_warning(
    db: Store, client: aioredis.Redis, passhash: str, caplog: pytest.LogCaptureFixture
) -> None:
    sid_a, _ = await _enrol(db, passhash, "alice", seed=1)
    sid_b, _ = await _enrol(db, passhash, "bob", seed=2)
    sid_c, _ = await _enrol(db, passhash, "carol", seed=3)
    await client.delete(f"fp:link:s2a:{sid_a}")  # link gone
    await client.delete("fp:account:bob")  # account gone
    with caplog.at_level(logging.WARNING, logger="session.store"):
        got = [sid async for sid, _, _ in db.iter_subjects()]
    assert got == [sid_c]
    assert sum("skipping subject" in r.getMessage() for r in caplog.records) == 2
    assert all(r.args for r in caplog.records)  # %-style arguments, not pre-formatted text
    with pytest.raises(NotFound):
        await db.get_subject(sid_a)
    with pytest.raises(NotFound):
        await db.get_subject(sid_b)


async def test_a_template_under_another_subject_id_does_not_decrypt(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    sid_a, _ = await _enrol(db, passhash, "alice", seed=1)
    sid_b, _ = await _enrol(db, passhash, "bob", seed=2)
    await client.hset(f"fp:tpl:{sid_b}", "0", await client.hget(f"fp:tpl:{sid_a}", "0"))
    with pytest.raises(InvalidRequest):
        await db.get_subject(sid_b)
    assert [sid async for sid, _, _ in db.iter_subjects()] == [sid_a]


async def test_nothing_at_rest_leaks_templates_passphrase_or_the_face_person_join(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    aid = "alice.liddell@example"
    sid, templates = await _enrol(db, passhash, aid, seed=5)
    m = await db.add_merchant("Shop")
    till, _ = await db.add_terminal(m.merchant_id, "checkout")
    await db.create_payment(
        merchant_id=m.merchant_id,
        order_id="o-1",
        account_id=aid,
        terminal_id=till.terminal_id,
        amount=500,
        currency="CNY",
        daily_limit=10_000,
    )
    dump = await _dump(client)
    raw = [t.tobytes() for t in templates] + [base64.b64encode(t.tobytes()) for t in templates]
    everything = b"\x00".join(k.encode() + b"\x00" + b"\x00".join(v) for k, v in dump.items())
    for blob in raw:
        assert blob not in everything
        assert blob[:64] not in everything  # not even a slice of a template
    assert PASSPHRASE.encode() not in everything
    assert f"{templates[0][0]:.6f}".encode() not in everything
    tpl_keys = [k for k in dump if k.startswith("fp:tpl:")]
    assert tpl_keys == [f"fp:tpl:{sid}"]
    assert aid.encode() not in b"".join(dump[tpl_keys[0]])
    assert aid not in sid
    # No record names both the subject and the account: the links are sealed (s2a) and
    # keyed by an HMAC blind (a2s), so a dump without the key cannot join face and person.
    joins = sorted(
        k
        for k, values in dump.items()
        if (sid in k or any(sid.encode() in v for v in values))
        and (aid in k or any(aid.encode() in v for v in values))
    )
    assert joins == []
    links = sorted(k for k in dump if k.startswith("fp:link:"))
    assert len(links) == 2 and f"fp:link:s2a:{sid}" in links
    assert not any(aid in k for k in links)
    assert await db.account_for_subject(sid) == aid  # with the key, the link opens
    # the passphrase hash is in no record as such (it is sealed in the account hash, and
    # only the key opens it)
    assert passhash.encode() not in everything and b"$argon2" not in everything
    assert await db.passphrase_hash(aid) == passhash


async def test_enrol_and_erase_are_published(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    pubsub = client.pubsub()
    await pubsub.subscribe("fp:events")
    try:
        first = await pubsub.get_message(timeout=2)
        assert first is not None and first["type"] == "subscribe"
        sid, _ = await _enrol(db, passhash, "alice")
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert msg is not None and msg["data"] == f"enrolled:{sid}".encode()
        await db.erase_account("alice")
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert msg is not None and msg["data"] == f"erased:{sid}".encode()
    finally:
        await pubsub.aclose()


async def test_erase_removes_biometrics_links_and_pii(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    sid, _ = await _enrol(db, passhash, "alice", n=4)
    await _enrol(db, passhash, "bob", seed=2)
    await db.record_failure("alice", 5, 60)
    assert await db.erase_account("alice", reason="user-request") == 4
    for call in (db.get_account, db.passphrase_hash, db.account_with_lock):
        with pytest.raises(NotFound):
            await call("alice")
    with pytest.raises(NotFound):
        await db.account_for_subject(sid)
    with pytest.raises(NotFound):
        await db.get_subject(sid)
    with pytest.raises(NotFound):
        await db.erase_account("alice")
    with pytest.raises(NotFound):
        await db.erase_account("nobody")
    assert [s async for s, _, _ in db.iter_subjects()] != [] and sid not in [
        s async for s, _, _ in db.iter_subjects()
    ]
    dump = await _dump(client)
    assert not any(sid in k or any(sid.encode() in v for v in vs) for k, vs in dump.items())
    left = {k: v for k, v in (await client.hgetall("fp:account:alice")).items()}
    assert set(left) == {b"status", b"created", b"erased"} and left[b"status"] == b"erased"
    gone = (db._a2s_key("alice"), f"fp:link:s2a:{sid}", "fp:fail:alice")
    assert not await client.exists(*gone)
    assert len(await client.keys("fp:link:*")) == 2  # bob's two links, untouched
    erased = [e for e in await db.read_audit() if e["event"] == "erased"]
    assert erased == [
        {
            "event": "erased",
            "t": erased[0]["t"],
            "account_id": "alice",
            "reason": "user-request",
            "subjects": "1",
            "samples": "4",
        }
    ]


async def test_an_erased_account_may_enrol_again(db: Store, passhash: str) -> None:
    old_sid, _ = await _enrol(db, passhash, "alice", seed=1)
    await db.erase_account("alice")
    account, new_sid = await db.create_account(
        "alice", "Alice Again", "123456789", passhash, _templates(2, 7), CONSENT
    )
    assert new_sid != old_sid
    assert await db.get_account("alice") == account
    assert [s async for s, _, _ in db.iter_subjects()] == [new_sid]
    with pytest.raises(Conflict):
        await _enrol(db, passhash, "alice", seed=3)


async def test_erasure_drops_the_accounts_daily_total(
    db: Store, client: aioredis.Redis, passhash: str, till: str
) -> None:
    """What an erased account spent today is its own: a later holder of the id (it may be
    enrolled again, by someone else) starts the day at nothing."""
    await _enrol(db, passhash, "alice", seed=1)
    await db.create_payment(**_pay(amount=9_000, daily_limit=10_000))
    assert [k async for k in client.scan_iter("fp:daily:alice:*")]
    await db.erase_account("alice")
    assert [k async for k in client.scan_iter("fp:daily:alice:*")] == []
    await db.create_account("alice", "Alice Again", "123456789", passhash, _templates(), CONSENT)
    paid = await db.create_payment(**_pay(order_id="o-2", amount=9_000, daily_limit=10_000))
    assert paid.amount == 9_000


async def test_enrolment_audit_records_consent_without_biometrics(db: Store, passhash: str) -> None:
    sid, _ = await _enrol(db, passhash, "alice", n=3)
    events = await db.read_audit()
    assert [e["event"] for e in events] == ["consent", "enrolled"]
    consent, enrolled = events
    assert consent["account_id"] == "alice"
    assert {k: consent[k] for k in CONSENT} == CONSENT
    assert enrolled["account_id"] == "alice"
    assert enrolled["subjects"] == "1" and enrolled["samples"] == "3"
    assert all(sid not in v for e in events for v in e.values())


# --- lockout -------------------------------------------------------------------------------------


async def test_a_failure_under_a_lock_answers_the_lock_as_stored(
    db: Store, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every server reports a lock's end as Redis holds it, whatever its own clock says: a
    wrong answer under the lock and a refused payment must be told the same end, or the
    difference would say whether a guess at a prompt left open was right."""
    for _ in range(3):
        _, until = await db.record_failure("alice", 3, 60.0)
    stored = float((await client.get("fp:lock:alice")).decode())
    assert until == stored
    skewed = time.time() + 0.007  # another server, 7 ms ahead
    monkeypatch.setattr(time, "time", lambda: skewed)
    assert await db.record_failure("alice", 3, 60.0) == (0, stored)
    assert await db.locked_until("alice") == stored


async def test_lockout_counts_locks_and_expires(db: Store, client: aioredis.Redis) -> None:
    assert await db.locked_until("alice") is None
    assert await db.record_failure("alice", 3, 1.0) == (2, None)
    assert await db.record_failure("alice", 3, 1.0) == (1, None)
    before = time.time()
    left, until = await db.record_failure("alice", 3, 1.0)
    assert left == 0 and until is not None and before + 0.9 < until < time.time() + 1.1
    assert await db.locked_until("alice") == pytest.approx(until)
    assert not await client.exists("fp:fail:alice")  # counter reset once locked
    assert 0 < await client.pttl("fp:lock:alice") <= 1000
    await asyncio.sleep(1.1)
    assert await db.locked_until("alice") is None
    assert await db.record_failure("alice", 3, 1.0) == (2, None)


async def test_account_with_lock_reads_both_as_get_account_and_locked_until(
    db: Store, passhash: str
) -> None:
    await _enrol(db, passhash)
    account = await db.get_account("alice")
    assert await db.account_with_lock("alice") == (account, None)
    for _ in range(3):
        _, until = await db.record_failure("alice", 3, 30.0)
    assert until is not None
    assert await db.account_with_lock("alice") == (account, pytest.approx(until))
    with pytest.raises(NotFound):
        await db.account_with_lock("bob")


async def test_a_locked_or_erased_account_is_never_charged(
    db: Store, client: aioredis.Redis, passhash: str, till: str
) -> None:
    """A prompt reads the lock and the account once, then may stay open for half a minute:
    a lockout (wrong answers at another prompt, through any server) or an erasure meanwhile
    must still stop its payment, and a wrong answer there must not start a fresh counter
    under the lock (three more guesses). The payment script checks both in its own step."""
    await _enrol(db, passhash, "alice")
    for _ in range(2):
        assert (await db.record_failure("alice", 3, 60.0))[1] is None
    left, until = await db.record_failure("alice", 3, 60.0)
    assert left == 0 and until is not None
    with pytest.raises(AccountLocked) as info:
        await db.create_payment(**_pay())
    assert info.value.until == pytest.approx(until, abs=0.01)
    assert await db.find_payment("m_shop", "order-1") is None
    assert not [k async for k in client.scan_iter("fp:daily:*")]
    # A wrong answer at a prompt opened before the lock: the same lock, nothing counted.
    left, again = await db.record_failure("alice", 3, 60.0)
    assert left == 0 and again == pytest.approx(until, abs=0.05)
    assert not await client.exists("fp:fail:alice")
    assert await client.get("fp:failday:alice") == b"3"
    assert await client.get("fp:lockouts:alice") == b"1"
    await client.delete("fp:lock:alice")  # as if the lock ran out
    assert (await db.create_payment(**_pay())).account_id == "alice"
    await db.erase_account("alice")
    with pytest.raises(NotFound):
        await db.create_payment(**_pay(order_id="order-2"))
    with pytest.raises(NotFound):  # never enrolled
        await db.create_payment(**_pay(order_id="order-3", account_id="carol"))
    assert [e["order_id"] for e in await db.read_audit() if e["event"] == "payment"] == ["order-1"]


async def test_a_revoked_or_unknown_terminal_is_never_charged(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    """A session reads its terminal once, at the hello: a revocation since (through any
    server, its socket not closed yet) must still stop the payment, in the script's step."""
    await _enrol(db, passhash, "alice")
    shop = await db.add_merchant("Shop")
    till, _ = await db.add_terminal(shop.merchant_id, "checkout")
    pay = _pay(merchant_id=shop.merchant_id, terminal_id=till.terminal_id)
    paid = await db.create_payment(**pay, payment_id="p_before")
    await db.revoke_terminal(till.terminal_id)
    with pytest.raises(AuthError):
        await db.create_payment(**{**pay, "order_id": "order-2"})
    with pytest.raises(AuthError):  # a terminal id that was never added
        await db.create_payment(**{**pay, "order_id": "order-3", "terminal_id": "t_forged"})
    assert await db.find_payment(shop.merchant_id, "order-2") is None
    assert await client.get(next(iter([k async for k in client.scan_iter("fp:daily:*")]))) == (
        str(paid.amount).encode()
    )
    # A retry of the payment written before the revocation still finds it (a lost reply).
    assert await db.create_payment(**pay, payment_id="p_before") == paid
    assert [e["order_id"] for e in await db.read_audit() if e["event"] == "payment"] == ["order-1"]


async def test_a_terminal_pays_only_for_its_own_merchant_and_only_if_it_takes_payments(
    db: Store, client: aioredis.Redis, passhash: str
) -> None:
    """Defence in depth: the sessions take the merchant and the mode from the terminal's
    record, but the payment script itself refuses a terminal of another merchant, and an
    enrolment terminal, before anything is written."""
    await _enrol(db, passhash, "alice")
    shop, other = await db.add_merchant("Shop"), await db.add_merchant("Other shop")
    till, _ = await db.add_terminal(shop.merchant_id, "checkout")
    gate, _ = await db.add_terminal(shop.merchant_id, "gate")
    kiosk, _ = await db.add_terminal(shop.merchant_id, "enroll")
    with pytest.raises(Forbidden, match="does not belong"):
        await db.create_payment(**_pay(merchant_id=other.merchant_id, terminal_id=till.terminal_id))
    with pytest.raises(Forbidden, match="enroll terminal cannot take payments"):
        await db.create_payment(**_pay(merchant_id=shop.merchant_id, terminal_id=kiosk.terminal_id))
    assert await db.find_payment(other.merchant_id, "order-1") is None
    assert await db.find_payment(shop.merchant_id, "order-1") is None
    assert not [k async for k in client.scan_iter("fp:daily:*")]
    assert not [e for e in await db.read_audit() if e["event"] == "payment"]
    for order, terminal in (("o-till", till), ("o-gate", gate)):
        paid = await db.create_payment(
            **_pay(merchant_id=shop.merchant_id, order_id=order, terminal_id=terminal.terminal_id)
        )
        assert paid.terminal_id == terminal.terminal_id


async def test_a_lookup_after_a_lost_reply_fences_off_a_late_write(
    db: Store, client: aioredis.Redis, passhash: str, till: str
) -> None:
    """A payment script whose packets were delayed past the client's timeout can still reach
    Redis after the lookup that found nothing. The lookup marks the id void in the same step,
    so "not found" stays true: the late script writes nothing."""
    await _enrol(db, passhash, "alice")
    written = await db.create_payment(**_pay(), payment_id="p_written")
    assert await db.payment_or_void("p_written") == written  # found: not voided
    assert not await client.exists("fp:voided:p_written")
    assert await db.payment_or_void("p_late") is None  # not written: voided
    assert 0 < await client.ttl("fp:voided:p_late") <= 86_400
    with pytest.raises(Conflict):  # the late script
        await db.create_payment(**_pay(order_id="order-late"), payment_id="p_late")
    assert await db.find_payment("m_shop", "order-late") is None
    assert not await client.exists("fp:payid:p_late")
    assert [e["order_id"] for e in await db.read_audit() if e["event"] == "payment"] == ["order-1"]
    # The order itself is not burnt: a fresh attempt (a new id) pays it.
    retry = await db.create_payment(**_pay(order_id="order-late"))
    assert retry.order_id == "order-late" and retry.payment_id != "p_late"


async def test_failure_counter_expires_and_clears(db: Store) -> None:
    assert await db.record_failure("alice", 3, 0.3) == (2, None)
    await asyncio.sleep(0.4)
    assert await db.record_failure("alice", 3, 0.3) == (2, None)
    assert await db.record_failure("alice", 3, 0.3) == (1, None)
    await db.clear_failures("alice")
    assert await db.record_failure("alice", 3, 0.3) == (2, None)
    with pytest.raises(InvalidRequest):
        await db.record_failure("alice", 0, 1.0)


# --- payments ------------------------------------------------------------------------------------


@pytest.fixture
async def payers(db: Store, passhash: str) -> None:
    """The accounts the payment tests charge: the payment script refuses any account that
    is not active."""
    await _enrol(db, passhash, "alice", seed=1)
    await _enrol(db, passhash, "bob", seed=2)


def _pay(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "merchant_id": "m_shop",
        "order_id": "order-1",
        "account_id": "alice",
        "terminal_id": "t_till",
        "amount": 1250,
        "currency": "CNY",
        "daily_limit": 100_000,
    }
    args.update(overrides)
    return args


async def test_a_prompt_opened_for_an_erased_account_cannot_charge_its_id_s_next_holder(
    db: Store, passhash: str, till: str
) -> None:
    """An erased account id may be enrolled again, by someone else. A payment prepared for
    the account a session read (its ``created``) must not be written to the new holder: the
    old holder's passphrase was checked against the old hash, and the ledger would say the
    new holder paid."""
    await _enrol(db, passhash, "alice", seed=1)
    first, _ = await db.account_with_lock("alice")
    await db.erase_account("alice")
    await db.create_account("alice", "Mallory", "+8613800009999", passhash, _templates(), CONSENT)
    with pytest.raises(NotFound):
        await db.create_payment(**_pay(), account_created=first.created)
    assert await db.find_payment("m_shop", "order-1") is None
    holder, _ = await db.account_with_lock("alice")
    paid = await db.create_payment(**_pay(), account_created=holder.created)  # its own: paid
    assert paid.account_id == "alice"


async def test_a_socket_whose_token_was_rotated_neither_pays_nor_enrols(
    db: Store, client: aioredis.Redis, passhash: str, till: str
) -> None:
    """The sessions pass the digest of the token their socket said hello with: once the
    terminal's token is another (rotated: a stolen token's socket), the payment script and
    the account's write refuse it, even before the socket's close reaches it."""
    await _enrol(db, passhash, "alice", seed=1)
    await client.hset(f"fp:terminal:{till}", "token_sha256", "a" * 64)

    async def enrol_bob(digest: str) -> None:
        await db.create_account(
            "bob", "Bob", "+8613800005555", passhash, _templates(), CONSENT,
            terminal_id=till, terminal_token_sha256=digest,
        )  # fmt: skip

    with pytest.raises(AuthError):
        await db.create_payment(**_pay(), terminal_token_sha256="b" * 64)
    with pytest.raises(AuthError):
        await enrol_bob("b" * 64)
    with pytest.raises(NotFound):
        await db.get_account("bob")
    paid = await db.create_payment(**_pay(), terminal_token_sha256="a" * 64)
    assert paid.terminal_id == till
    await enrol_bob("a" * 64)
    assert (await db.get_account("bob")).status == "active"


@pytest.mark.usefixtures("payers")
async def test_twenty_concurrent_payments_for_one_order_charge_once(
    db: Store, client: aioredis.Redis, till: str
) -> None:
    results = await asyncio.gather(
        *(db.create_payment(**_pay()) for _ in range(20)), return_exceptions=True
    )
    paid = [r for r in results if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, PaymentConflict)]
    assert len(paid) == 1 and len(conflicts) == 19
    winner = paid[0]
    assert all(c.payment_id == winner.payment_id for c in conflicts)
    assert all(winner.payment_id in str(c) for c in conflicts)
    assert all(isinstance(c, Conflict) for c in conflicts)
    assert len([k async for k in client.scan_iter("fp:payid:*")]) == 1
    day = time.strftime("%Y%m%d", time.gmtime())
    assert await client.get(f"fp:daily:alice:{day}") == b"1250"
    ttl = await client.ttl(f"fp:daily:alice:{day}")
    assert 2 * 86400 - 5 < ttl <= 2 * 86400
    audit = [e for e in await db.read_audit() if e["event"] == "payment"]
    assert len(audit) == 1
    assert audit[0]["payment_id"] == winner.payment_id and audit[0]["amount"] == "1250"


@pytest.mark.usefixtures("payers")
async def test_a_retry_with_the_same_payment_id_succeeds(db: Store, till: str) -> None:
    first = await db.create_payment(**_pay(), payment_id="p_fixed")
    again = await db.create_payment(**_pay(), payment_id="p_fixed")
    assert again == first and first.payment_id == "p_fixed"
    with pytest.raises(PaymentConflict) as info:
        await db.create_payment(**_pay())
    assert info.value.payment_id == "p_fixed"


@pytest.mark.usefixtures("payers")
async def test_payment_lookup(db: Store, till: str) -> None:
    p = await db.create_payment(**_pay())
    assert p.payment_id.startswith("p_") and p.status == "captured"
    assert p.amount == 1250 and p.currency == "CNY" and p.order_id == "order-1"
    assert await db.get_payment(p.payment_id) == p
    assert await db.find_payment("m_shop", "order-1") == p
    assert await db.find_payment("m_shop", "order-2") is None
    assert await db.find_payment("m_other", "order-1") is None
    with pytest.raises(NotFound):
        await db.get_payment("p_nope")


@pytest.mark.usefixtures("payers")
async def test_daily_limit(db: Store, till: str) -> None:
    await db.create_payment(**_pay(order_id="a", amount=600, daily_limit=1000))
    with pytest.raises(LimitExceeded):
        await db.create_payment(**_pay(order_id="b", amount=500, daily_limit=1000))
    assert await db.find_payment("m_shop", "b") is None
    await db.create_payment(**_pay(order_id="c", amount=400, daily_limit=1000))
    with pytest.raises(LimitExceeded):
        await db.create_payment(**_pay(order_id="d", amount=1, daily_limit=1000))
    # another account has its own total
    await db.create_payment(**_pay(order_id="e", account_id="bob", amount=1000, daily_limit=1000))


@pytest.mark.parametrize(
    "bad",
    [
        {"amount": 0},
        {"amount": -5},
        {"amount": 12.5},
        {"amount": True},
        {"amount": "100"},
        {"order_id": ""},
        {"order_id": "has space"},
        {"order_id": "x" * 65},
        {"currency": "cny"},
        {"currency": "EURO"},
    ],
)
async def test_payment_arguments_are_validated(
    db: Store, client: aioredis.Redis, bad: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequest):
        await db.create_payment(**_pay(**bad))
    assert await client.dbsize() == 0


# --- audit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        "passphrase",
        "Pass",
        "user_password",
        "passhash",
        "HASH",
        "embedding",
        "template_count",
        "image",
        "frame_no",
        "token",
        "api_Token",
    ],
)
async def test_audit_refuses_secretish_field_names(
    db: Store, client: aioredis.Redis, field: str
) -> None:
    with pytest.raises(InvalidRequest):
        await db.audit("login", **{field: "x"})
    assert await client.dbsize() == 0


async def test_audit_appends_and_reads_oldest_first(db: Store) -> None:
    for i in range(5):
        await db.audit("login", account_id=f"a{i}", result="ok")
    rows = await db.read_audit(3)
    assert [r["account_id"] for r in rows] == ["a2", "a3", "a4"]
    assert all(isinstance(k, str) and isinstance(v, str) for r in rows for k, v in r.items())
    assert rows[0]["event"] == "login" and float(rows[0]["t"]) <= time.time()
    with pytest.raises(InvalidRequest):
        await db.audit("login", note="x" * 1000)  # too long to be a short id or reason


async def test_audit_pages_flag_records_trimmed_before_they_were_read(
    client: aioredis.Redis,
) -> None:
    # A tiny cap: Redis trims whole stream nodes (100 records each by default), so with
    # 250 records and a cap of 10 the oldest node or two go.
    db = Store(client, TemplateCipher(generate_key()), audit_maxlen=10)
    assert (await db.audit_after()).records == [] and not (await db.audit_after()).missed
    await db.audit("login", account_id="a0")
    first = await db.audit_after()
    assert [f["account_id"] for _, f in first.records] == ["a0"] and not first.missed
    cursor = first.records[0][0]
    assert (await db.audit_after(cursor)).records == []
    for i in range(1, 250):
        await db.audit("login", account_id=f"a{i}")
    page = await db.audit_after(cursor, count=10_000)
    assert page.missed  # a1 and the records after it were trimmed before this read
    kept = [f["account_id"] for _, f in page.records]
    assert kept and kept[-1] == "a249" and "a1" not in kept
    assert (await db.audit_after()).missed  # from the start: the oldest records are gone
    # Reading on from the newest record read misses nothing more.
    newer = await db.audit_after(page.records[-1][0])
    assert newer.records == [] and not newer.missed
    # A record deleted behind FacePay's back (XDEL) is flagged to a reader behind it.
    await db.audit("login", account_id="b1")
    await db.audit("login", account_id="b2")
    b1, b2 = (await db.audit_after(page.records[-1][0])).records
    await client.xdel("fp:audit", b2[0])
    assert (await db.audit_after(b1[0])).missed
    assert not (await db.audit_after(b2[0])).missed
    # Record ids compare as numbers: "…-10" comes after "…-9".
    assert h.stream_id("5-10") > h.stream_id("5-9") > h.stream_id("4-99")


async def test_audit_seals_verify_and_catch_a_rewritten_history(
    db: Store, client: aioredis.Redis
) -> None:
    for i in range(5):
        await db.audit("login", account_id=f"a{i}")
    assert await db.seal_audit() == 5
    assert await db.seal_audit() == 0  # nothing new since
    for i in range(5, 7):
        await db.audit("login", account_id=f"a{i}")
    check = await db.verify_audit()
    assert (check.seals, check.verified, check.records_sealed, check.unsealed) == (1, 1, 5, 2)
    assert await db.seal_audit() == 2
    check = await db.verify_audit()
    assert (check.verified, check.records_sealed, check.unsealed, check.broken) == (2, 7, 0, [])
    # Someone with Redis access but not the key writes another history under the same
    # ids: one record changed, the seals copied as they were.
    rows = await client.xrange("fp:audit")
    await client.delete("fp:audit")
    for rid, fields in rows:
        if fields.get(b"account_id") == b"a2":
            fields[b"account_id"] = b"mallory"
        await client.xadd("fp:audit", fields, id=rid)
    first_seal = next(rid for rid, f in rows if f[b"event"] == b"audit_sealed").decode()
    check = await db.verify_audit()
    assert check.broken == [first_seal] and check.verified == 1
    # Under another template key (after a rotation) the seals name a key it does not hold;
    # given the retired key as well, it checks them.
    rotated = Store(client, TemplateCipher(generate_key()))
    other = await rotated.verify_audit()
    assert (other.seals, other.unknown_key, other.verified, other.broken) == (2, 2, 0, [])
    both = await rotated.verify_audit([db._cipher.audit])
    assert (both.unknown_key, both.verified, both.broken) == (0, 1, [first_seal])


async def test_audit_seals_catch_the_first_seal_deleted(db: Store, client: aioredis.Redis) -> None:
    for batch in range(2):
        await db.audit("login", account_id=f"e{batch}")
        await db.seal_audit()
    seals = [rid.decode() for rid, f in await client.xrange("fp:audit")
             if f[b"event"] == b"audit_sealed"]  # fmt: skip
    await client.xdel("fp:audit", seals[0])
    # The record it covered is still there: the seal now oldest cannot start the chain.
    check = await db.verify_audit()
    assert check.broken == [seals[1]] and check.verified == 0


async def test_audit_seals_over_a_trimmed_stream(client: aioredis.Redis) -> None:
    """The cap trims whole nodes from the start: a seal whose records went with them cannot
    be checked, the rest still are, and a deletion among the kept records still shows."""
    db = Store(client, TemplateCipher(generate_key()), audit_maxlen=20)
    for batch in range(30):
        for i in range(5):
            await db.audit("login", account_id=f"t{batch}-{i}")
        await db.seal_audit()
    check = await db.verify_audit()
    assert check.broken == [] and check.unknown_key == 0 and check.restarts == []
    assert check.verified >= 1 and check.not_checkable >= 1
    assert check.verified + check.not_checkable == check.seals
    rows = await client.xrange("fp:audit")
    kept = [rid for rid, f in rows if f[b"event"] == b"login"]
    last_seal = next(rid for rid, f in reversed(rows) if f[b"event"] == b"audit_sealed")
    await client.xdel("fp:audit", kept[-2])
    # Redis keeps only the newest deleted id, so the trimmed seal can no longer be excused
    # either: a deletion may have reached it too. Failing closed flags both.
    broken = (await db.verify_audit()).broken
    assert last_seal.decode() in broken and len(broken) <= 2


async def test_audit_seals_catch_a_deletion_dressed_up_as_a_trim(
    db: Store, client: aioredis.Redis
) -> None:
    """Someone with Redis access rewrites the stream without a sealed record and forges its
    counters (XSETID) so that it looks trimmed: far below its cap it cannot have been, so
    the seal is broken, not excused as not checkable."""
    for batch, count in enumerate((5, 3)):
        for i in range(count):
            await db.audit("login", account_id=f"d{batch}{i}")
        assert await db.seal_audit() == count
    rows = await client.xrange("fp:audit")
    info = await client.xinfo_stream("fp:audit")
    gone = rows[2][0]  # the third of the first seal's five records
    await client.delete("fp:audit")
    for rid, fields in rows:
        if rid != gone:
            await client.xadd("fp:audit", fields, id=rid)
    await client.execute_command(
        "XSETID", "fp:audit", rows[-1][0], "ENTRIESADDED", info["entries-added"],
        "MAXDELETEDID", "0-0",
    )  # fmt: skip
    forged = await client.xinfo_stream("fp:audit")
    assert forged["entries-added"] > forged["length"]  # it looks trimmed, and not deleted
    assert forged["max-deleted-entry-id"] in (b"0-0", "0-0")
    first_seal = next(rid for rid, f in rows if f[b"event"] == b"audit_sealed").decode()
    check = await db.verify_audit()
    assert check.broken == [first_seal] and check.not_checkable == 0 and check.verified == 1
    # Only a stream the cap can have trimmed (at least audit_maxlen records) is excused.
    capped = Store(client, db._cipher, audit_maxlen=len(rows) - 1)
    assert (await capped.verify_audit()).not_checkable == 1
    # The first seal dropped with all its records, the counters made to look trimmed or
    # untouched: the oldest seal kept no longer starts the chain.
    second = [(rid, f) for rid, f in rows if rid > rows[5][0]]
    for added in (info["entries-added"], len(second)):
        await client.delete("fp:audit")
        for rid, fields in second:
            await client.xadd("fp:audit", fields, id=rid)
        await client.execute_command("XSETID", "fp:audit", rows[-1][0], "ENTRIESADDED", added)
        check = await db.verify_audit()
        assert check.broken == [second[-1][0].decode()] and check.verified == 0


async def test_audit_seals_across_a_template_key_rotation(
    db: Store, client: aioredis.Redis
) -> None:
    old_key = db._cipher
    await db.audit("login", account_id="before")
    assert await db.seal_audit() == 1
    new_key = TemplateCipher(generate_key())
    server = Store(client, new_key)  # a server started with the new key continues the chain
    await server.audit("login", account_id="after")
    assert await server.seal_audit() == 1
    check = await server.verify_audit([old_key.audit])
    assert (check.seals, check.verified, check.unknown_key, check.broken) == (2, 2, 0, [])
    assert check.restarts == [] and check.unsealed == 0 and check.oldest_unsealed_s is None
    await server.audit("login", account_id="later")
    check = await server.verify_audit([old_key.audit])
    assert check.unsealed == 1 and check.oldest_unsealed_s is not None
    assert 0 <= check.oldest_unsealed_s < 60


async def test_audit_chain_state_reset_or_altered_starts_a_flagged_chain(
    db: Store, client: aioredis.Redis
) -> None:
    """Someone who can write to Redis resets the chain's state after rewriting history:
    the sealer does not quietly seal the new history as if it were the first."""
    await db.audit("login", account_id="a0")
    assert await db.seal_audit() == 1
    rows = await client.xrange("fp:audit")
    await client.delete("fp:audit", "fp:audit:seal")
    for rid, fields in rows:  # the same ids, a record changed, the old seal dropped
        if fields.get(b"event") != b"audit_sealed":
            await client.xadd("fp:audit", {**fields, b"account_id": b"mallory"}, id=rid)
    # A server that sealed before remembers the chain: the state went back.
    assert await db.seal_audit() == 1
    check = await db.verify_audit()
    assert len(check.restarts) == 1 and check.broken == []
    restart = (await client.xrange("fp:audit", min=check.restarts[0], max=check.restarts[0]))[0]
    assert restart[1][b"restart"] == b"state_behind" and restart[1][b"prev"] == b""
    # A server that never saw it (restarted) notices a state that is empty beside seals...
    fresh = Store(client, db._cipher)
    await client.delete("fp:audit:seal")
    await db.audit("login", account_id="a1")
    assert await fresh.seal_audit() > 0
    last = (await client.xrevrange("fp:audit", count=1))[0][1]
    assert last[b"restart"] == b"state_reset"
    # ... and a state whose seal is not in the stream, or says otherwise.
    await db.audit("login", account_id="a2")
    await client.hset("fp:audit:seal", "mac", "0" * 64)
    assert await Store(client, db._cipher).seal_audit() == 1
    last = (await client.xrevrange("fp:audit", count=1))[0][1]
    assert last[b"restart"] == b"state_mismatch"
    check = await db.verify_audit()
    assert len(check.restarts) == 3 and check.unsealed == 0
    # An intact chain continues without a restart, on any server.
    await db.audit("login", account_id="a3")
    assert await Store(client, db._cipher).seal_audit() == 1
    assert "restart" not in h.decode_hash((await client.xrevrange("fp:audit", count=1))[0][1])
    assert len((await db.verify_audit()).restarts) == 3
    # A state pointed past every record would leave new ones unsealed for good: the
    # restart begins after the newest seal in the stream instead.
    await client.hset("fp:audit:seal", mapping={"upto": "99999999999999-0", "seal": "1-1"})
    await db.audit("login", account_id="a4")
    assert await Store(client, db._cipher).seal_audit() == 1
    check = await db.verify_audit()
    assert len(check.restarts) == 4 and check.unsealed == 0 and check.broken == []


async def test_audit_seals_catch_deleted_records_and_seals(
    db: Store, client: aioredis.Redis
) -> None:
    for batch in range(3):
        for i in range(3):
            await db.audit("login", account_id=f"b{batch}{i}")
        await db.seal_audit()
    rows = await client.xrange("fp:audit")
    seals = [rid.decode() for rid, f in rows if f[b"event"] == b"audit_sealed"]
    assert (await db.verify_audit()).verified == 3
    record = next(rid for rid, f in rows if f.get(b"account_id") == b"b11")
    await client.xdel("fp:audit", record)  # a sealed record removed
    assert (await db.verify_audit()).broken == [seals[1]]
    await client.xdel("fp:audit", seals[1])  # ... and its seal: the next one's link breaks
    assert (await db.verify_audit()).broken == [seals[2]]
    # One sealer at a time: while another server holds the lock, this one seals nothing.
    await db.audit("login", account_id="c0")
    await client.set("fp:audit:sealing", "another-server", px=5000)
    assert await db.seal_audit() == 0
    await client.delete("fp:audit:sealing")
    assert await db.seal_audit() == 1


async def test_audit_verify_catches_records_deleted_after_the_last_seal(
    db: Store, client: aioredis.Redis
) -> None:
    """No seal covers the records after the last one, but Redis records an XDEL there too,
    and the chain's state names the newest seal: a cut tail shows on the live stream."""
    for batch in range(2):
        for i in range(3):
            await db.audit("login", account_id=f"n{batch}{i}")
        await db.seal_audit()
    await db.audit("login", account_id="young")  # after the last seal
    check = await db.verify_audit()
    assert (check.deleted_upto, check.state_fault, check.unsealed) == (None, None, 1)
    young = (await client.xrevrange("fp:audit", count=1))[0][0].decode()
    await client.xdel("fp:audit", young)
    check = await db.verify_audit()
    assert check.broken == [] and check.verified == 2 and check.unsealed == 0
    assert check.deleted_upto == young and check.state_fault is None
    # The chain's state against the stream: the seal it names says otherwise, or is gone,
    # or the stream is.
    await client.hset("fp:audit:seal", "mac", "0" * 64)
    assert (await db.verify_audit()).state_fault == "seal_mismatch"
    await client.hset("fp:audit:seal", "seal", "1-1")
    assert (await db.verify_audit()).state_fault == "seal_missing"
    await client.delete("fp:audit")
    check = await db.verify_audit()
    assert check.state_fault == "stream_missing" and check.seals == 0
    await client.delete("fp:audit:seal")  # nothing sealed, nothing written: nothing wrong
    assert await db.verify_audit() == type(check)()


async def test_audit_verify_passes_a_stream_trimmed_by_its_cap(client: aioredis.Redis) -> None:
    """Trimming is no deletion: a capped stream sealed as servers seal it passes, and so
    does one whose newest seal the cap trimmed (records outran the seals)."""
    db = Store(client, TemplateCipher(generate_key()), audit_maxlen=20)
    for batch in range(30):
        for i in range(5):
            await db.audit("login", account_id=f"t{batch}-{i}")
        await db.seal_audit()
    info = await client.xinfo_stream("fp:audit")
    assert info["entries-added"] > info["length"] >= 20  # trimmed
    check = await db.verify_audit()
    assert check.broken == [] and check.restarts == [] and check.verified >= 1
    assert check.deleted_upto is None and check.state_fault is None
    for i in range(150):
        await db.audit("login", account_id=f"u{i}")
    named = (await client.hget("fp:audit:seal", "seal")).decode()
    assert not await client.xrange("fp:audit", min=named, max=named)  # trimmed away
    check = await db.verify_audit()
    assert check.state_fault is None and check.deleted_upto is None and check.seals == 0


# --- Erased data in Redis's own files ------------------------------------------------------------


async def test_purge_history_drops_deleted_data_from_the_aof_and_slowlog(
    db: Store, client: aioredis.Redis, redis_server: Any
) -> None:
    marker = b"name-of-an-erased-person-7f3a"
    await client.config_set("slowlog-log-slower-than", 0)  # log every command
    try:
        await client.set("fp:test:victim", marker)
        await client.delete("fp:test:victim")
        await aof_settled(client)
        assert marker in aof_bytes(redis_server.workdir)  # deleted, yet still in the file
        assert any(marker in bytes(e["command"]) for e in await client.slowlog_get(128))
        # This Redis writes an AOF and takes no snapshots (save ""): nothing to re-snapshot.
        assert await db.purge_history() == ("aof_rewrite", "slowlog")
        assert not any(marker in bytes(e["command"]) for e in await client.slowlog_get(128))
        await aof_settled(client)
        assert marker not in aof_bytes(redis_server.workdir)
    finally:
        await client.config_set("slowlog-log-slower-than", 10000)  # Redis's default


async def test_an_unfinished_purge_stays_owed_until_one_finishes(
    db: Store, client: aioredis.Redis, redis_server: Any, passhash: str
) -> None:
    await _enrol(db, passhash, "alice")
    assert not await db.purge_owed()
    filler = [f"fp:test:filler:{i}" for i in range(150)]
    await client.mset(dict.fromkeys(filler, "x"))
    await aof_settled(client)
    # 10 ms per key: the rewrite started here takes ~1.5 s, and it forks before the erasure,
    # so it keeps Alice. A purge must start a rewrite of its own after that one.
    await client.config_set("rdb-key-save-delay", 10_000)
    try:
        await client.bgrewriteaof()
        await db.erase_account("alice")
        assert await db.purge_owed()
        assert await db.purge_history(wait_s=0.2) == ("slowlog",)  # the rewrite is still busy
        assert await db.purge_owed()  # so the purge is still owed
        assert b"Alice Liddell" in aof_bytes(redis_server.workdir)
    finally:
        await client.config_set("rdb-key-save-delay", 0)  # the running rewrite keeps its 10 ms
        await client.delete(*filler)
    # Another server's retry is running: this server's retry leaves it to that one...
    await client.set("fp:purge:running", "another-server", px=5000)
    assert await db.purge_history(exclusive=True) == ()
    assert await db.purge_owed()
    await client.delete("fp:purge:running")
    assert await db.purge_history(exclusive=True) == ("aof_rewrite", "slowlog")  # waits, starts
    assert not await db.purge_owed() and not await client.exists("fp:purge:running")
    await aof_settled(client)
    assert b"Alice Liddell" not in aof_bytes(redis_server.workdir)


async def test_purge_history_leaves_out_what_redis_refuses(
    client: aioredis.Redis, redis_server: Any, caplog: pytest.LogCaptureFixture, passhash: str
) -> None:
    # A Redis user that may not rewrite the AOF, as a managed service may set it up.
    await client.acl_setuser(
        "limited", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
        commands=["+@all", "-bgrewriteaof"],
    )  # fmt: skip
    limited = aioredis.Redis(port=redis_server.port, username="limited", password="pw")
    try:
        store = Store(limited, TemplateCipher(generate_key()))
        await store.create_account("bob", "Bob", "+8613800005678", passhash, _templates(), CONSENT)
        await store.erase_account("bob")
        assert await store.purge_owed()
        with caplog.at_level(logging.WARNING, logger="session.store"):
            done = await store.purge_history()
        assert done == ("slowlog",)
        assert "refused BGREWRITEAOF" in caplog.text
        # Asking again would be refused again: the purge is as done as this Redis allows.
        assert not await store.purge_owed()
    finally:
        await limited.aclose()
        await client.acl_deluser("limited")


async def test_a_rewrite_redis_could_not_start_leaves_the_purge_owed(
    db: Store,
    client: aioredis.Redis,
    redis_server: Any,
    caplog: pytest.LogCaptureFixture,
    passhash: str,
) -> None:
    """BGREWRITEAOF answers an error when Redis cannot start the rewrite (fork failed, no new
    AOF file could be opened: memory or disk trouble). That is not a refusal for good: the
    erased data is still in the file, so the purge stays owed and the retry starts it."""
    await _enrol(db, passhash, "carol")
    await aof_settled(client)
    await db.erase_account("carol")
    # A real failure of the real command: a file where Redis's AOF folder should be, so it
    # cannot open the rewrite's new increment file (ENOTDIR). Redis keeps appending to the
    # file it has open, which moves with the folder set aside.
    folder = redis_server.workdir / "appendonlydir"
    aside = folder.with_name("appendonlydir.aside")
    folder.rename(aside)
    try:
        folder.write_bytes(b"")
        with caplog.at_level(logging.WARNING, logger="session._store_purge"):
            assert await db.purge_history() == ("slowlog",)
        assert "BGREWRITEAOF failed" in caplog.text and "retried later" in caplog.text
        assert await db.purge_owed()  # counted as a refusal, this would have been dropped
    finally:
        folder.unlink(missing_ok=True)
        aside.rename(folder)
    assert b"Alice Liddell" in aof_bytes(redis_server.workdir)
    assert await db.purge_history(exclusive=True) == ("aof_rewrite", "slowlog")
    assert not await db.purge_owed()
    await aof_settled(client)
    assert b"Alice Liddell" not in aof_bytes(redis_server.workdir)


@pytest.mark.parametrize(
    ("reply", "for_good"),
    [
        ("unknown command 'BGSAVE', with args beginning with: ", True),  # renamed away
        ("NOPERM User limited has no permissions to run the 'bgsave' command", True),
        ("Can't execute an AOF background rewriting. Please check the server logs", False),
        ("", False),  # BGSAVE's bare ERR when the fork failed
        ("command not allowed when used memory > 'maxmemory'.", False),  # OOM: passes
        ("BUSY Redis is busy running a script.", False),
    ],
)
def test_only_refusals_for_good_are_taken_as_final(reply: str, for_good: bool) -> None:
    """Redis 7's own replies: a purge step refused for good counts as done (asking again
    would be refused again); any other error leaves the purge owed for the retry."""
    from redis.exceptions import ResponseError

    from session._store_purge import refused_for_good

    assert refused_for_good(ResponseError(reply)) is for_good


# --- Redis going away ----------------------------------------------------------------------------


async def test_redis_down_is_store_unavailable_and_the_client_recovers(
    db: Store, redis_server: Any, passhash: str, till: str
) -> None:
    sid, _ = await _enrol(db, passhash, "alice")
    await db.create_payment(**_pay())  # loads the Lua script into the server's cache
    redis_server.stop()
    try:
        assert await db.ping() is False
        calls = [
            db.get_account("alice"),
            db.create_payment(**_pay(order_id="o-2")),
            db.audit("login", account_id="alice"),
            db.record_failure("alice", 3, 1.0),
            db.erase_account("alice"),
            db.get_subject(sid),
            _enrol(db, passhash, "bob"),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert info.value.__cause__ is not None
            # No connection could be made: the command certainly never ran (a checkout may
            # then say "nothing was charged"; a lost reply could not).
            assert info.value.unsent, info.value.__cause__
        with pytest.raises(StoreUnavailable):
            async for _ in db.iter_subjects():
                pass
    finally:
        redis_server.start()
    # a restarted server on the same port (its data kept or not): the same client object works
    # again, and the payment script is reloaded transparently into the empty script cache
    assert await db.ping() is True
    sid_b, _ = await _enrol(db, passhash, "bob")
    assert sid_b in [s async for s, _, _ in db.iter_subjects()]
    p = await db.create_payment(**_pay(order_id="o-3"))
    assert await db.get_payment(p.payment_id) == p


class _ExecReplyLost:
    """A relay to Redis that passes a transaction's EXEC on, then cuts its client off before
    the reply and refuses every later connection: the write commits, its caller never
    hears, and a retry cannot even connect."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cut = False
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def up() -> None:
            while data := await c_reader.read(65536):
                if b"EXEC" in data:
                    self.cut = True  # before it is sent: its reply must never get back
                    assert self.server is not None
                    self.server.close()
                s_writer.write(data)
                await s_writer.drain()
                if self.cut:
                    await asyncio.sleep(0.2)  # Redis runs it
                    c_writer.transport.abort()
                    s_writer.close()
                    return

        async def down() -> None:
            while (data := await s_reader.read(65536)) and not self.cut:
                c_writer.write(data)
                await c_writer.drain()

        await asyncio.gather(up(), down(), return_exceptions=True)


async def test_a_lost_reply_to_an_enrolment_write_never_says_nothing_was_written(
    db: Store, redis_server: Any, passhash: str
) -> None:
    """The EXEC of create_account commits, its reply is lost, and the retry cannot connect:
    the failure must not read as "never sent" (a live enrolment then told the person that
    nothing was stored, while their account and templates were in Redis)."""
    relay = _ExecReplyLost(redis_server.port)
    url = await relay.start()
    cut_off = Store(connect(url, max_connections=2, socket_timeout=2), db._cipher)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await cut_off.create_account(
                "alice", "Alice Liddell", "+8613800001234", passhash, _templates(), CONSENT
            )
    finally:
        await cut_off._r.aclose()
    assert relay.cut
    assert not info.value.unsent and "may have been done" in str(info.value)
    assert (await db.get_account("alice")).status == "active"  # it was written


async def test_phone_separators_are_normalised(db: Store, passhash: str) -> None:
    account, _ = await db.create_account(
        "bob", "Bob", "+1 (202) 555-0101", passhash, _templates(), CONSENT
    )
    assert account.phone == "+12025550101" and account.phone_last4 == "0101"
