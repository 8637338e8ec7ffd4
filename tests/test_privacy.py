"""Privacy proofs: after full flows on real parts, scan Redis, the logs and the data folder.

Flows: back-office enrolment (admin API and ``facepay enroll``), live enrolment over real
WebRTC, a checkout paid with a passphrase, a gate pass, then erasure. Scans look for the
passphrases (plain, UTF-16, base64, hex), tokens and keys, the enrolled faces' templates as
raw float32/float16/float64 bytes (taken from the store itself and recomputed from the photos),
long runs of plausible embedding floats, image files (JPEG/PNG/WebP/BMP/NPY magic) and large
binary blobs. ``test_scanners_find_planted_leaks`` proves the scanners do see each kind of leak.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.image import load_image
from pipeline.scene import render_scene
from pipeline.scene_presets import largest_face_box, preset_scene
from session.crypto import TemplateCipher
from session.enrollment import template_from_image
from session.store import Store
from stream_server.app import DIRECTORY
from tests.e2e import ADMIN_TOKEN, REPO, SERVER_ENV_VARS, camera_frames
from tests.privacy_scan import (
    ENC_BYTES,
    SID,
    aof_bytes,
    aof_settled,
    check_identity_separation,
    dump_redis,
    file_findings,
    float_needles,
    leaks,
    log_findings,
    record_text,
    redis_findings,
    secret_forms,
    subject_templates,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LIVE_SECRET = "Live Phrase 58 zebra"
PHOTO_SECRET = "Photo Phrase 91 otter"
CLI_SECRET = "Cli Phrase 37 heron"
WRONG_SECRET = "Wrong Guess 13 lemur"  # a shopper's typo is a secret too
LIVE = {"account_id": "acct-live", "name": "Barack Obama", "phone": "+1 202 555 0101"}
PHOTO = {"account_id": "acct-photo", "name": "Joe Biden", "phone": "+1 202 555 0146"}
CLI = {"account_id": "acct-cli", "name": "Kit Harington", "phone": "+44 20 7946 0958"}

pytestmark = pytest.mark.usefixtures("loopback_ice")


@pytest.fixture(autouse=True)
def _collect_garbage_now():  # type: ignore[no-untyped-def]
    """Finalise this test's dead asyncio tasks now (torn down after the event loop).

    aiortc leaves ``RTCPeerConnection.close()`` tasks whose InvalidStateError nobody
    retrieves; when the garbage collector later finalises one inside pytest's ast.parse
    (rewriting a module imported lazily), asyncio logs it with a traceback, whose caret
    code calls ast.parse again, and CPython 3.11 fails the outer parse with "AST
    constructor recursion depth mismatch".
    """
    yield
    gc.collect()


# --- the in-process server: every flow, then erasure ---------------------------------------


async def _admin(env: Any, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    url = str(env.server.make_url(path))
    async with (
        aiohttp.ClientSession(headers=ADMIN) as http,
        http.request(method, url, **kw) as resp,
    ):
        return resp.status, await resp.json()


def _enrol_form(fields: dict[str, str], passphrase: str, photos: list[Path]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in {**fields, "passphrase": passphrase, "consent": "true"}.items():
        form.add_field(name, value)
    for path in photos:
        form.add_field("image", path.read_bytes(), filename=path.name, content_type="image/jpeg")
    return form


async def _live_enrolment(env: Any, analyzer: Any, photo: Any) -> Any:
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "enroll")
    term = await env.terminal(token)
    await term.start_video(camera_frames(analyzer, photo("faces/obama/obama.jpg")))
    await term.send({"type": "start_enroll", "consent": True, **LIVE})
    assert (await term.expect("state"))["state"] == "capturing", term.events
    assert (await term.expect("state", timeout=40))["state"] == "passphrase", term.events
    await term.send(
        {"type": "enroll_passphrase", "passphrase": LIVE_SECRET, "confirm": LIVE_SECRET}
    )
    enrolled = await term.expect("enrolled", "declined")
    assert enrolled["type"] == "enrolled", term.events
    return token


async def _checkout(env: Any, analyzer: Any, photo: Any, order: str) -> dict[str, Any]:
    """A checkout of the live-enrolled face: one wrong passphrase, then the right one."""
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo("faces/obama/obama3.jpg")))
    assert (await term.checkout("8.00", order))["state"] == "scanning"
    first = await term.expect("confirm", "declined", timeout=40)
    if first["type"] == "confirm":
        for secret in (WRONG_SECRET, LIVE_SECRET):
            await term.send(
                {"type": "passphrase", "prompt_id": first["prompt_id"], "passphrase": secret}
            )
            answer = await term.expect("wrong_passphrase", "approved", "declined")
        return answer
    return first


async def _gate_pass(env: Any, analyzer: Any, photo: Any) -> tuple[str, dict[str, Any]]:
    _, token = await env.store.add_terminal(env.merchant.merchant_id, "gate")

    spec = preset_scene(1)
    term = await env.terminal(token)
    await term.start_video(
        [f for f, _ in render_scene(spec, photo, largest_face_box(analyzer.detect))], fps=spec.fps
    )
    opened = await term.expect("gate_open", timeout=40)
    return token, opened


async def _until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_full_flows_then_erasure_leave_no_biometrics_or_secrets(
    make_env, analyzer, photo, data_dir, redis_url, caplog
):
    caplog.set_level(logging.DEBUG)
    env = await make_env()
    raw = aioredis.from_url(redis_url)
    try:
        photos = [data_dir / "faces/biden/biden.jpg", data_dir / "faces/biden/biden2.jpg"]
        status, body = await _admin(
            env, "POST", "/api/accounts", data=_enrol_form(PHOTO, PHOTO_SECRET, photos)
        )
        assert status == 201, body
        enroll_token = await _live_enrolment(env, analyzer, photo)
        approved = await _checkout(env, analyzer, photo, "o-privacy-1")
        assert approved["type"] == "approved", approved
        assert await raw.exists("fp:failday:acct-live")  # the wrong passphrase was counted
        gate_token, opened = await _gate_pass(env, analyzer, photo)
        assert (await env.store.get_payment(opened["payment_id"])).account_id == "acct-live"

        # Redis while enrolled: secrets, templates (as stored, and recomputed from the photos).
        stored = await subject_templates(env.store, raw)
        assert len(stored) == 2 and sorted(map(len, stored.values())) == [2, 3]
        recomputed = [template_from_image(analyzer, load_image(p), 0) for p in photos]
        flat = [t for ts in stored.values() for t in ts]
        assert any(np.array_equal(flat_t, recomputed[0]) for flat_t in flat)  # same bytes
        needles = float_needles(flat + recomputed)
        secrets = {
            **secret_forms("live passphrase", LIVE_SECRET),
            **secret_forms("photo passphrase", PHOTO_SECRET),
            **secret_forms("wrong passphrase", WRONG_SECRET),
            **secret_forms("admin token", ADMIN_TOKEN),
            # Passphrase hashes are stored sealed under the template key: nothing to crack.
            "argon2id hash": b"$argon2",
        }
        for name, token in (
            ("checkout", env.token),
            ("enroll", enroll_token),
            ("gate", gate_token),
        ):
            secrets.update(secret_forms(f"{name} terminal token", token))
        before = await dump_redis(raw)
        assert redis_findings(before, secrets, needles) == []
        assert check_identity_separation(before, [LIVE, PHOTO]) == []
        sids = set(stored)
        sid_of = {aid: {s.decode() for s in await raw.smembers(env.store._a2s_key(aid))}
                  for aid in ("acct-live", "acct-photo")}  # fmt: skip
        assert set().union(*sid_of.values()) == sids and all(map(len, sid_of.values()))

        # Erase the shopper: the face no longer pays, even with the other account enrolled.
        status, body = await _admin(env, "DELETE", "/api/accounts/acct-live")
        purged = ["aof_rewrite", "slowlog"]  # the test Redis writes an AOF, no snapshots
        assert (status, body) == (
            200,
            {"account_id": "acct-live", "erased": 3, "history_purge": purged},
        )
        directory = env.app[DIRECTORY]
        await _until(lambda: not sid_of["acct-live"] & set(directory.gallery.subjects()), "index")
        declined = await _checkout(env, analyzer, photo, "o-privacy-2")
        assert declined == {**declined, "type": "declined", "reason": "no_match"}
        status, body = await _admin(env, "DELETE", "/api/accounts/acct-photo")
        assert (status, body) == (
            200,
            {"account_id": "acct-photo", "erased": 2, "history_purge": purged},
        )
        await _until(lambda: len(directory.gallery) == 0, "index empty")

        after = await dump_redis(raw)
        assert redis_findings(after, secrets, needles) == []
        keys = sorted(k.decode() for k in after)
        assert not [k for k in keys if k.startswith(("fp:tpl:", "fp:link:", "fp:subjects"))]
        lockout = ("fp:fail:", "fp:lock:", "fp:lockouts:", "fp:failday:")
        assert not [k for k in keys if k.startswith(lockout)]
        # SLOWLOG too: it may have echoed an account's HSET, and the purge cleared it.
        everything = b"\n".join(x for k, vs in after.items() for x in [k, *vs])
        assert not [s for s in sids if s.encode() in everything]
        for person in (LIVE, PHOTO):
            assert person["name"].encode() not in everything
            assert re.sub(r"[^0-9+]", "", person["phone"]).encode() not in everything
            account = await raw.hgetall(f"fp:account:{person['account_id']}")
            assert set(account) == {b"status", b"erased", b"created"}
            assert account[b"status"] == b"erased"
        assert b"$argon2" not in everything
        # The ledger keeps its bookkeeping (account id, amount), nothing biometric.
        payment = await env.store.get_payment(approved["payment_id"])
        assert payment.account_id == "acct-live" and payment.amount == 800

        audit = await env.store.read_audit(1000)
        events = [e["event"] for e in audit]
        for event in ("consent", "enrolled", "payment", "passphrase_failed", "erased"):
            assert event in events, events
        assert events.count("payment") == 2 and events.count("erased") == 2
        erased = [e for e in audit if e["event"] == "erased"]
        assert {(e["account_id"], e["samples"]) for e in erased} == {
            ("acct-live", "3"),
            ("acct-photo", "2"),
        }
        audit_blob = json.dumps(audit).encode()
        assert leaks(audit_blob, secrets, needles) == []
        assert not SID.search(audit_blob)
        assert not [e for e in audit for k in e if re.search("pass|hash|embed|templ|image", k)]

        # Terminals were told nothing secret or biometric either, nor is /metrics.
        events_blob = json.dumps([e for t in env.terminals for e in t.events]).encode()
        assert leaks(events_blob, secrets, needles) == [] and not SID.search(events_blob)
        metrics_url = str(env.server.make_url("/metrics"))
        async with aiohttp.ClientSession() as http, http.get(metrics_url) as resp:
            metrics = await resp.read()
        errors = [record_text(r) for r in caplog.records if r.levelno >= logging.ERROR]
        assert b"facepay_sessions" in metrics, errors
        assert leaks(metrics, secrets, needles) == [] and not SID.search(metrics)
        assert b"acct-" not in metrics and b"Obama" not in metrics

        # Logs (every logger, DEBUG): no passphrase, token, template, image or face data.
        lines = [record_text(r) for r in caplog.records]
        assert len(lines) > 10
        pii = {p[k]: p[k].encode() for p in (LIVE, PHOTO) for k in ("name", "phone")}
        assert log_findings(lines, {**secrets, **pii}, needles) == []
    finally:
        await raw.aclose()


# --- facepay serve --dev: its stderr (DEBUG), the CLI's output and the data folder ----------


def _spawn_verbose(data: Path, models_dir: Path, stderr: Path) -> tuple[subprocess.Popen[str], Any]:
    """``facepay -v serve --dev`` (DEBUG logs, to a file so a full pipe never blocks it)."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_VARS}
    argv = ["-v", "serve", "--dev", "--port", "0", "--data-dir", str(data)]
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream_server.cli", *argv, "--models-dir", str(models_dir)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    try:
        line = _first_line(proc)
        return proc, json.loads(line)
    except BaseException:
        proc.kill()
        proc.wait(timeout=15)
        raise


def _first_line(proc: subprocess.Popen[str]) -> str:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(proc.stdout.readline).result(timeout=60)  # type: ignore[union-attr]


async def test_dev_server_logs_and_data_folder_hold_no_secrets(
    tmp_path, models_dir, data_dir, analyzer
):
    data, stderr = tmp_path / "data", tmp_path / "serve.log"
    proc, started = _spawn_verbose(data, models_dir, stderr)
    try:
        url, admin = started["url"], (data / "admin.token").read_text().strip()
        key = bytes.fromhex((data / "template.key").read_text().strip())
        auth = {"Authorization": f"Bearer {admin}"}
        photos = {
            "photo": data_dir / "faces/biden/biden.jpg",
            "cli": data_dir / "faces/kit_harington/john1.jpeg",
        }
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.post(f"{url}/api/merchants", json={"name": "Shop"}) as resp:
                merchant = (await resp.json())["merchant_id"]
            body = {"merchant_id": merchant, "mode": "checkout"}
            async with http.post(f"{url}/api/terminals", json=body) as resp:
                token = (await resp.json())["token"]
            form = _enrol_form(PHOTO, PHOTO_SECRET, [photos["photo"]])
            async with http.post(f"{url}/api/accounts", data=form) as resp:
                assert resp.status == 201, await resp.text()
            # A terminal sends secrets where they do not belong: errors must not echo them.
            async with aiohttp.ClientSession() as plain, plain.ws_connect(f"{url}/ws") as ws:
                await ws.send_json({"type": "hello", "token": token})
                assert (await ws.receive_json(timeout=10))["type"] == "hello"
                for msg in (
                    {"type": "passphrase", "prompt_id": "p", "passphrase": PHOTO_SECRET},
                    {"type": "passphrase", "prompt_id": "p", "passphrase": PHOTO_SECRET, "x": 1},
                    {"type": "enroll_passphrase", "passphrase": PHOTO_SECRET, "confirm": "o"},
                ):
                    await ws.send_json(msg)
                    reply = await ws.receive_json(timeout=10)
                    assert reply["type"] == "error" and PHOTO_SECRET not in json.dumps(reply)
        passfile = tmp_path / "passphrase"
        passfile.write_text(CLI_SECRET + "\n")
        cli_argv = [
            sys.executable, "-m", "stream_server.cli", "-v", "enroll", "--data-dir", str(data),
            "--models-dir", str(models_dir), "--account", CLI["account_id"], "--name",
            CLI["name"], "--phone", CLI["phone"], "--consent", "--passphrase-file",
            str(passfile), str(photos["cli"]),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_VARS}
        cli = await asyncio.to_thread(
            subprocess.run, cli_argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == {"account_id": "acct-cli", "templates": 1}

        r = aioredis.from_url((data / "redis.url").read_text().strip())
        try:
            store = Store(r, TemplateCipher(key))
            stored = await subject_templates(store, r)
            assert len(stored) == 2
            recomputed = [template_from_image(analyzer, load_image(p), 0) for p in photos.values()]
            needles = float_needles([t for ts in stored.values() for t in ts] + recomputed)
            secrets = {
                **secret_forms("photo passphrase", PHOTO_SECRET),
                **secret_forms("cli passphrase", CLI_SECRET),
                **secret_forms("admin token", admin),
                **secret_forms("terminal token", token),
                "template key (raw)": key,
                **secret_forms("template key", key.hex()),
                "template key (base64)": base64.b64encode(key),
                "argon2id hash": b"$argon2",  # stored sealed, in Redis and in its AOF
            }
            dump = await dump_redis(r)
            assert redis_findings(dump, secrets, needles) == []
            assert check_identity_separation(dump, [PHOTO, CLI]) == []
            blobs = [v for k, vs in dump.items() if k.startswith(b"fp:tpl:") for v in vs[1::2]]
            assert len(blobs) == 2
            # While running: the AOF holds the encrypted form only, never the plain one.
            assert file_findings(data, secrets, needles) == []
            aof = aof_bytes(data / "redis")
            assert all(blob in aof for blob in blobs)

            for person in (PHOTO, CLI):
                async with aiohttp.ClientSession(headers=auth) as http:
                    path = f"{url}/api/accounts/{person['account_id']}"
                    async with http.delete(path) as resp:
                        assert resp.status == 200
                        # The embedded Redis writes an AOF and snapshots (its defaults).
                        purged = (await resp.json())["history_purge"]
                        assert purged == ["aof_rewrite", "snapshot", "slowlog"]
            assert await r.keys("fp:tpl:*") == [] and await r.keys("fp:link:*") == []
            # Erasure deletes live data, and the AOF rewrite it started drops the history
            # that wrote it (docs/privacy.md), with no step by the operator.
            await aof_settled(r)
            aof = aof_bytes(data / "redis")
            assert PHOTO["name"].encode() not in aof and CLI["name"].encode() not in aof
        finally:
            await r.aclose()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # After erasure and shutdown (Redis saved dump.rdb): nothing of those people.
    erased = {
        f"{p['account_id']} {field}": re.sub(r"[^0-9+]", "", p[field]).encode()
        if field == "phone"
        else p[field].encode()
        for p in (PHOTO, CLI)
        for field in ("name", "phone")
    }
    erased.update({f"encrypted template {i}": blob for i, blob in enumerate(blobs)})
    erased["argon2 hash"] = b"$argon2"
    assert (data / "redis" / "dump.rdb").exists()
    assert file_findings(data, {**secrets, **erased}, needles) == []
    assert (data / "template.key").stat().st_mode & 0o777 == 0o600
    assert (data / "redis").stat().st_mode & 0o777 == 0o700

    # Logs: the server's DEBUG stderr and the CLI's output.
    lines = stderr.read_text().splitlines() + cli.stderr.splitlines() + cli.stdout.splitlines()
    assert len(lines) > 10
    pii = {f"{p['account_id']} {k}": p[k].encode() for p in (PHOTO, CLI) for k in ("name", "phone")}
    assert log_findings(lines, {**secrets, **pii}, needles) == []


# --- the scanners see what they look for -------------------------------------------------------


async def test_scanners_find_planted_leaks(redis_server, redis_url, analyzer, data_dir, tmp_path):
    image = data_dir / "faces/obama/obama.jpg"
    template = template_from_image(analyzer, load_image(image), 0)
    needles = float_needles([template])
    secrets = secret_forms("passphrase", LIVE_SECRET)
    r = aioredis.from_url(redis_url)
    try:
        other = np.random.default_rng(1).normal(0, 0.09, 128).astype(np.float32)
        plants = {
            b"fp:leak:raw": template.astype("<f4").tobytes(),
            b"fp:leak:half": template.astype("<f2").tobytes(),
            b"fp:leak:unknown": other.tobytes(),  # not a known face: caught as a float run
            b"fp:leak:jpeg": image.read_bytes()[:64],
            b"fp:leak:b64": base64.b64encode(LIVE_SECRET.encode()),
        }
        for key, value in plants.items():
            await r.set(key, value)
        await r.hset(b"fp:tpl:s_" + b"A" * 22, mapping={"0": os.urandom(ENC_BYTES)})
        await r.xadd(b"fp:audit", {"event": "x", "note": LIVE_SECRET.encode().hex()})
        found = redis_findings(await dump_redis(r), secrets, needles)
        for key in plants:
            assert any(repr(key) in f for f in found), (key, found)
        assert any("fp:audit" in f and "(hex)" in f for f in found)
        assert not [f for f in found if "fp:tpl:" in f]  # an encrypted template is fine
        # A plain (unsealed) link naming the person is caught by the separation check.
        await r.sadd(f"fp:link:a2s:{LIVE['account_id']}".encode(), b"s_" + b"A" * 22)
        joined = check_identity_separation(await dump_redis(r), [LIVE])
        assert any("fp:link:a2s:" in p for p in joined), joined
        # The same through an RDB file (LZF-compressed) and through a log line.
        await r.save()
        rdb = tmp_path / "copy"
        rdb.mkdir()
        (rdb / "dump.rdb").write_bytes((redis_server.workdir / "dump.rdb").read_bytes())
        (rdb / "face.png").write_bytes(b"")
        in_file = file_findings(rdb, secrets, needles)
        assert any("raw template bytes" in f for f in in_file), in_file
        assert any("image or array file" in f for f in in_file), in_file
        embedding_text = " ".join(f"{v:.6f}" for v in template[:12])
        lines = [f"probe {embedding_text}", f"user typed {LIVE_SECRET}", "all good"]
        assert len(log_findings(lines, secrets, needles)) == 2
    finally:
        await r.delete(*(await r.keys("fp:*")))
        await r.aclose()


# --- replayed terminal messages ---------------------------------------------------------------


async def test_replayed_or_forged_passphrase_messages_pay_nothing(make_env, analyzer, photo):
    """A recorded ``passphrase`` message is worth nothing: prompt ids are random, single-use
    and die with their checkout; a replay after approval neither pays again nor leaks."""
    env = await make_env()
    fields = (LIVE["account_id"], LIVE["name"], LIVE["phone"])
    await env.enroll(*fields, photo("faces/obama/obama.jpg"), LIVE_SECRET)
    term = await env.terminal()
    await term.start_video(camera_frames(analyzer, photo("faces/obama/obama3.jpg")))
    await term.checkout("4.00", "o-replay")
    confirm = await term.expect("confirm", "declined", timeout=40)
    assert confirm["type"] == "confirm", term.events
    forged = {"type": "passphrase", "prompt_id": "q_forged", "passphrase": LIVE_SECRET}
    await term.send(forged)
    assert (await term.expect("error"))["message"] == "unknown or stale prompt_id"
    answer = {"type": "passphrase", "prompt_id": confirm["prompt_id"], "passphrase": LIVE_SECRET}
    await term.send(answer)
    assert (await term.expect("approved", "declined"))["type"] == "approved"
    await term.send(answer)  # replayed on the same connection
    assert (await term.expect("error"))["code"] in ("illegal_transition", "invalid_request")
    other = await env.terminal()  # and on another connection of the same terminal
    await other.send(answer)
    assert (await other.expect("error"))["code"] == "invalid_request"
    # A new checkout gets a new prompt id: the old one does not answer it.
    await term.checkout("4.00", "o-replay-2")
    second = await term.expect("confirm", timeout=40)
    assert second["prompt_id"] != confirm["prompt_id"]
    await term.send(answer)
    assert (await term.expect("error"))["message"] == "unknown or stale prompt_id"
    await term.send({"type": "cancel"})
    assert (await term.until_end())["state"] == "cancelled"
    assert len(await env.payments()) == 1
    assert all(LIVE_SECRET not in json.dumps(e) for t in env.terminals for e in t.events)
