"""Evidence accumulation: the mechanisms (dips, frames, span, fast spoof, window, rigidity).

Unit tests of one piece, so frame analyses are built by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analyzer import FaceAnalysis
from pipeline.config import EvidenceConfig
from pipeline.evidence import EvidenceAccumulator, rigidity, trimmed_mean
from pipeline.quality import QualityReport
from pipeline.types import Box, Face

LANDMARKS = ((40.0, 50.0), (72.0, 50.0), (56.0, 70.0), (43.0, 90.0), (69.0, 90.0))


def _quality(ok: bool = True, weight: float = 0.8) -> QualityReport:
    return QualityReport(ok, () if ok else ("blurry",), 120, 300, 0, 0, 120, weight if ok else 0)


def _analysis(p_real, embedding=None, ok=True, weight=0.8, landmarks=LANDMARKS):
    face = Face(Box(20, 20, 100, 120), landmarks, 0.93)
    return FaceAnalysis(face, _quality(ok, weight), p_real, embedding)


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return v / np.linalg.norm(v)


def _near(base: np.ndarray, cos: float, seed: int) -> np.ndarray:
    """A unit vector at exactly ``cos`` to ``base``."""
    other = _unit(seed)
    other = other - (other @ base) * base
    other /= np.linalg.norm(other)
    return (cos * base + np.sqrt(1 - cos**2) * other).astype(np.float32)


PERSON = _unit(1000)


def _same(i: int) -> np.ndarray:
    """Frame ``i``'s embedding of one person (0.9 to their face, ~0.8 to each other)."""
    return _near(PERSON, 0.9, seed=i)


def _feed(acc, scores, fps=30.0, start=0):
    for i, p in enumerate(scores, start=start):
        acc.add(i / fps, _analysis(p, _same(i)))


def test_single_frame_dips_of_a_live_face_do_not_flip_the_verdict():
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    # Genuine single frames measured as low as 0.33; two such dips among ten frames.
    _feed(acc, [0.97, 0.33, 0.95, 0.98, 0.35, 0.96, 0.99, 0.94, 0.97, 0.96])
    assert acc.verdict().status == "live"


def test_mostly_low_scores_are_spoof_even_with_some_high_frames():
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    _feed(acc, [0.2, 0.9, 0.15, 0.3, 0.95, 0.2, 0.25, 0.3, 0.2, 0.3])
    verdict = acc.verdict()
    assert verdict.status == "spoof" and verdict.reasons == ("liveness_low",)
    assert verdict.embedding is None


def test_needs_enough_frames_and_enough_time():
    cfg = EvidenceConfig(min_frames=5, min_span_s=0.3)
    acc = EvidenceAccumulator(cfg, 0.5)
    _feed(acc, [0.99] * 4)
    assert acc.verdict().reasons == ("need_more_frames",)
    fast = EvidenceAccumulator(cfg, 0.5)
    _feed(fast, [0.99] * 8, fps=100.0)  # 8 frames within 70 ms
    assert fast.verdict().reasons == ("need_longer_video",)
    _feed(acc, [0.99] * 6, start=4)  # 10 frames at 30 fps: 0.3 s
    assert acc.verdict().status == "live"


def test_fast_spoof_exit_before_the_full_window():
    acc = EvidenceAccumulator(EvidenceConfig(spoof_fast_frames=4, spoof_floor=0.1), 0.5)
    _feed(acc, [0.01, 0.02, 0.0, 0.03])
    assert acc.verdict().status == "spoof"
    acc2 = EvidenceAccumulator(EvidenceConfig(spoof_fast_frames=4, spoof_floor=0.1), 0.5)
    _feed(acc2, [0.01, 0.02, 0.4, 0.03])  # one frame above the floor: wait for more video
    assert acc2.verdict().status == "undecided"


def test_quality_failures_add_no_evidence_and_are_counted():
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    for i in range(10):
        acc.add(i / 30, _analysis(0.99, _same(i), ok=False))
    verdict = acc.verdict()
    assert verdict.status == "undecided" and verdict.frames == 0
    assert acc.rejected == {"blurry": 10}


def test_window_slides_old_frames_out():
    acc = EvidenceAccumulator(EvidenceConfig(window_s=1.0), 0.5)
    for i in range(30):
        acc.add(i * 0.1, _analysis(0.05, _same(i)))  # spoof-like for 3 s
    for i in range(30, 45):
        acc.add(i * 0.1, _analysis(0.99, _same(i)))  # then live-like for 1.5 s
    assert all(f.t >= 3.4 for f in acc.frames)
    assert acc.verdict().status == "live"


def test_mean_embedding_is_quality_weighted_and_normalised():
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    a = _unit(1)
    b = _near(a, 0.7, seed=2)  # the same person (below 0.5 would restart the evidence)
    acc.add(0.0, _analysis(0.9, a, weight=0.9))
    acc.add(0.1, _analysis(0.9, b, weight=0.1))
    mean = acc.mean_embedding()
    assert mean is not None and np.linalg.norm(mean) == pytest.approx(1.0, abs=1e-5)
    assert float(mean @ a) > float(mean @ b)


def test_trimmed_mean_drops_only_the_lowest_share():
    values = np.array([0.1, 0.9, 0.9, 0.9, 0.9], np.float32)
    assert trimmed_mean(values, 0.2) == pytest.approx(0.9)
    assert trimmed_mean(values, 0.0) == pytest.approx(0.74)
    assert trimmed_mean(np.array([0.3], np.float32), 0.5) == pytest.approx(0.3)


def _rotate_head(yaw_deg: float) -> np.ndarray:
    """Project a 3-D face (nose sticks out) turned by yaw: not an affine map of frontal."""
    pts3 = np.array([[-16, -10, 0], [16, -10, 0], [0, 10, 18], [-13, 30, 2], [13, 30, 2]], float)
    a = np.deg2rad(yaw_deg)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    return (pts3 @ rot.T)[:, :2] + 60


def test_rigidity_separates_a_moved_plane_from_a_turning_head():
    base = np.array(LANDMARKS)
    plane = [base * s + [dx, 0] for s, dx in [(1, 0), (1.1, 10), (0.95, 25), (1.05, 40)]]
    nonrigid, motion = rigidity(plane)
    assert nonrigid < 1e-6 and motion > 0.3
    head = [_rotate_head(y) for y in (0, 8, 15, -10)]
    nonrigid_head, _ = rigidity(head)
    assert nonrigid_head > 0.035


def _rigidity_frame_by_frame(landmarks: list[np.ndarray]) -> tuple[float, float]:
    """The definition, one least-squares fit per frame (what ``rigidity`` does at once)."""
    ref = landmarks[0].astype(np.float64)
    eye = float(np.linalg.norm(ref[1] - ref[0])) or 1.0
    design = np.hstack([ref, np.ones((5, 1))])
    residuals, motions = [], []
    for pts in landmarks[1:]:
        target = pts.astype(np.float64)
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        err = target - design @ coef
        residuals.append(float(np.sqrt((err**2).sum(axis=1).mean())) / eye)
        motions.append(float(np.linalg.norm(target - ref, axis=1).mean()) / eye)
    if not residuals:
        return 0.0, 0.0
    return float(np.percentile(residuals, 80)), float(max(motions))


def test_rigidity_fits_every_frame_as_one_fit_per_frame_would():
    """All frames in one solve give each frame's own fit: random tracks of 1-60 frames,
    degenerate ones too (all five landmarks on one point, or on one line)."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        base = rng.uniform(100, 500, (5, 2)).astype(np.float32)
        if trial % 7 == 0:
            base[:] = base[0]
        elif trial % 11 == 0:
            base[:, 1] = base[:, 0]
        noise = rng.uniform(0, 20)
        track = [base] + [
            (base + rng.normal(0, noise, (5, 2))).astype(np.float32)
            for _ in range(int(rng.integers(0, 60)))
        ]
        assert rigidity(track) == pytest.approx(_rigidity_frame_by_frame(track), abs=1e-9)


def test_rigidity_cue_flags_a_moved_plane_only_when_enabled():
    cfg_on = EvidenceConfig(use_rigidity=True, rigidity_min_frames=10)
    for cfg, expected in [(EvidenceConfig(), "live"), (cfg_on, "spoof")]:
        acc = EvidenceAccumulator(cfg, 0.5)
        for i in range(12):
            moved = tuple((x * (1 + 0.02 * i) + 4 * i, y) for x, y in LANDMARKS)
            acc.add(i / 30, _analysis(0.95, _same(i), landmarks=moved))
        assert acc.verdict().status == expected


def test_moderately_low_scores_wait_for_more_video_when_configured():
    cfg = EvidenceConfig(min_frames=4, min_span_s=0.1, spoof_fast_frames=3, spoof_min_frames=8)
    acc = EvidenceAccumulator(cfg, 0.5)
    _feed(acc, [0.3, 0.4, 0.35, 0.3])  # a live face dipping while another face is near
    assert acc.verdict().reasons == ("need_more_frames",)
    _feed(acc, [0.95, 0.97, 0.96, 0.98], start=4)  # the crossing is over
    assert acc.verdict().status == "live"
    slow = EvidenceAccumulator(cfg, 0.5)
    _feed(slow, [0.3, 0.35, 0.3, 0.4, 0.3, 0.35, 0.3, 0.4])
    assert slow.verdict().status == "spoof"  # low for long enough: still refused
    fast = EvidenceAccumulator(cfg, 0.5)
    _feed(fast, [0.01, 0.0, 0.02])
    assert fast.verdict().status == "spoof"  # a print's near-zero scores exit at once


def _too_close(p_real):
    face = Face(Box(0, 0, 470, 470), LANDMARKS, 0.93)
    report = QualityReport(False, ("too_close",), 470, 300, 0, 0, 120, 0.0)
    return FaceAnalysis(face, report, p_real, None)


def test_too_close_frames_never_make_a_face_live_nor_decline_a_middling_one():
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    for i in range(30):  # a live face leaning in scores 0.2-0.4, then a perfect 1.0
        assert not acc.add(i / 15, _too_close(0.3 if i % 5 else 1.0))
    verdict = acc.verdict()
    assert verdict.status == "undecided" and verdict.reasons == ("need_more_frames",)
    assert acc.rejected == {"too_close": 30}
    # Stepping back: ordinary frames decide, as they would have without the close ones.
    _feed(acc, [0.97] * 8, fps=15.0, start=30)
    assert acc.verdict().status == "live"


def test_too_close_frames_scoring_near_zero_take_the_fast_spoof_exit():
    cfg = EvidenceConfig(spoof_fast_frames=4, spoof_floor=0.1)
    acc = EvidenceAccumulator(cfg, 0.5)
    for i, p in enumerate([0.02, 0.01, 0.03]):
        acc.add(i / 15, _too_close(p))
    assert acc.verdict().status == "undecided"  # three frames are not yet enough
    acc.add(3 / 15, _too_close(0.0))
    verdict = acc.verdict()
    assert verdict.status == "spoof" and verdict.reasons == ("liveness_low",)
    assert verdict.frames == 4 and verdict.embedding is None
    # One close frame at the floor or above keeps the exit shut.
    other = EvidenceAccumulator(cfg, 0.5)
    for i, p in enumerate([0.02, 0.01, 0.12, 0.0]):
        other.add(i / 15, _too_close(p))
    assert other.verdict().status == "undecided"


def test_too_close_scores_leave_the_window_like_any_evidence():
    cfg = EvidenceConfig(window_s=1.0, spoof_fast_frames=4)
    acc = EvidenceAccumulator(cfg, 0.5)
    for i in range(3):
        acc.add(i / 15, _too_close(0.01))
    acc.add(5.0, _too_close(0.01))  # the first three are over 1 s old by now
    assert len(acc.too_close) == 1 and acc.verdict().status == "undecided"


def test_a_borderline_track_needs_the_spoof_frame_count_to_become_live():
    """A verdict is recomputed on every frame: a moderately low spoof must not get many
    chances to cross the threshold once before it has the frames a spoof verdict needs."""
    cfg = EvidenceConfig(min_frames=4, min_span_s=0.1, spoof_fast_frames=3, spoof_min_frames=8)
    acc = EvidenceAccumulator(cfg, 0.5)
    _feed(acc, [0.45, 0.3, 0.4, 0.45])  # below the threshold at the first decision point
    assert acc.verdict().reasons == ("need_more_frames",) and acc.doubted
    _feed(acc, [0.9, 0.9], start=4)  # fused 0.57: over the threshold after 6 frames
    assert acc.fused_liveness() >= 0.5
    assert acc.verdict().reasons == ("need_more_frames",)
    _feed(acc, [0.9, 0.9], start=6)  # 8 frames: live if it still holds
    assert acc.verdict().status == "live"
    clear = EvidenceAccumulator(cfg, 0.5)
    _feed(clear, [0.95, 0.97, 0.96, 0.98])  # a clearly live face is not held up
    assert clear.verdict().status == "live" and not clear.doubted


def test_the_identity_comes_only_from_frames_scored_live():
    """A look-alike alternating their own face with a victim's print in one box: the print's
    frames (scored as a photo) must not pull the verdict's identity towards the victim. A
    look-alike this close (0.6) stays within ``same_person_min_cos``, so the window is kept
    and only the identity rule stands between them."""
    attacker = _unit(1)
    victim = _near(attacker, 0.6, seed=2)
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    for i in range(11):  # ends on the attacker's own (live) frame
        own = i % 2 == 0
        acc.add(i / 30, _analysis(0.99 if own else 0.3, attacker if own else victim))
    verdict = acc.verdict()
    assert acc.restarts == 0
    assert verdict.status == "live"  # trimmed fusion forgives the dips ...
    assert float(verdict.embedding @ attacker) == pytest.approx(1.0, abs=1e-5)  # ... not who


@pytest.mark.parametrize("p_real_y", [0.99, 0.3, 0.02])  # live, borderline, a print
def test_another_persons_frame_restarts_the_evidence(p_real_y):
    """x is seen live one frame short of a verdict; then y (0.45 to x: a stranger who
    passes the tracker's 0.3 veto) is in the box. y's frame, live or not, must not complete
    x's evidence: the window restarts from it, and no verdict carries x's identity."""
    cfg = EvidenceConfig(min_frames=4, min_span_s=0.1)
    x = _unit(1)
    y = _near(x, 0.45, seed=2)
    acc = EvidenceAccumulator(cfg, 0.5)
    for i in range(3):
        acc.add(i / 10, _analysis(0.99, _near(x, 0.95, seed=10 + i)))
    acc.add(0.3, _analysis(p_real_y, y))
    assert acc.restarts == 1 and len(acc.frames) == 1
    assert acc.verdict().status == "undecided"
    for i in range(4, 8):  # y stays: their own evidence decides, on their own frames
        acc.add(i / 10, _analysis(p_real_y, _near(y, 0.95, seed=10 + i)))
    verdict = acc.verdict()
    assert acc.restarts == 1
    if p_real_y >= 0.5:
        assert verdict.status == "live" and float(verdict.embedding @ y) > 0.95
    else:
        assert verdict.status in ("spoof", "undecided") and verdict.embedding is None


def test_a_restart_keeps_the_doubt():
    """A borderline face that shows another face in between does not win a fresh chance to
    cross the threshold with fewer frames: ``doubted`` survives the restart."""
    cfg = EvidenceConfig(min_frames=4, min_span_s=0.1, spoof_min_frames=10)
    x = _unit(1)
    acc = EvidenceAccumulator(cfg, 0.5)
    for i in range(4):
        acc.add(i / 10, _analysis(0.45 if i else 0.6, _near(x, 0.95, seed=20 + i)))
    assert acc.verdict().status == "undecided" and acc.doubted
    other = _near(x, 0.2, seed=3)
    for i in range(4, 8):
        acc.add(i / 10, _analysis(0.9, _near(other, 0.95, seed=20 + i)))
    # x's live frame went; its three borderline frames stay, as evidence against the track.
    assert acc.restarts == 1 and len(acc.frames) == 7
    assert acc.verdict().status == "undecided"  # live enough, but 10 frames are needed now


def test_a_print_held_up_where_its_owner_stood_is_not_live_on_their_frames():
    """A gate needs 4 frames. Its owner is seen live for 3 and turns away; someone holds up
    their print in the same place. Same identity, so no restart: the fused score of
    [0.99, 0.99, 0.99, 0.02] is 0.75, and the first print frame used to make the track live
    (the gate would charge the owner and open for the print's holder)."""
    cfg = EvidenceConfig(min_frames=4, min_span_s=0.1)
    acc = EvidenceAccumulator(cfg, 0.5)
    for i in range(3):
        acc.add(i / 10, _analysis(0.99, _same(i)))
    statuses = []
    for i in range(3, 12):
        acc.add(i / 10, _analysis(0.02, _same(i)))  # the print: the same face, scored low
        statuses.append(acc.verdict().status)
    assert "live" not in statuses, statuses
    assert statuses[0] == "undecided" and statuses[-1] == "spoof", statuses


def test_a_live_face_whose_newest_frame_dips_waits_one_frame():
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    _feed(acc, [0.97, 0.95, 0.98, 0.96, 0.94, 0.35], fps=10.0)
    verdict = acc.verdict()
    assert (verdict.status, verdict.reasons) == ("undecided", ("latest_not_live",))
    _feed(acc, [0.97], fps=10.0, start=6)
    assert acc.verdict().status == "live"
    # Once judged live, a later dip does not take it back (callers have acted on it).
    _feed(acc, [0.35], fps=10.0, start=7)
    assert acc.verdict().status == "live"


def test_a_photo_shown_between_glimpses_of_ones_own_face_is_still_a_spoof():
    """Own face (live), then a photo of someone at 0.45 to it, in turn in one box. Each
    photo frame drops the live frames before it, but the photo frames themselves stay, so
    the track is judged a spoof (a first version dropped them too: never judged at all)."""
    own = _unit(1)
    photo = _near(own, 0.45, seed=2)
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    statuses = set()
    for i in range(60):
        mine = i % 2 == 0
        acc.add(i / 30, _analysis(0.99 if mine else 0.02, own if mine else photo))
        statuses.add(acc.verdict().status)
    assert acc.restarts > 10
    assert "spoof" in statuses and "live" not in statuses, statuses


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1.5])
def test_a_liveness_score_that_is_not_a_probability_is_refused(bad):
    acc = EvidenceAccumulator(EvidenceConfig(), 0.5)
    _feed(acc, [0.2, 0.1, 0.2])
    with pytest.raises(ValueError):
        acc.add(1.0, _analysis(bad, _same(9)))
    assert len(acc.frames) == 3
