"""Real ``facepay serve`` processes for multi-server and fault tests.

Each server is a separate Python process started through the ``facepay`` command line with
production-style secrets (``FACEPAY_TEMPLATE_KEY``, ``FACEPAY_ADMIN_TOKEN``) and an external
Redis, like one replica behind a balancer. The only test-side difference is the launcher's
``restrict_host_addresses(["127.0.0.1"])``: aioice never offers loopback as an ICE candidate
and the tests talk to 127.0.0.1 only (DESIGN.md §6).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e import REPO, SERVER_ENV_VARS

#: FACEPAY_TEST_SERVER_DEBUG=1: servers log at debug level, and SIGUSR1 makes one write the
#: stacks of its asyncio tasks and threads to its log (``dump_tasks``), for hung tests.
DEBUG = os.environ.get("FACEPAY_TEST_SERVER_DEBUG") == "1"
#: ``python -c`` program: loopback ICE candidates, then the ordinary ``facepay`` entry point.
LAUNCH = (
    "import os, sys\n"
    "if os.environ.get('FACEPAY_TEST_SERVER_DEBUG') == '1':\n"
    "    import asyncio, signal\n"
    "    def _dump(*_):\n"
    "        for t in asyncio.all_tasks(asyncio.get_event_loop()):\n"
    "            c = t.get_coro(); print('TASK', t.get_name(), file=sys.stderr)\n"
    "            while c is not None and hasattr(c, 'cr_frame'):\n"
    "                f = c.cr_frame\n"
    "                if f: print('   ', f.f_code.co_filename, f.f_lineno, file=sys.stderr)\n"
    "                c = getattr(c, 'cr_await', None) or getattr(c, 'gi_yieldfrom', None)\n"
    "            print('   awaits', repr(c)[:200], file=sys.stderr)\n"
    "        import threading, traceback\n"
    "        names = {t.ident: t.name for t in threading.enumerate()}\n"
    "        for ident, frame in sys._current_frames().items():\n"
    "            print('THREAD', names.get(ident), file=sys.stderr)\n"
    "            traceback.print_stack(frame, limit=6, file=sys.stderr)\n"
    "    signal.signal(signal.SIGUSR1, _dump)\n"
    "from stream_server.webrtc import restrict_host_addresses\n"
    "restrict_host_addresses(['127.0.0.1'])\n"
    "from stream_server.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
#: Model loading on a busy 2-core machine can take a while; bounded all the same.
START_TIMEOUT_S = 90.0


class ServeProc:
    """One ``facepay serve`` process on a shared Redis; start/stop/kill/restart it."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        redis_url: str,
        models_dir: Path,
        template_key: str,
        admin_token: str,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.models_dir = models_dir
        self.admin_token = admin_token
        self.env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_VARS}
        self.env.update(FACEPAY_TEMPLATE_KEY=template_key, FACEPAY_ADMIN_TOKEN=admin_token)
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.workdir / "config.json"
            self.config_path.write_text(json.dumps(config), encoding="utf-8")
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.starts = 0

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _argv(self) -> list[str]:
        debug = ["-v"] if DEBUG else []
        argv = [sys.executable, "-c", LAUNCH, *debug, "serve", "--port", "0"]
        argv += ["--redis-url", self.redis_url, "--models-dir", str(self.models_dir)]
        argv += ["--data-dir", str(self.workdir / "data")]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv

    def start_blocking(self) -> None:
        """Start and wait for the JSON line that says where it listens."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = open(self.workdir / f"stderr-{self.starts}.log", "w", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self._argv(), cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True
        )
        log.close()  # the child holds its own descriptor
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        os.set_blocking(self.proc.stdout.fileno(), False)
        line = ""
        while not line.endswith("\n"):
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.kill_blocking()
                raise AssertionError(f"{self.name} did not start: {self.log()}")
            chunk = self.proc.stdout.readline()
            if chunk:
                line += chunk
            else:
                time.sleep(0.05)
        self.url = json.loads(line)["url"]

    async def start(self) -> None:
        await asyncio.to_thread(self.start_blocking)

    def kill_blocking(self, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` (SIGKILL: a crash) and reap; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    async def kill(self, sig: int = signal.SIGKILL) -> int | None:
        return await asyncio.to_thread(self.kill_blocking, sig)

    async def stop(self) -> int | None:
        """Graceful stop (SIGTERM), as an orchestrator does."""
        return await self.kill(signal.SIGTERM)

    async def dump_tasks(self) -> None:
        """With FACEPAY_TEST_SERVER_DEBUG=1: the server writes its tasks and threads to its log."""
        if DEBUG and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(0.5)

    def log(self, chars: int = 3000) -> str:
        """The tail of the current process's stderr (for failure messages)."""
        path = self.workdir / f"stderr-{self.starts}.log"
        try:
            return path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def _request_blocking(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.admin_token}")
        for key, value in headers.items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """An admin API call: (status, JSON body)."""
        return await asyncio.to_thread(self._request_blocking, method, path, body, headers or {})

    async def post_json(self, path: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        body = json.dumps(data).encode()
        return await self.request("POST", path, body, {"Content-Type": "application/json"})

    async def enroll(
        self, account_id: str, name: str, phone: str, passphrase: str, images: list[Path]
    ) -> tuple[int, dict[str, Any]]:
        """``POST /api/accounts`` (multipart, consent given) with the photo files."""
        boundary = "fp-test-boundary-7c1d"
        parts: list[bytes] = []
        fields = {
            "account_id": account_id,
            "name": name,
            "phone": phone,
            "passphrase": passphrase,
            "consent": "true",
        }
        for key, value in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
                f"{value}\r\n".encode()
            )
        for path in images:
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{path.name}"\r\nContent-Type: image/jpeg\r\n\r\n'
            )
            parts.append(head.encode() + path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return await self.request("POST", "/api/accounts", b"".join(parts), headers)
