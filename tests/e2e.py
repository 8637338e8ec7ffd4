"""Fixtures' building blocks for end-to-end tests: a real server app on a real Redis."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp.test_utils import TestServer
from aiortc import RTCPeerConnection

from pipeline.align import align
from pipeline.streamgen import StreamSpec, generate_frames
from pipeline.types import ImageArray, focus_box
from session.config import FacePayConfig
from session.crypto import TemplateCipher, generate_key
from session.models import Merchant
from session.store import Store
from stream_server.app import ANALYZER, DIRECTORY, HASHER, REDIS, STORE, create_app
from stream_server.replay_source import ReplayTrack
from stream_server.webrtc import rtc_configuration
from tests.terminal import TestTerminal

PASSPHRASE = "correct horse 42"
#: The in-process servers' admin token (at least 32 characters, as every admin token).
ADMIN_TOKEN = "admin-secret-token-for-e2e-tests-0123"
REPO = Path(__file__).resolve().parent.parent
#: Variables a ``facepay serve`` reads; tests start servers without any of them set.
SERVER_ENV_VARS = (
    "FACEPAY_REDIS_URL",
    "FACEPAY_TEMPLATE_KEY",
    "FACEPAY_ADMIN_TOKEN",
    "FACEPAY_DATA_DIR",
    "FACEPAY_DEV",
    "FACEPAY_TLS_CERT",
    "FACEPAY_TLS_KEY",
)


def spawn_serve(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``facepay serve --dev --port 0 ARGS`` in a clean environment; (process, its first line).

    The caller stops the process (terminate or SIGTERM, then wait).
    """
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_VARS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_server.cli", "serve", "--dev", "--port", "0", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            line = pool.submit(proc.stdout.readline).result(timeout=30)  # type: ignore[union-attr]
        return proc, json.loads(line)
    except BaseException:
        proc.kill()
        proc.wait(timeout=15)
        raise


def camera_frames(
    analyzer: Any, photo: ImageArray, seconds: float = 20, fps: float = 15, seed: int = 0
) -> Iterator[ImageArray]:
    """A camera-view stream of the photo's largest face."""
    focus = focus_box(analyzer.detect(photo))
    spec = StreamSpec(seconds=seconds, fps=fps, seed=seed, cover=True, focus=focus)
    return generate_frames(photo, spec)


def empty_frames(seconds: float = 20, fps: float = 15) -> Iterator[ImageArray]:
    """A camera that sees nobody."""
    frame = np.full((480, 640, 3), 110, np.uint8)
    return itertools.repeat(frame, int(seconds * fps))


async def offer_sdp() -> str:
    """A real aiortc offer with one video track (no connection is ever made)."""
    pc = RTCPeerConnection(rtc_configuration())
    pc.addTrack(ReplayTrack(empty_frames(1), fps=5))
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@dataclass
class Env:
    """A running FacePay server with one merchant and helpers to enrol and connect."""

    server: TestServer
    store: Store
    merchant: Merchant
    token: str
    terminals: list[TestTerminal] = field(default_factory=list)

    @property
    def app(self) -> Any:
        return self.server.app

    @property
    def ws_url(self) -> str:
        return str(self.server.make_url("/ws"))

    async def enroll(
        self,
        account_id: str,
        name: str,
        phone: str,
        photo: ImageArray,
        passphrase: str = PASSPHRASE,
    ) -> str:
        analyzer = self.app[ANALYZER]
        face = max(analyzer.detect(photo), key=lambda f: f.box.area)
        template = analyzer.embedder.embed(align(photo, face))
        hashed = self.app[HASHER].hash(passphrase)
        account, subject = await self.store.create_account(
            account_id, name, phone, hashed, [template], {"method": "test", "terminal": "t"}
        )
        self.app[DIRECTORY].add(subject, [template], account.phone_last4)
        return subject

    async def terminal(self, token: str | None = None, hello: bool = True) -> TestTerminal:
        term = TestTerminal(self.ws_url, token or self.token)
        self.terminals.append(term)
        await term.connect(hello=hello)
        return term

    async def payments(self) -> list[bytes]:
        return [k async for k in self.app[REDIS].scan_iter("fp:pay:*")]

    async def close(self) -> None:
        for term in self.terminals:
            await term.close()


async def start_env(
    aiohttp_server: Any,
    redis_url: str,
    models_dir: Path,
    *,
    server: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    gate: dict[str, Any] | None = None,
    checkout: dict[str, Any] | None = None,
    enrollment: dict[str, Any] | None = None,
    **policy: Any,
) -> Env:
    """Start the app (real Redis, models) with policy overrides (and server/limits/gate/
    checkout/enrollment ones); one merchant + terminal."""
    config = FacePayConfig.model_validate(
        {
            "policy": policy,
            "server": {"admin_token": ADMIN_TOKEN, "workers": 2, **(server or {})},
            "limits": limits or {},
            "gate": gate or {},
            "checkout": checkout or {},
            "enrollment": enrollment or {},
        }
    )
    app = create_app(
        config, cipher=TemplateCipher(generate_key()), redis_url=redis_url, models_dir=models_dir
    )
    server = await aiohttp_server(app)
    store = app[STORE]
    merchant = await store.add_merchant("Shop A")
    _, token = await store.add_terminal(merchant.merchant_id, "checkout")
    return Env(server=server, store=store, merchant=merchant, token=token)


def run_facepay(
    *argv: str, extra_env: dict[str, str] | None = None, drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``facepay ARGV`` as a new process from the checkout, in a clean server environment
    (none of SERVER_ENV_VARS, nor the variables in ``drop``) plus ``extra_env``."""
    env = {k: v for k, v in os.environ.items() if k not in (*SERVER_ENV_VARS, *drop)}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "stream_server.cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def operators_redis(url: str) -> Any:
    """The Redis an operator's FACEPAY_REDIS_URL names, holding data a bench must not touch."""
    import redis

    client = redis.Redis.from_url(url)
    client.set("fp:merchant:real", "production data")
    return client
