"""``facepay serve`` and what every server-side command shares (``cli_admin`` uses it).

Where the Redis URL, the data folder, the template key and the admin token come from:
``stream_server.cli_sources`` (one resolution for every command).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from pipeline.errors import (
    ConfigError,
    ModelError,
    StoreUnavailable,
)
from session.config import FacePayConfig, load_config
from session.crypto import TemplateCipher
from session.store import Store
from stream_server.cli import EXIT_OK, EXIT_USAGE, emit, say
from stream_server.cli_sources import (
    ENV_ADMIN,
    ENV_DATA,
    ENV_DEV,
    ENV_MODELS,
    ENV_REDIS,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    UsageError,
    data_dir_of,
    env_flag,
    redis_url_of,
    resolve_admin_token,
    resolve_template_key,
)
from stream_server.embedded_redis import EmbeddedRedis
from stream_server.redis_client import connect as connect_redis

_T = TypeVar("_T")


def redact_url(url: str) -> str:
    """The URL with its passwords replaced by ``***``, for printing.

    Read the way redis-py reads it (``urllib.parse``): the password is everything after the
    first ``:`` of the userinfo, which ends at the *last* ``@`` of the host part, so it may
    hold ``:`` and ``@`` itself; and a query field ``password=`` is a password too (as is any
    field whose name holds "pass", such as ``ssl_password``). The user name is kept. A URL
    with nothing to mask comes back unchanged; one that cannot be read, or that has an
    ``@`` outside its host part (a password with a raw ``/``, ``?`` or ``#`` in it, which
    would spill into the path or query), is masked whole rather than half-printed.
    """
    try:
        parts = urlsplit(url)
        if "@" in parts.path + parts.query + parts.fragment:
            raise ValueError("an @ outside the host part")
        netloc, query = parts.netloc, parts.query
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}{':***' if colon else ''}@{host}"
        if query:
            fields = [f.partition("=") for f in query.split("&")]
            query = "&".join(
                f"{name}=***" if "pass" in unquote_plus(name).lower() else name + eq + value
                for name, eq, value in fields
            )
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except Exception:  # it helps print an error: it must never become one itself
        scheme, sep, _ = str(url).partition("://")
        return f"{scheme}://***" if sep and scheme.isalnum() and len(scheme) <= 10 else "***"


async def with_store(
    url: str,
    cipher: TemplateCipher,
    work: Callable[[Store], Awaitable[_T]],
    audit_maxlen: int | None = None,
    *,
    check_key: bool = False,
) -> _T:
    """Run ``work`` on a Store connected to ``url``; UsageError if Redis cannot be reached.
    ``audit_maxlen``: the audit stream's cap (``server.audit_max_records``), for commands
    that have the configuration; the cap the servers published in Redis is used besides
    (``Store.adopt_audit_cap``): it is what they trim to, and what audit-verify checks.
    ``check_key``: first refuse (TemplateKeyMismatch, exit 2) a ``cipher`` that is not the
    key the data in Redis is sealed under (``Store.check_template_key``)."""
    try:
        # The server's own client settings (redis_client: pooled connections are checked).
        client = connect_redis(url, max_connections=2, socket_timeout=10)
    except ValueError as exc:
        raise UsageError(f"bad Redis URL {redact_url(url)}: {exc}") from None
    try:
        store = Store(client, cipher, audit_maxlen=audit_maxlen)
        if not await store.ping():
            raise UsageError(f"cannot reach Redis at {redact_url(url)}")
        await store.adopt_audit_cap(audit_maxlen)
        if check_key:
            await store.check_template_key()
        return await work(store)
    except StoreUnavailable as exc:
        raise UsageError(f"Redis at {redact_url(url)} failed: {exc}") from None
    finally:
        await client.aclose()


def run_cli(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map UsageError (and configuration/connection failures) to exit 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except UsageError as exc:
            say(f"facepay: {exc}")
            emit({"error": "usage", "message": str(exc)})
            return EXIT_USAGE
        except (ConfigError, ModelError, StoreUnavailable) as exc:
            say(f"facepay: {exc}")
            emit({"error": exc.code, "message": str(exc)})
            return EXIT_USAGE

    wrapped.__doc__ = handler.__doc__
    return wrapped


# --- facepay serve -----------------------------------------------------------------------------


def load_config_args(args: argparse.Namespace) -> FacePayConfig:
    server: dict[str, Any] = {}
    for key in ("host", "port"):
        server[key] = getattr(args, key, None)
    if getattr(args, "dev", False) or env_flag(ENV_DEV):
        server["dev_mode"] = True
    try:
        return load_config(getattr(args, "config", None), server=server)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The HTTPS context from --tls-cert/--tls-key (or their env); both or neither."""
    cert = getattr(args, "tls_cert", None) or os.environ.get(ENV_TLS_CERT)
    key = getattr(args, "tls_key", None) or os.environ.get(ENV_TLS_KEY)
    if not cert and not key:
        return None
    if not cert or not key:
        raise UsageError("--tls-cert and --tls-key must be given together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS certificate or key: {exc}") from None
    return context


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM; prints {"url", "redis_url", "dev"} once listening."""
    tls = tls_context(args)
    config = load_config_args(args)
    data_dir = data_dir_of(args, config)
    dev = config.server.dev_mode
    cipher = TemplateCipher(resolve_template_key(config, data_dir, create=dev))
    admin_token = resolve_admin_token(args, config, data_dir)
    if not admin_token and not config.server.admin_operators:
        say(f"facepay: admin API disabled (set {ENV_ADMIN} or --admin-token-file to enable it)")
    # Validated, not copied: a token from the environment or a file meets the same rules
    # (its length) as one in the config file.
    config = config.with_server(admin_token=admin_token or None, data_dir=data_dir)
    loop_name, loop_factory = event_loop_factory(config.server.event_loop)
    redis_url = redis_url_of(args, config)
    embedded: EmbeddedRedis | None = None
    if not redis_url:
        embedded = EmbeddedRedis(data_dir)
        redis_url = embedded.start()
        say(f"facepay: embedded Redis at {redis_url} (pid {embedded.pid})")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(
                _serve(config, cipher, redis_url, args.models_dir, tls, loop_name=loop_name)
            )
    finally:
        if embedded is not None:
            embedded.stop()


def event_loop_factory(
    choice: str,
) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The loop ``server.event_loop`` asks for: (its name, a factory or None for asyncio's).

    "auto" falls back to asyncio's loop where uvloop is not installed; "uvloop" asked for
    explicitly and missing is a usage error, not a silent fallback.
    """
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError(
                "server.event_loop is uvloop but uvloop is not installed "
                "(pip install uvloop, or set it to asyncio)"
            ) from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


async def _serve(
    config: FacePayConfig,
    cipher: TemplateCipher,
    redis_url: str,
    models_dir: str | None,
    tls: ssl.SSLContext | None = None,
    *,
    loop_name: str = "asyncio",
) -> int:
    from aiohttp import web

    from stream_server.app import create_app

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(config, cipher=cipher, redis_url=redis_url, models_dir=models_dir)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        try:
            await runner.setup()  # start-up: Redis, models, directory
        except (StoreUnavailable, ModelError, ConfigError) as exc:
            raise UsageError(f"cannot start: {exc}") from None
        host, port = config.server.host, config.server.port
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        real_port = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if tls is not None else "http"
        emit(
            {
                "url": f"{scheme}://{shown}:{real_port}",
                "redis_url": redact_url(redis_url),
                "dev": config.server.dev_mode,
                "event_loop": loop_name,
            }
        )
        say(f"facepay: serving on {scheme}://{shown}:{real_port} (Ctrl-C stops)")
        await stop.wait()
        say("facepay: stopping")
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    return EXIT_OK


# --- registration ------------------------------------------------------------------------------


def redis_arg(parser: argparse.ArgumentParser, *, serve: bool = False) -> None:
    default = (
        "start an embedded Redis in DATA_DIR"
        if serve
        else "the one a running `facepay serve` wrote to DATA_DIR/redis.url"
    )
    parser.add_argument(
        "--redis-url", default=None, help=f"Redis URL (env {ENV_REDIS}; default: {default})"
    )
    parser.add_argument("--data-dir", default=None, help=f"data folder (env {ENV_DATA}; data)")


def models_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        default=os.environ.get(ENV_MODELS),
        help=f"folder with the model files (env {ENV_MODELS}; default models/)",
    )


def register(sub: Any) -> None:
    """Add ``serve`` to the ``facepay`` parser."""
    p = sub.add_parser("serve", help="run the FacePay server (embedded Redis by default)")
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8080; 0 = any free)")
    redis_arg(p, serve=True)
    models_arg(p)
    p.add_argument(
        "--dev",
        action="store_true",
        help=f"dev mode (env {ENV_DEV}=1): keep a generated template key and admin token "
        "in the data folder",
    )
    p.add_argument("--config", default=None, help="JSON configuration file")
    p.add_argument(
        "--admin-token-file", default=None, help=f"file holding the admin token (env {ENV_ADMIN})"
    )
    p.add_argument(
        "--tls-cert", default=None, help=f"PEM certificate for HTTPS (env {ENV_TLS_CERT})"
    )
    p.add_argument("--tls-key", default=None, help=f"PEM private key for HTTPS (env {ENV_TLS_KEY})")
    p.set_defaults(handler=run_cli(cmd_serve))
