"""One person's evidence never completes another's: real models on real NUAA webcam frames.

A walker seen live for three frames (one short of a gate's verdict) leaves, and within the
tracker's patience another steps into the same place. These three pairs of NUAA subjects
score 0.35-0.45 to each other under the one webcam (above the tracker's 0.3 veto, so the
newcomer joins the first face's track); before ``evidence.same_person_min_cos`` the
newcomer's first frame completed the first face's evidence, the verdict's embedding was
mostly the first face's, and a gate charged the first person and opened for the second.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.analyzer import FaceAnalyzer
from pipeline.decision import Match, decide
from pipeline.stream import StreamAnalyzer
from session.config import FacePayConfig


@pytest.fixture(scope="module")
def gate_analyzer(store) -> FaceAnalyzer:
    return FaceAnalyzer.from_config(FacePayConfig().gate_pipeline(), store)


def _frames(data_dir: Path, person: str) -> list[np.ndarray]:
    paths = sorted((data_dir / "bench/nuaa_train/live").glob(f"nuaa_{person}_*.jpg"))
    assert len(paths) >= 7, f"NUAA frames of {person} missing under {data_dir}"
    return [cv2.imread(str(p)) for p in paths]


def _template(analyzer: FaceAnalyzer, image: np.ndarray) -> np.ndarray:
    face = max(analyzer.detect(image), key=lambda f: f.box.area)
    embedding = analyzer.analyze_face(image, face, liveness=False, require_quality=False).embedding
    assert embedding is not None
    return embedding


@pytest.mark.parametrize(("x", "y"), [("0002", "0003"), ("0003", "0009"), ("0009", "0004")])
def test_a_newcomer_in_a_leavers_place_is_decided_as_themselves(gate_analyzer, data_dir, x, y):
    config = FacePayConfig().gate_pipeline()
    fx, fy = _frames(data_dir, x), _frames(data_dir, y)
    # Enrolled from a frame the stream never shows.
    templates = {x: _template(gate_analyzer, fx[-1]), y: _template(gate_analyzer, fy[-1])}
    # The pair is what the test needs: close enough to share a track.
    assert float(_template(gate_analyzer, fx[0]) @ _template(gate_analyzer, fy[0])) > 0.3
    stream = StreamAnalyzer(gate_analyzer, config)
    blank = np.full_like(fx[0], 128)
    shown = [(x, fx[i]) for i in range(config.evidence.min_frames - 1)]
    shown += [("", blank)] * 3 + [(y, fy[i]) for i in range(6)]
    decided = []
    for i, (who, image) in enumerate(shown):
        for report in stream.process(image, i / 30):
            if report.verdict.status == "live" and report.track_id not in stream.decided:
                embedding = report.verdict.embedding
                matches = [Match(s, float(embedding @ t)) for s, t in templates.items()]
                decided.append((who, decide(matches, 0.45, 0.08).subject_id))
                stream.mark_decided(report.track_id)
    assert decided, "the newcomer was never decided"
    # Whoever stands in front of the camera is who is matched (or nobody), never the leaver.
    assert all(subject in (who, None) for who, subject in decided), decided
    assert (y, y) in decided
