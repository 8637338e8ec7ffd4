"""``facepay enroll``: enrol an account from photos (back-office import).

It reaches the server's Redis as ``facepay serve`` does (``cli_sources`` documents where the
URL, the data folder and the template key come from, ``--config`` included).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import ImageError, QualityError
from session.crypto import TemplateCipher
from session.store import Store
from stream_server.cli import EXIT_OK, EXIT_REFUSED, emit, say
from stream_server.cli_admin import cli_operator, config_arg, operator_arg
from stream_server.cli_server import load_config_args, models_arg, redis_arg, run_cli, with_store
from stream_server.cli_sources import (
    UsageError,
    client_redis_url,
    data_dir_of,
    resolve_template_key,
)


def register(sub: Any) -> None:
    """Add ``enroll`` to the ``facepay`` parser."""
    p = sub.add_parser("enroll", help="enrol an account from photos (back-office import)")
    redis_arg(p)
    operator_arg(p)
    models_arg(p)
    p.add_argument("--account", required=True, help="account id")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--phone", required=True, help="phone number (its last 4 digits narrow)")
    p.add_argument("--consent", action="store_true", help="the person agreed to enrolment")
    config_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--passphrase-stdin", action="store_true", help="read it from stdin")
    src.add_argument("--passphrase-file", default=None, help="read it from a file")
    p.add_argument("images", nargs="+", type=Path, help="photos with one face each")
    p.set_defaults(handler=run_cli(cmd_enroll))


def _read_passphrase(args: argparse.Namespace) -> str:
    if args.passphrase_file:
        try:
            text = Path(args.passphrase_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read passphrase file: {exc.strerror or exc}") from None
    else:
        text = sys.stdin.read()
    return text.rstrip("\r\n")


def cmd_enroll(args: argparse.Namespace) -> int:
    """Enrol an account from photos; prints {"account_id", "templates"}."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.analyzer import FaceAnalyzer
    from pipeline.image import load_image
    from pipeline.models import ModelStore
    from session.crypto import PassphraseHasher, check_passphrase
    from session.directory import Directory
    from session.enrollment import (
        ImageFileError,
        ImageQualityError,
        check_account_fields,
        enroll_from_images,
    )

    if not args.consent:
        say("facepay: consent required: pass --consent once the person has agreed")
        emit({"error": "consent_required", "message": "consent required"})
        return EXIT_REFUSED
    operator = cli_operator(args)
    passphrase = _read_passphrase(args)
    check_passphrase(passphrase)
    check_account_fields(args.account, args.name, args.phone)
    config = load_config_args(args)
    for path in args.images:
        # A missing file is refused before Redis and the models are loaded; the photos
        # themselves are decoded later, one at a time.
        if not Path(path).is_file():
            say(f"facepay: no such image file: {path}")
            emit({"error": ImageError.code, "message": "no such image file", "image": str(path)})
            return EXIT_REFUSED
    # Each photo is read and decoded when its turn comes and dropped once its template is
    # made: one decoded photo (up to 120 MB) at a time, however many are given.
    photos = [functools.partial(load_image, path) for path in args.images]
    cipher = TemplateCipher(resolve_template_key(config, data_dir_of(args, config), create=False))
    url = client_redis_url(args, config)
    analyzer = FaceAnalyzer.from_config(config.pipeline, ModelStore(args.models_dir))

    async def work(store: Store) -> tuple[str, int]:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="facepay-enroll") as pool:
            account, count = await enroll_from_images(
                store=store,
                directory=Directory(config.pipeline.match),  # servers learn via fp:events
                analyzer=analyzer,
                hasher=PassphraseHasher(),
                executor=pool,
                account_id=args.account,
                name=args.name,
                phone=args.phone,
                passphrase=passphrase,
                images=photos,
                consent={
                    "source": "cli",
                    "given_at": f"{time.time():.3f}",
                    "operator": operator,
                },
            )
        return account.account_id, count

    try:
        account_id, count = asyncio.run(
            with_store(url, cipher, work, config.server.audit_max_records, check_key=True)
        )
    except (QualityError, ImageFileError) as exc:
        body: dict[str, Any] = {"error": exc.code, "message": str(exc)}
        if isinstance(exc, QualityError):
            body["reasons"] = list(exc.reasons)
        if isinstance(exc, ImageQualityError | ImageFileError):
            body["image"] = str(args.images[exc.index])
        say(f"facepay: photo refused: {exc}")
        emit(body)
        return EXIT_REFUSED
    emit({"account_id": account_id, "templates": count})
    return EXIT_OK
