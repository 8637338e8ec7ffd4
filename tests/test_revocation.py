"""Revoking a terminal (docs/api.md, stream_server/revocation.py), real Redis and servers.

A revoked terminal (a stolen gate or kiosk token, say) must stop everywhere at once:
- its open socket on *another* server is closed too (``revoked:{id}`` on ``fp:events``);
- a hello whose token check raced the revocation is refused, not served;
- a prompt still open when the revocation lands (its socket not closed yet: the event lost
  with a cut subscription) pays nothing: the payment script refuses the terminal.

A token rotation (the answer to a stolen token) closes the sockets opened with the old
token the same ways (``rotated:{id}``), and leaves those opened with the new one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from session.config import FacePayConfig
from session.crypto import TemplateCipher, generate_key
from session.store import Store
from stream_server.app import CIPHER, STORE, TOKEN_ROTATIONS, create_app
from tests.e2e import ADMIN_TOKEN, PASSPHRASE, camera_frames
from tests.terminal import TestTerminal

ENROLL = "faces/obama/obama.jpg"
SHOPPER = "faces/obama/obama3.jpg"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

pytestmark = pytest.mark.usefixtures("loopback_ice")


async def _servers(aiohttp_server: Any, redis_url: str, models_dir: Any, n: int) -> list[Any]:
    """``n`` servers on one Redis with one template key and admin token, as in production."""
    config = FacePayConfig.model_validate({"server": {"admin_token": ADMIN_TOKEN, "workers": 1}})
    cipher = TemplateCipher(generate_key())
    return [
        await aiohttp_server(
            create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
        )
        for _ in range(n)
    ]


async def _revoke(server: Any, terminal_id: str) -> None:
    url = server.make_url(f"/api/terminals/{terminal_id}")
    async with aiohttp.ClientSession(headers=AUTH) as http, http.delete(url) as resp:
        assert resp.status == 200, await resp.text()


async def _rotate(server: Any, terminal_id: str) -> str:
    url = server.make_url(f"/api/terminals/{terminal_id}/rotate")
    async with aiohttp.ClientSession(headers=AUTH) as http, http.post(url) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["token"])


async def test_revoking_through_one_server_closes_the_socket_on_another(
    aiohttp_server, redis_url, models_dir
):
    a, b = await _servers(aiohttp_server, redis_url, models_dir, 2)
    store: Store = a.app[STORE]
    merchant = await store.add_merchant("Metro")
    gate, token = await store.add_terminal(merchant.merchant_id, "gate")
    term = TestTerminal(str(b.make_url("/ws")), token)
    await term.connect()
    try:
        await _revoke(a, gate.terminal_id)
        # Closed by B when the event reaches it (milliseconds); before this change B kept
        # serving the socket until the terminal itself reconnected.
        assert (await term.expect("_closed", timeout=2))["code"] == 4401
    finally:
        await term.close()
    again = TestTerminal(str(b.make_url("/ws")), token)
    await again.connect(hello=False)
    try:
        await again.send({"type": "hello", "token": token})
        assert (await again.next())["code"] == 4401
    finally:
        await again.close()


@pytest.mark.parametrize("change", ["revoke", "rotate"])
async def test_a_hello_racing_a_revocation_or_rotation_is_refused(
    aiohttp_server, redis_url, models_dir, monkeypatch, change
):
    """The hello's token check reads the terminal as active with this token; the revocation
    or rotation commits while that reply is on its way, and finds no socket to close yet."""
    (server,) = await _servers(aiohttp_server, redis_url, models_dir, 1)
    store: Store = server.app[STORE]
    merchant = await store.add_merchant("Shop")
    till, token = await store.add_terminal(merchant.merchant_id, "checkout")
    checked, release = asyncio.Event(), asyncio.Event()
    real = Store.authenticate_terminal

    async def first_reply_slow(self: Store, token: str) -> Any:
        terminal = await real(self, token)  # reads "active", with this token current
        if not checked.is_set():
            checked.set()
            await release.wait()  # the reply still on its way while the change commits
        return terminal

    monkeypatch.setattr(Store, "authenticate_terminal", first_reply_slow)
    term = TestTerminal(str(server.make_url("/ws")), token)
    await term.connect(hello=False)
    try:
        await term.send({"type": "hello", "token": token})
        await asyncio.wait_for(checked.wait(), 10)
        change_it = _revoke if change == "revoke" else _rotate
        await change_it(server, till.terminal_id)  # finds no socket of the terminal yet
        release.set()
        assert (await term.next(timeout=5)).get("code") == 4401, term.events
    finally:
        await term.close()


async def test_a_prompt_open_when_the_terminal_is_revoked_pays_nothing(make_env, analyzer, photo):
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+12025550101", photo(ENROLL))
    till = await env.store.authenticate_terminal(env.token)
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo(SHOPPER)))
    await term.checkout("9.90", "o-revoked")
    confirm = await term.expect("confirm")
    # Revoked in Redis with no event to any server (as when the revocation's pub/sub message
    # is lost to a cut subscription): this socket stays open, and only the payment itself
    # can stop the charge.
    await env.app[STORE]._r.hset(f"fp:terminal:{till.terminal_id}", "status", "revoked")
    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    end = await term.expect("approved", "declined", timeout=30)
    assert (end["type"], end.get("reason")) == ("declined", "terminal_revoked"), term.events
    assert await env.payments() == []
    assert await env.store.find_payment(env.merchant.merchant_id, "o-revoked") is None


async def test_a_prompt_open_when_the_token_is_rotated_pays_nothing(make_env, analyzer, photo):
    """A rotation answers a stolen token. Its socket is closed when ``rotated:`` arrives;
    until then (a payment already on its way, or the event lost to a cut subscription) the
    payment script itself refuses a socket whose token is no longer the terminal's."""
    env = await make_env()
    await env.enroll("acct-obama", "Barack Obama", "+12025550101", photo(ENROLL))
    till = await env.store.authenticate_terminal(env.token)
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo(SHOPPER)))
    await term.checkout("9.90", "o-rotated")
    confirm = await term.expect("confirm")
    # The new token's digest written with no event to any server: this socket stays open.
    await env.app[STORE]._r.hset(f"fp:terminal:{till.terminal_id}", "token_sha256", "0" * 64)
    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    end = await term.expect("approved", "declined", timeout=30)
    assert (end["type"], end.get("reason")) == ("declined", "terminal_revoked"), term.events
    assert await env.payments() == []


@pytest.mark.parametrize("change", ["revoke", "rotate"])
async def test_a_change_missed_during_a_subscription_gap_still_closes_the_socket(
    aiohttp_server, redis_url, models_dir, change
):
    """Pub/sub keeps no history: a revocation or a token rotation published while this
    server's subscription is down never reaches it. When the subscription is made again the
    server reads back the status and token of every terminal connected to it."""
    (server,) = await _servers(aiohttp_server, redis_url, models_dir, 1)
    store: Store = server.app[STORE]
    merchant = await store.add_merchant("Shop")
    mode = "enroll" if change == "revoke" else "checkout"
    terminal, token = await store.add_terminal(merchant.merchant_id, mode)
    term = TestTerminal(str(server.make_url("/ws")), token)
    await term.connect()
    admin = aioredis.from_url(redis_url)
    try:
        assert await admin.client_kill_filter(_type="pubsub") >= 1  # the gap starts
        # Changed through another process (the CLI, another server): the event is lost here.
        other = Store(admin, server.app[CIPHER])
        if change == "revoke":
            await other.revoke_terminal(terminal.terminal_id)
        else:
            await other.rotate_terminal_token(terminal.terminal_id)
        assert (await term.expect("_closed", timeout=5))["code"] == 4401
    finally:
        await admin.aclose()
        await term.close()


async def test_rotating_through_one_server_closes_the_old_tokens_socket_on_another(
    aiohttp_server, redis_url, models_dir
):
    a, b = await _servers(aiohttp_server, redis_url, models_dir, 2)
    store: Store = a.app[STORE]
    merchant = await store.add_merchant("Metro")
    gate, token = await store.add_terminal(merchant.merchant_id, "gate")
    old = TestTerminal(str(b.make_url("/ws")), token)
    await old.connect()
    new = None
    try:
        new_token = await _rotate(a, gate.terminal_id)
        # Closed by B when the event reaches it: the old token must not keep paying there.
        assert (await old.next(timeout=2)).get("code") == 4401, old.events
        new = TestTerminal(str(b.make_url("/ws")), new_token)
        await new.connect()
        # B gets the event again (as if it arrived late): the new token's socket stays up.
        await b.app[STORE]._r.publish(b.app[STORE].events_channel, f"rotated:{gate.terminal_id}")
        await asyncio.sleep(0.3)
        await new.send({"type": "ping"})
        assert (await new.next(timeout=5))["type"] == "pong", new.events
    finally:
        await old.close()
        if new is not None:
            await new.close()


async def test_rotating_other_terminals_does_not_fail_a_hello(
    aiohttp_server, redis_url, models_dir, monkeypatch
):
    """Each hello's token check is repeated when a rotation of *its* terminal was announced
    meanwhile; a script rotating many other terminals used to fail every hello (three
    checks, then "try later"), new tokens' hellos included."""
    (server,) = await _servers(aiohttp_server, redis_url, models_dir, 1)
    store: Store = server.app[STORE]
    merchant = await store.add_merchant("Shop")
    _, token = await store.add_terminal(merchant.merchant_id, "checkout")
    real = Store.authenticate_terminal

    async def others_rotated_meanwhile(self: Store, token: str) -> Any:
        terminal = await real(self, token)
        server.app[TOKEN_ROTATIONS]["t_someone_else"] += 1  # another terminal's rotation
        return terminal

    monkeypatch.setattr(Store, "authenticate_terminal", others_rotated_meanwhile)
    term = TestTerminal(str(server.make_url("/ws")), token)
    try:
        await term.connect()
        await term.send({"type": "ping"})
        assert (await term.expect("pong"))["type"] == "pong", term.events
    finally:
        await term.close()
