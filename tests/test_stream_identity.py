"""A track's evidence belongs to one face: the stream's frame selection and tracker with a
scripted stand-in for the models (a unit test of ``pipeline.stream`` alone; the real models
run in tests/test_scene.py, tests/test_motion.py and the end-to-end tests).

The attack it guards against: a face (or a print of it) is looked at for a few frames, then
another live face takes its place in the same box. Before every liveness score came with its
frame's embedding, the stream stopped embedding a track after ``max_embeddings`` frames; the
newcomer's box overlapped the track's, nothing could veto the match, and the newcomer's
liveness completed the first face's evidence: a gate would have charged the first face.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest

from pipeline.analyzer import FaceAnalysis
from pipeline.config import PipelineConfig
from pipeline.quality import QualityReport
from pipeline.stream import StreamAnalyzer
from pipeline.types import Box, Face
from session.config import FacePayConfig

FRAME = np.zeros((480, 640, 3), np.uint8)
GOOD = QualityReport(True, (), 100.0, 100.0, 0.0, 0.0, 120.0, 1.0)


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return v / np.linalg.norm(v)


@dataclass
class Scripted:
    """Detects one face, ``who``, in a fixed box; its models answer from a table."""

    config: PipelineConfig
    who: str = "x"
    p_real: dict[str, float] = field(default_factory=lambda: {"x": 0.95, "y": 0.95})
    boxes: ClassVar = {"x": (200.0, 150.0, 300.0, 250.0), "y": (190.0, 140.0, 310.0, 260.0)}
    embeddings: ClassVar = {"x": _unit(1), "y": _unit(2)}

    def detect(self, image: np.ndarray) -> list[Face]:
        x1, y1, x2, y2 = self.boxes[self.who]
        points = tuple((x1 + 20 + i * 12, y1 + 40.0) for i in range(5))
        return [Face(Box(x1, y1, x2, y2), points, 0.95)]

    def analyze_face(self, image, face, *, embed=True, liveness=True, limits=None, **_):
        p_real = self.p_real[self.who] if liveness else None
        return FaceAnalysis(face, GOOD, p_real, self.embeddings[self.who] if embed else None)


CONFIGS = {
    "checkout": PipelineConfig(),
    "gate": FacePayConfig().gate_pipeline(),
}


@pytest.mark.parametrize("mode", CONFIGS)
@pytest.mark.parametrize("p_real_x", [0.95, 0.2])  # a live face, or a print of it
def test_a_face_that_takes_anothers_place_never_completes_its_evidence(mode, p_real_x):
    config = CONFIGS[mode]
    models = Scripted(config, p_real={"x": p_real_x, "y": 0.95})
    stream = StreamAnalyzer(models, config)  # type: ignore[arg-type]
    short = config.evidence.min_frames - 1
    assert short >= config.selection.max_embeddings  # x is embedded to the cap, not decided
    t, x_tracks = 0.0, set()
    for _ in range(short):
        for report in stream.process(FRAME, t):
            x_tracks.add(report.track_id)
            assert report.verdict.status == "undecided"
        t += 1 / 30
    models.who = "y"  # x turns away as y steps into the same place
    for _ in range(30):
        for report in stream.process(FRAME, t):
            assert report.track_id not in x_tracks, "y's frames were added to x's track"
            if report.verdict.status == "live":
                assert report.verdict.embedding is not None
                assert float(report.verdict.embedding @ models.embeddings["x"]) < 0.5
        t += 1 / 30


def test_a_servers_stream_keeps_nothing_of_a_track_that_ended():
    """A gate's stream lives as long as its connection (days): the verdict of a walker who
    left, embedding included, is not kept unless asked for (offline evaluation)."""
    config = CONFIGS["gate"]
    kept = {}
    for keep in (False, True):
        models = Scripted(config)
        stream = StreamAnalyzer(models, config, keep_ended=keep)  # type: ignore[arg-type]
        t = 0.0
        for _ in range(20):
            stream.process(FRAME, t)
            t += 1 / 30
        models.detect = lambda image: []  # type: ignore[method-assign]
        for _ in range(90):  # three seconds of empty view: the track ends
            stream.process(FRAME, t)
            t += 1 / 30
        assert stream.evidence == {}
        kept[keep] = stream.verdicts()
    assert kept[False] == {}
    assert [v.status for v in kept[True].values()] == ["live"]


def _at_cosine(base: np.ndarray, cos: float, seed: int) -> np.ndarray:
    """A unit vector at exactly ``cos`` to ``base``."""
    other = _unit(seed)
    other = other - (other @ base) * base
    other /= np.linalg.norm(other)
    return (cos * base + np.sqrt(1 - cos**2) * other).astype(np.float32)


@pytest.mark.parametrize("mode", CONFIGS)
@pytest.mark.parametrize("veto", [None, 0.5])  # the default (the lowest allowed), a stricter one
@pytest.mark.parametrize("cos", [0.32, 0.45])
def test_a_look_alike_alternating_with_a_victims_print_is_never_the_victim(mode, veto, cos):
    """A live look-alike (``cos`` to the victim) and a print of the victim take turns in one
    box. Neither the tracker (it keeps the two apart at its default veto) nor the evidence
    (only frames scored live give the identity) may let the print's frames pull a live
    verdict towards the victim: a gate would charge the victim with no passphrase."""
    config = CONFIGS[mode]
    if veto is not None:
        tracker = config.tracker.model_copy(update={"embedding_threshold": veto})
        config = config.model_copy(update={"tracker": tracker})
    victim = _unit(7)
    attacker = _at_cosine(victim, cos, seed=8)

    class Blend(Scripted):
        boxes: ClassVar = {"a": Scripted.boxes["x"], "v": Scripted.boxes["x"]}
        embeddings: ClassVar = {"a": attacker, "v": victim}

    models = Blend(config, who="a", p_real={"a": 0.99, "v": 0.02})
    stream = StreamAnalyzer(models, config)  # type: ignore[arg-type]
    lives = []
    for i in range(60):
        models.who = "a" if i % 3 != 1 else "v"  # a, v, a, a, v, a, ...
        for report in stream.process(FRAME, i / 30):
            if report.verdict.status == "live":
                lives.append(float(report.verdict.embedding @ victim))
    assert lives, "the attacker's own live face was never decided"
    assert max(lives) <= cos + 1e-4  # never closer to the victim than the attacker is
    if veto is None:
        # Both share one track (cos is above the 0.3 veto), and each print frame drops the
        # attacker's live frames (cos is below evidence.same_person_min_cos).
        assert sum(acc.restarts for acc in stream.evidence.values()) > 0


@pytest.mark.parametrize("mode", CONFIGS)
@pytest.mark.parametrize("cos", [0.32, 0.4, 0.48])
def test_someone_stepping_into_a_face_that_left_starts_their_own_evidence(mode, cos):
    """x is seen live for one frame short of a verdict and turns away; y, close enough to x
    (``cos``) to pass the tracker's veto, steps into x's box. y's frames must not complete
    x's evidence: the verdict's embedding was 3 parts x to 1 part y, so a gate charged x
    and opened for y (a reviewer's finding; real NUAA frames in tests/test_evidence_real.py)."""
    config = CONFIGS[mode]
    x = _unit(11)
    y = _at_cosine(x, cos, seed=12)

    class Two(Scripted):
        embeddings: ClassVar = {"x": x, "y": y}

    models = Two(config)
    stream = StreamAnalyzer(models, config)  # type: ignore[arg-type]
    t = 0.0
    for _ in range(config.evidence.min_frames - 1):
        assert all(r.verdict.status == "undecided" for r in stream.process(FRAME, t))
        t += 1 / 30
    models.who = "y"
    lives = []
    for _ in range(30):
        for report in stream.process(FRAME, t):
            if report.verdict.status == "live":
                lives.append(report.verdict)
        t += 1 / 30
    assert lives, "y was never decided"
    # Every live verdict is y's own, on y's own frames only.
    assert all(float(v.embedding @ y) > 0.999 for v in lives)
    assert min(v.frames for v in lives) >= config.evidence.min_frames
