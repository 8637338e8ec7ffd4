"""``facepay models verify`` and ``facepay models fetch``.

``verify`` checks every manifest file's sha256 in a models folder; ``fetch`` downloads the
missing or altered ones (manifest URLs, or one ``--mirror``) and verifies them before they
are renamed into place. JSON on stdout, progress and refusals on stderr.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pipeline.fetch import DEFAULT_TIMEOUT_S, fetch_models
from pipeline.models import ModelStore, resolve_models_dir
from stream_server.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, emit, say

MIRROR_ENV = "FACEPAY_MODELS_MIRROR"


def register(subparsers: Any) -> None:
    """Add the ``models`` command with its ``verify`` and ``fetch`` sub-commands."""
    models = subparsers.add_parser("models", help="check or download the model weights")
    sub = models.add_subparsers(dest="models_command", required=True)

    verify = sub.add_parser("verify", help="check every model file against the manifest sha256")
    verify.add_argument(
        "--models-dir",
        default=None,
        help="models folder (default: $FACEPAY_MODELS_DIR, else models/ in the checkout)",
    )
    verify.set_defaults(handler=cmd_verify)

    fetch = sub.add_parser("fetch", help="download missing models and verify their sha256")
    fetch.add_argument(
        "--dest",
        default=None,
        help="destination folder (default: $FACEPAY_MODELS_DIR, else models/ in the checkout)",
    )
    fetch.add_argument(
        "--mirror",
        default=None,
        help="base URL serving {mirror}/{file}; the only source tried "
        f"(default: ${MIRROR_ENV}, else the manifest URLs)",
    )
    fetch.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per connect/read (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    fetch.set_defaults(handler=cmd_fetch)


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify every model; exit 0 when all match the manifest, 1 otherwise."""
    store = ModelStore(args.models_dir)
    rows = store.verify_all()
    ok = all(bool(row["ok"]) for row in rows)
    for row in rows:
        if row["ok"]:
            continue
        if row.get("found") is None:
            say(f"missing: {row['file']} (expected sha256 {row['expected']})")
        else:
            say(f"altered: {row['file']}: expected sha256 {row['expected']}, found {row['found']}")
    if ok:
        say(f"all {len(rows)} models verified in {store.models_dir}")
    else:
        bad = sum(1 for row in rows if not row["ok"])
        say(f"{bad} of {len(rows)} models failed verification in {store.models_dir}")
    emit({"models_dir": str(store.models_dir), "ok": ok, "models": rows})
    return EXIT_OK if ok else EXIT_REFUSED


def cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch missing models: exit 0 all verified, 1 any refused, 2 nothing reachable."""
    dest: Path = resolve_models_dir(args.dest)
    mirror: str | None = args.mirror or os.environ.get(MIRROR_ENV) or None
    store = ModelStore(dest)
    try:
        results = fetch_models(
            dest, store.manifest, mirror=mirror, timeout=args.timeout, progress=say
        )
    except ValueError as exc:
        say(f"facepay models fetch: {exc}")
        emit({"error": "bad_mirror", "message": str(exc)})
        return EXIT_USAGE
    except OSError as exc:
        say(f"facepay models fetch: cannot use {dest}: {exc}")
        emit({"error": "bad_dest", "message": f"cannot use {dest}: {exc}"})
        return EXIT_USAGE
    failed = [r for r in results if r.status == "failed"]
    emit(
        {
            "dest": str(dest),
            "ok": not failed,
            "models": [r.as_json() for r in results],
        }
    )
    if not failed:
        downloaded = sum(1 for r in results if r.status == "downloaded")
        say(f"all {len(results)} models verified in {dest} ({downloaded} downloaded)")
        return EXIT_OK
    for r in failed:
        say(f"failed: {r.file}: {r.error}")
    if not any(r.reached for r in results):
        say("no download URL could be reached (connection error)")
        return EXIT_USAGE
    return EXIT_REFUSED
