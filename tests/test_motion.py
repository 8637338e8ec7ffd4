"""The idle check before the detector (pipeline.motion): it must see every face the detector
would find, and let an empty view skip the detector.

The mechanism is tested on synthetic arrays; the claim that it misses no face is tested on
walk-through scenes rendered from the shared photos and judged by the real detector.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.analyzer import FaceAnalyzer
from pipeline.config import ChangeConfig
from pipeline.motion import ViewChange, changed_fraction, thumbnail
from pipeline.scene import SceneSpec, render_scene
from pipeline.scene_presets import largest_face_box, preset_scene
from pipeline.stream import StreamAnalyzer

CONFIG = ChangeConfig()
#: Corridors from near black to near white, one of them skin-toned (BGR top, bottom).
BACKGROUNDS = [
    ((150, 152, 156), (78, 82, 88)),
    ((140, 165, 200), (110, 135, 170)),
    ((40, 40, 45), (20, 20, 25)),
    ((230, 230, 235), (200, 200, 205)),
]


def _grey(level: int, shape: tuple[int, int] = (480, 640)) -> np.ndarray:
    return np.full((*shape, 3), level, np.uint8)


def _entering(people: int, background: tuple[tuple[int, int, int], ...]) -> SceneSpec:
    """A preset scene that starts with one second of empty corridor."""
    scene = preset_scene(people)
    actors = tuple(
        dataclasses.replace(a, enter_s=a.enter_s + 1.0, exit_s=a.exit_s + 1.0) for a in scene.actors
    )
    return dataclasses.replace(
        scene, actors=actors, seconds=scene.seconds + 1.0, background=background
    )


def test_thumbnail_is_a_grey_block_mean():
    image = np.zeros((480, 640, 3), np.uint8)
    image[:8, :8] = 255  # one 8x8 block white
    thumb = thumbnail(image)
    assert thumb.shape == (60, 80) and thumb.dtype == np.uint8
    assert thumb[0, 0] == 255 and int(thumb.sum()) == 255
    assert thumbnail(image[:, :, 0]).shape == (60, 80)  # grey input too
    assert thumbnail(np.zeros((720, 1280, 3), np.uint8)).shape == (45, 80)


def test_the_first_look_and_a_look_after_max_still_s_always_run_the_detector():
    check = ViewChange(CONFIG)
    view = _grey(100)
    assert not check.unchanged(view, 0.0)  # nothing seen yet
    check.looked(0.0, empty=True)
    assert check.unchanged(view, 0.1)
    assert check.unchanged(view, 0.1 + CONFIG.max_still_s - 0.2)
    assert not check.unchanged(view, CONFIG.max_still_s)  # still, but due a full look
    check.looked(CONFIG.max_still_s, empty=True)
    assert check.unchanged(view, CONFIG.max_still_s + 0.1)


def test_a_small_change_is_seen_and_a_face_drops_the_reference():
    check = ViewChange(CONFIG)
    check.unchanged(_grey(100), 0.0)
    check.looked(0.0, empty=True)
    changed = _grey(100)
    # 12 of 4,800 blocks (0.25 %) brighter by 40 levels: above min_fraction (0.2 %).
    changed[:8, : 12 * 8] = 140
    assert not check.unchanged(changed, 0.1)
    check.looked(0.1, empty=False)  # the detector found someone
    # Until a look finds the view empty again, every idle frame gets the detector.
    assert not check.unchanged(_grey(100), 0.2)
    check.looked(0.2, empty=True)
    assert check.unchanged(_grey(100), 0.3)


def test_moved_tells_a_changed_view_from_a_due_full_look():
    """``moved`` (what the gate's idle camera request listens to) is about the picture only:
    a still view's once-a-second full look has not moved; a changed view and a view with
    nothing to compare with have."""
    check = ViewChange(CONFIG)
    check.unchanged(_grey(100), 0.0)
    assert check.moved  # no reference yet
    check.looked(0.0, empty=True)
    assert check.unchanged(_grey(100), 0.1) and not check.moved
    assert not check.unchanged(_grey(100), CONFIG.max_still_s) and not check.moved
    changed = _grey(100)
    changed[:8, : 12 * 8] = 140
    assert not check.unchanged(changed, CONFIG.max_still_s + 0.1) and check.moved


def test_slow_drift_adds_up_against_the_last_empty_view():
    """The reference is the last view found empty, not the previous frame: a change of 4
    grey levels per look, each below ``pixel_delta`` (16), is seen once it adds up."""
    check = ViewChange(CONFIG)
    check.unchanged(_grey(100), 0.0)
    check.looked(0.0, empty=True)
    looks = [not check.unchanged(_grey(100 + 4 * i), 0.05 * i) for i in range(1, 8)]
    assert looks == [False, False, False, False, True, True, True]


def test_a_frame_of_another_size_is_a_changed_view():
    check = ViewChange(CONFIG)
    check.unchanged(_grey(100), 0.0)
    check.looked(0.0, empty=True)
    assert changed_fraction(thumbnail(_grey(100)), thumbnail(_grey(100, (720, 1280))), 16) == 1.0
    assert not check.unchanged(_grey(100, (720, 1280)), 0.1)


@pytest.mark.parametrize("people", [1, 3])
@pytest.mark.parametrize("background", BACKGROUNDS, ids=["grey", "skin", "dark", "bright"])
def test_every_face_the_detector_finds_changes_the_view(analyzer, photo, people, background):
    """Rendered scenes from the shared photos: against the empty corridor, every frame in
    which the real detector finds a face is a changed view (so it gets the detector), and
    the empty corridor with its noise and exposure drift is not (so the check saves work)."""
    spec = _entering(people, background)
    empty_view: np.ndarray | None = None
    empty, with_face = [], []
    for frame, states in render_scene(spec, photo, largest_face_box(analyzer.detect)):
        thumb = thumbnail(frame)
        if not any(s.visible for s in states):
            empty_view = thumb if empty_view is None else empty_view
            empty.append(changed_fraction(empty_view, thumb, CONFIG.pixel_delta))
        elif analyzer.detect(frame):
            assert empty_view is not None  # the scene starts empty
            with_face.append(changed_fraction(empty_view, thumb, CONFIG.pixel_delta))
    assert len(empty) >= 25 and len(with_face) >= 50
    assert max(empty) < CONFIG.min_fraction, max(empty)
    assert min(with_face) >= CONFIG.min_fraction, min(with_face)


def _stream(analyzer: FaceAnalyzer, frames: list[np.ndarray], fps: float, idle: bool):
    stream = StreamAnalyzer(analyzer, keep_ended=True)
    if idle:
        stream.idle_check = ViewChange(CONFIG)
    first_face = None
    for index, frame in enumerate(frames):
        if stream.process(frame, index / fps) and first_face is None:
            first_face = index
    return stream, first_face


def test_the_stream_skips_the_detector_on_an_empty_corridor_and_finds_the_walker_as_soon(
    analyzer, photo
):
    """The same scene with and without the check: the walker is first tracked in the same
    frame and ends with the same verdict; on the empty corridor before him the detector ran
    about once per ``max_still_s``, not on every frame."""
    walker = dataclasses.replace(preset_scene(1).actors[0], enter_s=2.0, exit_s=4.5)
    spec = SceneSpec(seconds=5.0, actors=(walker,), seed=2)
    rendered = list(render_scene(spec, photo, largest_face_box(analyzer.detect)))
    frames = [frame for frame, _ in rendered]
    in_view = next(i for i, (_, states) in enumerate(rendered) if any(s.visible for s in states))
    plain, plain_first = _stream(analyzer, frames, spec.fps, idle=False)
    checked, checked_first = _stream(analyzer, frames, spec.fps, idle=True)
    assert plain_first is not None and checked_first == plain_first
    assert plain.skipped["detect"] == 0
    # 2 s of empty corridor at 30 fps (60 frames): full looks at 0 s and 1 s only.
    assert in_view >= 55 and checked.skipped["detect"] >= in_view - 2, checked.skipped
    assert (
        {v.status for v in checked.verdicts().values()}
        == {v.status for v in plain.verdicts().values()}
        == {"live"}
    )


def test_frames_skipped_before_the_face_reached_the_size_start_the_decision_clock(analyzer, photo):
    """A busy gate analyses every sixth frame: the face that is first seen at
    ``ready_px`` may have been that size in the five frames it skipped, so the track's
    ``ready_since`` (where ``decision_ms`` starts) is the first of them; later looks do not
    move it. Without skipped frames it is the frame's own time."""
    spec = dataclasses.replace(preset_scene(1), seconds=2.6)
    frames = [f for f, _ in render_scene(spec, photo, largest_face_box(analyzer.detect))]
    busy, every = StreamAnalyzer(analyzer), StreamAnalyzer(analyzer)
    started: dict[str, tuple[int, float]] = {}
    for index, frame in enumerate(frames):
        t = index / spec.fps
        for name, stream, since in (("every", every, None), ("busy", busy, (index - 5) / spec.fps)):
            if name == "busy" and index % 6:
                continue
            for report in stream.process(frame, t, since=since):
                if report.ready_since is not None:
                    started.setdefault(name, (index, report.ready_since))
                    assert report.ready_since == started[name][1]  # set once
    first_busy, first_every = started["busy"][0], started["every"][0]
    assert started["every"][1] == first_every / spec.fps
    assert first_busy % 6 == 0 and started["busy"][1] == (first_busy - 5) / spec.fps
