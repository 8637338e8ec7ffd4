"""Abuse controls: rate limits, lockout back-off, WebSocket origin checks, admin/terminal
token separation, constant-time compares and token rotation. Real Redis, real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.config import MatchConfig
from pipeline.errors import InvalidRequest, RateLimited, StoreUnavailable
from session.config import FacePayConfig, Limit, RateLimitConfig
from session.crypto import TEMPLATE_DIM, PassphraseHasher, TemplateCipher, generate_key
from session.directory import Directory
from session.phone_digits import LOOKALIKE_LIMIT, lookalikes
from session.ratelimit import RateLimiter
from session.store import Store
from stream_server import admin
from stream_server.app import CONNECTIONS, PEERS, REDIS, STORE, create_app
from tests.e2e import (
    PASSPHRASE,
    SERVER_ENV_VARS,
    Env,
    camera_frames,
    offer_sdp,
)

ADMIN = "admin-token-for-abuse-tests-0123"
OLD_ADMIN = "previous-admin-token-9876543210abc"
ENROLL = "faces/obama/obama.jpg"
SHOPPER = "faces/obama/obama3.jpg"

pytestmark = pytest.mark.usefixtures("loopback_ice")


@pytest.fixture
async def make_server(aiohttp_server, redis_url, models_dir):  # type: ignore[no-untyped-def]
    """Factory: a running server on ``FacePayConfig`` sections, one merchant and terminal."""
    envs: list[Env] = []

    async def make(mode: str = "checkout", **sections: Any) -> Env:
        server = {"admin_token": ADMIN, "workers": 2, **sections.pop("server", {})}
        config = FacePayConfig.model_validate({"server": server, **sections})
        cipher = TemplateCipher(generate_key())
        app = create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
        srv = await aiohttp_server(app)
        store = app[STORE]
        merchant = await store.add_merchant("Shop A")
        _, token = await store.add_terminal(merchant.merchant_id, mode)  # type: ignore[arg-type]
        env = Env(server=srv, store=store, merchant=merchant, token=token)
        envs.append(env)
        return env

    yield make
    for env in envs:
        await env.close()


def _limits(**values: Any) -> dict[str, Any]:
    return {"limits": values}


# --- the limiter itself ---------------------------------------------------------------------


async def test_limiter_counts_a_window_then_refuses_with_retry_after(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        limiter = RateLimiter(client)
        limit = Limit(count=3, window_s=1.0)
        assert [await limiter.hit("starts", "t1", limit) for _ in range(3)] == [2, 1, 0]
        with pytest.raises(RateLimited) as info:
            await limiter.hit("starts", "t1", limit)
        assert 0 < info.value.retry_after_s <= 1.0 and info.value.retry_after == 1
        assert info.value.code == "rate_limited"
        assert await limiter.hit("starts", "t2", limit) == 2  # keys are separate
        assert await limiter.hit("offers", "t1", limit) == 2  # and so are buckets
        key = limiter.key("starts", "t1")
        assert "t1" not in key and 0 < await client.pttl(key) <= 1000  # hashed, expiring
        await asyncio.sleep(1.1)
        assert await limiter.hit("starts", "t1", limit) == 2  # a new window
    finally:
        await client.aclose()


async def test_limiter_fails_closed_when_redis_is_down(redis_server, redis_url: str) -> None:
    client = aioredis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
    limiter = RateLimiter(client)
    await limiter.hit("starts", "t1", Limit(count=5, window_s=60))
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await limiter.hit("starts", "t1", Limit(count=5, window_s=60))
    finally:
        redis_server.start()
        await client.aclose()


# --- lockout back-off ---------------------------------------------------------------------


async def _lock(db: Store, account: str, attempts: int, lockout_s: float) -> float:
    for _ in range(attempts - 1):
        assert (await db.record_failure(account, attempts, lockout_s))[1] is None
    left, until = await db.record_failure(account, attempts, lockout_s)
    assert left == 0 and until is not None
    return until


async def test_repeated_lockouts_back_off_exponentially_up_to_the_cap(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    limits = RateLimitConfig(lockout_backoff=2.0, max_lockout_s=30.0)
    db = Store(client, TemplateCipher(generate_key()), limits=limits)
    try:
        durations = []
        for _ in range(4):
            start = time.time()
            until = await _lock(db, "alice", 2, 5.0)
            durations.append(round(until - start))
            await client.delete("fp:lock:alice")  # as if the lock ran out
        assert durations == [5, 10, 20, 30]  # x2 each time, capped at max_lockout_s
        assert await client.pttl("fp:lockouts:alice") > 86_000_000  # remembered for a day
        # Another account starts from the base lockout.
        start = time.time()
        assert round(await _lock(db, "bob", 2, 5.0) - start) == 5
    finally:
        await client.aclose()


async def test_the_server_store_locks_out_with_the_configured_back_off(make_server) -> None:
    env = await make_server(**_limits(lockout_backoff=3.0, max_lockout_s=100.0))
    store = env.app[STORE]
    assert store.limits.lockout_backoff == 3.0 and store.limits.max_lockout_s == 100.0
    durations = []
    for _ in range(3):
        start = time.time()
        durations.append(round(await _lock(store, "alice", 3, 10.0) - start))
        await env.app[REDIS].delete("fp:lock:alice")  # as if the lock ran out
    assert durations == [10, 30, 90]


async def test_failures_per_account_over_the_day_lock_for_the_longest_time(
    redis_url: str,
) -> None:
    client = aioredis.from_url(redis_url)
    limits = RateLimitConfig(
        passphrase_failures_per_account=Limit(count=4, window_s=3600), max_lockout_s=600.0
    )
    db = Store(client, TemplateCipher(generate_key()), limits=limits)
    try:
        # Two wrong answers per prompt never reach the 3-attempt lockout, but the account's
        # budget for the day (4) does: then it locks for max_lockout_s at once.
        for _ in range(3):
            assert (await db.record_failure("alice", 3, 5.0))[1] is None
            await db.clear_failures("alice")  # a right answer in between
        start = time.time()
        left, until = await db.record_failure("alice", 3, 5.0)
        assert left == 0 and until is not None and round(until - start) == 600
        assert await db.locked_until("alice") == pytest.approx(until, abs=0.01)
    finally:
        await client.aclose()


async def test_a_lock_lasts_as_long_as_its_key_whatever_this_servers_clock(redis_url: str) -> None:
    """The server that locked the account wrote its end by its own clock; a server whose
    clock runs 1 s ahead reads that end as past while Redis still holds the lock. It must
    still see the lock (it used to give a prompt whose wrong answers went uncounted)."""
    client = aioredis.from_url(redis_url)
    db = Store(client, TemplateCipher(generate_key()))
    try:
        end = time.time() - 1.0  # past by this clock
        await client.set("fp:lock:alice", repr(end), px=3000)  # Redis: 3 s to go
        assert await db.locked_until("alice") == pytest.approx(end)
        # A failure during the lock counts nothing and reports the same lock.
        assert await db.record_failure("alice", 3, 5.0) == (0, pytest.approx(end))
        assert await client.get("fp:fail:alice") is None
        await client.delete("fp:lock:alice")  # Redis let it go: unlocked
        assert await db.locked_until("alice") is None
    finally:
        await client.aclose()


# --- rate limits at the terminal protocol ---------------------------------------------------------


async def test_session_starts_are_limited_per_terminal(make_server) -> None:
    env = await make_server(**_limits(session_starts_per_terminal={"count": 2, "window_s": 60}))
    term = await env.terminal()
    for order in ("o-1", "o-2"):
        assert (await term.checkout("1.00", order))["state"] == "scanning"
        await term.send({"type": "cancel"})
        assert (await term.until_end())["state"] == "cancelled"
    await term.send({"type": "start_checkout", "amount": "1.00", "order_id": "o-3"})
    error = await term.expect("error", "state")
    assert error["type"] == "error" and error["code"] == "rate_limited", term.events
    assert 0 < error["retry_after_s"] <= 60
    # Another terminal of the same merchant has its own budget; the connection stays usable.
    _, token2 = await env.store.add_terminal(env.merchant.merchant_id, "checkout")
    other = await env.terminal(token2)
    assert (await other.checkout("1.00", "o-4"))["state"] == "scanning"
    await term.send({"type": "ping"})
    assert (await term.expect("pong"))["type"] == "pong"


async def test_invalid_requests_do_not_use_up_the_budget(make_server) -> None:
    env = await make_server(**_limits(session_starts_per_terminal={"count": 1, "window_s": 60}))
    term = await env.terminal()
    for bad in ({"amount": "-1", "order_id": "o-1"}, {"amount": "1", "order_id": "bad id!"}):
        await term.send({"type": "start_checkout", **bad})
        assert (await term.expect("error"))["code"] == "invalid_request"
    assert (await term.checkout("1.00", "o-1"))["state"] == "scanning"


async def test_offers_are_limited_per_terminal(make_server) -> None:
    env = await make_server(**_limits(offers_per_terminal={"count": 1, "window_s": 60}))
    term = await env.terminal()
    sdp = await offer_sdp()
    await term.send({"type": "offer", "sdp": "v=0 garbage", "sdp_type": "offer"})
    assert (await term.expect("error"))["code"] == "bad_sdp"  # not counted
    await term.send({"type": "offer", "sdp": sdp, "sdp_type": "offer"})
    await term.expect("answer")
    await term.send({"type": "offer", "sdp": sdp, "sdp_type": "offer"})
    error = await term.expect("error", "answer")
    assert error["type"] == "error" and error["code"] == "rate_limited"
    assert len(env.app[PEERS]) == 1  # the refused offer built no peer connection


async def test_enrolments_are_limited_per_terminal_and_per_account(make_server) -> None:
    env = await make_server(
        mode="enroll",
        **_limits(
            enrolments_per_terminal={"count": 3, "window_s": 60},
            enrolments_per_account={"count": 1, "window_s": 60},
        ),
    )
    term = await env.terminal()

    async def start(account: str, phone: str = "+8613800001234") -> dict[str, Any]:
        await term.send(
            {
                "type": "start_enroll",
                "consent": True,
                "account_id": account,
                "name": "Test Person",
                "phone": phone,
            }
        )
        event = await term.expect("state", "error")
        if event["type"] == "state":
            await term.send({"type": "cancel"})
            await term.expect("state")  # declined/cancelled
            while not env.app[CONNECTIONS] or any(
                c.session_task is not None and not c.session_task.done()
                for c in env.app[CONNECTIONS]
            ):
                await asyncio.sleep(0.01)
        return event

    assert (await start("acct-a", phone="x"))["code"] == "invalid_request"  # not counted
    assert (await start("acct-a"))["state"] == "capturing"
    assert (await start("acct-a"))["code"] == "rate_limited"  # per account
    assert (await start("acct-b"))["state"] == "capturing"
    assert (await start("acct-c"))["code"] == "rate_limited"  # terminal's 3rd counted start


async def test_passphrase_answers_are_limited_per_terminal(make_server, analyzer, photo) -> None:
    env = await make_server(
        policy={"passphrase_attempts": 10},
        **_limits(passphrase_attempts_per_terminal={"count": 2, "window_s": 300}),
    )
    await env.enroll("acct-obama", "Barack Obama", "+1 202 555 0101", photo(ENROLL))
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo(SHOPPER)))
    await term.checkout("5.00", "o-1")
    confirm = await term.expect("confirm", "declined")
    assert confirm["type"] == "confirm", term.events
    answer = {"type": "passphrase", "prompt_id": confirm["prompt_id"]}
    for left in (9, 8):
        await term.send({**answer, "passphrase": f"wrong guess {left}"})
        assert (await term.expect("wrong_passphrase"))["attempts_left"] == left
    await term.send({**answer, "passphrase": PASSPHRASE})  # even the right one: over budget
    error = await term.expect("error", "approved")
    assert error["type"] == "error" and error["code"] == "rate_limited"
    assert await env.payments() == []
    await term.send({"type": "cancel"})
    assert (await term.until_end())["state"] == "cancelled"


async def _enrol_twins(env: Env, photo: Any) -> None:
    """Two accounts with nearly identical templates: every search is ambiguous."""
    await env.enroll("acct-a", "Barack Obama", "+12025550101", photo(ENROLL))
    await env.enroll("acct-b", "Twin", "+12025559999", photo("faces/obama/obama-480p.jpg"))


async def _two_wrong_guesses(term: Any) -> None:
    """The checkout already started asks for digits twice, gets wrong ones, and declines."""
    for digits in ("0000", "0001"):
        assert (await term.expect("need_phone_digits", "confirm"))["type"] == "need_phone_digits"
        await term.send({"type": "phone_digits", "digits": digits})
    end = await term.until_end()
    assert (end["state"], end.get("reason")) == ("declined", "ambiguous"), term.events


async def test_phone_digit_guesses_are_limited_per_terminal_across_checkouts(
    make_server, analyzer, photo
) -> None:
    """Each checkout allows two phone-digit answers; a new checkout used to allow two more,
    so a look-alike could walk through every last-four value. The terminal's budget spans
    checkouts."""
    env = await make_server(**_limits(phone_digits_per_terminal={"count": 3, "window_s": 300}))
    await _enrol_twins(env, photo)
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo(SHOPPER)))
    await term.checkout("1.00", "o-1")
    await _two_wrong_guesses(term)
    await term.checkout("1.00", "o-2")
    await term.expect("need_phone_digits")
    await term.send({"type": "phone_digits", "digits": "0002"})  # the third: within budget
    await term.expect("need_phone_digits")
    await term.send({"type": "phone_digits", "digits": "9999"})  # right, but over budget
    error = await term.expect("error", "confirm")
    assert error["type"] == "error" and error["code"] == "rate_limited", term.events
    await term.send({"type": "cancel"})
    assert (await term.until_end())["state"] == "cancelled"
    assert await env.payments() == []


async def test_wrong_digits_are_counted_per_person_across_terminals(
    make_server, analyzer, photo
) -> None:
    """The per-terminal budget alone lets a look-alike guess faster by moving between kiosks;
    each person an ambiguous search names has a budget of wrong digits of their own. Once
    it is spent, a search naming them is declined before any digits are checked, even the
    right ones, from any terminal."""
    env = await make_server(
        **_limits(phone_digit_misses_per_subject={"count": 2, "window_s": 3600})
    )
    await _enrol_twins(env, photo)
    first = await env.terminal()
    await first.start_video(camera_frames(analyzer, photo(SHOPPER)))
    await first.checkout("1.00", "o-1")
    await _two_wrong_guesses(first)
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "checkout")
    second = await env.terminal(token)  # another kiosk
    await second.start_video(camera_frames(analyzer, photo(SHOPPER), seed=1))
    await second.checkout("1.00", "o-2")
    end = await second.until_end()
    assert (end["state"], end.get("reason")) == ("declined", "ambiguous"), second.events
    assert "need_phone_digits" not in second.types()  # not even asked
    assert await env.payments() == []


async def _enrol_live(term: Any, account_id: str, phone: str) -> dict[str, Any]:
    """One live enrolment from consent to its end; the terminal's final message."""
    fields = {"account_id": account_id, "name": "Look Alike", "phone": phone}
    await term.send({"type": "start_enroll", "consent": True, **fields})
    assert (await term.expect("state"))["state"] == "capturing", term.events
    assert (await term.expect("state", timeout=40))["state"] == "passphrase", term.events
    await term.send({"type": "enroll_passphrase", "passphrase": PASSPHRASE, "confirm": PASSPHRASE})
    end = await term.expect("declined", "enrolled", timeout=30)
    await term.expect("state")
    return end


async def test_a_live_enrolment_cannot_confirm_a_look_alikes_phone_digits(
    make_server, analyzer, photo
) -> None:
    """An enrolment's duplicate check compares the face only with enrolled people whose
    phone ends in the digits given: `already_enrolled` used to confirm a look-alike's guess
    of those digits, and a new account deny it, as often as the guesser liked. Wrong digits
    now spend the look-alike's budget; once it is spent, the right ones are declined
    `ambiguous` like the wrong ones, and nothing is written."""
    env = await make_server(
        **_limits(phone_digit_misses_per_subject={"count": 1, "window_s": 3600})
    )
    await env.enroll("acct-victim", "Barack Obama", "+12025550101", photo(ENROLL))
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "enroll")
    term = await env.terminal(token)
    await term.start_video(camera_frames(analyzer, photo(SHOPPER)), fps=15)
    first = await _enrol_live(term, "acct-guess-1", "+12025550000")  # wrong: a twin may enrol
    assert first["type"] == "enrolled", term.events
    second = await _enrol_live(term, "acct-guess-2", "+12025550101")  # right, budget spent
    assert second == {"type": "declined", "reason": "ambiguous"}, term.events
    accounts = [k async for k in env.app[REDIS].scan_iter("fp:account:*")]
    assert sorted(accounts) == [b"fp:account:acct-guess-1", b"fp:account:acct-victim"]


def test_a_face_matching_a_crowd_of_enrolled_subjects_names_none() -> None:
    """The look-alikes an enrolment's answer is counted against come from a top-k search:
    someone enrolling their own face again and again (each a 'twin' with other digits)
    would push the person whose digits they guess out of it. A crowd that could hide one
    names nobody, and the enrolment is declined."""
    directory = Directory(MatchConfig())
    rng = np.random.default_rng(5)
    face = rng.standard_normal(128).astype(np.float32)
    face /= np.linalg.norm(face)

    def near() -> np.ndarray:
        v = face + 0.05 * rng.standard_normal(128).astype(np.float32)
        return (v / np.linalg.norm(v)).astype(np.float32)

    for i in range(3):
        directory.add(f"s_{i}", [near()], f"{i:04d}")
    assert sorted(lookalikes(directory, [near()]) or []) == ["s_0", "s_1", "s_2"]
    for i in range(3, LOOKALIKE_LIMIT):
        directory.add(f"s_{i}", [near()], f"{i:04d}")
    assert lookalikes(directory, [near()]) is None


async def test_rate_limits_fail_closed_when_redis_is_down(make_server, redis_server) -> None:
    env = await make_server()
    term = await env.terminal()
    redis_server.stop()
    try:
        await term.send({"type": "start_checkout", "amount": "1.00", "order_id": "o-1"})
        error = await term.expect("error", "state")
        assert error["type"] == "error" and error["code"] == "unavailable", term.events
    finally:
        redis_server.start()


async def test_connections_per_terminal_are_capped(make_server) -> None:
    env = await make_server(**_limits(connections_per_terminal=2))
    first, second = await env.terminal(), await env.terminal()
    third = await env.terminal(hello=False)
    await third.send({"type": "hello", "token": env.token})
    assert (await third.next())["code"] == 4429
    await first.close()
    while len(env.app[CONNECTIONS]) > 1:
        await asyncio.sleep(0.01)
    fourth = await env.terminal()  # a slot came free
    assert fourth.events[0]["type"] == "hello"
    await second.close()
    await fourth.close()
    while env.app[CONNECTIONS]:
        await asyncio.sleep(0.01)


# --- WebSocket origin -------------------------------------------------------------------------


async def _ws_status(env: Env, origin: str | None) -> int:
    headers = {"Origin": origin} if origin is not None else {}
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(env.ws_url, headers=headers) as ws:
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def test_websocket_origin_is_checked(make_server) -> None:
    env = await make_server(server={"allowed_origins": ["https://kiosk.example"]})
    own = f"http://{env.server.host}:{env.server.port}"
    assert await _ws_status(env, None) == 101  # not a browser: the token decides
    assert await _ws_status(env, own) == 101  # the server's own pages
    assert await _ws_status(env, "https://kiosk.example") == 101  # listed
    for hostile in (
        "https://evil.example",
        "null",
        f"http://{env.server.host}:1",
        f"{own}/path",
        "javascript:alert(1)",
        "http://[::1",
    ):
        assert await _ws_status(env, hostile) == 403, hostile


async def test_any_origin_only_when_configured(make_server) -> None:
    env = await make_server(server={"allowed_origins": ["*"]})
    assert await _ws_status(env, "https://anywhere.example") == 101


# --- admin and terminal secrets ----------------------------------------------------------------


async def test_admin_and_terminal_tokens_do_not_open_each_other(make_server) -> None:
    env = await make_server()
    async with aiohttp.ClientSession() as http:
        url = env.server.make_url("/api/merchants")
        async with http.post(url, json={"name": "x"}, headers=_bearer(env.token)) as resp:
            assert resp.status == 401
    term = await env.terminal(ADMIN, hello=False)
    await term.send({"type": "hello", "token": ADMIN})
    assert (await term.next())["code"] == 4401


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_previous_admin_token_works_during_a_rotation(make_server, monkeypatch) -> None:
    env = await make_server(server={"admin_token_previous": OLD_ADMIN})
    calls: list[int] = []
    real = admin.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", counting)
    url = env.server.make_url("/api/merchants")
    async with aiohttp.ClientSession() as http:
        for token, status in ((ADMIN, 201), (OLD_ADMIN, 201), ("nope", 401), (ADMIN[:-1], 401)):
            calls.clear()
            async with http.post(url, json={"name": "Shop"}, headers=_bearer(token)) as resp:
                assert resp.status == status, token
            assert len(calls) == 2  # both tokens compared, in constant time, every time


ALICE = "alice-operator-token-" + "a" * 20
BOB = "bob-operator-token-" + "b" * 20


async def test_the_audit_names_the_operator_behind_each_admin_change(make_server) -> None:
    env = await make_server(server={"admin_operators": {"alice": ALICE, "bob": BOB}})
    api = env.server.make_url
    hashed = PassphraseHasher(time_cost=1, memory_kib=64).hash(PASSPHRASE)
    consent = {"method": "test"}
    await env.store.create_account(
        "acct-erased", "Erin Erased", "+8613800004321", hashed, _templates(1, 0), consent
    )
    async with aiohttp.ClientSession() as http:
        shop = {"name": "Shop"}
        async with http.post(api("/api/merchants"), json=shop, headers=_bearer(ALICE)) as resp:
            assert resp.status == 201
            mid = (await resp.json())["merchant_id"]
        body = {"merchant_id": mid, "mode": "checkout"}
        async with http.post(api("/api/terminals"), json=body, headers=_bearer(ALICE)) as resp:
            assert resp.status == 201
            tid = (await resp.json())["terminal_id"]
        async with http.post(api(f"/api/terminals/{tid}/rotate"), headers=_bearer(BOB)) as resp:
            assert resp.status == 200
        async with http.delete(api(f"/api/terminals/{tid}"), headers=_bearer(ADMIN)) as resp:
            assert resp.status == 200
        async with http.delete(api("/api/accounts/acct-erased"), headers=_bearer(BOB)) as resp:
            assert resp.status == 200
    audit = {e["event"]: e for e in await env.store.read_audit()}
    assert audit["merchant_added"]["merchant_id"] == mid
    assert audit["merchant_added"]["operator"] == "alice"
    assert audit["terminal_added"]["terminal_id"] == tid
    assert audit["terminal_added"]["operator"] == "alice"
    assert audit["terminal_rotated"]["operator"] == "bob"
    assert audit["terminal_revoked"]["operator"] == "admin"  # server.admin_token
    assert audit["erased"]["account_id"] == "acct-erased"
    assert audit["erased"]["operator"] == "bob"
    # Ids and names only: no operator's token is in the stream.
    flat = " ".join(f"{k}={v}" for e in audit.values() for k, v in e.items())
    assert ALICE not in flat and BOB not in flat and ADMIN not in flat


async def test_terminal_token_rotation_and_revocation_via_admin_api(make_server) -> None:
    env = await make_server()
    tid = (await env.store.authenticate_terminal(env.token)).terminal_id
    old_socket = await env.terminal()
    async with aiohttp.ClientSession(headers=_bearer(ADMIN)) as http:
        async with http.post(env.server.make_url(f"/api/terminals/{tid}/rotate")) as resp:
            assert resp.status == 200
            new_token = (await resp.json())["token"]
        assert new_token != env.token and new_token.startswith("fpt_")
        # The socket opened with the old token is closed (a rotation answers a stolen
        # token: it must not keep paying), before the answer on this instance.
        closed = await old_socket.next(timeout=5)
        assert closed == {"type": "_closed", "code": 4401}, old_socket.events
        stale = await env.terminal(hello=False)
        await stale.send({"type": "hello", "token": env.token})
        assert (await stale.next())["code"] == 4401
        fresh = await env.terminal(new_token)
        assert fresh.events[0]["terminal_id"] == tid
        await fresh.send({"type": "ping"})
        assert (await fresh.next(timeout=5))["type"] == "pong"  # the new token's socket serves
        assert "terminal_rotated" in [e["event"] for e in await env.store.read_audit()]
        async with http.post(env.server.make_url("/api/terminals/t_nope/rotate")) as resp:
            assert resp.status == 404 and (await resp.json())["error"] == "not_found"
        async with http.delete(env.server.make_url(f"/api/terminals/{tid}")) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "revoked"
        # Revocation also closes the terminal's open sockets on this instance.
        assert (await fresh.expect("_closed", timeout=5))["code"] == 4401
        async with http.post(env.server.make_url(f"/api/terminals/{tid}/rotate")) as resp:
            assert resp.status == 409  # a revoked terminal is not revived by a rotation


def test_rate_limited_maps_to_429_with_retry_after() -> None:
    resp = admin.error_response(RateLimited("too many", retry_after_s=2.2))
    assert resp.status == 429 and resp.headers["Retry-After"] == "3"


# --- template key rotation ----------------------------------------------------------------------


def _templates(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, TEMPLATE_DIM)).astype(np.float32)
    return list(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


async def _enrolled_store(redis_url: str, key: bytes) -> tuple[Store, aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    db = Store(client, TemplateCipher(key))
    passhash = PassphraseHasher().hash(PASSPHRASE)
    for i, account in enumerate(("alice", "bob")):
        await db.create_account(
            account, "Test Person", "+8613800001234", passhash, _templates(2 + i, i), {"m": "t"}
        )
    return db, client


async def _subjects(redis_url: str, key: bytes) -> dict[str, int]:
    client = aioredis.from_url(redis_url)
    try:
        db = Store(client, TemplateCipher(key))
        return {sid: len(tpls) async for sid, tpls, _ in db.iter_subjects()}
    finally:
        await client.aclose()


async def test_template_key_rotation_re_encrypts_every_template(redis_url: str) -> None:
    old, new = generate_key(), generate_key()
    db, client = await _enrolled_store(redis_url, old)
    try:
        before = await _subjects(redis_url, old)
        assert sorted(before.values()) == [2, 3]
        # A wrong "current" key stops the run and writes nothing.
        wrong = Store(client, TemplateCipher(generate_key()))
        with pytest.raises(InvalidRequest):
            await wrong.rekey_templates(TemplateCipher(new))
        assert await _subjects(redis_url, old) == before
        # bob's hash was stored before hashes were sealed: the rotation seals it too.
        plain = await db.passphrase_hash("bob")
        await client.hset("fp:account:bob", "passhash", plain)
        assert await db.rekey_templates(TemplateCipher(new)) == (2, 5)
        for account in ("alice", "bob"):
            stored = (await client.hget(f"fp:account:{account}", "passhash")).decode()
            assert stored.startswith("sealed1:")
            hash_ = await Store(client, TemplateCipher(new)).passphrase_hash(account)
            assert PassphraseHasher().verify(hash_, PASSPHRASE)
            with pytest.raises(InvalidRequest):  # the old key opens it no more
                await Store(client, TemplateCipher(old)).passphrase_hash(account)
        assert await _subjects(redis_url, new) == before  # same subjects, same templates
        assert await _subjects(redis_url, old) == {}  # the old key opens nothing any more
        assert await db.rekey_templates(TemplateCipher(new)) == (0, 0)  # resumable, idempotent
        assert "template_key_rotated" in [e["event"] for e in await db.read_audit()]
        # The sealed links moved to the new key too: subjects still lead to their accounts,
        # and erasing an account (which finds its subjects by the new blind) removes them.
        renewed = Store(client, TemplateCipher(new))
        owners = {sid: await renewed.account_for_subject(sid) for sid in before}
        assert sorted(owners.values()) == ["alice", "bob"]
        assert await renewed.erase_account("alice") == 2
        assert list((await _subjects(redis_url, new)).values()) == [3]
    finally:
        await client.aclose()


async def test_rotate_template_key_command_replaces_the_dev_key_file(
    redis_url: str, tmp_path
) -> None:
    old, new = generate_key(), generate_key()
    store, client = await _enrolled_store(redis_url, old)
    assert await store.seal_audit() > 0  # the enrolments' records, sealed under the old key
    await client.aclose()
    (tmp_path / "template.key").write_text(old.hex() + "\n")
    (tmp_path / "new.key").write_text(new.hex() + "\n")
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_VARS}
    args = ["--redis-url", redis_url, "--data-dir", str(tmp_path)]
    cmd = [sys.executable, "-m", "stream_server.cli", "rotate-template-key", *args]
    retired = ["--retired-audit-key-file", str(tmp_path / "retired-audit.key")]
    done = subprocess.run(
        [*cmd, "--new-key-file", str(tmp_path / "new.key"), "--operator", "ops-1", *retired],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"subjects": 2, "templates": 5}
    reader = aioredis.from_url(redis_url)
    try:
        rotated = (await reader.xrevrange("fp:audit", count=1))[0][1]
    finally:
        await reader.aclose()
    assert rotated[b"event"] == b"template_key_rotated" and rotated[b"operator"] == b"cli:ops-1"
    # The old key's seals stay checkable with the retired audit key alone, which cannot
    # open a template: the old template key can be destroyed.
    kept = (tmp_path / "retired-audit.key").read_text()
    assert kept.startswith("audit:") and old.hex() not in kept
    verify = [sys.executable, "-m", "stream_server.cli", "admin", "audit-verify", *args]
    checked = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1 and json.loads(checked.stdout)["unknown_key"] == 1
    checked = subprocess.run(
        [*verify, "--previous-key-file", str(tmp_path / "retired-audit.key")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["verified"] == 1
    assert (tmp_path / "template.key").read_text().strip() == new.hex()
    assert sorted((await _subjects(redis_url, new)).values()) == [2, 3]
    # Without a new key: a usage error (exit 2), nothing touched.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "new key" in again.stderr


def test_admin_tokens_are_compared_in_constant_time_and_all_of_them(monkeypatch) -> None:
    """Every configured admin token goes through hmac.compare_digest, whichever matched."""
    import hmac

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from pipeline.errors import AuthError
    from stream_server.app import CONFIG

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", spy)
    new, old = "new-admin-token-" + "n" * 16, "old-admin-token-" + "o" * 16
    alice, bob = "alice-admin-token-" + "a" * 16, "bob-admin-token-" + "b" * 16
    config = FacePayConfig.model_validate(
        {
            "server": {
                "admin_token": new,
                "admin_token_previous": old,
                "admin_operators": {"alice": alice, "bob": bob},
            }
        }
    )
    app = web.Application()
    app[CONFIG] = config
    cases = ((new, "admin"), (old, "admin"), (alice, "alice"), (bob, "bob"), (new[:9], None))
    for given, operator in cases:
        calls.clear()
        request = make_mocked_request(
            "GET", "/api/payments/x", headers={"Authorization": f"Bearer {given}"}, app=app
        )
        if operator is not None:
            assert admin.check_admin(request) == operator
        else:
            with pytest.raises(AuthError):
                admin.check_admin(request)
        expected = [new.encode(), old.encode(), alice.encode(), bob.encode()]
        assert [b for _, b in calls] == expected, given
        assert all(a == given.encode() for a, _ in calls)
