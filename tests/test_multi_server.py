"""Several ``facepay serve`` processes on one Redis (DESIGN §4, docs/scaling.md).

- Two real server processes share a real redis-server and the same template key and admin
  token. An account enrolled through A's admin API pays at a terminal connected to B (its
  WebSocket and WebRTC both on B); the order is then refused on A (one ledger); the account
  erased through B is declined ``no_match`` on A.
- Propagation of enrolments and erasures between instances (Redis channel ``fp:events``)
  is measured on two apps in one process, where each directory can be watched.
- The compose file runs Redis plus replicated servers behind a balancer that passes the
  WebSocket upgrade through.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import statistics
import time
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from session.config import FacePayConfig, ServerConfig
from session.crypto import PassphraseHasher, TemplateCipher, generate_key
from session.store import Store
from stream_server.app import DIRECTORY, create_app
from tests.e2e import PASSPHRASE, REPO, camera_frames
from tests.serve_procs import ServeProc
from tests.terminal import TestTerminal

ENROLL = "faces/obama/obama.jpg"
SHOPPER = "faces/obama/obama3.jpg"
#: Generous bound for "seen by the others within a second": a poll gives up after this.
PROPAGATION_BOUND_S = 5.0


@pytest.fixture
async def two_servers(tmp_path, redis_url, models_dir, loopback_ice):  # type: ignore[no-untyped-def]
    """Servers A and B: separate processes, one Redis, one template key, one admin token."""
    key, token = generate_key().hex(), "fpa_" + secrets.token_urlsafe(24)
    servers = [
        ServeProc(
            name,
            tmp_path,
            redis_url=redis_url,
            models_dir=models_dir,
            template_key=key,
            admin_token=token,
            # Two processes on a 2-core machine; both seal the audit stream every second.
            config={"server": {"workers": 1, "audit_seal_s": 1.0}},
        )
        for name in ("a", "b")
    ]
    try:
        await asyncio.gather(*(s.start() for s in servers))
        yield servers
    finally:
        await asyncio.gather(*(s.stop() for s in servers))


async def _pay(term: TestTerminal, order: str, amount: str = "8.80") -> dict[str, Any]:
    """start_checkout, then the passphrase at the prompt: the approved or declined event."""
    await term.send({"type": "start_checkout", "amount": amount, "order_id": order})
    confirm = await term.expect("confirm", "declined", timeout=40)
    if confirm["type"] == "declined":
        return confirm
    await term.send(
        {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": PASSPHRASE}
    )
    return await term.expect("approved", "declined", timeout=30)


async def test_enrol_on_a_pay_on_b_erase_on_b_declines_on_a(
    two_servers, analyzer, photo, data_dir, redis_url
):
    a, b = two_servers
    status, merchant = await a.post_json("/api/merchants", {"name": "Shop"})
    assert status == 201, merchant
    status, terminal = await a.post_json(
        "/api/terminals", {"merchant_id": merchant["merchant_id"], "mode": "checkout"}
    )
    assert status == 201, terminal
    status, enrolled = await a.enroll(
        "acct-obama", "Barack Obama", "+12025550101", PASSPHRASE, [data_dir / ENROLL]
    )
    assert status == 201, enrolled

    # No waiting: B learns of the enrolment through fp:events while the terminal connects.
    on_b = TestTerminal(b.ws_url, terminal["token"])
    on_a = TestTerminal(a.ws_url, terminal["token"])
    try:
        await on_b.connect()
        await on_b.start_video(camera_frames(analyzer, photo(SHOPPER), seconds=60))
        approved = await _pay(on_b, "o-multi-1")
        assert approved["type"] == "approved", (on_b.events, b.log())
        # One ledger: A serves the payment B wrote and refuses the same order again.
        status, payment = await a.request("GET", f"/api/payments/{approved['payment_id']}")
        assert status == 200 and payment["order_id"] == "o-multi-1", payment
        assert payment["account_id"] == "acct-obama"

        await on_a.connect()
        await on_a.start_video(camera_frames(analyzer, photo(SHOPPER), seed=3, seconds=60))
        await on_a.send({"type": "start_checkout", "amount": "8.80", "order_id": "o-multi-1"})
        again = await on_a.expect("declined", "confirm", timeout=30)
        assert again["type"] == "declined" and again["reason"] == "duplicate_order", again
        assert again["payment_id"] == approved["payment_id"]

        # Erasure through B: A stops recognising the face.
        status, erased = await b.request("DELETE", "/api/accounts/acct-obama")
        assert status == 200 and erased["erased"] == 1, erased
        declined = await _pay(on_a, "o-multi-2")
        assert declined["type"] == "declined" and declined["reason"] == "no_match", on_a.events
        status, _ = await b.request(
            "GET", f"/api/merchants/{merchant['merchant_id']}/orders/o-multi-2"
        )
        assert status == 404
    finally:
        await on_a.close()
        await on_b.close()
    # Both servers seal the audit stream, one at a time, each going on from the last seal;
    # stopped, each seals what is left. One chain: no restart, nothing left unsealed.
    await asyncio.gather(a.stop(), b.stop())
    client = aioredis.from_url(redis_url)
    try:
        key = bytes.fromhex(a.env["FACEPAY_TEMPLATE_KEY"])
        check = await Store(client, TemplateCipher(key)).verify_audit()
    finally:
        await client.aclose()
    assert check.seals >= 1 and check.verified == check.seals, check
    assert check.restarts == [] and check.broken == [] and check.unsealed == 0, check


# --- propagation, measured --------------------------------------------------------------------


async def _until(predicate: Any, bound_s: float = PROPAGATION_BOUND_S) -> float:
    """Seconds until ``predicate()`` holds, polling every millisecond; fails past the bound."""
    t0 = time.perf_counter()
    while not predicate():
        elapsed = time.perf_counter() - t0
        assert elapsed < bound_s, f"not propagated within {bound_s} s"
        await asyncio.sleep(0.001)
    return time.perf_counter() - t0


async def test_enrolment_and_erasure_reach_every_instance(aiohttp_server, redis_url, models_dir):
    """Commit on a third client (like ``facepay enroll``) -> both servers' directories.

    Prints {"enrol_ms": ..., "erase_ms": ...}: per round, from the start of the store call
    (commit and PUBLISH are one MULTI) to the moment both instances' directories agree.
    """
    cipher = TemplateCipher(generate_key())
    config = FacePayConfig(server=ServerConfig(admin_token="t" * 32, workers=1))
    apps = [
        create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
        for _ in range(2)
    ]
    for app in apps:
        await aiohttp_server(app)
    directories = [app[DIRECTORY] for app in apps]
    client = aioredis.from_url(redis_url)
    store = Store(client, cipher)
    passhash = PassphraseHasher(time_cost=1, memory_kib=1024).hash(PASSPHRASE)
    rng = np.random.default_rng(7)
    enrol_s, erase_s = [], []
    try:
        for i in range(7):
            template = rng.standard_normal(128).astype(np.float32)
            template /= np.linalg.norm(template)
            t0 = time.perf_counter()
            _, sid = await store.create_account(
                f"acct-{i}", "Person", f"+8613800000{i:03d}", passhash, [template], {"m": "t"}
            )
            await _until(lambda sid=sid: all(sid in d.gallery for d in directories))
            enrol_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await store.erase_account(f"acct-{i}")
            await _until(lambda sid=sid: all(sid not in d.gallery for d in directories))
            erase_s.append(time.perf_counter() - t0)
    finally:
        await client.aclose()

    def summary(values: list[float]) -> dict[str, float]:
        ms = [v * 1000 for v in values]
        return {"median": round(statistics.median(ms), 2), "max": round(max(ms), 2)}

    print(json.dumps({"enrol_ms": summary(enrol_s), "erase_ms": summary(erase_s)}))


# --- docker-compose.yml -----------------------------------------------------------------------


def _parse_yaml_subset(text: str) -> dict[str, Any]:
    """Block mappings, ``- scalar`` lists and JSON flow lists: the subset our compose file uses.

    PyYAML is not a dependency; anything outside the subset fails loudly, which keeps the
    file plain for the people who edit it too.
    """
    lines = []
    for raw in text.splitlines():
        stripped = re.sub(r"\s+#.*$", "", raw) if not raw.lstrip().startswith("#") else ""
        if stripped.strip():
            lines.append((len(stripped) - len(stripped.lstrip()), stripped.strip()))

    def scalar(value: str) -> Any:
        if value.startswith("["):
            return json.loads(value)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            return value[1:-1]
        return int(value) if value.isdigit() else value

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                items.append(scalar(lines[i][1][2:].strip()))
                i += 1
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            key, sep, rest = lines[i][1].partition(":")
            assert sep, f"not a mapping entry: {lines[i][1]!r}"
            rest = rest.strip()
            if rest:
                mapping[key] = scalar(rest)
                i += 1
            elif i + 1 < len(lines) and lines[i + 1][0] > indent:
                mapping[key], i = block(i + 1, lines[i + 1][0])
            else:
                mapping[key] = None  # "name:" alone, as in a top-level volumes list
                i += 1
        assert i == len(lines) or lines[i][0] < indent, f"bad indentation at {lines[i][1]!r}"
        return mapping, i

    parsed, end = block(0, 0)
    assert end == len(lines)
    return parsed


def test_compose_runs_replicated_servers_on_one_redis_behind_a_balancer():
    compose = _parse_yaml_subset((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(services) >= {"redis", "facepay", "balancer"}
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]

    servers = {name: s for name, s in services.items() if s.get("build") == "."}
    assert servers, "no FacePay server service"
    replicas = sum(int(s.get("deploy", {}).get("replicas", 1)) for s in servers.values())
    assert replicas >= 2
    for name, server in servers.items():
        env = server["environment"]
        # One Redis for all; one template key and one admin token for all (from the .env).
        assert env["FACEPAY_REDIS_URL"] == "redis://redis:6379/0", name
        assert env["FACEPAY_TEMPLATE_KEY"].startswith("${FACEPAY_TEMPLATE_KEY:?"), name
        assert env["FACEPAY_ADMIN_TOKEN"].startswith("${FACEPAY_ADMIN_TOKEN:?"), name
        assert "ports" not in server, f"{name}: reach the servers through the balancer"

    balancer = services["balancer"]
    assert any(p.endswith(":8080") for p in balancer["ports"])
    mounted = [v.split(":")[0] for v in balancer["volumes"]]
    conf_path = REPO / mounted[0]
    assert conf_path.parent == REPO / "deploy" and conf_path.exists(), mounted
    conf = conf_path.read_text(encoding="utf-8")
    for name in servers:
        assert f"server {name}:8080" in conf
    # The WebSocket upgrade is passed through and a quiet socket is not cut by the balancer.
    assert "proxy_set_header Upgrade $http_upgrade" in conf
    assert "proxy_set_header Connection $connection_upgrade" in conf
    # Same-origin check: the server compares a browser's Origin with the Host it is given.
    assert "proxy_set_header Host $http_host" in conf
    assert re.search(r"proxy_read_timeout\s+\d+[sm]", conf)
    # The admin API's largest upload (8 MiB) fits through.
    assert re.search(r"client_max_body_size\s+(8|9|[1-9]\d+)m", conf)


def test_yaml_subset_parser_refuses_what_it_does_not_know():
    with pytest.raises(AssertionError):
        _parse_yaml_subset("a:\n  - b: c\n    d: e\n")
    assert _parse_yaml_subset("a:\n  b: 1\n  c: [\"x\"]\n# note\nd: 'y'\n") == {
        "a": {"b": 1, "c": ["x"]},
        "d": "y",
    }
