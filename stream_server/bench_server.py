"""The server under test for ``facepay bench``: started here or given by URL."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.errors import ConfigError
from session.config import read_config_data, with_sections
from stream_server.cli import say

#: Read by every other command; never by a bench, whose Redis is its own or ``--redis-url``.
ENV_REDIS = "FACEPAY_REDIS_URL"


class BenchError(Exception):
    """The bench cannot run (the server did not start, an admin call failed)."""


def refuse_redis(url: str | None) -> str | None:
    """Why a bench must not write into the Redis database ``url``, or None if it may (or if
    there is no ``url``: the bench then starts its own).

    A bench writes merchants, terminals, accounts, payments and audit records (sealed with
    a throwaway key): so it writes only into an empty database (DBSIZE 0), and never
    empties one. Only reads here: nothing is written either way.
    """
    if not url:
        return None
    import redis

    from stream_server.cli_server import redact_url

    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            keys = int(client.dbsize())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"cannot read Redis at {redact_url(url)}: {exc}"
    if keys:
        return (
            f"Redis at {redact_url(url)} holds {keys} keys: a bench writes only into an empty "
            "database (give it a fresh one, or no --redis-url for its own private Redis)"
        )
    return None


class BenchServer:
    """The server under test: started here (``facepay serve --dev``) or given by URL."""

    def __init__(
        self, args: argparse.Namespace, models_dir: str | None, config: dict[str, Any]
    ) -> None:
        self.args = args
        self.models_dir = models_dir
        #: Written for the started server unless ``--config`` names a file.
        self.config = config
        self.proc: subprocess.Popen[str] | None = None
        self.tmp: Path | None = None
        self.url: str = args.server or ""
        self.admin_token: str = args.admin_token or ""
        self.enrolled = False
        #: Gate bench: enrolled walkers, account id -> kind (bench_gate.provision).
        self.gate_accounts: dict[str, str] = {}
        #: Their actor names in the scene, account id -> name.
        self.gate_names: dict[str, str] = {}
        self.pid: int | None = None
        self.redis_url: str | None = args.redis_url

    def __enter__(self) -> BenchServer:
        if self.url:
            return self
        # The user's file, with what the measurement needs on top (lifted rate limits, the
        # gate scene's entry window): without them every pass after the first would count as
        # a repeat and back-to-back checkouts would hit the limits.
        try:
            config = with_sections(read_config_data(self.args.config), self.config)
        except ConfigError as exc:
            raise BenchError(str(exc)) from exc
        # The server's Redis is the bench's alone: --redis-url (checked empty) or its own;
        # and its template key a throwaway one (the dev key in its own data folder), never
        # the operator's, so that nothing the bench seals is readable with a real key.
        server = config.get("server", {})
        if server.pop("redis_url", None):
            say("bench: ignoring server.redis_url in --config (the bench's Redis: --redis-url)")
        if server.pop("template_key", None):
            say("bench: ignoring server.template_key in --config (the bench's key is its own)")
        self.tmp = Path(tempfile.mkdtemp(prefix="facepay-bench-"))
        cmd = [sys.executable, "-m", "stream_server.cli", "serve", "--dev", "--port", "0"]
        cmd += ["--data-dir", str(self.tmp / "data")]
        if self.models_dir:
            cmd += ["--models-dir", self.models_dir]
        config_path = self.tmp / "bench-config.json"
        config_path.write_text(json.dumps(config))
        cmd += ["--config", str(config_path)]
        dropped = ("FACEPAY_ADMIN_TOKEN", ENV_REDIS, "FACEPAY_TEMPLATE_KEY")
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        if self.args.redis_url:  # in the environment: an argv (and its password) shows in ps
            env[ENV_REDIS] = self.args.redis_url
        log = (self.tmp / "server.log").open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("{"):
            self.__exit__()
            raise BenchError(f"the server did not start; see {self.tmp / 'server.log'}")
        first = json.loads(line)
        if "url" not in first:
            self.__exit__()
            raise BenchError(f"the server did not start: {first.get('message', first)}")
        self.url = first["url"]
        self.pid = self.proc.pid
        if not self.redis_url and str(first.get("redis_url", "")).startswith("unix://"):
            self.redis_url = first["redis_url"]  # the embedded one (no password to redact)
        self.admin_token = (self.tmp / "data" / "admin.token").read_text().strip()
        say(f"bench: server {self.url} (pid {self.proc.pid}, log {self.tmp / 'server.log'})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def post(self, http: aiohttp.ClientSession, path: str, **kw: Any) -> Any:
        """An admin API POST; its JSON body (BenchError on a failure status)."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        async with http.post(self.url + path, headers=headers, **kw) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 300:
                raise BenchError(f"POST {path}: {resp.status} {body}")
            return body

    async def get(self, http: aiohttp.ClientSession, path: str) -> Any:
        """An admin API GET; its JSON body (BenchError on a failure status)."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        async with http.get(self.url + path, headers=headers) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 300:
                raise BenchError(f"GET {path}: {resp.status} {body}")
            return body

    def cpu_s(self) -> float | None:
        """CPU seconds of the server process itself (not its embedded Redis)."""
        if self.proc is None:
            return None
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def redis_cpu_s(self) -> float | None:
        """CPU seconds of the server's child processes (its embedded Redis): not server CPU,
        reported beside it so a run's whole cost is visible. None without one."""
        if self.proc is None:
            return None
        import psutil

        children = psutil.Process(self.proc.pid).children(recursive=True)
        if not children:
            return None  # an external Redis (--redis-url): not the bench's to measure
        total = 0.0
        for child in children:
            try:
                t = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        import psutil

        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20


#: Seconds between the bench's reads of /metrics during a run (thread CPU by role).
THREAD_LOOK_S = 2.0


async def read_metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The server's counters we use, summed over labels."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
        if resp.status != 200:
            raise BenchError(f"GET /metrics: {resp.status}")
    wanted = {
        "facepay_frames_received_total": "received",
        "facepay_frames_processed_total": "processed",
        "facepay_frames_dropped_total": "dropped",
        "facepay_frames_undecoded_total": "undecoded",
        "facepay_frames_no_detector_total": "no_detector",
        "facepay_model_seconds_total": "model_s",
        "facepay_work_seconds_total": "argon2_s",
        "process_cpu_seconds_total": "cpu_s",
        "process_resident_memory_bytes": "rss",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    out["gate_decisions"] = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and m.group(1) in wanted:
            out[wanted[m.group(1)]] += float(m.group(3))
        elif m and m.group(1) == "facepay_decisions_total" and 'mode="gate"' in (m.group(2) or ""):
            out["gate_decisions"] += float(m.group(3))
        elif m and m.group(1) == "facepay_thread_cpu_seconds_total":
            role = re.search(r'role="([a-z_]+)"', m.group(2) or "")
            if role:  # CPU by thread role: "thread:event_loop", "thread:workers", ...
                out[f"thread:{role.group(1)}"] = float(m.group(3))
    return out
