"""``facepay scene``: render a reproducible walk-through scene (video + JSON spec).

The scene is one of ``pipeline.scene``'s presets (1, 3 or 5 people, or one person who turns
away); the photos it names are read from ``--data-dir`` and their faces found with the real
detector. The video and ``FILE.json`` (the spec: photo paths and motion, nothing biometric)
are written side by side; stdout gets {"video", "scene", "frames", "people"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from stream_server.cli import EXIT_OK, EXIT_USAGE, emit, say

DATA_ENV = "FACEPAY_TEST_DATA"
DEFAULT_DATA = Path("..") / "shared" / "data"
#: Longest video ``--seconds`` renders (10 minutes of 640x480 at 30 fps).
MAX_SECONDS = 600.0


def register(sub: Any) -> None:
    """Add the ``scene`` sub-command."""
    p = sub.add_parser(
        "scene",
        help="render a walk-through gate scene from photos (video + JSON spec)",
        description="Render a preset walk-through scene: people walk towards a gate camera, "
        "grow, cross and occlude each other; optionally a print attacker.",
    )
    p.add_argument("--out", required=True, type=Path, help="video file: .avi, .mp4 or .y4m")
    p.add_argument("--people", type=int, default=3, choices=(1, 3, 5), help="preset size (3)")
    p.add_argument(
        "--turn-away",
        action="store_true",
        help="instead: one person who turns away before showing enough face",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="video length: longer than the preset adds an empty corridor after the walkers "
        f"(a mostly idle gate); at most {MAX_SECONDS:g}",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"root of the photos (env {DATA_ENV}, default {DEFAULT_DATA})",
    )
    p.add_argument(
        "--models-dir",
        default=os.environ.get("FACEPAY_MODELS_DIR"),
        help="folder with the model files (env FACEPAY_MODELS_DIR; default models/)",
    )
    p.set_defaults(handler=cmd_scene)


def _usage(message: str) -> int:
    say(f"facepay scene: {message}")
    emit({"error": "usage", "message": message})
    return EXIT_USAGE


def cmd_scene(args: argparse.Namespace) -> int:
    """Render the scene; exit 0, or 2 on bad options or missing photos."""
    from pipeline.analyzer import FaceAnalyzer
    from pipeline.config import PipelineConfig
    from pipeline.image import load_image
    from pipeline.models import ModelStore
    from pipeline.scene_presets import largest_face_box, preset_scene, preset_turn_away, write_scene

    out: Path = args.out
    if out.suffix.lower() not in (".avi", ".mp4", ".y4m"):
        return _usage(f"--out must end in .avi, .mp4 or .y4m, got {out.name!r}")
    if not out.parent.is_dir():
        return _usage(f"folder {out.parent} does not exist")
    data = Path(args.data_dir or os.environ.get(DATA_ENV) or DEFAULT_DATA)
    spec = preset_turn_away(args.seed) if args.turn_away else preset_scene(args.people, args.seed)
    if args.seconds is not None:
        if not spec.seconds <= args.seconds <= MAX_SECONDS:
            return _usage(f"--seconds must be {spec.seconds:g} to {MAX_SECONDS:g} for this scene")
        spec = dataclasses.replace(spec, seconds=args.seconds)
    missing = [a.photo for a in spec.actors if not (data / a.photo).is_file()]
    if missing:
        return _usage(f"photos not found under {data} (set --data-dir or {DATA_ENV}): {missing}")
    analyzer = FaceAnalyzer.from_config(PipelineConfig(), ModelStore(args.models_dir))
    say(f"facepay scene: rendering {len(spec.actors)} people, {spec.seconds:g} s, to {out}")
    result = write_scene(
        spec, out, lambda rel: load_image(data / rel), largest_face_box(analyzer.detect)
    )
    emit(result)
    return EXIT_OK
