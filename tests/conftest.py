"""Shared fixtures: the real models and photos from ../shared, located by environment.

In CI these must exist. A test that needs them and cannot find them fails with a message
saying where it looked; nothing is skipped silently.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.analyzer import FaceAnalyzer
from pipeline.config import PipelineConfig
from pipeline.image import load_image
from pipeline.models import ModelStore
from pipeline.types import ImageArray

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = REPO_ROOT.parent / "shared"


def _locate(env: str, default: Path, probe: str) -> Path:
    path = Path(os.environ.get(env) or default)
    if not (path / probe).exists():
        pytest.fail(
            f"{env} is not set to a folder holding {probe!r} (looked in {path}); "
            f"point it at ../shared/{default.name}",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The real model folder (FACEPAY_MODELS_DIR, default ../shared/models)."""
    return _locate("FACEPAY_MODELS_DIR", DEFAULT_SHARED / "models", "detection")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real test photos (FACEPAY_TEST_DATA, default ../shared/data)."""
    return _locate("FACEPAY_TEST_DATA", DEFAULT_SHARED / "data", "faces")


@pytest.fixture(scope="session")
def store(models_dir: Path) -> ModelStore:
    """Verified models."""
    return ModelStore(models_dir)


@pytest.fixture(scope="session")
def analyzer(store: ModelStore) -> FaceAnalyzer:
    """The default pipeline on the real models (shared: stages hold no per-call state)."""
    return FaceAnalyzer.from_config(PipelineConfig(), store)


@pytest.fixture(scope="session")
def photo(data_dir: Path):  # type: ignore[no-untyped-def]
    """Load a shared photo by its path under the data folder (cached)."""
    cache: dict[str, ImageArray] = {}

    def load(rel: str) -> ImageArray:
        if rel not in cache:
            cache[rel] = load_image(data_dir / rel)
        return cache[rel]

    return load


# --- Redis: a real redis-server on a free loopback port --------------------------------------


class RedisServer:
    """A private redis-server process (no persistence) that tests can stop and restart."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (scripts/install-system-deps)", False)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                # Append-only file: data survives stop()/start(), like a production Redis
                # restart (tests of "Redis down mid-session" need that).
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        pytest.fail(f"redis-server did not start on port {self.port}", False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One redis-server for the test session; tests that stop it must restart it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean Redis for this test (FLUSHALL first; restarted if a test left it stopped)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


# --- end-to-end servers -------------------------------------------------------------------


@pytest.fixture
async def client_pc():  # type: ignore[no-untyped-def]
    """A terminal-side aiortc peer connection for the test, closed afterwards."""
    from aiortc import RTCPeerConnection

    from stream_server.webrtc import rtc_configuration

    pc = RTCPeerConnection(rtc_configuration())
    yield pc
    async with asyncio.timeout(5):
        await pc.close()


@pytest.fixture
def loopback_ice():  # type: ignore[no-untyped-def]
    """aioice gathers host candidates on 127.0.0.1 only (it skips loopback by default)."""
    from stream_server.webrtc import restrict_host_addresses, unrestrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])
    yield
    unrestrict_host_addresses()
    # aiortc leaves close() tasks whose InvalidStateError nobody retrieves; if the garbage
    # collector frees one later, while pytest is rewriting a test module's AST, asyncio's
    # "exception never retrieved" log nests inside that parse and Python 3.11 fails it with
    # "AST constructor recursion depth mismatch". Collect them here, between tests.
    gc.collect()


@pytest.fixture
async def make_env(aiohttp_server, redis_url, models_dir, loopback_ice):  # type: ignore[no-untyped-def]
    """Factory: a running FacePay server (real Redis, models) with policy overrides."""
    from tests.e2e import start_env

    envs = []

    async def make(**policy):  # type: ignore[no-untyped-def]
        env = await start_env(aiohttp_server, redis_url, models_dir, **policy)
        envs.append(env)
        return env

    yield make
    for env in envs:
        await env.close()
