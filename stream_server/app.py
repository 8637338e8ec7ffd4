"""The aiohttp application factory: ``create_app(config)``.

Shared state lives under ``web.AppKey``s; each resource has its own ``cleanup_ctx`` (Redis
pool, executor, models and directory, peer connections), so start-up and shutdown are
symmetric and a test can build an app on any config.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from pipeline.analyzer import FaceAnalyzer
from pipeline.errors import StoreUnavailable
from pipeline.models import ModelStore
from session.camera_load import CheckoutLoad
from session.config import FacePayConfig
from session.crypto import PassphraseHasher, TemplateCipher
from session.directory import Directory
from session.ratelimit import RateLimiter
from session.store import Store
from stream_server.metrics import Metrics, TimedHasher
from stream_server.redis_client import connect as connect_redis
from stream_server.webrtc import BgrConverter, restore_host_addresses, restrict_host_addresses

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", FacePayConfig)
METRICS = web.AppKey("metrics", Metrics)
REDIS = web.AppKey("redis", aioredis.Redis)
STORE = web.AppKey("store", Store)
LIMITER = web.AppKey("limiter", RateLimiter)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
#: One thread for gallery searches (session.services.SessionServices.identify).
SEARCH_EXECUTOR = web.AppKey("search_executor", ThreadPoolExecutor)
ANALYZER = web.AppKey("analyzer", FaceAnalyzer)
DIRECTORY = web.AppKey("directory", Directory)
HASHER = web.AppKey("hasher", PassphraseHasher)
FRAME_CONVERTER = web.AppKey("frame_converter", BgrConverter)
CIPHER = web.AppKey("cipher", TemplateCipher)
PEERS = web.AppKey("peers", set)  # RTCPeerConnection objects, closed on shutdown
CONNECTIONS = web.AppKey("connections", set)  # open terminal connections
#: Terminals revoked while this server ran (stream_server.revocation).
REVOKED_TERMINALS = web.AppKey("revoked_terminals", set)
#: Token rotations this server was told of, by terminal id (stream_server.revocation).
TOKEN_ROTATIONS = web.AppKey("token_rotations", Counter)
MODELS_DIR = web.AppKey("models_dir", str)
#: How much of its checkout cameras' frames this process analysed lately (load pacing).
CHECKOUT_LOAD = web.AppKey("checkout_load", CheckoutLoad)
#: Optional folder with the browser pages (default: the repository's web_client/).
WEB_ROOT_DIR = web.AppKey("web_root_dir", str)


def create_app(
    config: FacePayConfig,
    *,
    cipher: TemplateCipher,
    redis_url: str,
    models_dir: str | os.PathLike[str] | None = None,
    web_root: str | os.PathLike[str] | None = None,
) -> web.Application:
    """Build the FacePay app. ``redis_url`` is resolved by the caller (embedded or given)."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[CIPHER] = cipher
    app[HASHER] = TimedHasher(app[METRICS].work_clock)
    app[FRAME_CONVERTER] = BgrConverter()
    app[PEERS] = set()
    app[CONNECTIONS] = set()
    app[REVOKED_TERMINALS] = set()
    app[TOKEN_ROTATIONS] = Counter()
    app[CHECKOUT_LOAD] = CheckoutLoad(config.checkout.load_pacing.window_s)
    app[MODELS_DIR] = str(models_dir) if models_dir is not None else ""
    if web_root is not None:
        app[WEB_ROOT_DIR] = str(web_root)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client = connect_redis(redis_url, max_connections=config.server.redis_max_connections)
        app[REDIS] = client
        app[STORE] = Store(
            client, cipher, limits=config.limits, audit_maxlen=config.server.audit_max_records
        )
        # Best effort: a server starting while Redis is down publishes it on its next start.
        with contextlib.suppress(StoreUnavailable):
            await app[STORE].publish_audit_cap()
        app[LIMITER] = RateLimiter(client)
        yield
        await client.aclose()

    async def executor_ctx(app: web.Application) -> AsyncIterator[None]:
        # Inference and argon2 release the GIL: one thread per core keeps both cores busy
        # without oversubscribing (onnxruntime sessions use one intra-op thread each).
        workers = config.server.workers or os.cpu_count() or 2
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="facepay-work")
        app[EXECUTOR] = pool
        yield
        pool.shutdown(wait=True, cancel_futures=True)

    async def search_ctx(app: web.Application) -> AsyncIterator[None]:
        # Gallery searches leave the event loop (up to ~6 ms each at a million templates,
        # longer while an index rebuild's step holds the gallery lock) but not for the
        # inference pool, where a decision's search would queue behind every terminal's
        # frame. One thread: a search is short, and it spares the workers' cores.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facepay-search")
        app[SEARCH_EXECUTOR] = pool
        yield
        pool.shutdown(wait=True, cancel_futures=True)

    async def models_ctx(app: web.Application) -> AsyncIterator[None]:
        store = ModelStore(models_dir, intra_op_threads=1, clock=app[METRICS].model_clock)
        app[ANALYZER] = FaceAnalyzer.from_config(config.pipeline, store)
        # Empty until the sync context subscribes to fp:events and loads it (sync.py).
        app[DIRECTORY] = Directory(config.pipeline.match)
        yield

    async def peers_ctx(app: web.Application) -> AsyncIterator[None]:
        addresses = config.server.ice_addresses
        # Before any peer connection gathers its candidates; undone at shutdown to what was
        # in force before (process-wide: another app in this process may have set it).
        previous = restrict_host_addresses(addresses) if addresses else None
        yield
        peers = app[PEERS]
        for pc in list(peers):
            await pc.close()
        peers.clear()
        if previous is not None:
            restore_host_addresses(previous)

    app.cleanup_ctx.extend([redis_ctx, executor_ctx, search_ctx, models_ctx, peers_ctx])
    _add_routes(app)
    return app


def _add_routes(app: web.Application) -> None:
    from stream_server import admin, audit_seal, health, purge_retry, sync, web, ws

    health.setup(app)
    sync.setup(app)
    purge_retry.setup(app)
    audit_seal.setup(app)
    admin.setup(app)
    ws.setup(app)
    web.setup(app, app.get(WEB_ROOT_DIR))


def json_response(data: Any, status: int = 200) -> web.Response:
    """A compact JSON response."""
    return web.json_response(data, status=status)
