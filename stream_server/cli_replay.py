"""``facepay replay``: stream a SOURCE to a server as a real terminal (DESIGN.md §5).

Exit codes: 0 approved (checkout) or completed (gate); 1 declined, cancelled or timeout;
2 usage or connection errors (bad options or SOURCE, server unreachable, token refused, a
request the server refused before any session started, the connection dropped mid-session).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_server.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, emit, say

if TYPE_CHECKING:  # replay_source imports av and aiortc: only when a replay runs
    from stream_server.replay_source import Box, Locate

TOKEN_ENV = "FACEPAY_TERMINAL_TOKEN"
_AMOUNT = re.compile(r"^\d{1,12}(\.\d{1,2})?$")


def register(sub: Any) -> None:
    """Add the ``replay`` sub-command."""
    p = sub.add_parser(
        "replay",
        help="stream a photo, video or folder to a server as a terminal over WebRTC",
        description="Act as a real terminal: stream SOURCE at real time over WebRTC, print "
        "every server event as a JSON line with t_ms, end with a result line.",
    )
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--token", help=f"terminal token (default: ${TOKEN_ENV})")
    p.add_argument("--mode", required=True, choices=("checkout", "gate"))
    p.add_argument("--amount", help="checkout amount, e.g. 12.50 (required for checkout)")
    p.add_argument("--order-id", help="order id (default: a random replay-... id)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--passphrase-stdin", action="store_true", help="read the passphrase from stdin"
    )
    group.add_argument("--passphrase-file", type=Path, help="read the passphrase from a file")
    p.add_argument("--phone-last4", help="last four phone digits, if the server asks")
    p.add_argument("--fps", type=float, default=15.0, help="frames per second (default 15)")
    p.add_argument(
        "--duration", type=float, default=20.0, help="seconds of SOURCE to stream (default 20)"
    )
    # Longer than the server's own session timeout (60 s by default), so that a session
    # that never decides ends with the server's verdict rather than the client giving up.
    p.add_argument(
        "--timeout", type=float, default=90.0, help="give up after this many seconds (90)"
    )
    p.add_argument(
        "--focus",
        help="photo SOURCE: centre on this box X1,Y1,X2,Y2 in photo pixels "
        "(default: the largest face the detector finds, else the centre)",
    )
    p.add_argument(
        "--models-dir",
        default=os.environ.get("FACEPAY_MODELS_DIR"),
        help="models used only to find the face to frame in SOURCE "
        "(env FACEPAY_MODELS_DIR; default models/; without them SOURCE is centred)",
    )
    p.add_argument(
        "--loopback",
        action="store_true",
        help="offer ICE candidates on 127.0.0.1 only (server on this machine)",
    )
    p.add_argument("source", metavar="SOURCE", help="a photo, a video file or a folder of photos")
    p.set_defaults(handler=_replay)


def _usage(message: str) -> int:
    say(f"facepay replay: {message}")
    emit({"error": "usage", "message": message})
    return EXIT_USAGE


def _read_passphrase(args: argparse.Namespace) -> str | None:
    """The passphrase from stdin or a file (first line, newline stripped), or None."""
    if args.passphrase_stdin:
        text = sys.stdin.readline()
    elif args.passphrase_file is not None:
        with open(args.passphrase_file, encoding="utf-8") as f:
            text = f.readline()
    else:
        return None
    text = text.rstrip("\r\n")
    if not text:
        raise ValueError("the passphrase is empty")
    return text


def _parse_focus(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 4 or not (parts[2] > parts[0] and parts[3] > parts[1]):
        raise ValueError("--focus must be X1,Y1,X2,Y2 with X2 > X1 and Y2 > Y1")
    return parts[0], parts[1], parts[2], parts[3]


def _face_locator(models_dir: str | None) -> Locate | None:
    """The largest face's box in a photo, so the camera view frames it; None without models.

    A camera in front of a shopper frames the face, while a centre crop of a tall portrait
    often shows a chest: streaming that would test nothing.
    """
    from pipeline.analyzer import FaceAnalyzer
    from pipeline.config import PipelineConfig
    from pipeline.errors import ModelError
    from pipeline.models import ModelStore
    from pipeline.types import focus_box

    try:
        analyzer = FaceAnalyzer.from_config(PipelineConfig(), ModelStore(models_dir))
    except ModelError as exc:
        say(f"facepay replay: SOURCE is centred, not framed on a face ({exc}); see --focus")
        return None

    def locate(image: Any) -> Box | None:
        return focus_box(analyzer.detect(image))

    return locate


def _replay(args: argparse.Namespace) -> int:
    from stream_server import replay
    from stream_server.webrtc import restrict_host_addresses

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        return _usage(f"a terminal token is needed (--token or ${TOKEN_ENV})")
    if args.mode == "checkout" and args.amount is None:
        return _usage("--amount is required in checkout mode")
    if args.amount is not None and not _AMOUNT.match(args.amount):
        return _usage("--amount must be a positive decimal with at most two decimals")
    if args.phone_last4 is not None and not re.fullmatch(r"\d{4}", args.phone_last4):
        return _usage("--phone-last4 must be four digits")
    if not 0 < args.fps <= 60:
        return _usage("--fps must be in (0, 60]")
    if not args.duration > 0 or not args.timeout > 0:
        return _usage("--duration and --timeout must be positive")
    try:
        passphrase = _read_passphrase(args)
        focus = _parse_focus(args.focus)
    except (OSError, ValueError) as exc:
        return _usage(str(exc))
    # Frame the face in photos, folders and videos alike (--focus: photos only, explicit).
    locate = _face_locator(args.models_dir) if focus is None else None
    if args.loopback:
        restrict_host_addresses(["127.0.0.1"])
    try:
        result = asyncio.run(
            replay.run_replay(
                args.server,
                token,
                args.mode,
                args.source,
                amount=args.amount,
                order_id=args.order_id,
                passphrase=passphrase,
                phone_last4=args.phone_last4,
                fps=args.fps,
                duration_s=args.duration,
                timeout_s=args.timeout,
                focus=focus,
                locate=locate,
                out=emit,
            )
        )
    except (
        replay.ReplaySourceError,
        replay.ReplayConnectionError,
        replay.ReplayAuthError,
        replay.ReplayProtocolError,
    ) as exc:
        say(f"facepay replay: {exc}")
        emit({"type": "error", "error": exc.code, "message": str(exc)})
        return EXIT_USAGE
    outcome = result.get("outcome")
    if result.get("reason") == "disconnected":
        say("facepay replay: the server dropped the connection")
        return EXIT_USAGE
    if outcome in ("approved", "completed"):
        return EXIT_OK
    say(f"facepay replay: {outcome} ({result.get('reason')})")
    return EXIT_REFUSED
