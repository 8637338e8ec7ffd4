"""Where the server-side commands find their Redis, data folder and secrets.

One resolution for every command (``serve``, ``enroll``, ``admin``, ``rotate-template-key``);
an option wins over its environment variable, which wins over the config file (``--config``):
- Redis: ``--redis-url`` / ``FACEPAY_REDIS_URL`` / config ``server.redis_url``; ``serve``
  without one starts an embedded redis-server in the data folder, and the other commands
  without one use the URL that embedded server wrote to ``DATA_DIR/redis.url``
  (``rotate-template-key`` starts the embedded server itself when none runs).
- Data folder: ``--data-dir`` / ``FACEPAY_DATA_DIR`` / config ``server.data_dir`` (``data``).
- Template key: ``FACEPAY_TEMPLATE_KEY`` / config; else ``DATA_DIR/template.key`` if it
  exists (dev mode, ``--dev`` or ``FACEPAY_DEV=1``, makes it once, mode 0600; any command
  reads it, so the client commands find the dev server's key); else refused (exit 2).
  Redis keeps a check value of the key its data is sealed under (session/_store_keycheck.py):
  a key that does not match it is refused (exit 2).
- Admin token: ``--admin-token-file`` / ``FACEPAY_ADMIN_TOKEN`` / config; else, in dev mode,
  ``DATA_DIR/admin.token`` (made once); else the admin API is disabled.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from pipeline.errors import ConfigError
from session.config import FacePayConfig, check_admin_token
from session.crypto import generate_key, parse_key
from stream_server.cli import say
from stream_server.embedded_redis import read_url_file

ENV_REDIS = "FACEPAY_REDIS_URL"
ENV_MODELS = "FACEPAY_MODELS_DIR"
ENV_ADMIN = "FACEPAY_ADMIN_TOKEN"
ENV_KEY = "FACEPAY_TEMPLATE_KEY"
ENV_DATA = "FACEPAY_DATA_DIR"
ENV_DEV = "FACEPAY_DEV"
ENV_TLS_CERT = "FACEPAY_TLS_CERT"
ENV_TLS_KEY = "FACEPAY_TLS_KEY"
KEY_FILE = "template.key"
ADMIN_TOKEN_FILE = "admin.token"


class UsageError(Exception):
    """A usage, configuration or connection problem: message on stderr, exit 2."""


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _write_secret(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (refuses to overwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if not text:
        raise UsageError(f"{what} file {path} is empty")
    return text


def resolve_template_key(config: FacePayConfig, data_dir: Path, *, create: bool) -> bytes:
    """The template key: env, config, else (dev) ``data_dir/template.key``; UsageError if none.

    ``create`` (``serve --dev``) makes the key file when missing; ``enroll`` only reads it.
    """
    secret = os.environ.get(ENV_KEY) or (
        config.server.template_key.get_secret_value() if config.server.template_key else None
    )
    path = data_dir / KEY_FILE
    try:
        if secret:
            return parse_key(secret)
        if path.exists():
            return parse_key(_read_secret(path, "template key"))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if create:
        key = generate_key()
        _write_secret(path, key.hex())
        say(f"facepay: dev mode: generated a template key in {path} (keep it: it decrypts faces)")
        return key
    raise UsageError(
        f"no template key: set {ENV_KEY} (64 hex characters; e.g. "
        "python -c 'import secrets; print(secrets.token_hex(32))'), "
        f"or run facepay serve --dev once to keep one in {path}"
    )


def _long_enough(token: str, source: str) -> str:
    """``token`` if long enough, else ConfigError naming where it came from (the config
    file's own token is checked when the file is read, under its field's name)."""
    try:
        check_admin_token(SecretStr(token))
    except ValueError as exc:
        raise ConfigError(f"the admin token from {source} is too short: {exc}") from exc
    return token


def resolve_admin_token(args: argparse.Namespace, config: FacePayConfig, data_dir: Path) -> str:
    """The admin token, or "" (admin API disabled)."""
    if args.admin_token_file:
        return _long_enough(
            _read_secret(Path(args.admin_token_file), "admin token"), "--admin-token-file"
        )
    if os.environ.get(ENV_ADMIN):
        return _long_enough(os.environ[ENV_ADMIN], ENV_ADMIN)
    token = config.server.admin_token.get_secret_value() if config.server.admin_token else ""
    if token or not config.server.dev_mode:
        return token
    path = data_dir / ADMIN_TOKEN_FILE
    if not path.exists():
        _write_secret(path, "fpa_" + secrets.token_urlsafe(32))
        say(f"facepay: dev mode: generated an admin token in {path}")
    else:
        say(f"facepay: dev mode: admin token in {path}")
    return _read_secret(path, "admin token")


def data_dir_of(args: argparse.Namespace, config: FacePayConfig) -> Path:
    """The data folder: ``--data-dir``, ``FACEPAY_DATA_DIR``, config ``server.data_dir``."""
    given = getattr(args, "data_dir", None) or os.environ.get(ENV_DATA)
    return Path(given or config.server.data_dir)


def redis_url_of(args: argparse.Namespace, config: FacePayConfig) -> str | None:
    """The Redis URL given: ``--redis-url``, ``FACEPAY_REDIS_URL``, config
    ``server.redis_url``; None if none (``serve`` then starts the embedded Redis)."""
    url = getattr(args, "redis_url", None) or os.environ.get(ENV_REDIS) or config.server.redis_url
    return str(url) if url else None


def client_redis_url(args: argparse.Namespace, config: FacePayConfig) -> str:
    """The Redis URL a client command uses: the one given (:func:`redis_url_of`), else the
    running embedded server's ``DATA_DIR/redis.url``; UsageError if neither."""
    url = redis_url_of(args, config)
    if url:
        return url
    data_dir = data_dir_of(args, config)
    url = read_url_file(data_dir)
    if url:
        return url
    raise UsageError(
        f"no Redis: pass --redis-url (or set {ENV_REDIS}, or server.redis_url in --config), "
        f"or start facepay serve --dev with the same data folder ({data_dir})"
    )
