"""Health endpoints: ``/healthz`` (alive), ``/readyz`` (can serve), ``/metrics`` (Prometheus).

None of them needs a token and none says anything secret; bind the server to a private
interface (the default is 127.0.0.1) or filter them at the proxy if that matters.
"""

from __future__ import annotations

import asyncio
import threading
import time

from aiohttp import web

from pipeline.errors import FacePayError
from stream_server.app import ANALYZER, METRICS, STORE

#: Prometheus text exposition format 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Longest a readiness probe waits for Redis to answer PING.
PING_TIMEOUT_S = 2.0

_STARTED = web.AppKey("health_started", float)


async def healthz(request: web.Request) -> web.Response:
    """200 while the process runs and its event loop answers."""
    uptime = time.monotonic() - request.app.get(_STARTED, time.monotonic())
    return web.json_response({"status": "ok", "uptime_s": round(uptime, 1)})


async def _redis_ok(app: web.Application) -> bool:
    store = app.get(STORE)
    if store is None:
        return False
    try:
        return await asyncio.wait_for(store.ping(), PING_TIMEOUT_S)
    except (TimeoutError, FacePayError):  # ping() should not raise; a probe must not either
        return False


async def readyz(request: web.Request) -> web.Response:
    """200 when Redis answers PING and the models are loaded; else 503 naming what failed."""
    checks = {
        "redis": "ok" if await _redis_ok(request.app) else "unavailable",
        "models": "ok" if request.app.get(ANALYZER) is not None else "not_loaded",
    }
    ready = all(v == "ok" for v in checks.values())
    failed = [name for name, value in checks.items() if value != "ok"]
    body: dict[str, object] = {"status": "ready" if ready else "not_ready", "checks": checks}
    if failed:
        body["failed"] = failed
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """The app's Prometheus metrics in the text format."""
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": METRICS_CONTENT_TYPE}
    )


async def _name_loop_thread(app: web.Application) -> None:
    app[METRICS].thread_cpu.set_loop_thread(threading.get_native_id())


def setup(app: web.Application) -> None:
    """Add the health routes."""
    app[_STARTED] = time.monotonic()
    app.on_startup.append(_name_loop_thread)  # on_startup runs on the loop's thread
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
