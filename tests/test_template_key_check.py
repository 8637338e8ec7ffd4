"""The template key is checked against the data in Redis (``fp:template_key_check``): a
server, an enrolment or a rotation with another key is refused before it misreads or
mis-seals anything; a rotation keeps everyone out until it has finished, and in dev mode it
runs without a server (and refuses while one runs). The commands resolve their Redis and
data folder as ``serve`` does, ``--config`` included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.errors import InvalidRequest, TemplateKeyMismatch
from session.crypto import TEMPLATE_DIM, TemplateCipher, generate_key
from session.store import Store
from stream_server.cli import main
from stream_server.embedded_redis import EmbeddedRedis
from tests.e2e import REPO, SERVER_ENV_VARS

# A fixed argon2 hash (the store checks only its form): no argon2 work in these tests.
PASSHASH = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
CHECK, NEXT = "fp:template_key_check", "fp:template_key_check:next"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _templates(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, TEMPLATE_DIM)).astype(np.float32)
    return list(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


async def _enrol(url: str, key: bytes, *accounts: str) -> dict[str, str]:
    """Enrol ``accounts`` under ``key``; {account: subject id}."""
    client = aioredis.from_url(url)
    try:
        db = Store(client, TemplateCipher(key))
        out = {}
        for i, account in enumerate(accounts):
            _, sid = await db.create_account(
                account, "Test Person", "+8613800001234", PASSHASH, _templates(2, i), {"m": "t"}
            )
            out[account] = sid
        return out
    finally:
        await client.aclose()


async def _opened(url: str, key: bytes) -> dict[str, str]:
    """{subject id: account} for every subject ``key`` opens."""
    client = aioredis.from_url(url)
    try:
        db = Store(client, TemplateCipher(key))
        return {sid: await db.account_for_subject(sid) async for sid, _, _ in db.iter_subjects()}
    finally:
        await client.aclose()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


# --- A: the key check ---------------------------------------------------------------------------


async def test_another_key_is_refused_before_it_reads_or_writes(redis_url: str) -> None:
    key, other = generate_key(), generate_key()
    await _enrol(redis_url, key, "alice")
    client = aioredis.from_url(redis_url)
    try:
        stored = (await client.get(CHECK)).decode()
        assert stored == TemplateCipher(key).key_check  # recorded by the first enrolment
        assert key.hex() not in stored and stored not in key.hex()
        await Store(client, TemplateCipher(key)).check_template_key()
        wrong = Store(client, TemplateCipher(other))
        with pytest.raises(TemplateKeyMismatch, match="does not match"):
            await wrong.check_template_key()
        before = await client.scard("fp:subjects")
        with pytest.raises(TemplateKeyMismatch):
            await wrong.create_account(
                "bob", "Bob", "+8613800005678", PASSHASH, _templates(1, 9), {"m": "t"}
            )
        assert await client.scard("fp:subjects") == before
        assert await client.exists("fp:account:bob") == 0
        # A database enrolled before the check existed: the key is tried on its links.
        await client.delete(CHECK)
        with pytest.raises(TemplateKeyMismatch, match="link does not open"):
            await wrong.check_template_key()
        assert await client.exists(CHECK) == 0
        await Store(client, TemplateCipher(key)).check_template_key()
        assert (await client.get(CHECK)).decode() == stored
    finally:
        await client.aclose()


def test_serve_with_another_key_exits_2_instead_of_serving(
    redis_url: str, models_dir: Path, tmp_path: Path
) -> None:
    import asyncio

    asyncio.run(_enrol(redis_url, generate_key(), "alice"))
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_VARS}
    env["FACEPAY_TEMPLATE_KEY"] = generate_key().hex()  # a typo'd replica, say
    cmd = [sys.executable, "-m", "stream_server.cli", "serve", "--port", "0"]
    args = ["--redis-url", redis_url, "--models-dir", str(models_dir), "--data-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [*cmd, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"serve started with another template key: {out}")
    assert proc.returncode == 2, err
    assert "template key does not match" in err


def test_enroll_with_another_key_exits_2(
    redis_url: str, models_dir: Path, data_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import asyncio

    asyncio.run(_enrol(redis_url, generate_key(), "alice"))
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", generate_key().hex())
    passfile = tmp_path / "pass"
    passfile.write_text("correct horse\n")
    code, out, err = run(
        capsys, "enroll", "--redis-url", redis_url, "--models-dir", str(models_dir),
        "--account", "bob", "--name", "Bob", "--phone", "+8613800005678", "--consent",
        "--passphrase-file", str(passfile), str(data_dir / "faces/obama/obama.jpg"),
    )  # fmt: skip
    assert code == 2 and "template key does not match" in err
    assert out[-1]["error"] in ("usage", "template_key_mismatch")
    assert asyncio.run(_opened(redis_url, generate_key())) == {}  # nothing new to open


# --- A: rotation and the key check --------------------------------------------------------------


async def test_an_interrupted_rotation_keeps_everyone_out_until_it_is_finished(
    redis_url: str,
) -> None:
    old, new, third = generate_key(), generate_key(), generate_key()
    subjects = await _enrol(redis_url, old, "alice", "bob")
    client = aioredis.from_url(redis_url)
    try:
        db = Store(client, TemplateCipher(old))
        # Interrupted after one subject: the data is under both keys.
        await db.begin_rotation(TemplateCipher(new))
        assert await db._rekey_subject(subjects["alice"], TemplateCipher(new)) == 2
        for key in (old, new):
            with pytest.raises(TemplateKeyMismatch, match="unfinished"):
                await Store(client, TemplateCipher(key)).check_template_key()
            with pytest.raises(TemplateKeyMismatch, match="unfinished"):
                await Store(client, TemplateCipher(key)).create_account(
                    "carol", "Carol", "+8613800000000", PASSHASH, _templates(1, 5), {"m": "t"}
                )
        # Another new key cannot take over the open rotation.
        with pytest.raises(TemplateKeyMismatch, match="another new key"):
            await Store(client, TemplateCipher(old)).rekey_templates(TemplateCipher(third))
        # Run again with the same two keys: it finishes, and only the new key is let in.
        assert await Store(client, TemplateCipher(old)).rekey_templates(TemplateCipher(new)) == (
            1,
            2,
        )
        assert (await client.get(CHECK)).decode() == TemplateCipher(new).key_check
        assert await client.exists(NEXT) == 0
        await Store(client, TemplateCipher(new)).check_template_key()
        with pytest.raises(TemplateKeyMismatch, match="does not match"):
            await Store(client, TemplateCipher(old)).check_template_key()
        # Resumed after its last step (the dev key file not yet replaced): a no-op.
        assert await Store(client, TemplateCipher(old)).rekey_templates(TemplateCipher(new)) == (
            0,
            0,
        )
        # A wrong current key is refused before anything is written.
        with pytest.raises(TemplateKeyMismatch):
            await Store(client, TemplateCipher(third)).rekey_templates(TemplateCipher(old))
        assert await client.exists(NEXT) == 0
    finally:
        await client.aclose()
    assert sorted((await _opened(redis_url, new)).values()) == ["alice", "bob"]


async def test_a_rotation_that_cannot_open_a_subject_names_it_and_its_account(
    redis_url: str,
) -> None:
    old, new, stray = generate_key(), generate_key(), generate_key()
    subjects = await _enrol(redis_url, old, "alice", "bob")
    client = aioredis.from_url(redis_url)
    try:
        # alice's second template was sealed under a key since thrown away.
        sid = subjects["alice"]
        await client.hset(
            f"fp:tpl:{sid}", "1", TemplateCipher(stray).encrypt(sid, _templates(1, 3)[0])
        )
        with pytest.raises(InvalidRequest) as caught:
            await Store(client, TemplateCipher(old)).rekey_templates(TemplateCipher(new))
        assert sid in str(caught.value) and "alice" in str(caught.value)
        await client.hdel(f"fp:tpl:{sid}", "1")
        # bob's link too: its account cannot be named, its subject is.
        sid = subjects["bob"]
        await client.set(f"fp:link:s2a:{sid}", TemplateCipher(stray).seal_link(f"s2a:{sid}", "bob"))
        with pytest.raises(InvalidRequest) as caught:
            await Store(client, TemplateCipher(old)).rekey_templates(TemplateCipher(new))
        assert sid in str(caught.value)
    finally:
        await client.aclose()


# --- B: dev-mode rotation without a server ------------------------------------------------------


def _dev_folder(tmp_path: Path, key: bytes) -> Path:
    """A dev data folder as ``facepay serve --dev`` leaves it once stopped."""
    import asyncio

    data = tmp_path / "data"
    data.mkdir()
    (data / "template.key").write_text(key.hex() + "\n")
    (data / "template.key").chmod(0o600)
    with EmbeddedRedis(data) as redis:
        asyncio.run(_enrol(redis.url, key, "alice", "bob"))
    assert not (data / "redis.url").exists()
    return data


def test_dev_rotation_runs_with_the_server_stopped(tmp_path: Path, capsys) -> None:
    import asyncio

    old, new = generate_key(), generate_key()
    data = _dev_folder(tmp_path, old)
    (tmp_path / "new.key").write_text(new.hex())
    code, out, err = run(
        capsys, "rotate-template-key", "--data-dir", str(data),
        "--new-key-file", str(tmp_path / "new.key"), "--operator", "ops",
    )  # fmt: skip
    assert code == 0, err
    assert out == [{"subjects": 2, "templates": 4}]
    assert (data / "template.key").read_text().strip() == new.hex()
    kept = data / "template.key.old"  # the old key is kept, not lost
    assert kept.read_text().strip() == old.hex() and kept.stat().st_mode & 0o777 == 0o600
    assert not (data / "redis.url").exists()  # the rotation's own Redis stopped again
    with EmbeddedRedis(data) as redis:
        assert sorted(asyncio.run(_opened(redis.url, new)).values()) == ["alice", "bob"]


def test_dev_rotation_is_refused_while_the_server_runs(tmp_path: Path, capsys) -> None:
    old, new = generate_key(), generate_key()
    data = _dev_folder(tmp_path, old)
    (tmp_path / "new.key").write_text(new.hex())
    with EmbeddedRedis(data):  # what a running facepay serve --dev holds
        code, _, err = run(
            capsys, "rotate-template-key", "--data-dir", str(data),
            "--new-key-file", str(tmp_path / "new.key"),
        )  # fmt: skip
    assert code == 1 and "stop it" in err
    assert (data / "template.key").read_text().strip() == old.hex()
    assert not (data / "template.key.old").exists()


# --- C: --config counts for every command -------------------------------------------------------


def test_commands_take_redis_data_folder_and_key_from_the_config(
    redis_url: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    import asyncio

    key = generate_key()
    asyncio.run(_enrol(redis_url, key, "alice"))
    # A dev server's redis.url in the working directory must not be picked instead.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "redis.url").write_text("redis://127.0.0.1:1/0\n")
    prod = tmp_path / "prod.json"
    prod.write_text(
        json.dumps(
            {
                "server": {
                    "redis_url": redis_url,
                    "template_key": key.hex(),
                    "data_dir": str(tmp_path / "prod-data"),
                }
            }
        )
    )
    code, out, err = run(capsys, "admin", "audit-verify", "--config", str(prod))
    assert code == 0, err
    code, out, err = run(capsys, "admin", "merchant-add", "--config", str(prod), "Shop")
    assert code == 0 and out[0]["merchant_id"].startswith("m_"), err
    # The config's data folder holds the key when the config does not.
    (tmp_path / "prod-data").mkdir()
    (tmp_path / "prod-data" / "template.key").write_text(key.hex())
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps({"server": {"redis_url": redis_url, "data_dir": "prod-data"}}))
    code, out, err = run(capsys, "admin", "audit-verify", "--config", str(dev))
    assert code == 0, err
    # An option still wins over the config.
    code, _, err = run(
        capsys, "admin", "audit-verify", "--config", str(prod), "--redis-url",
        "redis://127.0.0.1:1/0",
    )  # fmt: skip
    assert code == 2 and "cannot reach Redis" in err
