"""``facepay admin merchant-add|terminal-add|audit|audit-verify`` (back-office tools;
``facepay enroll`` is in ``cli_enroll``).

They reach the server's Redis as ``facepay serve`` does (``cli_sources`` documents where the
URL, the data folder and the template key come from, ``--config`` included).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InvalidRequest
from session.audit_copy import STATE_FAULTS, check_copy, diverged, parse_copy
from session.config import OPERATOR_NAME
from session.crypto import (
    AUDIT_KEY_PREFIX,
    AuditSealKey,
    TemplateCipher,
    generate_key,
    parse_key,
)
from stream_server.cli import EXIT_OK, EXIT_REFUSED, emit, say
from stream_server.cli_server import load_config_args, redis_arg, run_cli, with_store
from stream_server.cli_sources import (
    UsageError,
    _read_secret,
    client_redis_url,
    data_dir_of,
    resolve_template_key,
)


def operator_arg(p: argparse.ArgumentParser) -> None:
    """``--operator NAME``: who is making a change, for the audit stream."""
    p.add_argument(
        "--operator",
        default=None,
        help="your name for the audit stream, recorded as cli:NAME (default: the login name)",
    )


def cli_operator(args: argparse.Namespace) -> str:
    """The audit's operator for a command-line change: ``cli:`` and ``--operator`` or the
    login name. The ``cli:`` prefix sets it apart from the admin API's operators, who are
    authenticated by their token: a command-line user reaches Redis directly, so the name
    is the one they give, and it says who claimed a change, not who proved it."""
    name = args.operator
    if name is None:
        try:
            name = getpass.getuser()
        except (OSError, KeyError):  # no login name: a container without a passwd entry
            name = "unknown"
    if not OPERATOR_NAME.fullmatch(name):
        raise UsageError("--operator must be 1-64 letters, digits or _.@-")
    return f"cli:{name}"


def config_arg(p: argparse.ArgumentParser) -> None:
    """``--config FILE``: its ``server.redis_url``, ``data_dir`` and ``template_key`` count
    (after the options and the environment), as for ``serve``."""
    p.add_argument("--config", default=None, help="JSON configuration file")


def register(sub: Any) -> None:
    """Add ``admin`` to the ``facepay`` parser."""
    admin = sub.add_parser("admin", help="create merchants and terminals, read the audit")
    asub = admin.add_subparsers(dest="admin_command", required=True)
    p = asub.add_parser("merchant-add", help="create a merchant")
    redis_arg(p)
    operator_arg(p)
    config_arg(p)
    p.add_argument("name", help="merchant name")
    p.set_defaults(handler=run_cli(cmd_merchant_add))
    p = asub.add_parser("terminal-add", help="create a terminal and print its token once")
    redis_arg(p)
    operator_arg(p)
    config_arg(p)
    p.add_argument("--merchant", required=True, help="merchant id")
    p.add_argument("--mode", required=True, choices=("checkout", "gate", "enroll"))
    p.set_defaults(handler=run_cli(cmd_terminal_add))
    p = asub.add_parser("audit", help="print audit records as JSON lines, oldest first")
    redis_arg(p)
    config_arg(p)
    p.add_argument("--after", default=None, help="start after this record id (a cursor)")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (1-10000)")
    p.set_defaults(handler=run_cli(cmd_audit))
    p = asub.add_parser("audit-verify", help="check the audit stream's seals (template key)")
    redis_arg(p)
    config_arg(p)
    p.add_argument(
        "--previous-key-file",
        action="append",
        default=[],
        type=Path,
        help="a key from before a rotation (the template key, or its audit:HEX key) for the "
        "seals made under it (repeatable)",
    )
    p.add_argument(
        "--file",
        type=Path,
        default=None,
        help="check a copy (JSON lines from facepay admin audit) instead of the live stream",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="with --file: also compare the copy with the live stream, record by record",
    )
    p.add_argument(
        "--max-unsealed-age",
        type=float,
        default=None,
        help="seconds a record may stay unsealed (default: 6 x server.audit_seal_s, >= 60; "
        "in a copy, counted to its newest record)",
    )
    p.set_defaults(handler=run_cli(cmd_audit_verify))


# --- facepay admin ... -----------------------------------------------------------------------


def cmd_merchant_add(args: argparse.Namespace) -> int:
    """Create a merchant; prints {"merchant_id", "name"}."""
    url = client_redis_url(args, load_config_args(args))
    operator = cli_operator(args)
    # Merchants and terminals hold no templates: the store's cipher is never used here.
    merchant = asyncio.run(
        with_store(
            url,
            TemplateCipher(generate_key()),
            lambda s: s.add_merchant(args.name, operator=operator),
        )
    )
    emit({"merchant_id": merchant.merchant_id, "name": merchant.name})
    return EXIT_OK


def cmd_terminal_add(args: argparse.Namespace) -> int:
    """Create a terminal; prints {"terminal_id", "token", ...} (the token is shown once)."""
    url = client_redis_url(args, load_config_args(args))
    operator = cli_operator(args)
    terminal, token = asyncio.run(
        with_store(
            url,
            TemplateCipher(generate_key()),
            lambda s: s.add_terminal(args.merchant, args.mode, operator=operator),
        )
    )
    emit(
        {
            "terminal_id": terminal.terminal_id,
            "token": token,
            "merchant_id": terminal.merchant_id,
            "mode": terminal.mode,
        }
    )
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    """Print audit records after ``--after``, one JSON object per line with its ``id``.

    For shipping the stream to storage Redis cannot rewrite: keep the last ``id`` printed
    and pass it as ``--after`` next time. Exit 1 (after printing what is left) when records
    after the cursor were trimmed before they were read; 2 for a malformed cursor or limit.
    """
    url = client_redis_url(args, load_config_args(args))
    try:
        page = asyncio.run(
            with_store(
                url, TemplateCipher(generate_key()), lambda s: s.audit_after(args.after, args.limit)
            )
        )
    except InvalidRequest as exc:
        raise UsageError(str(exc)) from exc
    for rid, fields in page.records:
        emit({"id": rid, **fields})
    if page.missed:
        say(
            f"facepay: audit records after {args.after or 'the start'} were trimmed or "
            "deleted before they were read: a copy has a gap there"
        )
        return EXIT_REFUSED
    return EXIT_OK


def _retired_keys(paths: list[Path]) -> list[AuditSealKey]:
    """The audit keys in ``--previous-key-file`` files: a whole template key, or only its
    audit key (``audit:HEX``, as ``rotate-template-key --retired-audit-key-file`` keeps it)."""
    out = []
    for path in paths:
        text = _read_secret(path, "previous key")
        try:
            if text.startswith(AUDIT_KEY_PREFIX):
                out.append(AuditSealKey.parse(text))
            else:
                out.append(TemplateCipher(parse_key(text)).audit)
        except ConfigError as exc:
            raise UsageError(f"previous key {path}: {exc}") from None
    return out


def _read_copy(path: Path) -> list[tuple[str, dict[str, str]]]:
    try:
        with path.open(encoding="utf-8") as f:
            return parse_copy(f)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (InvalidRequest, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Recompute the audit stream's seals with the template key; print what was found.

    Exit 0 when every seal checks out; 1 when one does not match (records were changed,
    removed or inserted after it was made; a seal whose records left the head counts as not
    checkable only while the stream holds ``server.audit_max_records`` records, enough for
    the cap to have trimmed them), when the chain was restarted (its state in Redis
    was reset or altered), when a seal's key was not given, when records have stayed
    unsealed longer than ``--max-unsealed-age`` (no server sealing, or seals removed; in a
    copy, counted to its newest record), when records were deleted (XDEL) from the live
    stream, when the chain's state names a seal the stream lacks or the stream is gone, and
    with ``--compare`` when the copy and the live stream differ over the copy's ids.
    """
    config = load_config_args(args)
    if args.max_unsealed_age is not None and args.max_unsealed_age <= 0:
        raise UsageError("--max-unsealed-age must be a positive number of seconds")
    cipher = TemplateCipher(resolve_template_key(config, data_dir_of(args, config), create=False))
    retired = _retired_keys(args.previous_key_file)
    if args.compare and args.file is None:
        raise UsageError("--compare needs --file COPY")
    report: dict[str, Any] = {}
    # The cap the servers trim to: a seal over records gone from the head is excused as
    # trimmed only while the stream is long enough for the cap to have trimmed it.
    cap = config.server.audit_max_records
    if args.file is not None:
        rows = _read_copy(args.file)
        check = check_copy(rows, [cipher.audit, *retired])
        if args.compare:
            live = asyncio.run(
                with_store(client_redis_url(args, config), cipher, lambda s: s.audit_records(), cap)
            )
            report["diverged"], report["diverged_ids"] = diverged(
                rows, live.rows, head_trimmed=live.head_trimmed, deleted_upto=live.deleted_upto
            )
    else:
        check = asyncio.run(
            with_store(
                client_redis_url(args, config), cipher, lambda s: s.verify_audit(retired), cap
            )
        )
    emit(dataclasses.asdict(check) | report)
    problems = []
    if report.get("diverged"):
        problems.append(
            f"{report['diverged']} record(s) differ between the copy and the live stream "
            "(changed, removed or inserted on one side): diverged_ids lists them"
        )
    if check.broken:
        problems.append(
            f"{len(check.broken)} audit seal(s) do not match: records were changed, removed "
            "or inserted after they were sealed"
        )
    if check.restarts:
        problems.append(
            f"the seal chain was restarted {len(check.restarts)} time(s): a server found its "
            "state in Redis reset or altered; records before each restart seal may have "
            "been rewritten (compare them with the write-once copy)"
        )
    if check.unknown_key:
        problems.append(
            f"{check.unknown_key} seal(s) were made under a template key that was not given: "
            "pass the key from before a rotation with --previous-key-file"
        )
    if check.deleted_upto:
        problems.append(
            f"records were deleted from the audit stream (XDEL, the newest {check.deleted_upto}"
            "), which FacePay never does: compare the stream with the write-once copy"
        )
    if check.state_fault:
        problems.append(f"audit stream: {STATE_FAULTS[check.state_fault]}")
    interval = config.server.audit_seal_s
    limit = args.max_unsealed_age or (max(60.0, 6 * interval) if interval else None)
    age = check.oldest_unsealed_s
    # A copy's age is counted to its newest record (check_copy): a copy ends where it was
    # read, usually between two seals, but a record much older than its end had its seal
    # written before the end, in the copy.
    if limit is not None and age is not None and age > limit:
        before = " before the copy's newest record" if args.file is not None else ""
        problems.append(
            f"{check.unsealed} record(s) unsealed, the oldest for {age:.0f} s{before} (limit "
            f"{limit:.0f} s): no server is sealing, or seals were removed"
        )
    for problem in problems:
        say(f"facepay: {problem}")
    return EXIT_REFUSED if problems else EXIT_OK
