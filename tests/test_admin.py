"""The admin HTTP API, the health endpoints and the directory sync, on real Redis and models."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import weakref
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.errors import NotFound
from pipeline.image import decode_image
from session.config import FacePayConfig
from session.crypto import PassphraseHasher, TemplateCipher, generate_key
from session.store import Store
from stream_server import admin, sync
from stream_server.app import DIRECTORY, METRICS, STORE, create_app
from tests.privacy_scan import aof_bytes, aof_settled
from tests.test_image_bombs import (
    jpeg_hiding_its_frame,
    png_chunk_bomb,
    progressive_repeating_last_scan,
)

ADMIN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PASSPHRASE = "correct horse"


def _config(admin_token: str | None = ADMIN) -> FacePayConfig:
    return FacePayConfig.model_validate({"server": {"admin_token": admin_token}})


@pytest.fixture
def cipher() -> TemplateCipher:
    return TemplateCipher(generate_key())


@pytest.fixture
async def client(aiohttp_client, redis_url, models_dir, cipher):  # type: ignore[no-untyped-def]
    app = create_app(_config(), cipher=cipher, redis_url=redis_url, models_dir=models_dir)
    sync.setup(app)  # idempotent: a no-op once create_app sets it up itself
    return await aiohttp_client(app)


def _enrol_form(images: list[bytes], **fields: str) -> aiohttp.FormData:
    values = {
        "account_id": "alice",
        "name": "Alice Example",
        "phone": "+8613800001234",
        "passphrase": PASSPHRASE,
        "consent": "true",
        **fields,
    }
    form = aiohttp.FormData()
    for key, value in values.items():
        form.add_field(key, value)
    for i, data in enumerate(images):
        form.add_field("image", data, filename=f"{i}.jpg", content_type="image/jpeg")
    return form


def _jpeg(data_dir: Path, rel: str) -> bytes:
    return (data_dir / "faces" / rel).read_bytes()


async def _eventually(check, timeout: float = 1.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_admin_api_needs_the_admin_token(client, headers):
    resp = await client.post("/api/merchants", json={"name": "Shop"}, headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await resp.json())["error"] == "unauthorized"


async def test_admin_api_is_disabled_without_a_configured_token(
    aiohttp_client, redis_url, models_dir, cipher
):
    app = create_app(_config(None), cipher=cipher, redis_url=redis_url, models_dir=models_dir)
    client = await aiohttp_client(app)
    for headers in ({}, {"Authorization": "Bearer "}, AUTH):
        resp = await client.post("/api/merchants", json={"name": "Shop"}, headers=headers)
        assert resp.status == 503
        body = await resp.json()
        assert body["error"] == "admin_disabled"
        assert "disabled" in body["message"]


async def test_named_operators_alone_enable_the_admin_api(
    aiohttp_client, redis_url, models_dir, cipher
):
    ops = "ops-team-admin-token-0123456789-x"
    config = FacePayConfig.model_validate({"server": {"admin_operators": {"ops": ops}}})
    app = create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
    client = await aiohttp_client(app)
    shop = {"name": "Shop"}
    resp = await client.post(
        "/api/merchants", json=shop, headers={"Authorization": f"Bearer {ops}"}
    )
    assert resp.status == 201
    assert (await client.post("/api/merchants", json=shop, headers=AUTH)).status == 401
    [entry] = [e for e in await app[STORE].read_audit() if e["event"] == "merchant_added"]
    assert entry["operator"] == "ops"


# --- merchants and terminals ------------------------------------------------------------------


async def test_create_merchant_and_terminal(client):
    resp = await client.post("/api/merchants", json={"name": "Corner Shop"}, headers=AUTH)
    assert resp.status == 201
    merchant_id = (await resp.json())["merchant_id"]

    resp = await client.post(
        "/api/terminals", json={"merchant_id": merchant_id, "mode": "checkout"}, headers=AUTH
    )
    assert resp.status == 201
    body = await resp.json()
    assert body["merchant_id"] == merchant_id and body["mode"] == "checkout"
    terminal = await client.app[STORE].authenticate_terminal(body["token"])
    assert terminal.terminal_id == body["terminal_id"]


@pytest.mark.parametrize(
    ("path", "payload", "status", "error"),
    [
        ("/api/merchants", {"name": "Shop", "extra": 1}, 400, "invalid_request"),
        ("/api/merchants", {"name": ""}, 400, "invalid_request"),
        ("/api/merchants", [1, 2], 400, "invalid_request"),
        ("/api/merchants", {"name": "x" * 20_000}, 413, "too_large"),
        ("/api/terminals", {"merchant_id": "m_nope", "mode": "checkout"}, 404, "not_found"),
        ("/api/terminals", {"merchant_id": "m_nope", "mode": "vending"}, 400, "invalid_request"),
    ],
)
async def test_bad_bodies_are_refused(client, path, payload, status, error):
    resp = await client.post(path, json=payload, headers=AUTH)
    assert resp.status == status
    assert (await resp.json())["error"] == error


async def test_malformed_json_is_a_400(client):
    resp = await client.post("/api/merchants", data=b"{not json", headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"


async def test_unexpected_errors_hide_their_details(client, monkeypatch):
    async def boom(name: str) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client.app[STORE], "add_merchant", boom)
    resp = await client.post("/api/merchants", json={"name": "Shop"}, headers=AUTH)
    assert resp.status == 500
    text = await resp.text()
    assert "secret internals" not in text and "Traceback" not in text


# --- enrolment and erasure --------------------------------------------------------------------


async def test_enrol_from_photo_then_erase(client, data_dir, redis_url):
    directory = client.app[DIRECTORY]
    form = _enrol_form([_jpeg(data_dir, "obama/obama.jpg"), _jpeg(data_dir, "obama/obama2.jpg")])
    resp = await client.post("/api/accounts", data=form, headers=AUTH)
    assert resp.status == 201, await resp.text()
    assert await resp.json() == {"account_id": "alice", "templates": 2, "name": "A************"}
    [consent] = [e for e in await client.app[STORE].read_audit() if e["event"] == "consent"]
    assert consent["source"] == "admin_api" and consent["operator"] == "admin"
    assert len(directory.gallery) == 2
    assert len(directory.gallery.subjects()) == 1

    again = _enrol_form([_jpeg(data_dir, "obama/obama.jpg")])
    resp = await client.post("/api/accounts", data=again, headers=AUTH)
    assert resp.status == 409

    resp = await client.delete("/api/accounts/alice", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {
        "account_id": "alice",
        "erased": 2,
        "history_purge": ["aof_rewrite", "slowlog"],  # the test Redis: AOF, no snapshots
    }
    raw = aioredis.from_url(redis_url)
    try:
        assert await raw.keys("fp:tpl:*") == []
        assert await raw.smembers("fp:subjects") == set()
    finally:
        await raw.aclose()
    await _eventually(lambda: len(directory.gallery) == 0)

    resp = await client.delete("/api/accounts/alice", headers=AUTH)
    assert resp.status == 404


async def test_two_enrolments_of_one_face_at_once_make_one_account(client, data_dir):
    """Two kiosks, or a double submit: both requests used to pass the duplicate check before
    either was written, and both accounts were then ambiguous at every checkout, even after
    the phone digits. Checked and written one at a time, the second is refused."""
    forms = [
        _enrol_form([_jpeg(data_dir, f"obama/{name}")], account_id=account)
        for name, account in (("obama.jpg", "alice"), ("obama3.jpg", "alice2"))
    ]
    responses = await asyncio.gather(
        *(client.post("/api/accounts", data=form, headers=AUTH) for form in forms)
    )
    assert sorted(r.status for r in responses) == [201, 409], [r.status for r in responses]
    assert len(client.app[DIRECTORY].gallery.subjects()) == 1
    store, found = client.app[STORE], []
    for account in ("alice", "alice2"):
        with contextlib.suppress(NotFound):
            found.append((await store.get_account(account)).account_id)
    assert len(found) == 1, found


async def test_the_same_face_is_not_enrolled_twice_with_the_same_phone_digits(client, data_dir):
    """A second account for an enrolled face, with a phone ending in the same four digits,
    would leave both declined ``ambiguous`` at every checkout (the phone digits are all a
    checkout narrows by): refused, nothing written. Other digits (twins) may enrol."""
    first = _enrol_form([_jpeg(data_dir, "obama/obama.jpg")])
    assert (await client.post("/api/accounts", data=first, headers=AUTH)).status == 201
    again = _enrol_form(
        [_jpeg(data_dir, "obama/obama3.jpg")], account_id="alice2", phone="+86 139 0000 1234"
    )
    resp = await client.post("/api/accounts", data=again, headers=AUTH)
    assert resp.status == 409, await resp.text()
    assert (await resp.json())["error"] == "already_enrolled"
    with pytest.raises(NotFound):
        await client.app[STORE].get_account("alice2")
    # Each such refusal says something about an enrolled person: it is audited.
    refused = [r for r in await client.app[STORE].read_audit(20) if r["event"] == "enroll_refused"]
    assert [(r["account_id"], r["reason"], r["operator"]) for r in refused] == [
        ("alice2", "already_enrolled", "admin")
    ]
    # A taken account id is refused before any face is looked at: otherwise the answer
    # (already_enrolled or conflict) would tell, for any photo and four guessed digits,
    # whether that person is enrolled with them, with nothing written.
    for phone in ("+86 139 0000 1234", "+86 139 0000 9999"):
        probe = _enrol_form([_jpeg(data_dir, "obama/obama3.jpg")], account_id="alice", phone=phone)
        resp = await client.post("/api/accounts", data=probe, headers=AUTH)
        assert resp.status == 409 and (await resp.json())["error"] == "conflict"
    other = _enrol_form(
        [_jpeg(data_dir, "obama/obama3.jpg")], account_id="alice3", phone="+8613800005678"
    )
    assert (await client.post("/api/accounts", data=other, headers=AUTH)).status == 201
    # Someone else with the same digits is not a duplicate.
    stranger = _enrol_form([_jpeg(data_dir, "biden/biden.jpg")], account_id="joe")
    assert (await client.post("/api/accounts", data=stranger, headers=AUTH)).status == 201


async def test_erasure_without_the_purge_when_it_is_turned_off(
    aiohttp_client, redis_url, models_dir, cipher, data_dir
):
    config = FacePayConfig.model_validate(
        {"server": {"admin_token": ADMIN, "purge_history_on_erasure": False}}
    )
    app = create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
    client = await aiohttp_client(app)
    form = _enrol_form([_jpeg(data_dir, "obama/obama.jpg")])
    assert (await client.post("/api/accounts", data=form, headers=AUTH)).status == 201
    raw = aioredis.from_url(redis_url)
    try:
        await raw.config_set("slowlog-log-slower-than", 0)  # every command is logged
        resp = await client.delete("/api/accounts/alice", headers=AUTH)
        assert resp.status == 200
        assert await resp.json() == {"account_id": "alice", "erased": 1, "history_purge": []}
        commands = [bytes(e["command"]) for e in await raw.slowlog_get(128)]
        assert any(c.startswith(b"MULTI") or b"fp:account" in c for c in commands)
        assert not [c for c in commands if c.startswith((b"BGREWRITEAOF", b"BGSAVE"))]
    finally:
        await raw.config_set("slowlog-log-slower-than", 10000)
        await raw.aclose()


async def test_an_owed_purge_is_finished_by_the_next_server(
    aiohttp_client, redis_url, redis_server, models_dir, cipher
):
    """A server stopped between an erasure and its purge: a server started later purges."""
    raw = aioredis.from_url(redis_url)
    try:
        store = Store(raw, cipher)
        passhash = PassphraseHasher(time_cost=1, memory_kib=64).hash(PASSPHRASE)
        template = np.ones(128, np.float32) / np.sqrt(128)
        consent = {"source": "test"}
        await store.create_account(
            "carol", "Carol Erased", "+8613800007777", passhash, [template], consent
        )
        await store.erase_account("carol")  # ... and the server stopped here
        assert await store.purge_owed()
        await aof_settled(raw)
        assert b"Carol Erased" in aof_bytes(redis_server.workdir)

        config = FacePayConfig.model_validate(
            {"server": {"admin_token": ADMIN, "purge_retry_s": 1.0}}
        )
        app = create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
        await aiohttp_client(app)
        deadline = time.monotonic() + 10
        while await store.purge_owed():
            assert time.monotonic() < deadline, "the owed purge was not run"
            await asyncio.sleep(0.1)
        await aof_settled(raw)
        assert b"Carol Erased" not in aof_bytes(redis_server.workdir)
    finally:
        await raw.aclose()


@pytest.mark.parametrize(
    ("images", "error", "reason"),
    [
        (["group/obama_and_biden.jpg"], "bad_quality", "several_faces"),
        (["obama/obama.jpg", "group/two_people.jpg"], "bad_quality", "several_faces"),
        ([b"blank"], "bad_quality", "no_face"),
        ([b"corrupt"], "bad_image", None),
        # one consent, one person: a second person's photo is not stored under it
        (
            ["obama/obama.jpg", "obama/obama2.jpg", "biden/biden.jpg"],
            "bad_quality",
            "different_person",
        ),
    ],
    ids=["group", "second-photo-group", "blank", "corrupt", "another-person"],
)
async def test_enrol_refuses_unusable_photos(client, data_dir, images, error, reason):
    blobs = []
    for item in images:
        if item == b"blank":
            _, enc = cv2.imencode(".png", np.full((480, 640, 3), 128, np.uint8))
            blobs.append(enc.tobytes())
        elif item == b"corrupt":
            blobs.append(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        else:
            blobs.append(_jpeg(data_dir, item))
    resp = await client.post("/api/accounts", data=_enrol_form(blobs), headers=AUTH)
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == error
    assert body["image"] == len(images) - 1
    if reason is not None:
        assert reason in body["reasons"]
    with pytest.raises(Exception, match="no such account"):
        await client.app[STORE].get_account("alice")
    assert len(client.app[DIRECTORY].gallery) == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"consent": "false"}, "consent required"),
        ({"passphrase": "short"}, "passphrase"),
        ({"account_id": "bad id!"}, "account id"),
        ({"phone": "12"}, "phone"),
    ],
)
async def test_enrol_refuses_bad_fields(client, data_dir, fields, message):
    form = _enrol_form([_jpeg(data_dir, "obama/obama.jpg")], **fields)
    resp = await client.post("/api/accounts", data=form, headers=AUTH)
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "invalid_request"
    assert message in body["message"]
    assert "short" not in body["message"]  # never echo a passphrase


async def test_passphrase_is_kept_exactly_as_typed(client, data_dir):
    spaced = "  spaced passphrase  "
    form = _enrol_form([_jpeg(data_dir, "obama/obama.jpg")], passphrase=spaced)
    assert (await client.post("/api/accounts", data=form, headers=AUTH)).status == 201
    stored = await client.app[STORE].passphrase_hash("alice")
    assert PassphraseHasher().verify(stored, spaced)
    assert not PassphraseHasher().verify(stored, spaced.strip())


async def test_enrol_needs_multipart_and_an_image(client):
    resp = await client.post("/api/accounts", json={"account_id": "a"}, headers=AUTH)
    assert resp.status == 400
    form = _enrol_form([])
    resp = await client.post("/api/accounts", data=form, headers=AUTH)
    assert resp.status == 400
    assert "image" in (await resp.json())["message"]


# --- hostile uploads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{"passphrase": "short"}, {"account_id": "bad id!"}, {"phone": "12345"}, {"name": "   "}],
    ids=["passphrase", "account_id", "phone", "name"],
)
async def test_enrol_checks_every_field_before_decoding_a_photo(client, monkeypatch, fields):
    # A photo may cost seconds of the executor that checkouts share: a typo fails first.
    decoded: list[int] = []

    def decode(data: bytes) -> np.ndarray:
        decoded.append(len(data))
        return decode_image(data)

    monkeypatch.setattr(admin, "decode_image", decode)
    photo = progressive_repeating_last_scan(20)
    resp = await client.post("/api/accounts", data=_enrol_form([photo], **fields), headers=AUTH)
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    assert decoded == []


async def test_enrol_keeps_one_decoded_photo_at_a_time(client, data_dir, monkeypatch):
    # Ten 40 MP photos decoded up front held 1.3 GB; each photo only needs its template.
    class Tracked(np.ndarray):
        pass

    decoded: list[weakref.ref[np.ndarray]] = []
    alive_at_decode: list[int] = []

    def decode(data: bytes) -> np.ndarray:
        gc.collect()
        alive_at_decode.append(sum(ref() is not None for ref in decoded))
        image = decode_image(data).view(Tracked)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(admin, "decode_image", decode)
    photos = [_jpeg(data_dir, f"obama/{name}.jpg") for name in ("obama", "obama2", "obama3")]
    resp = await client.post("/api/accounts", data=_enrol_form(photos), headers=AUTH)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["templates"] == 3
    assert alive_at_decode == [0, 0, 0]


@pytest.mark.parametrize(
    "bomb",
    [png_chunk_bomb(), jpeg_hiding_its_frame(), progressive_repeating_last_scan(200)],
    ids=["png-chunk-length", "jpeg-ff00", "jpeg-scans"],
)
async def test_enrol_refuses_image_bombs_before_opencv(client, data_dir, monkeypatch, bomb):
    calls: list[int] = []

    def imdecode(buf: np.ndarray, flags: int) -> None:
        calls.append(len(buf))  # a bomb must never get here (GBs or minutes on the old code)

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    resp = await client.post("/api/accounts", data=_enrol_form([bomb]), headers=AUTH)
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "bad_image" and body["image"] == 0
    assert calls == []


# --- payments -----------------------------------------------------------------------------------


async def test_audit_pages_with_a_cursor(aiohttp_client, redis_url, models_dir, cipher):
    # Paging only: the sealer is off here, because its first pass runs as the app starts,
    # concurrently with these requests, and its seal record could land between two pages
    # (seen once in CI). Sealing has tests of its own below.
    config = FacePayConfig.model_validate({"server": {"admin_token": ADMIN, "audit_seal_s": None}})
    client = await aiohttp_client(
        create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
    )
    for name in ("Shop 1", "Shop 2", "Shop 3"):
        assert (
            await client.post("/api/merchants", json={"name": name}, headers=AUTH)
        ).status == 201
    resp = await client.get("/api/audit", params={"limit": "2"}, headers=AUTH)
    assert resp.status == 200
    first = await resp.json()
    assert [r["event"] for r in first["records"]] == ["merchant_added"] * 2
    assert first["next"] == first["records"][-1]["id"] and first["missed"] is False
    assert all(r["operator"] == "admin" for r in first["records"])
    resp = await client.get("/api/audit", params={"after": first["next"]}, headers=AUTH)
    second = await resp.json()
    assert len(second["records"]) == 1 and second["records"][0]["id"] > first["next"]
    resp = await client.get("/api/audit", params={"after": second["next"]}, headers=AUTH)
    assert await resp.json() == {"records": [], "next": second["next"], "missed": False}
    for params in ({"after": "1-2-3"}, {"limit": "-1"}, {"limit": "0"}, {"limit": "x"}):
        resp = await client.get("/api/audit", params=params, headers=AUTH)
        assert resp.status == 400, params
        assert (await resp.json())["error"] == "invalid_request"
    assert (await client.get("/api/audit")).status == 401


async def test_the_server_seals_the_audit_stream(aiohttp_client, redis_url, models_dir, cipher):
    config = FacePayConfig.model_validate({"server": {"admin_token": ADMIN, "audit_seal_s": 1.0}})
    app = create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
    client = await aiohttp_client(app)
    for name in ("Shop 1", "Shop 2"):
        assert (
            await client.post("/api/merchants", json={"name": name}, headers=AUTH)
        ).status == 201
    deadline = time.monotonic() + 10
    while (check := await app[STORE].verify_audit()).records_sealed < 2:
        assert time.monotonic() < deadline, f"not sealed in time: {check}"
        await asyncio.sleep(0.1)
    assert check.broken == [] and check.unsealed == 0
    # The seal is in the stream a reader ships: GET /api/audit carries it too.
    records = (await (await client.get("/api/audit", headers=AUTH)).json())["records"]
    shops = [r for r in records if r["event"] == "merchant_added"]
    seals = [r for r in records if r["event"] == "audit_sealed"]
    assert len(shops) == 2 and len(shops) + len(seals) == len(records)
    assert seals[-1]["upto"] == shops[-1]["id"] and len(seals[-1]["mac"]) == 64


async def test_a_stopping_server_seals_and_counts_chain_restarts(
    aiohttp_client, redis_url, models_dir, cipher
):
    """Seals come every hour here: at start-up (before any record), and when the server
    stops. A chain state reset in Redis meanwhile is answered with a restart seal, counted."""
    config = FacePayConfig.model_validate(
        {"server": {"admin_token": ADMIN, "audit_seal_s": 3600.0}}
    )
    app = create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
    client = await aiohttp_client(app)
    assert (await client.post("/api/merchants", json={"name": "S1"}, headers=AUTH)).status == 201
    # S1 sealed by this server, as its hourly pass would. Its start-up pass may still hold
    # the sealing lock (this call then seals nothing): that pass seals S1 itself.
    deadline = time.monotonic() + 5
    while await app[STORE].seal_audit() == 0 and (await app[STORE].verify_audit()).verified < 1:
        assert time.monotonic() < deadline, "S1 never sealed"
        await asyncio.sleep(0.05)
    assert (await app[STORE].verify_audit()).verified == 1
    redis = aioredis.from_url(redis_url)
    try:
        await redis.delete("fp:audit:seal")  # the chain's state reset behind the server
        assert (
            await client.post("/api/merchants", json={"name": "S2"}, headers=AUTH)
        ).status == 201
        metrics = await (await client.get("/metrics")).text()
        assert "facepay_audit_chain_restarts_total 0.0" in metrics
        await client.close()  # stops the app: the sealer's last pass
        check = await Store(redis, cipher).verify_audit()
        assert check.unsealed == 0 and check.broken == [] and len(check.restarts) == 1
        restarts = app[METRICS].registry.get_sample_value("facepay_audit_chain_restarts_total")
        assert restarts == 1
    finally:
        await redis.aclose()


async def test_payment_lookups(client):
    resp = await client.get("/api/payments/p_nope", headers=AUTH)
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
    resp = await client.get("/api/merchants/m_x/orders/o1", headers=AUTH)
    assert resp.status == 404

    store = client.app[STORE]
    merchant = await store.add_merchant("Shop")
    passhash = PassphraseHasher(time_cost=1, memory_kib=1024).hash(PASSPHRASE)
    template = np.zeros(128, np.float32)
    template[0] = 1.0
    await store.create_account(
        "acct", "Ann", "+8613800001111", passhash, [template], {"source": "test"}
    )
    till, _ = await store.add_terminal(merchant.merchant_id, "checkout")
    payment = await store.create_payment(
        merchant_id=merchant.merchant_id,
        order_id="o1",
        account_id="acct",
        terminal_id=till.terminal_id,
        amount=1250,
        currency="CNY",
        daily_limit=100_00,
    )
    resp = await client.get(f"/api/payments/{payment.payment_id}", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["amount"] == "12.50"
    resp = await client.get(f"/api/merchants/{merchant.merchant_id}/orders/o1", headers=AUTH)
    assert (await resp.json())["payment_id"] == payment.payment_id
    resp = await client.get(f"/api/payments/{payment.payment_id}")
    assert resp.status == 401


# --- health -------------------------------------------------------------------------------------


async def test_health_endpoints(client):
    resp = await client.get("/healthz")
    assert resp.status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"] == {"redis": "ok", "models": "ok"}
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    assert "facepay_frames_received_total" in text
    assert "facepay_sessions_active" in text


async def test_readyz_reports_redis_down_and_recovers(client, redis_server):
    redis_server.stop()
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert body["failed"] == ["redis"]
        assert (await client.get("/healthz")).status == 200
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


# --- directory sync -------------------------------------------------------------------------


async def test_enrolment_elsewhere_reaches_the_directory(client, redis_url, cipher):
    """An account written by another process (CLI, second server) is searchable here < 1 s."""
    directory = client.app[DIRECTORY]
    rng = np.random.default_rng(1)
    templates = [v / np.linalg.norm(v) for v in rng.standard_normal((2, 128)).astype(np.float32)]
    other = aioredis.from_url(redis_url)
    try:
        store = Store(other, cipher)
        passhash = PassphraseHasher(time_cost=1, memory_kib=1024).hash(PASSPHRASE)
        _, sid = await store.create_account(
            "bob", "Bob", "+8613800005678", passhash, templates, {"source": "test"}
        )
        await _eventually(lambda: sid in directory.gallery)
        decision = directory.identify(templates[0])
        assert decision.subject_id == sid
        await store.erase_account("bob")
        await _eventually(lambda: sid not in directory.gallery)
    finally:
        await other.aclose()


async def test_sync_survives_a_redis_restart(client, redis_server, redis_url, cipher):
    directory = client.app[DIRECTORY]
    redis_server.stop()
    await asyncio.sleep(0.3)
    redis_server.start()
    other = aioredis.from_url(redis_url)
    try:
        store = Store(other, cipher)
        passhash = PassphraseHasher(time_cost=1, memory_kib=1024).hash(PASSPHRASE)
        template = np.zeros(128, np.float32)
        template[0] = 1.0
        _, sid = await store.create_account(
            "carol", "Carol", "+8613800009999", passhash, [template], {"source": "test"}
        )
        # Either the event arrives on the re-made subscription or the reload finds it.
        await _eventually(lambda: sid in directory.gallery, timeout=sync.MAX_BACKOFF_S)
    finally:
        await other.aclose()
