"""One video stream, frame by frame: detect, track, analyse, and judge each face track.

Synchronous and pure: the session room runs ``StreamAnalyzer.process`` in an executor, tests
run it on generated frames directly. A face that has not yet shown enough video stays
``undecided``; a stream without faces yields no track and so no verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.analyzer import FaceAnalysis, FaceAnalyzer
from pipeline.config import PipelineConfig
from pipeline.evidence import EvidenceAccumulator, Verdict
from pipeline.tracker import Tracker
from pipeline.types import Face, ImageArray


@dataclass(frozen=True, slots=True)
class TrackReport:
    """A tracked face in the current frame, with its analysis and the track's verdict."""

    track_id: int
    face: Face
    analysis: FaceAnalysis
    verdict: Verdict
    is_new: bool
    first_seen: float


class StreamAnalyzer:
    """Per-stream state: the tracker and one evidence accumulator per face track."""

    def __init__(self, analyzer: FaceAnalyzer, config: PipelineConfig | None = None) -> None:
        self.analyzer = analyzer
        self.config = config or analyzer.config
        tc = self.config.tracker
        self.tracker = Tracker(
            iou_threshold=tc.iou_threshold,
            max_missed=tc.max_missed,
            max_age_s=tc.max_age_s,
            embedding_threshold=tc.embedding_threshold,
            relink_threshold=tc.relink_threshold,
        )
        self.evidence: dict[int, EvidenceAccumulator] = {}
        self.first_seen: dict[int, float] = {}
        self.ended: dict[int, Verdict] = {}
        self.frames = 0

    def process(self, frame: ImageArray, t: float) -> list[TrackReport]:
        """Analyse one frame taken at ``t`` seconds; returns a report per tracked face."""
        self.frames += 1
        faces = self.analyzer.detect(frame)
        analyses = [self.analyzer.analyze_face(frame, f) for f in faces]
        updates = self.tracker.update(faces, t, [a.embedding for a in analyses])
        by_face = {id(f): a for f, a in zip(faces, analyses, strict=True)}
        reports = []
        for update in updates:
            analysis = by_face[id(update.face)]
            acc = self.evidence.get(update.track_id)
            if acc is None:
                acc = EvidenceAccumulator(self.config.evidence, self.config.liveness.threshold)
                self.evidence[update.track_id] = acc
                self.first_seen[update.track_id] = t
            acc.add(t, analysis)
            reports.append(
                TrackReport(
                    track_id=update.track_id,
                    face=update.face,
                    analysis=analysis,
                    verdict=acc.verdict(),
                    is_new=update.is_new,
                    first_seen=self.first_seen[update.track_id],
                )
            )
        for track_id in self.tracker.pop_ended():
            acc = self.evidence.pop(track_id, None)
            self.first_seen.pop(track_id, None)
            if acc is not None:
                self.ended[track_id] = acc.verdict()
        return reports

    def verdicts(self) -> dict[int, Verdict]:
        """Current verdict of every track seen so far (ended ones included)."""
        out = dict(self.ended)
        out.update({tid: acc.verdict() for tid, acc in self.evidence.items()})
        return out
