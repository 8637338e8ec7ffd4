"""``facepay serve`` (embedded Redis, signals), ``facepay admin ...`` and ``facepay enroll``."""

from __future__ import annotations

import asyncio
import getpass
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.errors import ConfigError
from session import _store_lua as h
from session.config import FacePayConfig
from session.crypto import TemplateCipher, generate_key
from session.models import Terminal
from session.store import Store
from stream_server import embedded_redis
from stream_server.cli import main
from stream_server.cli_server import UsageError, event_loop_factory, redact_url
from tests.e2e import REPO, SERVER_ENV_VARS, spawn_serve


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


# --- serve ---------------------------------------------------------------------------------------


def test_serve_with_embedded_redis_then_admin_from_another_shell(tmp_path, models_dir, capsys):
    data = tmp_path / "data"
    proc, started = spawn_serve("--data-dir", str(data), "--models-dir", str(models_dir))
    try:
        assert started["dev"] is True
        assert started["event_loop"] == "uvloop"  # the default where uvloop is installed
        assert started["url"].startswith("http://127.0.0.1:")
        assert started["redis_url"] == (data / "redis.url").read_text().strip()
        assert (data / "template.key").stat().st_mode & 0o777 == 0o600
        assert (data / "admin.token").stat().st_mode & 0o777 == 0o600

        with urllib.request.urlopen(started["url"] + "/readyz", timeout=5) as resp:
            assert resp.status == 200

        # "Another shell": the admin command finds the embedded Redis through the data dir.
        code, out, _ = run(capsys, "admin", "merchant-add", "--data-dir", str(data), "Shop")
        assert code == 0 and out[0]["merchant_id"].startswith("m_")
        token = (data / "admin.token").read_text().strip()
        req = urllib.request.Request(
            f"{started['url']}/api/payments/nope", headers={"Authorization": f"Bearer {token}"}
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=5)
        assert caught.value.code == 404

        # A second embedded server on the same data folder is refused, not started.
        code, _, err = run(capsys, "serve", "--dev", "--port", "0", "--data-dir", str(data))
        assert code == 2 and "already running" in err

        pids = [int((data / "redis" / "redis.pid").read_text())]
        assert _alive(pids[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 5
        while _alive(pids[0]):
            assert time.monotonic() < deadline, "embedded redis-server still running"
            time.sleep(0.05)
        assert not (data / "redis.url").exists()
        assert (data / "redis" / "appendonlydir").is_dir()  # persistent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_event_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    name, factory = event_loop_factory("auto")
    assert name == "uvloop" and factory is uvloop.new_event_loop
    assert event_loop_factory("uvloop") == ("uvloop", uvloop.new_event_loop)
    assert event_loop_factory("asyncio") == ("asyncio", None)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert event_loop_factory("auto") == ("asyncio", None)
    with pytest.raises(UsageError, match="uvloop is not installed"):
        event_loop_factory("uvloop")


def test_serve_on_the_standard_loop_when_configured(tmp_path, models_dir):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"event_loop": "asyncio"}}))
    proc, started = spawn_serve(
        "--data-dir",
        str(tmp_path / "data"),
        "--models-dir",
        str(models_dir),
        "--config",
        str(config),
    )
    try:
        assert started["event_loop"] == "asyncio"
        with urllib.request.urlopen(started["url"] + "/readyz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_serve_without_a_key_outside_dev_mode_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "serve", "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert code == 2
    assert "FACEPAY_TEMPLATE_KEY" in err
    assert not (tmp_path / "d" / "redis").exists()  # refused before starting anything


def test_serve_says_when_there_is_no_redis_server(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded_redis, "FALLBACK_PATHS", ())
    code, _, err = run(capsys, "serve", "--dev", "--port", "0", "--data-dir", str(tmp_path))
    assert code == 2
    assert "no redis-server" in err and "--redis-url" in err


def test_serve_refuses_a_malformed_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", "not-a-key")
    code, _, err = run(capsys, "serve", "--port", "0", "--data-dir", str(tmp_path))
    assert code == 2
    assert "not-a-key" not in err and "template key" in err


# --- admin -------------------------------------------------------------------------------------


def test_admin_commands(redis_url, capsys):
    code, out, _ = run(capsys, "admin", "merchant-add", "--redis-url", redis_url, "Corner Shop")
    assert code == 0
    merchant_id = out[0]["merchant_id"]
    code, out, _ = run(
        capsys, "admin", "terminal-add", "--redis-url", redis_url, "--operator", "li.wei",
        "--merchant", merchant_id, "--mode", "gate",
    )  # fmt: skip
    assert code == 0
    assert out[0]["mode"] == "gate"

    async def check(token: str) -> Terminal:
        client = aioredis.from_url(redis_url)
        try:
            return await Store(client, TemplateCipher(generate_key())).authenticate_terminal(token)
        finally:
            await client.aclose()

    terminal = asyncio.run(check(out[0]["token"]))
    assert terminal.terminal_id == out[0]["terminal_id"]

    code, out, _ = run(
        capsys, "admin", "terminal-add", "--redis-url", redis_url,
        "--merchant", "m_unknown", "--mode", "checkout",
    )  # fmt: skip
    assert code == 1 and out[0]["error"] == "not_found"

    # The audit, oldest first, shipped page by page with the last id as the cursor.
    code, page, _ = run(capsys, "admin", "audit", "--redis-url", redis_url, "--limit", "1")
    assert code == 0 and [r["event"] for r in page] == ["merchant_added"]
    # The command line's operator is the login name, or the one given, as "cli:NAME".
    assert page[0]["merchant_id"] == merchant_id
    assert page[0]["operator"] == f"cli:{getpass.getuser()}"
    audit = ["admin", "audit", "--redis-url", redis_url]
    code, rest, _ = run(capsys, *audit, "--after", page[0]["id"])
    assert code == 0 and [r["event"] for r in rest] == ["terminal_added"]
    assert rest[0]["operator"] == "cli:li.wei"
    assert rest[0]["terminal_id"] == terminal.terminal_id and "token" not in json.dumps(rest)
    code, none, _ = run(capsys, *audit, "--after", rest[0]["id"])
    assert code == 0 and none == []
    for bad in (["--after", "yesterday"], ["--limit", "0"], ["--limit", "10001"]):
        code, out, _ = run(capsys, *audit, *bad)
        assert code == 2 and out[0]["error"] == "usage", bad


def test_admin_without_redis_is_a_usage_error(tmp_path, capsys):
    code, _, err = run(
        capsys, "admin", "merchant-add", "--redis-url", "redis://127.0.0.1:1",
        "--operator", "li wei", "Shop",
    )  # fmt: skip
    assert code == 2 and "--operator" in err  # checked before anything is reached
    code, _, err = run(capsys, "admin", "merchant-add", "--data-dir", str(tmp_path), "Shop")
    assert code == 2 and "--redis-url" in err
    code, _, err = run(capsys, "admin", "merchant-add", "--redis-url", "redis://127.0.0.1:1", "S")
    assert code == 2 and "cannot reach Redis" in err
    code, out, err = run(capsys, "admin", "merchant-add", "--redis-url", "http://127.0.0.1:1", "S")
    assert code == 2 and "bad Redis URL" in err and out[0]["error"] == "usage"


# --- enroll --------------------------------------------------------------------------------------


def _enroll_args(redis_url: str, models_dir: Path, passfile: Path, *images: Path) -> list[str]:
    return [
        "enroll", "--redis-url", redis_url, "--models-dir", str(models_dir),
        "--account", "alice", "--name", "Alice", "--phone", "+8613800001234",
        "--passphrase-file", str(passfile), *map(str, images),
    ]  # fmt: skip


def test_enroll_command(redis_url, models_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", generate_key().hex())
    passfile = tmp_path / "pass"
    passfile.write_text("correct horse\n")
    faces = data_dir / "faces"
    args = _enroll_args(redis_url, models_dir, passfile, faces / "obama/obama.jpg")

    code, out, err = run(capsys, *args)
    assert code == 1 and out[0]["error"] == "consent_required" and "consent" in err

    group = faces / "group/obama_and_biden.jpg"
    code, out, _ = run(capsys, *args, str(group), "--consent")
    assert code == 1
    assert out[0]["error"] == "bad_quality"
    assert out[0]["reasons"] == ["several_faces"]
    assert out[0]["image"] == str(group)

    code, out, _ = run(capsys, *args, str(faces / "obama/obama2.jpg"), "--consent")
    assert code == 0
    assert out == [{"account_id": "alice", "templates": 2}]
    # The consent is audited with who recorded it and when.
    code, audit, _ = run(capsys, "admin", "audit", "--redis-url", redis_url)
    consent = next(r for r in audit if r["event"] == "consent")
    assert consent["operator"] == f"cli:{getpass.getuser()}" and consent["source"] == "cli"
    assert abs(float(consent["given_at"]) - time.time()) < 120

    code, out, _ = run(capsys, *args, "--consent")
    assert code == 1 and out[0]["error"] == "conflict"

    # A missing photo is refused by name, before anything is loaded or written.
    missing = tmp_path / "nope.jpg"
    argv = _enroll_args(redis_url, models_dir, passfile, missing)
    code, out, err = run(capsys, *argv, "--consent")
    assert code == 1 and out == [
        {"error": "bad_image", "message": "no such image file", "image": str(missing)}
    ]
    assert "no such image file" in err


def test_enroll_reads_the_passphrase_from_stdin(
    redis_url, models_dir, data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", generate_key().hex())
    args = _enroll_args(redis_url, models_dir, tmp_path, data_dir / "faces/biden/biden.jpg")
    args[args.index("--passphrase-file") : args.index("--passphrase-file") + 2] = [
        "--passphrase-stdin"
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    code, out, _ = run(capsys, *args, "--consent")
    assert code == 1 and out[0]["error"] == "invalid_request"
    monkeypatch.setattr(sys, "stdin", io.StringIO("long enough phrase\n"))
    code, out, _ = run(capsys, *args, "--consent")
    assert code == 0 and out[0]["templates"] == 1


def test_enroll_needs_a_template_key(redis_url, models_dir, data_dir, tmp_path, capsys):
    passfile = tmp_path / "pass"
    passfile.write_text("correct horse")
    args = _enroll_args(redis_url, models_dir, passfile, data_dir / "faces/obama/obama.jpg")
    code, _, err = run(capsys, *args, "--consent", "--data-dir", str(tmp_path))
    assert code == 2 and "FACEPAY_TEMPLATE_KEY" in err


@pytest.mark.parametrize("source", ["env", "file", "config"])
def test_serve_refuses_a_short_admin_token_and_does_not_print_it(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin token under 32 characters stops `facepay serve` (exit 2) before it starts,
    and the message names where the token came from."""
    short = "weak-token-31-characters-long-x"
    assert len(short) == 31
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", "00" * 32)
    argv = ["serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
    if source == "env":
        monkeypatch.setenv("FACEPAY_ADMIN_TOKEN", short)
    elif source == "file":
        (tmp_path / "admin.token").write_text(short + "\n")
        argv += ["--admin-token-file", str(tmp_path / "admin.token")]
    else:
        (tmp_path / "config.json").write_text(json.dumps({"server": {"admin_token": short}}))
        argv += ["--config", str(tmp_path / "config.json")]
    code, out, err = run(capsys, *argv)
    assert code == 2
    named = {"env": "FACEPAY_ADMIN_TOKEN", "file": "--admin-token-file", "config": "admin_token"}
    assert "at least 32 characters" in err and named[source] in err
    assert short not in err and short not in json.dumps(out)
    assert not (tmp_path / "data" / "redis.url").exists()  # nothing was started
    # One character more is enough for the rule (the server would then start: not here).
    FacePayConfig().with_server(admin_token=short + "y")


@pytest.mark.parametrize("section", [None, "x", [1, 2], 3])
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["admin", "merchant-add", "Shop"]])
def test_a_config_section_that_is_not_an_object_is_a_usage_error(
    section: object, command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """{"server": null} used to end in a TypeError's traceback and exit 1."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"server": section}))
    code, _, err = run(capsys, *command, "--config", str(path))
    assert code == 2, err
    assert '"server" must be a JSON object' in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"admin_operators": {"alice smith": "a" * 40}}, "operator's name"),
        ({"admin_operators": {"admin": "a" * 40}}, "operator's name"),
        ({"admin_operators": {"alice": "b" * 31}}, "at least 32 characters"),
        ({"admin_operators": {"alice": "c" * 40, "bob": "c" * 40}}, "must differ"),
        ({"admin_token": "d" * 40, "admin_operators": {"alice": "d" * 40}}, "must differ"),
    ],
)
def test_admin_operators_need_a_name_and_a_strong_token_of_their_own(
    server: dict[str, object], message: str
) -> None:
    """One operator's token must not stand for another: the audit's operator would be a guess."""
    with pytest.raises(ConfigError) as err:
        FacePayConfig().with_server(**server)
    assert message in str(err.value)
    assert not any(c * 31 in str(err.value) for c in "abcd")  # no token is echoed


async def _rewrite_history(redis_url: str, key: bytes, changed_id: str) -> None:
    """What someone with Redis and the key's server could do while every server is stopped:
    delete the stream and the chain state, write it again with one record changed, and let
    a freshly started server seal it from the start."""
    client = aioredis.from_url(redis_url)
    try:
        rows = await client.xrange("fp:audit")
        await client.delete("fp:audit", "fp:audit:seal")
        for rid, fields in rows:
            if fields[b"event"] == b"audit_sealed":
                continue
            if rid.decode() == changed_id:
                fields = {**fields, b"account_id": b"mallory"}
            await client.xadd("fp:audit", fields, id=rid)
        assert await Store(client, TemplateCipher(key)).seal_audit() > 0
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "hidden"),
    [
        ("redis://user:pa:ss@h", ["pa:ss", "ss@"]),  # the password runs to the last @
        ("redis://:p@ss@h", ["p@ss", "ss@"]),
        ("redis://h/0?password=topsecret", ["topsecret"]),  # redis-py's password too
        ("redis://:secret@127.0.0.1:6379/0", ["secret"]),
        ("rediss://u:pw1@h:6380/1?ssl_password=pw2&password=pw3&db=2", ["pw1", "pw2", "pw3"]),
        ("redis://:p/ss@h", ["p/ss", "ss@"]),  # spills into the path: masked whole
        ("redis://:pw[@h", ["pw"]),  # urllib cannot read it: masked whole, no exception
    ],
)
def test_redact_url_hides_every_password(url: str, hidden: list[str]) -> None:
    """`serve` prints the Redis URL at every start, and errors name it: no password shows,
    however it is written, and the rest stays readable where it can be."""
    shown = redact_url(url)
    assert "***" in shown and not any(secret in shown for secret in hidden)
    if "user:" in url:
        assert shown == "redis://user:***@h"  # the user name stays


def test_redact_url_leaves_a_url_without_a_password_unchanged() -> None:
    for url in ("redis://127.0.0.1:6379/0", "redis://u@h:1/2?db=3", "unix:///tmp/r.sock?db=0"):
        assert redact_url(url) == url


async def _audit_writes(
    redis_url: str, key: bytes, sealed: tuple[int, ...] | list[int] = (), tail: int = 0
) -> list[bytes]:
    """Audit records as a server under ``key`` writes them: each batch of ``sealed`` then a
    seal, then ``tail`` records not yet sealed. Returns the ids of the records written."""
    client = aioredis.from_url(redis_url)
    try:
        store = Store(client, TemplateCipher(key))
        for batch, count in enumerate([*sealed, tail]):
            for i in range(count):
                await store.audit("login", account_id=f"a{batch}{i}")
            if batch < len(sealed):
                assert await store.seal_audit() == count
        rows = await client.xrange("fp:audit")
        return [rid for rid, fields in rows if fields[b"event"] == b"login"]
    finally:
        await client.aclose()


def test_audit_verify_command(redis_url, capsys, monkeypatch, tmp_path) -> None:
    """`facepay admin audit-verify` checks the seals with the template key: 0, 1 or 2."""
    key = generate_key()
    first = asyncio.run(_audit_writes(redis_url, key, sealed=[3]))[0]
    argv = ["admin", "audit-verify", "--redis-url", redis_url]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "template key" in err  # no key: nothing can be checked
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", key.hex())
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert out[0] == {
        "seals": 1, "verified": 1, "records_sealed": 3, "unsealed": 0,
        "oldest_unsealed_s": None, "not_checkable": 0, "unknown_key": 0, "broken": [],
        "restarts": [], "deleted_upto": None, "state_fault": None,
    }  # fmt: skip
    # After a rotation the old seals need the retired key: without it the check fails.
    retired = tmp_path / "retired.key"
    retired.write_text(key.hex())
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", generate_key().hex())
    code, out, err = run(capsys, *argv)
    assert code == 1 and out[0]["unknown_key"] == 1 and "--previous-key-file" in err
    code, out, _ = run(capsys, *argv, "--previous-key-file", str(retired))
    assert code == 0 and out[0]["verified"] == 1
    audit_only = tmp_path / "retired-audit.key"  # its audit key alone does as well
    audit_only.write_text(TemplateCipher(key).audit.export())
    code, out, _ = run(capsys, *argv, "--previous-key-file", str(audit_only))
    assert code == 0 and out[0]["verified"] == 1
    audit_only.write_text("audit:1234")
    code, _, err = run(capsys, *argv, "--previous-key-file", str(audit_only))
    assert code == 2 and "audit:" in err
    code, _, err = run(capsys, *argv, "--previous-key-file", str(tmp_path / "missing.key"))
    assert code == 2 and "cannot read" in err
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", key.hex())

    # A record no server has sealed: fine while it is young, a failure once it is old.
    asyncio.run(_audit_writes(redis_url, key, tail=1))
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out[0]["unsealed"] == 1
    time.sleep(1.1)
    code, out, err = run(capsys, *argv, "--max-unsealed-age", "1")
    assert code == 1 and "no server is sealing" in err and out[0]["oldest_unsealed_s"] >= 1
    code, _, err = run(capsys, *argv, "--max-unsealed-age", "0")
    assert code == 2 and "positive" in err

    async def delete(record_id: bytes) -> None:
        client = aioredis.from_url(redis_url)
        try:
            await client.xdel("fp:audit", record_id)
        finally:
            await client.aclose()

    asyncio.run(delete(first))
    code, out, err = run(capsys, *argv)
    assert code == 1 and len(out[0]["broken"]) == 1 and "do not match" in err


def test_audit_verify_fails_on_a_deletion_dressed_up_as_a_trim(
    redis_url, capsys, monkeypatch
) -> None:
    """A sealed record removed by rewriting the stream, with XSETID restoring the counters
    so that it looks trimmed, fails the check: the stream is far below its cap."""
    key = generate_key()
    ids = asyncio.run(_audit_writes(redis_url, key, sealed=[5, 3]))

    async def rewrite_without(record_id: bytes) -> None:
        client = aioredis.from_url(redis_url)
        try:
            rows = await client.xrange("fp:audit")
            added = (await client.xinfo_stream("fp:audit"))["entries-added"]
            await client.delete("fp:audit")
            for rid, fields in rows:
                if rid != record_id:
                    await client.xadd("fp:audit", fields, id=rid)
            await client.execute_command(
                "XSETID", "fp:audit", rows[-1][0], "ENTRIESADDED", added, "MAXDELETEDID", "0-0"
            )
        finally:
            await client.aclose()

    asyncio.run(rewrite_without(ids[1]))
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", key.hex())
    code, out, err = run(capsys, "admin", "audit-verify", "--redis-url", redis_url)
    assert code == 1 and "do not match" in err
    assert len(out[0]["broken"]) == 1 and out[0]["not_checkable"] == 0


def test_audit_verify_judges_trimming_by_the_cap_the_servers_published(
    redis_url, capsys, monkeypatch
) -> None:
    """Servers with a small cap trim the stream; audit-verify run without their
    configuration (the built-in cap is 100,000) must not call the trimmed seals tampered
    with, and the command line must not trim to another cap than theirs."""
    key = generate_key()

    async def server_writes() -> None:
        client = aioredis.from_url(redis_url)
        try:
            store = Store(client, TemplateCipher(key), audit_maxlen=20)
            await store.publish_audit_cap()  # as every server does at start
            for batch in range(30):
                for i in range(5):
                    await store.audit("login", account_id=f"t{batch}-{i}")
                await store.seal_audit()
            cli = Store(client, TemplateCipher(key))
            assert await cli.adopt_audit_cap(None) == 20  # the servers' cap, not 100,000
            assert await cli.adopt_audit_cap(500) == 20  # theirs, whatever a config says
            await client.delete("fp:audit:maxlen")  # nothing published: the config's
            assert await Store(client, TemplateCipher(key)).adopt_audit_cap(500) == 500
            await store.publish_audit_cap()
        finally:
            await client.aclose()

    asyncio.run(server_writes())
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", key.hex())
    code, out, err = run(capsys, "admin", "audit-verify", "--redis-url", redis_url)
    assert code == 0, err
    assert out[0]["broken"] == [] and out[0]["not_checkable"] >= 1 and out[0]["verified"] >= 1


def test_audit_verify_checks_a_shipped_copy_without_redis(
    redis_url, capsys, monkeypatch, tmp_path
) -> None:
    """The write-once copy covers what seals cannot show, so it is checkable on its own."""
    key = generate_key()
    asyncio.run(_audit_writes(redis_url, key, sealed=[3, 3], tail=1))  # tail: read unsealed
    code, records, _ = run(capsys, "admin", "audit", "--redis-url", redis_url)
    assert code == 0 and len(records) == 9
    copy = tmp_path / "audit.jsonl"
    copy.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", key.hex())
    argv = ["admin", "audit-verify", "--data-dir", str(tmp_path), "--file", str(copy)]
    code, out, _ = run(capsys, *argv)  # no --redis-url: the copy alone
    assert code == 0 and out[0]["verified"] == 2 and out[0]["records_sealed"] == 6
    assert out[0]["unsealed"] == 1
    # A copy that starts at a cursor: the seal reaching before it cannot be checked.
    copy.write_text("".join(json.dumps(r) + "\n" for r in records[2:]))
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out[0]["not_checkable"] == 1 and out[0]["verified"] == 1
    # A record changed in the copy (or in Redis before it was read) breaks its seal.
    changed = [dict(r) for r in records]
    changed[4]["account_id"] = "mallory"
    copy.write_text("".join(json.dumps(r) + "\n" for r in changed))
    code, out, err = run(capsys, *argv)
    assert code == 1 and out[0]["broken"] == [records[7]["id"]] and "do not match" in err
    # The copy against the live stream: the same, then after a history rewritten while
    # every server was stopped, which seals as a clean new chain and only the copy shows.
    copy.write_text("".join(json.dumps(r) + "\n" for r in records))
    live = ["admin", "audit-verify", "--redis-url", redis_url]
    code, out, _ = run(capsys, *argv, "--compare", "--redis-url", redis_url)
    assert code == 0 and out[0]["diverged"] == 0 and out[0]["diverged_ids"] == []
    asyncio.run(_rewrite_history(redis_url, key, records[1]["id"]))
    code, out, _ = run(capsys, *live)
    assert code == 0 and out[0]["restarts"] == [] and out[0]["broken"] == []  # seals hold
    code, out, err = run(capsys, *argv, "--compare", "--redis-url", redis_url)
    assert code == 1 and "differ" in err
    # The changed record, and the old seals that the rewrite dropped.
    events = {r["id"]: r["event"] for r in records}
    ids = out[0]["diverged_ids"]
    assert [i for i in ids if events.get(i) == "login"] == [records[1]["id"]]
    assert {i for i in ids if events.get(i) == "audit_sealed"} == {
        r["id"] for r in records if r["event"] == "audit_sealed"
    }
    code, _, err = run(capsys, "admin", "audit-verify", "--redis-url", redis_url, "--compare")
    assert code == 2 and "--file" in err
    for bad in (
        "not json\n",
        '{"event": "login"}\n',
        json.dumps(records[1]) + "\n" + json.dumps(records[0]),
    ):
        copy.write_text(bad)
        code, _, err = run(capsys, *argv)
        assert code == 2 and "line" in err, bad


def _redis(url: str, *command: object) -> object:
    """One Redis command, as someone with write access to Redis (not FacePay) sends it."""

    async def send() -> object:
        client = aioredis.from_url(url)
        try:
            return await client.execute_command(*command)
        finally:
            await client.aclose()

    return asyncio.run(send())


def _write_copy(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_catches_the_newest_records_cut_off_with_their_seal(
    redis_url, capsys, monkeypatch, tmp_path
) -> None:
    """The copy is read before the live stream, and trimming cuts only the head: the copy's
    newest records missing from the live stream diverge, seal and all, and every record
    does against a stream deleted or renamed. A head the cap trimmed does not."""
    key = generate_key()
    asyncio.run(_audit_writes(redis_url, key, sealed=[3, 2]))
    code, records, _ = run(capsys, "admin", "audit", "--redis-url", redis_url)
    assert code == 0 and len(records) == 7
    copy = tmp_path / "audit.jsonl"
    _write_copy(copy, records)
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", key.hex())
    argv = ["admin", "audit-verify", "--redis-url", redis_url, "--file", str(copy), "--compare"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out[0]["diverged"] == 0
    cut = [r["id"] for r in records[-3:]]  # the two newest records and the seal over them
    assert records[-1]["event"] == "audit_sealed"
    _redis(redis_url, "XDEL", "fp:audit", *cut)
    code, out, err = run(capsys, *argv)
    assert code == 1 and "differ" in err and out[0]["diverged_ids"] == cut
    assert out[0]["broken"] == []  # the copy's own seals hold
    _redis(redis_url, "RENAME", "fp:audit", "fp:audit:elsewhere")
    code, out, err = run(capsys, *argv)
    assert code == 1 and out[0]["diverged"] == len(records)
    _redis(redis_url, "DEL", "fp:audit:elsewhere")
    code, out, err = run(capsys, *argv)
    assert code == 1 and out[0]["diverged"] == len(records)

    # Servers with a small cap: a copy, then writes that trim its oldest records away.
    _redis(redis_url, "FLUSHALL")

    async def server_writes(batches: int) -> None:
        client = aioredis.from_url(redis_url)
        try:
            store = Store(client, TemplateCipher(key), audit_maxlen=20)
            await store.publish_audit_cap()
            for batch in range(batches):
                for i in range(5):
                    await store.audit("login", account_id=f"t{batch}-{i}")
                await store.seal_audit()
        finally:
            await client.aclose()

    asyncio.run(server_writes(11))  # 66 records, not yet trimmed
    code, records, _ = run(capsys, "admin", "audit", "--redis-url", redis_url)
    _write_copy(copy, records)
    first = h.stream_id(records[0]["id"])
    for _ in range(20):  # until the trim (whole nodes) reaches the copy's head
        asyncio.run(server_writes(1))
        _, live, _ = run(capsys, "admin", "audit", "--redis-url", redis_url)
        if h.stream_id(live[0]["id"]) > first:
            break
    head = live[0]["id"]
    assert first < h.stream_id(head) <= h.stream_id(records[-1]["id"])  # they overlap
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert out[0]["diverged"] == 0
    # ... but a copy record deleted from the live head (XDEL) is not a trimmed one. Redis
    # keeps only the newest deleted id, so the trimmed records before it may have been
    # deleted too: they diverge as well (failing closed), and none after it.
    _redis(redis_url, "XDEL", "fp:audit", head)
    code, out, _ = run(capsys, *argv)
    assert code == 1 and head in out[0]["diverged_ids"]
    assert max(map(h.stream_id, out[0]["diverged_ids"])) == h.stream_id(head)


def test_audit_verify_fails_a_copy_whose_old_records_are_unsealed(
    redis_url, capsys, monkeypatch, tmp_path
) -> None:
    """A copy whose seals were stripped so that its records could be edited: records older
    than its newest by more than the unsealed limit would have had their seal written
    before the copy ended, in the copy. A copy's young unsealed tail is fine."""
    key = generate_key()
    asyncio.run(_audit_writes(redis_url, key, sealed=[3]))
    time.sleep(1.1)
    asyncio.run(_audit_writes(redis_url, key, sealed=[2], tail=1))
    code, records, _ = run(capsys, "admin", "audit", "--redis-url", redis_url)
    assert code == 0 and len(records) == 8
    copy = tmp_path / "audit.jsonl"
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", key.hex())
    argv = ["admin", "audit-verify", "--data-dir", str(tmp_path), "--file", str(copy)]
    argv += ["--max-unsealed-age", "1"]
    _write_copy(copy, records)
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert out[0]["unsealed"] == 1 and out[0]["verified"] == 2
    assert out[0]["oldest_unsealed_s"] < 1  # counted to the copy's newest record
    stripped = [
        {**r, "account_id": "mallory"} if r.get("account_id") == "a01" else r
        for r in records
        if r["event"] != "audit_sealed"
    ]
    _write_copy(copy, stripped)
    code, out, err = run(capsys, *argv)
    assert code == 1 and "no server is sealing" in err and "copy's newest" in err
    assert out[0]["seals"] == 0 and out[0]["unsealed"] == 6
    assert out[0]["oldest_unsealed_s"] >= 1


def test_audit_verify_catches_the_newest_records_cut_off_with_their_seal(
    redis_url, capsys, monkeypatch
) -> None:
    """The seals alone cannot tell a tail cut off with its seal from a stream sealed less
    recently; Redis records the deletion, and the chain's state still names that seal."""
    key = generate_key()
    asyncio.run(_audit_writes(redis_url, key, sealed=[3, 2]))
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", key.hex())
    argv = ["admin", "audit-verify", "--redis-url", redis_url]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    rows = _redis(redis_url, "XRANGE", "fp:audit", "-", "+")
    assert isinstance(rows, list)
    cut = [rid.decode() for rid, _ in rows[-3:]]  # the two newest records and their seal
    _redis(redis_url, "XDEL", "fp:audit", *cut)
    code, out, err = run(capsys, *argv)
    assert code == 1 and "XDEL" in err and "cut off" in err
    assert out[0]["broken"] == [] and out[0]["verified"] == 1  # the seals left still hold
    assert out[0]["deleted_upto"] == cut[-1] and out[0]["state_fault"] == "seal_missing"
    # The deletion hidden: the stream written anew without the tail, its counters as they
    # were (XSETID cannot clear a deleted id). The chain state still names the seal cut off.
    _redis(redis_url, "DEL", "fp:audit")
    for rid, fields in rows[:-3]:
        _redis(redis_url, "XADD", "fp:audit", rid, *[x for kv in fields.items() for x in kv])
    _redis(redis_url, "XSETID", "fp:audit", cut[-1], "ENTRIESADDED", len(rows))
    code, out, err = run(capsys, *argv)
    assert code == 1 and out[0]["deleted_upto"] is None
    assert out[0]["state_fault"] == "seal_missing"
    # The whole stream deleted, or renamed, while its chain state remains.
    _redis(redis_url, "RENAME", "fp:audit", "fp:audit:elsewhere")
    code, out, err = run(capsys, *argv)
    assert code == 1 and out[0]["state_fault"] == "stream_missing" and "gone" in err
    assert out[0]["seals"] == 0


def test_a_reader_that_leaves_early_is_not_a_crash(redis_url, tmp_path) -> None:
    """`facepay admin audit | head -1`: the rest has nowhere to go; no traceback."""
    asyncio.run(_audit_writes(redis_url, generate_key(), tail=2000))
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_VARS}
    done = subprocess.run(
        f"{sys.executable} -m stream_server.cli admin audit --limit 10000"
        f" --redis-url {redis_url} | head -1",
        shell=True, env=env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert json.loads(done.stdout)["event"] == "login"
    assert "Traceback" not in done.stderr and "output closed" in done.stderr
