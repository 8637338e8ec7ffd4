"""The benches' Redis: their own, or an empty one named by ``--redis-url``; never the
operator's ``FACEPAY_REDIS_URL``.

A bench writes merchants, accounts, payments and audit records sealed with a throwaway key
(and ``bench-gate`` once emptied the database first): pointed at a production Redis it
wiped or polluted it. The full runs with ``FACEPAY_REDIS_URL`` set are in
``tests/test_bench_cli.py``; these are the cheap checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from stream_server import bench_server
from stream_server.cli import build_parser
from tests.e2e import operators_redis, run_facepay


@pytest.mark.parametrize("command", ["bench", "bench-gate"])
def test_benches_do_not_read_facepay_redis_url(command: str, monkeypatch) -> None:
    """Every other command reads FACEPAY_REDIS_URL (DESIGN.md §5); a bench takes a Redis
    only from ``--redis-url``."""
    monkeypatch.setenv("FACEPAY_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert build_parser().parse_args([command]).redis_url is None
    url = "redis://127.0.0.1:1/3"
    assert build_parser().parse_args([command, "--redis-url", url]).redis_url == url


def test_bench_gate_refuses_a_redis_that_holds_data_and_leaves_it_alone(
    redis_url: str, models_dir: Path, data_dir: Path
) -> None:
    client = operators_redis(redis_url)
    proc = run_facepay(
        "bench-gate",
        "--redis-url",
        redis_url,
        "--people",
        "1",
        "--models-dir",
        str(models_dir),
        "--data-dir",
        str(data_dir),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds 1 keys" in proc.stderr and proc.stdout == ""
    assert client.keys("*") == [b"fp:merchant:real"]
    assert client.get("fp:merchant:real") == b"production data"


@pytest.mark.parametrize("target", ["seeded", "unreachable"])
def test_bench_refuses_a_redis_that_holds_data_or_cannot_be_read(
    target: str, redis_url: str, models_dir: Path, data_dir: Path
) -> None:
    client = operators_redis(redis_url)
    url = redis_url if target == "seeded" else "redis://127.0.0.1:1/0"
    argv = ("--models-dir", str(models_dir), "--terminals", "1", "--duration", "2")
    photo = str(data_dir / "faces/obama/obama.jpg")
    proc = run_facepay("bench", "--redis-url", url, *argv, photo)
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = "holds 1 keys" if target == "seeded" else "cannot read Redis"
    assert expected in proc.stderr and proc.stdout == ""
    assert client.keys("*") == [b"fp:merchant:real"]


def test_bench_server_takes_its_redis_url_in_its_environment_not_argv(
    monkeypatch, tmp_path: Path
) -> None:
    """The server process ``facepay bench`` starts: ``--redis-url`` reaches it in its
    environment (an argv, password included, shows in ``ps``); without one it gets neither
    the operator's FACEPAY_REDIS_URL nor a ``server.redis_url`` from ``--config``; never
    the operator's template key."""
    seen: list[tuple[list[str], dict[str, str], dict]] = []

    class Started(Exception):
        pass

    def popen(cmd: list[str], **kw: object) -> None:
        config = json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())
        env = kw["env"]
        assert isinstance(env, dict)
        seen.append((cmd, env, config))
        raise Started

    monkeypatch.setattr(bench_server.subprocess, "Popen", popen)
    monkeypatch.setenv("FACEPAY_REDIS_URL", "redis://:prod-secret@10.0.0.5:6379/0")
    monkeypatch.setenv("FACEPAY_TEMPLATE_KEY", "11" * 32)
    user_config = tmp_path / "prod.json"
    prod = {"server": {"redis_url": "redis://10.0.0.5:6379/0", "template_key": "22" * 32}}
    user_config.write_text(json.dumps(prod))
    explicit = "redis://:bench-secret@127.0.0.1:6399/0"
    for url in (explicit, None):
        args = argparse.Namespace(
            server=None, admin_token=None, redis_url=url, config=str(user_config)
        )
        server = bench_server.BenchServer(args, None, {"limits": {}})
        try:
            with pytest.raises(Started):
                server.__enter__()
        finally:
            server.__exit__()
    (cmd, env, config), (cmd2, env2, config2) = seen
    assert not any("secret" in part for part in cmd + cmd2), cmd
    assert "--redis-url" not in cmd + cmd2
    assert env["FACEPAY_REDIS_URL"] == explicit
    assert "FACEPAY_REDIS_URL" not in env2
    assert "redis_url" not in config.get("server", {}) and "redis_url" not in config2["server"]
    # Nor the operator's template key: what the bench seals is sealed with its own dev key.
    assert "FACEPAY_TEMPLATE_KEY" not in env and "FACEPAY_TEMPLATE_KEY" not in env2
    assert "template_key" not in config["server"] and "template_key" not in config2["server"]
