"""Per-track evidence across frames, and the live / spoof / undecided verdict.

One frame never decides. Genuine single frames score as low as 0.33 (blur, a blink, a hand
passing), prints and screens occasionally score high on one frame, so the verdict rests on:
- fused liveness: a trimmed mean of the window's p_real that drops the lowest ``trim_low``
  fraction (dips from a live face are forgiven; a spoof scores low on most frames, which
  trimming cannot hide);
- enough video: at least ``min_frames`` quality-passed frames over ``min_span_s`` seconds;
- a fast spoof exit when the last ``spoof_fast_frames`` frames all score under ``spoof_floor``;
- a face too close to the camera (quality ``too_close``) adds no evidence, since its
  liveness crops hold no context and live faces score low there; its scores are kept apart
  and can only take the fast spoof exit (a print or a screen that close scores ~0), never
  make the face live;
- optionally, the rigidity cue (``use_rigidity``): a sheet of paper or a tablet moves as one
  rigid plane, so its five landmarks follow an affine map of their first position exactly,
  while a real head turning even a few degrees moves the nose off that map (parallax). The
  residual, in eye distances, is reported in every decided verdict (``nonrigidity``; one
  least-squares solve over the window's frames, so undecided verdicts, computed on every
  analysed frame, leave it out).
The embedding is the quality-weighted mean of the embeddings of the frames that were
themselves scored live, re-normalised: a frame whose own score says photo or screen may show
someone else, and must not pull the track's identity towards them (a look-alike alternating
their own face with a victim's print in one box).
The evidence belongs to one person: a frame whose embedding is below ``same_person_min_cos``
to the mean of the window's live frames drops those live frames (the frames scored as a photo
or a screen stay, as evidence against the track), so the live evidence starts again from
it. Without that, someone stepping into the box of a face that left before its verdict
(and close enough to it to pass the tracker's 0.3 veto) completed that face's evidence with
a frame or two of their own: the verdict's embedding was mostly the first face's, so a gate
charged the first person and opened for the second.
A borderline track (its fused score below the threshold once it had ``min_frames`` scores,
but not yet ``spoof_min_frames`` to call it a spoof) needs ``spoof_min_frames`` scores for a
live verdict as well: otherwise a verdict recomputed on every frame gives a moderately low
spoof many chances to cross the threshold once, and live is final.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.analyzer import FaceAnalysis
from pipeline.config import EvidenceConfig
from pipeline.embedder import l2_normalise
from pipeline.types import FloatArray

Status = Literal["live", "spoof", "undecided"]
#: Landmark motion (in eye distances) below which the rigidity cue has nothing to say: a
#: face that stays still is consistent with any model.
_RIGIDITY_MIN_MOTION = 0.3
#: Affine residual (eye distances) under which the motion counts as a rigid plane. YuNet's
#: landmark jitter on rigidly moved photos measured 0.006-0.031 (80th pct) over 15 streams.
_RIGID_PLANE_RESIDUAL = 0.035


@dataclass(frozen=True, slots=True)
class FrameEvidence:
    """What one quality-passed frame contributed."""

    t: float
    p_real: float | None
    embedding: FloatArray | None
    weight: float
    landmarks: FloatArray


@dataclass(frozen=True, slots=True)
class Verdict:
    """The evidence's current conclusion about one face track."""

    status: Status
    reasons: tuple[str, ...]
    liveness: float | None
    frames: int
    span_s: float
    embedding: FloatArray | None
    nonrigidity: float | None
    motion: float | None

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary (never the embedding itself)."""
        return {
            "status": self.status,
            "reasons": list(self.reasons),
            "liveness": None if self.liveness is None else round(self.liveness, 4),
            "frames": self.frames,
            "span_s": round(self.span_s, 3),
            "nonrigidity": None if self.nonrigidity is None else round(self.nonrigidity, 4),
            "motion": None if self.motion is None else round(self.motion, 3),
        }


def trimmed_mean(values: FloatArray, trim_low: float) -> float:
    """Mean after dropping the lowest ``trim_low`` fraction (at least one value is kept)."""
    ordered = np.sort(values)
    drop = min(int(len(ordered) * trim_low), len(ordered) - 1)
    return float(ordered[drop:].mean())


def rigidity(landmarks: list[FloatArray]) -> tuple[float, float]:
    """(non-rigidity, motion) of a landmark sequence, both in eye distances.

    Non-rigidity is the 80th percentile over frames of the RMS residual of the best affine
    map from the first frame's five landmarks to that frame's; motion is the largest mean
    landmark displacement from the first frame.
    """
    ref = landmarks[0].astype(np.float64)
    eye = float(np.linalg.norm(ref[1] - ref[0])) or 1.0
    if len(landmarks) < 2:
        return 0.0, 0.0
    design = np.hstack([ref, np.ones((5, 1))])
    targets = np.stack(landmarks[1:]).astype(np.float64)  # (frames, 5, 2)
    # One solve for every frame: all share the design (the first frame), so lstsq takes the
    # frames' coordinates as columns of one right-hand side and fits each column alone,
    # as a call per frame would. A gate computes this for every frame of a decided track
    # in view, over up to a window of frames: per frame it was ~1.7 ms of numpy overhead.
    n = len(targets)
    columns = targets.transpose(1, 0, 2).reshape(5, 2 * n)
    coef, *_ = np.linalg.lstsq(design, columns, rcond=None)
    err = (columns - design @ coef).reshape(5, n, 2).transpose(1, 0, 2)
    residuals = np.sqrt((err**2).sum(axis=2).mean(axis=1)) / eye
    motions = np.linalg.norm(targets - ref, axis=2).mean(axis=1) / eye
    return float(np.percentile(residuals, 80)), float(motions.max())


class EvidenceAccumulator:
    """Collects frames of one face track and judges them."""

    def __init__(self, config: EvidenceConfig, liveness_threshold: float) -> None:
        self.config = config
        self.liveness_threshold = liveness_threshold
        self.frames: deque[FrameEvidence] = deque(maxlen=config.max_frames)
        #: (t, p_real) of frames set aside as too close: spoof evidence only.
        self.too_close: deque[tuple[float, float]] = deque(maxlen=config.max_frames)
        self.rejected: dict[str, int] = {}
        self.seen = 0
        #: Set once a verdict found the fused score below the threshold with too few scores
        #: to call a spoof (see the module docstring); a live verdict then needs
        #: ``spoof_min_frames`` scores. Set by ``verdict``: only a verdict is a chance to
        #: cross the threshold, and it has the fused score at hand.
        self.doubted = False
        #: How often the window was dropped because a frame showed someone else.
        self.restarts = 0
        #: Whether a verdict has been ``live`` since the last restart (see ``verdict``).
        self.judged_live = False

    def add(self, t: float, analysis: FaceAnalysis) -> bool:
        """Add one frame's analysis; returns whether it counted (quality passed)."""
        self.seen += 1
        if analysis.p_real is not None and not 0.0 <= analysis.p_real <= 1.0:
            # NaN compares False with every threshold and would read as live.
            raise ValueError(f"liveness score must be in [0, 1], got {analysis.p_real}")
        if not analysis.quality.ok:
            for reason in analysis.quality.reasons:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
            if analysis.quality.reasons == ("too_close",) and analysis.p_real is not None:
                self.too_close.append((t, analysis.p_real))
                self._slide(t)
            return False
        if analysis.embedding is not None and self._someone_else(analysis.embedding):
            # The live frames show someone else: their identity and their liveness are that
            # person's, so they go. Frames scored as a photo or a screen stay: they are
            # evidence against the track whoever is in them, and dropping them too let a
            # photo shown between glimpses of one's own face restart the window for ever,
            # never judged a spoof.
            live = self.liveness_threshold
            kept = [f for f in self.frames if f.p_real is None or f.p_real < live]
            self.frames = deque(kept, maxlen=self.config.max_frames)
            self.restarts += 1
            self.judged_live = False  # the newcomer is judged on their own frames
        self.frames.append(
            FrameEvidence(
                t=t,
                p_real=analysis.p_real,
                embedding=analysis.embedding,
                weight=max(analysis.quality.weight, 1e-3),
                landmarks=analysis.face.landmarks_array(),
            )
        )
        self._slide(t)
        return True

    def _someone_else(self, embedding: FloatArray) -> bool:
        """Whether ``embedding`` is another person than the window's live frames show.

        ``doubted`` survives a restart on purpose: a spoof could otherwise win a fresh
        chance to cross the threshold by showing another face in between. Frames without
        an embedding carry no liveness score either (``pipeline.stream``), so they cannot
        slip another person's liveness in unchecked."""
        reference = self.mean_embedding()
        if reference is None:
            return False
        return float(reference @ embedding) < self.config.same_person_min_cos

    def _slide(self, t: float) -> None:
        # The window slides: old evidence about a face that has since changed must not count.
        while self.frames and t - self.frames[0].t > self.config.window_s:
            self.frames.popleft()
        while self.too_close and t - self.too_close[0][0] > self.config.window_s:
            self.too_close.popleft()

    @property
    def embeddings_count(self) -> int:
        """How many frames in the window carry an embedding."""
        return sum(1 for f in self.frames if f.embedding is not None)

    def fused_liveness(self) -> float | None:
        """Trimmed mean of the window's liveness scores, or None without any."""
        scores = np.array([f.p_real for f in self.frames if f.p_real is not None], np.float32)
        return trimmed_mean(scores, self.config.trim_low) if scores.size else None

    def mean_embedding(self) -> FloatArray | None:
        """Quality-weighted mean of the embeddings of the window's frames scored live
        (``p_real`` at or above the threshold), L2-normalised; None without any."""
        pairs = [
            (f.embedding, f.weight)
            for f in self.frames
            if f.embedding is not None
            and f.p_real is not None
            and f.p_real >= self.liveness_threshold
        ]
        if not pairs:
            return None
        stacked = np.stack([e for e, _ in pairs])
        weights = np.array([w for _, w in pairs], dtype=np.float32)
        return l2_normalise((stacked * weights[:, None]).sum(axis=0))

    def _fast_spoof(self, scores: list[float]) -> bool:
        """Whether the last ``spoof_fast_frames`` scores are all under ``spoof_floor``."""
        n = self.config.spoof_fast_frames
        return len(scores) >= n and max(scores[-n:]) < self.config.spoof_floor

    def verdict(self) -> Verdict:
        """Live, spoof or undecided, with reasons."""
        cfg = self.config
        scored = [f for f in self.frames if f.p_real is not None]
        span = scored[-1].t - scored[0].t if scored else 0.0
        fused = self.fused_liveness()

        @functools.cache
        def rigid() -> tuple[float, float] | tuple[None, None]:
            if len(self.frames) < 2:
                return None, None
            return rigidity([f.landmarks for f in self.frames])

        def make(status: Status, *reasons: str, embedding: FloatArray | None = None) -> Verdict:
            nonrigid, motion = rigid() if status != "undecided" else (None, None)
            return Verdict(
                status=status,
                reasons=reasons,
                liveness=fused,
                frames=len(scored),
                span_s=span,
                embedding=embedding,
                nonrigidity=nonrigid,
                motion=motion,
            )

        if self._fast_spoof([f.p_real for f in scored if f.p_real is not None]):
            return make("spoof", "liveness_low")
        close = [p for _, p in self.too_close]
        if self._fast_spoof(close):
            # Resting on the too-close frames alone: their own score, count and span.
            return Verdict(
                status="spoof",
                reasons=("liveness_low",),
                liveness=trimmed_mean(np.array(close, np.float32), cfg.trim_low),
                frames=len(close),
                span_s=self.too_close[-1][0] - self.too_close[0][0],
                embedding=None,
                nonrigidity=None,
                motion=None,
            )
        if len(scored) < cfg.min_frames:
            return make("undecided", "need_more_frames")
        if span < cfg.min_span_s:
            return make("undecided", "need_longer_video")
        assert fused is not None  # scored is non-empty here
        needed = cfg.spoof_min_frames or cfg.min_frames
        if fused < self.liveness_threshold:
            if len(scored) < needed:
                self.doubted = True
                return make("undecided", "need_more_frames")
            return make("spoof", "liveness_low")
        if self.doubted and len(scored) < needed:
            return make("undecided", "need_more_frames")
        newest = scored[-1].p_real
        if not self.judged_live and newest is not None and newest < self.liveness_threshold:
            # A first "live" says the face in front of the camera now is live: callers act
            # on it at once. Trimmed fusion forgives a dip, but not as the newest frame: a
            # print of the same person held up where they stood a moment ago (their live
            # frames still in the window, and the same identity, so no restart) would
            # otherwise be judged live on its first frame. A live face's dip costs one
            # frame. Once judged live the verdict is as before (offline evaluation reads
            # the verdict a track ends with, often on a face turning away).
            return make("undecided", "latest_not_live")
        if cfg.use_rigidity and len(self.frames) >= cfg.rigidity_min_frames:
            nonrigid, motion = rigid()
            if (
                motion is not None
                and nonrigid is not None
                and motion >= _RIGIDITY_MIN_MOTION
                and nonrigid < _RIGID_PLANE_RESIDUAL
            ):
                return make("spoof", "rigid_plane")
        embedding = self.mean_embedding()
        if embedding is None:
            return make("undecided", "no_embedding")
        self.judged_live = True
        return make("live", embedding=embedding)
