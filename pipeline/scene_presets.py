"""Scene files and preset scenes for :mod:`pipeline.scene`.

``write_scene`` renders a spec to a video and saves the spec beside it as JSON (photo paths
and motion, nothing biometric); ``preset_scene`` and ``preset_turn_away`` are the
reproducible queues the gate tests, ``facepay scene`` and ``facepay bench-gate`` use.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.scene import (
    CORRIDOR,
    SCENE_FORMAT,
    Actor,
    ActorState,
    BoxT,
    FaceBoxFn,
    Kind,
    LoadFn,
    SceneSpec,
    reach_times,
    render_scene,
)
from pipeline.streamgen import write_video, write_y4m
from pipeline.types import Face, ImageArray, focus_box


def largest_face_box(detect: Callable[[ImageArray], Sequence[Face]]) -> FaceBoxFn:
    """A ``face_box`` for ``render_scene`` from a detector (e.g. ``FaceAnalyzer.detect``)."""

    def face_box(image: ImageArray) -> BoxT:
        box = focus_box(detect(image))
        if box is None:
            raise ValueError("no face found in an actor's photo")
        return box

    return face_box


def scene_to_json(spec: SceneSpec) -> dict[str, Any]:
    """The spec as a JSON-ready dict (photo paths and motion; nothing biometric)."""
    body = asdict(spec)
    body["background"] = [list(c) for c in spec.background]
    return {"format": SCENE_FORMAT, **body}


def scene_from_json(obj: dict[str, Any]) -> SceneSpec:
    """Rebuild a spec saved by ``scene_to_json`` (ValueError on a foreign or bad object)."""
    if not isinstance(obj, dict) or obj.get("format") != SCENE_FORMAT:
        raise ValueError(f"not a {SCENE_FORMAT} object")
    body = {k: v for k, v in obj.items() if k != "format"}
    try:
        actors = tuple(Actor(**a) for a in body.pop("actors", []))
        top, bottom = body.pop("background", CORRIDOR)
        return SceneSpec(actors=actors, background=(tuple(top), tuple(bottom)), **body)
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"bad scene: {exc}") from exc


def write_scene(
    spec: SceneSpec,
    out_path: str | Path,
    load: LoadFn,
    face_box: FaceBoxFn,
    reach_px: float | None = None,
) -> dict[str, Any]:
    """Render the scene to ``.avi`` (MJPG), ``.mp4`` or ``.y4m`` and save its spec beside it
    (``out_path.with_suffix(".json")``). Returns {"video", "scene", "frames", "people"}, and
    with ``reach_px`` also "reach_s": :func:`~pipeline.scene.reach_times` at that size."""
    out = Path(out_path)
    suffix = out.suffix.lower()
    if suffix not in (".avi", ".mp4", ".y4m"):
        raise ValueError(f"unknown video extension {suffix!r}; use .avi, .mp4 or .y4m")
    truth: list[list[ActorState]] = []

    def frames() -> Iterator[ImageArray]:
        for frame, states in render_scene(spec, load, face_box):
            truth.append(states)
            yield frame

    count = (write_y4m if suffix == ".y4m" else write_video)(frames(), out, spec.fps)
    scene = out.with_suffix(".json")
    scene.write_text(json.dumps(scene_to_json(spec), indent=2) + "\n", encoding="utf-8")
    written: dict[str, Any] = {
        "video": str(out),
        "scene": str(scene),
        "frames": count,
        "people": len(spec.actors),
    }
    if reach_px is not None:
        written["reach_s"] = reach_times(truth, spec.fps, reach_px)
    return written


# --- presets ------------------------------------------------------------------------------
# Photos (walk, enrol): the walk photo is the one of each pair that reads live best in the
# composited scene (fused p_real alone, seeds 0-1, 60 -> 150 px): obama 0.90 / obama3 0.85,
# john1 0.98 / john2 0.81, biden 0.90 / biden2 0.53.
PHOTOS: dict[str, tuple[str, str | None]] = {
    "obama": ("faces/obama/obama.jpg", "faces/obama/obama3.jpg"),
    "kit_harington": ("faces/kit_harington/john1.jpeg", "faces/kit_harington/john2.jpeg"),
    "biden": ("faces/biden/biden.jpg", "faces/biden/biden2.jpg"),
    "unknown": ("spoof/image_T1.jpg", None),  # a genuine capture, not enrolled
    # A printed photo of an enrolled victim: enrolled, yet the gate must deny it as spoof.
    "attacker": ("spoof/image_F1.jpg", "spoof/image_F1.jpg"),
}
# name: (enter_s, exit_s, x0, x1, face1_px); faces start at 60 px. Walkers enter 0.4 s apart
# and head for the sides (people pass beside the camera), so they cross while still small
# and nobody is hidden right behind a person who leaves (a tracker could hand the track
# over). The print is scored (>= ~86 px) only once it is alone: a live face inside its 4x
# crop made it read live (fused 0.54-0.95 with a walker 130-250 px away).
_LAYOUTS: dict[int, tuple[float, dict[str, tuple[float, float, float, float, float]]]] = {
    1: (2.8, {"obama": (0.1, 2.6, 0.45, 0.55, 150)}),
    3: (3.4, {"obama": (0.1, 2.5, 0.3, 0.62, 150), "kit_harington": (0.5, 2.9, 0.54, 0.2, 150),
              "unknown": (0.9, 3.3, 0.88, 0.84, 150)}),
    5: (4.3, {"biden": (0.0, 2.0, 0.52, 0.95, 140), "obama": (0.4, 2.4, 0.66, 0.05, 140),
              "kit_harington": (0.8, 2.8, 0.4, 0.95, 140), "unknown": (1.2, 3.2, 0.6, 0.05, 140),
              "attacker": (2.3, 4.3, 0.5, 0.5, 140)}),
}  # fmt: skip


def _cast(name: str, **kw: Any) -> Actor:
    walk, enrol = PHOTOS[name]
    kind: Kind = "print" if name == "attacker" else "live"
    return Actor(name, walk, kind, enrolled=enrol is not None, enroll_photo=enrol, **kw)


def preset_scene(n_people: int, seed: int = 0) -> SceneSpec:
    """A walk-through queue of 1, 3 or 5 people (``_LAYOUTS``).

    1: obama. 3: obama and kit_harington (enrolled) cross, an unknown person follows on the
    right. 5: biden, obama, kit_harington and the unknown, 4 in view at once, then a print
    attacker in the middle once they have passed. The seed jitters entry times (+-0.04 s,
    not the first) and paths (+-0.012 of the width).
    """
    if n_people not in _LAYOUTS:
        raise ValueError(f"preset scenes have 1, 3 or 5 people, got {n_people}")
    seconds, layout = _LAYOUTS[n_people]
    rng = np.random.default_rng([seed, 7])
    actors = []
    for i, (name, (enter, leave, x0, x1, face1)) in enumerate(layout.items()):
        de, d0, d1 = (float(v) for v in rng.uniform(-1, 1, 3))
        enter = round(enter + 0.04 * de, 3) if i else enter
        actors.append(_cast(name, enter_s=enter, exit_s=leave, x0=round(x0 + 0.012 * d0, 3),
                            x1=round(x1 + 0.012 * d1, 3), face0_px=60, face1_px=face1))  # fmt: skip
    return SceneSpec(seconds=seconds, actors=tuple(actors), seed=seed)


def preset_turn_away(seed: int = 0) -> SceneSpec:
    """One enrolled person appears small (45 px) and turns away at ~68 px, before the quality
    gate (64 px face width, ~86 px height) lets any frame count: never enough evidence."""
    actor = _cast("obama", enter_s=0.1, exit_s=3.0, x0=0.4, x1=0.5, face0_px=45, face1_px=130,
                  turn_away_s=0.9)  # fmt: skip
    return SceneSpec(seconds=3.0, actors=(actor,), seed=seed)
