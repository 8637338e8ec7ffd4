"""The ``facepay`` command line.

Contract (DESIGN.md §5): JSON on stdout, human messages on stderr; exit 0 on success, 1 on a
refused operation, 2 on a usage or connection error. Each sub-command lives in its own
``cli_*`` module exposing ``register(subparsers)``; handlers return an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.errors import FacePayError
from pipeline.peek import MAX_PIXELS

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def emit(obj: Any) -> None:
    """Print one JSON object on stdout (one line)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def say(message: str) -> None:
    """A human message on stderr."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors, as the contract wants; keep it but print to stderr."""


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every sub-command registered."""
    from stream_server import (
        cli_admin,
        cli_bench,
        cli_enroll,
        cli_gallery,
        cli_gate,
        cli_keys,
        cli_models,
        cli_pipeline,
        cli_replay,
        cli_scene,
        cli_server,
    )

    parser = _Parser(prog="facepay", description="FacePay face payment server and tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (
        cli_models,
        cli_pipeline,
        cli_server,
        cli_admin,
        cli_enroll,
        cli_replay,
        cli_scene,
        cli_gate,
        cli_bench,
        cli_gallery,
        cli_keys,
    ):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``facepay`` console script."""
    # Before numpy loads: its BLAS threads compete with the inference and search threads on
    # small machines (a 60k-template exact search took 15 ms with 2 BLAS threads under load,
    # 2.7 ms with 1; docs/gallery.md). An operator's own setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Before OpenCV loads: it reads its decoded-size limit once, when the library is loaded
    # (setting it after ``import cv2`` has no effect; checked with OpenCV 5.0), and its default
    # is 2**30 pixels, a 3 GB decode. A second line behind pipeline.peek, which refuses such
    # files first; decode_image turns OpenCV's refusal into an ImageError.
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except FacePayError as exc:
        say(f"facepay: {exc}")
        emit({"error": exc.code, "message": str(exc)})
        return EXIT_REFUSED
    except KeyboardInterrupt:
        say("facepay: interrupted")
        return 130
    except BrokenPipeError:
        # The reader left early (`facepay admin audit | head`): not a crash. Point stdout
        # at /dev/null so that the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        say("facepay: output closed before everything was written")
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
