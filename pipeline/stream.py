"""One video stream, frame by frame: detect, track, analyse, and judge each face track.

Synchronous and pure: the session room runs ``StreamAnalyzer.process`` in an executor, tests
run it on generated frames directly. A face that has not yet shown enough video stays
``undecided``; a stream without faces yields no track and so no verdict.

Frame selection (``PipelineConfig.selection``): detection and tracking run on every frame;
per face, the embedder runs only until its track holds ``max_embeddings`` embeddings, the
liveness models on every frame until ``evidence.min_frames`` scores and then every
``liveness_every`` frames, and a decided track gets no liveness and only an identity-check
embedding every ``recheck_every`` frames. At most
``max_faces_per_frame`` faces get model time per frame, undecided and larger ones first.
With an ``idle_check`` (gates), a frame taken while nobody is tracked skips even the
detector if the view has not changed since the detector last found it empty.

Each track is also checked once for an upside-down face (``pipeline.orientation``: one more
detector run, on the track's first frame that passes the quality gate); a track found upside
down gets the quality reason ``upside_down`` on every frame, so none of them counts as
evidence, and is looked at again every ``recheck_every`` frames in case the first look was
wrong.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.analyzer import FaceAnalysis, FaceAnalyzer, quality_limits
from pipeline.config import PipelineConfig
from pipeline.evidence import EvidenceAccumulator, Verdict
from pipeline.motion import ViewChange
from pipeline.orientation import upside_down
from pipeline.tracker import Tracker, TrackUpdate
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
    #: Time of the first frame in which this track's face reached ``ready_px``, or of the
    #: first frame skipped before it (the gate's decision clock starts there); None until
    #: it has.
    ready_since: float | None = None


def _refused(analysis: FaceAnalysis, reason: str) -> FaceAnalysis:
    """``analysis`` failing the quality gate for ``reason`` too: it adds no evidence."""
    quality = dataclasses.replace(
        analysis.quality, ok=False, reasons=(*analysis.quality.reasons, reason), weight=0.0
    )
    return dataclasses.replace(analysis, quality=quality, p_real=None, embedding=None)


class StreamAnalyzer:
    """Per-stream state: the tracker and one evidence accumulator per face track."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        config: PipelineConfig | None = None,
        *,
        keep_ended: bool = False,
    ) -> None:
        """``keep_ended``: keep the last verdict of every ended track for :meth:`verdicts`
        (offline evaluation). A server's stream keeps none: a gate's runs for days, and a
        verdict carries the face's embedding."""
        self.analyzer = analyzer
        self.keep_ended = keep_ended
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
        self.ready_since: dict[int, float] = {}
        self.ended: dict[int, Verdict] = {}
        self.decided: set[int] = set()
        #: The tracks the last ``process`` call ended (their ids never come back), so that a
        #: caller can drop what it keeps per track.
        self.just_ended: list[int] = []
        #: Per track: (upside down, frame number of the look) (``pipeline.orientation``).
        self.orientation: dict[int, tuple[bool, int]] = {}
        self.ready_px = self.config.quality.min_face_px
        self.limits = quality_limits(self.config, video=True)
        self.frames = 0
        #: Model runs saved by frame selection (embeddings, liveness) and by the idle check
        #: (detections), for benchmarks and tests.
        self.skipped = {"embed": 0, "liveness": 0, "detect": 0}
        #: The idle check before the detector (``pipeline.motion``): gates set it; None
        #: (checkout, enrolment) runs the detector on every frame.
        self.idle_check: ViewChange | None = None
        #: Whether the last :meth:`process` ran the detector (False: skipped by the check).
        self.detector_ran = False
        #: Whether the idle check of the last :meth:`process` saw the view move since it was
        #: last found empty (False when the check did not run: someone tracked, or no check).
        self.view_moved = False

    def mark_decided(self, track_id: int) -> None:
        """The caller decided this track: stop spending embedder and liveness time on it."""
        self.decided.add(track_id)

    def _plan(self, faces: list[Face], t: float) -> list[tuple[bool, bool]]:
        """(embed, liveness) per detected face, from its probable track's evidence."""
        sel = self.config.selection
        predicted = self.tracker.predict(t)
        probable: list[int | None] = []
        taken: set[int] = set()
        for face in faces:
            best, best_iou = None, self.config.tracker.iou_threshold
            for tid, box in predicted.items():
                iou = face.box.iou(box)
                if tid not in taken and iou >= best_iou:
                    best, best_iou = tid, iou
            if best is not None:
                taken.add(best)
            probable.append(best)

        def undecided(i: int) -> bool:
            guess = probable[i]
            return guess is None or guess not in self.decided

        order = sorted(range(len(faces)), key=lambda i: (not undecided(i), -faces[i].box.area))
        plan = [(False, False)] * len(faces)
        for rank, i in enumerate(order):
            track = probable[i]
            if rank >= sel.max_faces_per_frame:
                continue
            if sel.skip_decided and not undecided(i):
                plan[i] = (self.frames % sel.recheck_every == 0, False)
                continue
            acc = self.evidence.get(track) if track is not None else None
            scored = 0 if acc is None else sum(1 for f in acc.frames if f.p_real is not None)
            live = (
                scored < self.config.evidence.min_frames
                or self.frames % sel.liveness_every == 0
                # A doubted track needs spoof_min_frames scores in its window to go live:
                # scored every frame, a slow or busy stream can still collect them.
                or (acc is not None and acc.doubted)
            )
            # A liveness score always comes with its frame's embedding: without one, the
            # tracker cannot veto another face that steps into this track's box, and that
            # face's liveness would complete this face's evidence (someone else's entry
            # charged to this face). max_embeddings bounds only the frames scored for nothing.
            embed = acc is None or acc.embeddings_count < sel.max_embeddings or live
            plan[i] = (embed, live)
        return plan

    def _check_orientation(
        self,
        frame: ImageArray,
        faces: list[Face],
        updates: list[TrackUpdate],
        by_face: dict[int, FaceAnalysis],
    ) -> None:
        """Look for upside-down faces: once per track, on its first frame that passes the
        quality gate, and again every ``recheck_every`` frames while found upside down.

        Every face of the frame goes to ``upside_down``, due or not, so that none of their
        turned copies stands in for a due face the turned frame misses (an upright face
        beside an already checked one was otherwise judged against that one's turned score);
        only the due tracks' flags are kept."""
        every = self.config.selection.recheck_every
        due = []
        for update in updates:
            if not by_face[id(update.face)].quality.ok:
                continue
            seen = self.orientation.get(update.track_id)
            if seen is None or (seen[0] and self.frames - seen[1] >= every):
                due.append(update)
        if not due:
            return
        margin = self.config.quality.upside_down_margin
        flags = upside_down(self.analyzer.detect, frame, faces, margin)
        flag_of = {id(f): flag for f, flag in zip(faces, flags, strict=True)}
        for update in due:
            self.orientation[update.track_id] = (flag_of[id(update.face)], self.frames)

    def process(self, frame: ImageArray, t: float, since: float | None = None) -> list[TrackReport]:
        """Analyse one frame taken at ``t`` seconds; returns a report per tracked face.

        ``since``: when the first frame after the last one analysed was taken, if frames
        were skipped in between. A face first seen at ``ready_px`` here may have been that
        size in those frames already, so its ``ready_since`` is ``since``: under load the
        decision clock errs long, never short.
        """
        self.frames += 1
        self.just_ended = []
        # Nobody tracked: a view unchanged since it was last found empty needs no detector.
        idle = self.idle_check if not self.evidence else None
        self.detector_ran = idle is None or not idle.unchanged(frame, t)
        self.view_moved = idle is not None and idle.moved
        if not self.detector_ran:
            self.skipped["detect"] += 1
            return []
        faces = self.analyzer.detect(frame)
        if idle is not None:
            idle.looked(t, empty=not faces)
        plan = self._plan(faces, t)
        analyses = []
        for face, (embed, live) in zip(faces, plan, strict=True):
            self.skipped["embed"] += not embed
            self.skipped["liveness"] += not live
            analyses.append(
                self.analyzer.analyze_face(
                    frame, face, embed=embed, liveness=live, limits=self.limits
                )
            )
        updates = self.tracker.update(faces, t, [a.embedding for a in analyses])
        by_face = {id(f): a for f, a in zip(faces, analyses, strict=True)}
        self._check_orientation(frame, faces, updates, by_face)
        reports = []
        for update in updates:
            analysis = by_face[id(update.face)]
            if self.orientation.get(update.track_id, (False, 0))[0]:
                analysis = _refused(analysis, "upside_down")
            acc = self.evidence.get(update.track_id)
            if acc is None:
                acc = EvidenceAccumulator(self.config.evidence, self.config.liveness.threshold)
                self.evidence[update.track_id] = acc
                self.first_seen[update.track_id] = t
            acc.add(t, analysis)
            if update.track_id not in self.ready_since and (
                min(update.face.box.width, update.face.box.height) >= self.ready_px
            ):
                self.ready_since[update.track_id] = t if since is None else min(since, t)
            reports.append(
                TrackReport(
                    track_id=update.track_id,
                    face=update.face,
                    analysis=analysis,
                    verdict=acc.verdict(),
                    is_new=update.is_new,
                    first_seen=self.first_seen[update.track_id],
                    ready_since=self.ready_since.get(update.track_id),
                )
            )
        self.just_ended = self.tracker.pop_ended()
        for track_id in self.just_ended:
            acc = self.evidence.pop(track_id, None)
            self.first_seen.pop(track_id, None)
            self.ready_since.pop(track_id, None)
            self.orientation.pop(track_id, None)
            self.decided.discard(track_id)
            if acc is not None and self.keep_ended:
                self.ended[track_id] = acc.verdict()
        return reports

    def verdicts(self) -> dict[int, Verdict]:
        """Current verdict of every track seen so far (ended ones with ``keep_ended``)."""
        out = dict(self.ended)
        out.update({tid: acc.verdict() for tid, acc in self.evidence.items()})
        return out
