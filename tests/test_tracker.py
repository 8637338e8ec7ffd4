"""Tests for the multi-face tracker (pipeline.tracker), on synthetic boxes and embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.tracker import Tracker, TrackUpdate
from pipeline.types import Box, Face

FPS = 30.0
DIM = 128


def _face(cx: float, cy: float, size: float = 80.0, score: float = 0.9) -> Face:
    half = size / 2.0
    box = Box(cx - half, cy - half, cx + half, cy + half)
    s = size / 4.0
    landmarks = (
        (cx - s, cy - s),
        (cx + s, cy - s),
        (cx, cy),
        (cx - s, cy + s),
        (cx + s, cy + s),
    )
    return Face(box=box, landmarks=landmarks, score=score)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _noisy(rng: np.random.Generator, base: np.ndarray, noise: float = 0.3) -> np.ndarray:
    """A fresh embedding of the same person: ``noise`` is the noise norm relative to 1."""
    vec = base + noise * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
    return (vec / np.linalg.norm(vec)).astype(np.float32)


def _ids(updates: list[TrackUpdate]) -> list[int]:
    return [u.track_id for u in updates]


def test_small_motion_keeps_one_id() -> None:
    tracker = Tracker()
    seen: list[TrackUpdate] = []
    for i in range(60):
        updates = tracker.update([_face(200 + 4 * i, 150 + 2 * i)], t=i / FPS)
        assert len(updates) == 1
        seen.append(updates[0])
    assert {u.track_id for u in seen} == {1}
    assert [u.is_new for u in seen] == [True] + [False] * 59
    assert [u.hits for u in seen] == list(range(1, 61))
    assert seen[-1].age_s == pytest.approx(59 / FPS)
    assert seen[0].matched_by == "new" and seen[-1].matched_by == "iou"
    assert tracker.pop_ended() == []
    assert [s.track_id for s in tracker.active_tracks()] == [1]


def test_new_faces_get_new_increasing_ids() -> None:
    tracker = Tracker()
    first = tracker.update([_face(100, 100)], t=0.0)
    both = tracker.update([_face(400, 100), _face(102, 100)], t=1 / FPS)
    three = tracker.update([_face(401, 100), _face(103, 100), _face(250, 350)], t=2 / FPS)
    assert _ids(first) == [1]
    # Updates come in detection order, not id order.
    assert _ids(both) == [2, 1]
    assert [u.is_new for u in both] == [True, False]
    assert _ids(three) == [2, 1, 3]
    assert [u.is_new for u in three] == [False, False, True]


def test_track_ends_after_max_missed_frames() -> None:
    tracker = Tracker(max_missed=3, max_age_s=10.0)
    tracker.update([_face(100, 100)], t=0.0)
    tracker.update([], t=1 / FPS)
    tracker.update([], t=2 / FPS)
    assert tracker.pop_ended() == []
    assert [s.missed for s in tracker.active_tracks()] == [2]
    tracker.update([], t=3 / FPS)
    assert tracker.pop_ended() == [1]
    assert tracker.pop_ended() == []  # reported once
    assert tracker.active_tracks() == []
    again = tracker.update([_face(100, 100)], t=4 / FPS)
    assert _ids(again) == [2] and again[0].is_new


def test_missed_frames_below_limit_keep_the_id() -> None:
    tracker = Tracker(max_missed=3)
    tracker.update([_face(100, 100)], t=0.0)
    tracker.update([], t=1 / FPS)
    tracker.update([], t=2 / FPS)
    back = tracker.update([_face(103, 100)], t=3 / FPS)
    assert _ids(back) == [1] and not back[0].is_new
    assert tracker.active_tracks()[0].missed == 0


def test_track_ends_after_max_age_even_without_missed_frames() -> None:
    # A caller that stops sending frames for a while: one update, but a long gap in time.
    tracker = Tracker(max_missed=30, max_age_s=1.0)
    tracker.update([_face(100, 100)], t=0.0)
    later = tracker.update([_face(100, 100)], t=1.5)
    assert _ids(later) == [2]
    assert tracker.pop_ended() == [1]


def test_min_hits_hides_tentative_tracks_and_one_frame_false_positives() -> None:
    tracker = Tracker(min_hits=3)
    assert tracker.update([_face(100, 100), _face(400, 300)], t=0.0) == []
    assert tracker.update([_face(102, 100)], t=1 / FPS) == []  # the 2nd face was a blip
    confirmed = tracker.update([_face(104, 100)], t=2 / FPS)
    assert _ids(confirmed) == [1] and confirmed[0].is_new and confirmed[0].hits == 3
    assert tracker.pop_ended() == []  # the blip never had an id to report
    assert _ids(tracker.update([_face(106, 100)], t=3 / FPS)) == [1]


def test_fast_motion_links_by_centre_distance() -> None:
    # 50 px per frame on an 80 px face: IoU with the last box is about 0.23.
    tracker = Tracker(iou_threshold=0.3)
    first = tracker.update([_face(100, 200)], t=0.0)
    jump = tracker.update([_face(150, 200)], t=1 / FPS)
    assert _ids(first) == _ids(jump) == [1]
    assert jump[0].matched_by == "distance"
    # With a velocity estimate the prediction overlaps again.
    steady = tracker.update([_face(200, 200)], t=2 / FPS)
    assert _ids(steady) == [1] and steady[0].matched_by == "iou"


def test_distance_fallback_rejects_a_different_size_face() -> None:
    tracker = Tracker()
    tracker.update([_face(100, 200, size=80)], t=0.0)
    near_big = tracker.update([_face(160, 200, size=200)], t=1 / FPS)
    assert _ids(near_big) == [2]


def _crossing_paths(frames: int) -> list[list[tuple[float, float]]]:
    """Four faces on an X: all four boxes coincide at the middle frame."""
    starts = [(100.0, 100.0), (500.0, 100.0), (100.0, 400.0), (500.0, 400.0)]
    ends = [(500.0, 400.0), (100.0, 400.0), (500.0, 100.0), (100.0, 100.0)]
    out = []
    for i in range(frames):
        a = i / (frames - 1)
        out.append(
            [
                (s[0] + a * (e[0] - s[0]), s[1] + a * (e[1] - s[1]))
                for s, e in zip(starts, ends, strict=True)
            ]
        )
    return out


def _run(
    tracker: Tracker,
    frames: list[list[tuple[float, float]]],
    people: np.ndarray | None,
    rng: np.random.Generator,
) -> list[dict[int, int]]:
    """Per frame, person index -> track id; detections are jittered and shuffled."""
    history = []
    for i, centres in enumerate(frames):
        order = rng.permutation(len(centres))
        faces = [
            _face(centres[p][0] + rng.normal(0, 2), centres[p][1] + rng.normal(0, 2)) for p in order
        ]
        embs = None if people is None else [_noisy(rng, people[p]) for p in order]
        updates = tracker.update(faces, t=i / FPS, embeddings=embs)
        assert len(updates) == len(centres)
        history.append({int(order[j]): u.track_id for j, u in enumerate(updates)})
    return history


def test_four_faces_crossing_keep_their_ids_with_embeddings() -> None:
    rng = np.random.default_rng(10)
    people = _unit(rng, 4)
    history = _run(Tracker(), _crossing_paths(41), people, rng)
    assert all(h == history[0] for h in history)
    assert sorted(history[0].values()) == [1, 2, 3, 4]
    # At the middle frame the four boxes coincide, so geometry alone cannot tell them apart.
    without = _run(Tracker(), _crossing_paths(41), None, rng)
    assert any(h != without[0] for h in without), "scenario too easy for geometry alone"


def test_bounce_at_crossing_needs_the_embedding_veto() -> None:
    # Two faces meet head-on, overlap completely, then each turns back. Constant velocity
    # predicts they pass through each other, so geometry alone swaps their ids.
    path = [50.0 * i for i in range(9)]
    frames = [[(100 + 15 * x / 50, 200.0), (340 - 15 * x / 50, 200.0)] for x in path]
    frames += frames[-2::-1]
    rng = np.random.default_rng(11)
    people = _unit(rng, 2)
    with_emb = _run(Tracker(), frames, people, rng)
    assert all(h == with_emb[0] for h in with_emb)
    without = _run(Tracker(), frames, None, rng)
    assert without[-1] != without[0], "scenario too easy: geometry alone kept the ids"


def test_five_faces_with_jitter_and_dropped_detections() -> None:
    rng = np.random.default_rng(12)
    people = _unit(rng, 5)
    centres = [(100.0 + 120 * p, 240.0 + 30 * (p % 2)) for p in range(5)]
    tracker = Tracker(max_missed=5)
    ids: dict[int, set[int]] = {p: set() for p in range(5)}
    for i in range(90):
        present = [p for p in range(5) if rng.random() > 0.15]  # detector misses some
        faces = [
            _face(centres[p][0] + rng.normal(0, 3), centres[p][1] + rng.normal(0, 3))
            for p in present
        ]
        embs = [_noisy(rng, people[p]) for p in present]
        for p, update in zip(
            present, tracker.update(faces, t=i / FPS, embeddings=embs), strict=True
        ):
            ids[p].add(update.track_id)
    assert all(len(s) == 1 for s in ids.values())
    assert set().union(*ids.values()) == {1, 2, 3, 4, 5}


def test_embedding_veto_stops_a_stranger_taking_over_a_track() -> None:
    rng = np.random.default_rng(13)
    alice, bob = _unit(rng, 2)
    tracker = Tracker()
    tracker.update([_face(200, 200)], t=0.0, embeddings=[alice])
    swapped = tracker.update([_face(201, 200)], t=1 / FPS, embeddings=[bob])
    assert _ids(swapped) == [2] and swapped[0].is_new
    # Without embeddings the same geometry is simply the same track.
    plain = Tracker()
    plain.update([_face(200, 200)], t=0.0)
    assert _ids(plain.update([_face(201, 200)], t=1 / FPS)) == [1]


def test_broken_track_relinks_by_embedding_within_window() -> None:
    rng = np.random.default_rng(14)
    alice = _unit(rng, 1)[0]
    tracker = Tracker(max_missed=15, max_age_s=1.0)
    for i in range(10):
        tracker.update([_face(100 + 2 * i, 200)], t=i / FPS, embeddings=[_noisy(rng, alice)])
    for i in range(10, 18):  # occluded for 8 frames
        tracker.update([], t=i / FPS)
    back = tracker.update([_face(500, 300)], t=18 / FPS, embeddings=[_noisy(rng, alice)])
    assert _ids(back) == [1] and back[0].matched_by == "embedding" and not back[0].is_new
    assert tracker.pop_ended() == []
    # The jump is not motion: the next prediction stays put instead of flying off.
    assert tracker.predict(19 / FPS)[1] == _face(500, 300).box


def test_relink_fails_without_embedding_or_after_the_window() -> None:
    rng = np.random.default_rng(15)
    alice = _unit(rng, 1)[0]
    no_emb = Tracker(max_missed=15)
    no_emb.update([_face(100, 200)], t=0.0)
    no_emb.update([], t=1 / FPS)
    assert _ids(no_emb.update([_face(500, 300)], t=2 / FPS)) == [2]

    expired = Tracker(max_missed=15, max_age_s=0.2)
    expired.update([_face(100, 200)], t=0.0, embeddings=[alice])
    for i in range(1, 8):
        expired.update([], t=i / FPS)
    assert expired.pop_ended() == [1]
    late = expired.update([_face(500, 300)], t=8 / FPS, embeddings=[_noisy(rng, alice)])
    assert _ids(late) == [2]


def test_running_mean_embedding_is_normalised() -> None:
    rng = np.random.default_rng(16)
    e1, e2 = _unit(rng, 2)
    tracker = Tracker(embedding_threshold=-1.0)  # let two unrelated vectors share a track
    tracker.update([_face(100, 100)], t=0.0, embeddings=[e1])
    update = tracker.update([_face(101, 100)], t=1 / FPS, embeddings=[e2 * 3.0])[0]
    want = (e1 + e2) / np.linalg.norm(e1 + e2)
    assert update.embedding is not None
    np.testing.assert_allclose(update.embedding, want, atol=1e-6)
    state = tracker.active_tracks()[0]
    assert state.embedding is not None
    np.testing.assert_allclose(state.embedding, want, atol=1e-6)
    # Frames without an embedding leave the mean as it was.
    kept = tracker.update([_face(102, 100)], t=2 / FPS)[0]
    assert kept.embedding is not None
    np.testing.assert_allclose(kept.embedding, want, atol=1e-6)


def test_predict_extrapolates_constant_velocity() -> None:
    tracker = Tracker()
    for i in range(5):
        tracker.update([_face(100 + 10 * i, 200 - 5 * i)], t=i / FPS)
    predicted = tracker.predict(6 / FPS)[1]  # two frames after the last detection
    want = _face(100 + 60, 200 - 30).box
    assert predicted.center == pytest.approx(want.center)
    assert predicted.width == pytest.approx(want.width)
    # predict() changes nothing; the caller can skip detection and resume later.
    assert tracker.active_tracks()[0].box == _face(140, 180).box
    resumed = tracker.update([_face(170, 185)], t=7 / FPS)
    assert _ids(resumed) == [1] and resumed[0].matched_by == "iou"


def test_predict_caps_extrapolation_and_lists_only_confirmed_tracks() -> None:
    tracker = Tracker(min_hits=2, max_age_s=5.0, max_missed=100)
    tracker.update([_face(100, 100), _face(400, 400)], t=0.0)
    tracker.update([_face(110, 100)], t=1 / FPS)  # 300 px/s, 2nd face still tentative
    assert set(tracker.predict(2 / FPS)) == {1}
    # Far in the future the box stops at 0.5 s of motion instead of leaving the frame.
    assert tracker.predict(4.0)[1].center[0] == pytest.approx(110 + 300 * 0.5)


def test_invalid_input_raises() -> None:
    tracker = Tracker()
    with pytest.raises(ValueError):
        tracker.update([_face(100, 100)], t=0.0, embeddings=[])
    tracker.update([_face(100, 100)], t=1.0, embeddings=[np.ones(DIM, dtype=np.float32)])
    with pytest.raises(ValueError):
        tracker.update([], t=0.5)
    with pytest.raises(ValueError):
        tracker.update([], t=float("nan"))
    for bad in (
        np.full(DIM, np.nan, dtype=np.float32),
        np.zeros(DIM, dtype=np.float32),
        np.ones(DIM + 1, dtype=np.float32),
        np.ones((2, DIM), dtype=np.float32),
    ):
        with pytest.raises(ValueError):
            tracker.update([_face(100, 100)], t=2.0, embeddings=[bad])
    with pytest.raises(ValueError):
        Tracker(iou_threshold=0.0)
    with pytest.raises(ValueError):
        Tracker(max_missed=0)
    with pytest.raises(ValueError):
        Tracker(min_hits=0)
    with pytest.raises(ValueError):
        Tracker(embedding_threshold=0.8, relink_threshold=0.7)
