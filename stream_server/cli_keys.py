"""``facepay rotate-template-key``: re-encrypt every stored face template under a new key.

Procedure (docs/api.md "Rotating the template key"): stop the servers, run this with the
current key (``FACEPAY_TEMPLATE_KEY``, the config or the dev key file) and the new one
(``FACEPAY_NEW_TEMPLATE_KEY`` or ``--new-key-file``), then start the servers with the new
key. The run is resumable: interrupted, it can be run again with the same two keys. Redis's
key check (session/_store_keycheck.py) refuses a current key that is not the data's, and
keeps servers and enrolments out until the rotation has finished.

Without a Redis URL (option, environment or config) it works on the dev data folder: it
refuses while a ``facepay serve --dev`` runs there (that server would go on sealing new
enrolments under the old key), else starts the embedded Redis itself for the run. There the
old key is kept beside the new one (``template.key.old``, mode 0600).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InvalidRequest, TemplateKeyMismatch
from session.crypto import TemplateCipher, parse_key
from stream_server.cli import EXIT_OK, EXIT_REFUSED, emit, say
from stream_server.cli_admin import cli_operator, config_arg, operator_arg
from stream_server.cli_server import load_config_args, redis_arg, run_cli, with_store
from stream_server.cli_sources import (
    ENV_KEY,
    KEY_FILE,
    UsageError,
    _read_secret,
    _write_secret,
    data_dir_of,
    redis_url_of,
    resolve_template_key,
)
from stream_server.embedded_redis import EmbeddedRedis

ENV_NEW_KEY = "FACEPAY_NEW_TEMPLATE_KEY"


def _new_key(args: argparse.Namespace) -> bytes:
    if args.new_key_file:
        secret = _read_secret(Path(args.new_key_file), "new template key")
    else:
        secret = os.environ.get(ENV_NEW_KEY, "")
    if not secret:
        raise UsageError(f"no new key: pass --new-key-file FILE or set {ENV_NEW_KEY}")
    try:
        return parse_key(secret)
    except ConfigError as exc:
        raise UsageError(f"new template key: {exc}") from None


def cmd_rotate_template_key(args: argparse.Namespace) -> int:
    """Re-encrypt all templates; prints {"subjects", "templates"} (how many were rewritten)."""
    config = load_config_args(args)
    data_dir = data_dir_of(args, config)
    old_key = resolve_template_key(config, data_dir, create=False)
    new_key = _new_key(args)
    if new_key == old_key:
        raise UsageError("the new template key is the current one")
    url = redis_url_of(args, config)
    embedded = None
    if url is None:
        embedded = EmbeddedRedis(data_dir)
        if not embedded.dir.is_dir():
            raise UsageError(
                f"no Redis: pass --redis-url (or set FACEPAY_REDIS_URL, or server.redis_url in "
                f"--config); {data_dir} holds no embedded Redis data to rotate"
            )
        if embedded.answering():
            say(
                f"facepay: a server is running on the data folder {data_dir} (its embedded "
                "Redis answers): stop it first; a running server keeps sealing new "
                "enrolments under the old key"
            )
            emit({"error": "server_running", "message": "stop the server first"})
            return EXIT_REFUSED
    operator = cli_operator(args)
    new_cipher = TemplateCipher(new_key)
    if args.retired_audit_key_file:
        # Kept before anything changes: the old audit seals stay checkable once the old
        # template key is destroyed (which is what makes old backups unreadable).
        retired, kept = Path(args.retired_audit_key_file), TemplateCipher(old_key).audit.export()
        if not retired.exists():
            _write_secret(retired, kept)
        elif _read_secret(retired, "retired audit key") != kept:  # same: a run resumed
            raise UsageError(f"{retired} holds another key; choose a new file")
    try:
        if embedded is not None:  # set exactly when no URL was given
            url = embedded.start()
            say(f"facepay: started the embedded Redis in {embedded.dir} for the rotation")
        assert url is not None
        subjects, templates = asyncio.run(
            with_store(
                url,
                TemplateCipher(old_key),
                lambda s: s.rekey_templates(new_cipher, operator=operator),
                config.server.audit_max_records,
            )
        )
    except TemplateKeyMismatch as exc:
        raise UsageError(str(exc)) from None
    except InvalidRequest as exc:
        say(f"facepay: template key rotation stopped: {exc}")
        emit({"error": exc.code, "message": str(exc)})
        return EXIT_REFUSED
    finally:
        if embedded is not None:
            embedded.stop()
    key_file = data_dir / KEY_FILE
    uses_key_file = not os.environ.get(ENV_KEY) and config.server.template_key is None
    if uses_key_file and key_file.exists():
        _replace_key_file(key_file, old_key, new_key)
    else:
        say(f"facepay: done; start the servers with the new key ({ENV_NEW_KEY}'s value)")
    emit({"subjects": subjects, "templates": templates})
    return EXIT_OK


def _replace_key_file(key_file: Path, old_key: bytes, new_key: bytes) -> None:
    """Dev mode keeps the key in the data folder: the servers must find the new one there.
    The old one is kept as ``template.key.old`` (0600; numbered if that holds another key)
    first, then the new one is written beside and renamed over: at every moment one complete
    key is on disk, and no key is lost."""
    for n in range(100):
        kept = key_file.with_name(KEY_FILE + ".old" + (f".{n}" if n else ""))
        if not kept.exists():
            _write_secret(kept, old_key.hex())
            break
        if _read_secret(kept, "old template key") == old_key.hex():
            break  # kept by a run that stopped before the key file was replaced
    else:
        raise UsageError(f"too many old keys beside {key_file}; move them away")
    say(f"facepay: the old key is kept in {kept}: delete it once no backup needs it")
    fresh = key_file.with_name(KEY_FILE + ".new")
    fresh.unlink(missing_ok=True)
    _write_secret(fresh, new_key.hex())
    os.replace(fresh, key_file)
    say(f"facepay: the new key replaced {key_file}")


def register(sub: Any) -> None:
    """Add ``rotate-template-key`` to the ``facepay`` parser."""
    p = sub.add_parser(
        "rotate-template-key",
        help="re-encrypt the stored face templates under a new key (servers stopped)",
    )
    redis_arg(p)
    operator_arg(p)
    config_arg(p)
    p.add_argument(
        "--new-key-file", default=None, help=f"file holding the new key (env {ENV_NEW_KEY})"
    )
    p.add_argument(
        "--retired-audit-key-file",
        default=None,
        help="write the old key's audit seal key here (a new file), for "
        "facepay admin audit-verify --previous-key-file after the old key is destroyed",
    )
    p.set_defaults(handler=run_cli(cmd_rotate_template_key))
