"""Seal the audit stream every ``server.audit_seal_s`` seconds (session._store_audit).

Every server runs the sealer; a short lock in Redis lets one of them seal at a time. A
server seals once more when it stops, so that an orderly shutdown leaves nothing unsealed.
"""

from __future__ import annotations

from aiohttp import web

from stream_server.app import CONFIG, METRICS, STORE
from stream_server.background import periodic_ctx

_STARTED = web.AppKey("audit_seal_started", bool)


def setup(app: web.Application) -> None:
    """Seal new audit records for the app's lifetime, unless turned off (idempotent)."""
    if _STARTED in app:
        return
    app[_STARTED] = True

    def interval(app: web.Application) -> float | None:
        return app[CONFIG].server.audit_seal_s

    async def job(app: web.Application) -> None:
        store = app[STORE]
        before = store.audit_chain_restarts
        await store.seal_audit()
        app[METRICS].audit_chain_restarts.inc(store.audit_chain_restarts - before)

    app.cleanup_ctx.append(periodic_ctx("facepay-audit-seal", job, interval, final_s=5.0))
