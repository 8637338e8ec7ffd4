"""The pipeline facade: stages built by name from config, with injected inference sessions.

``FaceAnalyzer.analyze(frame)`` runs detect -> quality gate -> align -> embed + liveness for
each face. Stages are plain objects with one small method each, so a test can swap any of
them (or the onnxruntime session inside) for a fake.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pipeline.align import align
from pipeline.config import PipelineConfig
from pipeline.detector import YuNetDetector
from pipeline.embedder import MobileFaceNetEmbedder
from pipeline.errors import ConfigError
from pipeline.image import to_bgr
from pipeline.liveness import LivenessModel, MiniFASNetFusion
from pipeline.models import ModelStore
from pipeline.orientation import upside_down
from pipeline.quality import QualityReport, QualityThresholds, assess
from pipeline.types import Face, FloatArray, ImageArray

_T = TypeVar("_T")
_Factory = Callable[[ModelStore, PipelineConfig], _T]


class Detector(Protocol):
    """``detect(image) -> list[Face]``."""

    def detect(self, image: ImageArray) -> list[Face]: ...


class Embedder(Protocol):
    """``embed(aligned) -> vector`` (L2-normalised)."""

    def embed(self, aligned: ImageArray) -> FloatArray: ...


class Liveness(Protocol):
    """``liveness(frame, face) -> p_real`` in [0, 1]."""

    def liveness(self, frame: ImageArray, face: Face) -> float: ...


def _yunet(store: ModelStore, config: PipelineConfig) -> Detector:
    c = config.detector
    return YuNetDetector(
        store.session("yunet"),
        score_threshold=c.score_threshold,
        nms_threshold=c.nms_threshold,
        top_k=c.top_k,
        max_side=c.max_side,
    )


def _mobilefacenet(store: ModelStore, config: PipelineConfig) -> Embedder:
    return MobileFaceNetEmbedder(
        store.session("mobilefacenet"), flip_augment=config.embedder.flip_augment
    )


def _minifasnet(*names: str) -> Callable[[ModelStore, PipelineConfig], Liveness]:
    scales = {"minifasnet_v2": 2.7, "minifasnet_v1se": 4.0}

    def build(store: ModelStore, config: PipelineConfig) -> Liveness:
        return MiniFASNetFusion([LivenessModel(store.session(n), scales[n]) for n in names])

    return build


DETECTORS: dict[str, Callable[[ModelStore, PipelineConfig], Detector]] = {"yunet": _yunet}
EMBEDDERS: dict[str, Callable[[ModelStore, PipelineConfig], Embedder]] = {
    "mobilefacenet": _mobilefacenet
}
LIVENESS: dict[str, Callable[[ModelStore, PipelineConfig], Liveness]] = {
    "minifasnet_fusion": _minifasnet("minifasnet_v2", "minifasnet_v1se"),
    "minifasnet_v2": _minifasnet("minifasnet_v2"),
    "minifasnet_v1se": _minifasnet("minifasnet_v1se"),
}


def _pick(registry: dict[str, _Factory[_T]], name: str, kind: str) -> _Factory[_T]:
    try:
        return registry[name]
    except KeyError as exc:
        raise ConfigError(f"unknown {kind} {name!r}; known: {sorted(registry)}") from exc


def quality_limits(config: PipelineConfig, *, video: bool = False) -> QualityThresholds:
    """The quality gate's thresholds from config.

    ``video`` adds the rule that only live video needs: ``max_face_frac`` (a face too close
    for liveness). A single photo is judged without it: a close-cropped portrait is a good
    template, and no verdict rests on its liveness.
    """
    q = config.quality
    return QualityThresholds(
        min_face_px=q.min_face_px,
        min_sharpness=q.min_sharpness,
        max_yaw_deg=q.max_yaw_deg,
        max_pitch_deg=q.max_pitch_deg,
        min_brightness=q.min_brightness,
        max_brightness=q.max_brightness,
        min_detection_score=q.min_detection_score,
        max_face_frac=q.max_face_frac if video else 1.0,
        min_edge_margin=q.min_edge_margin,
        max_outside_frac=q.max_outside_frac,
    )


@dataclass(frozen=True, slots=True)
class FaceAnalysis:
    """One face in one frame: where, how good, how live, and its embedding.

    ``p_real`` and ``embedding`` are None when the stage was skipped (quality failed or the
    caller did not ask for it).
    """

    face: Face
    quality: QualityReport
    p_real: float | None
    embedding: FloatArray | None
    timings_ms: dict[str, float] = field(default_factory=dict)


class FaceAnalyzer:
    """The stages of the recognition pipeline, composed."""

    def __init__(
        self,
        detector: Detector,
        embedder: Embedder,
        liveness: Liveness,
        config: PipelineConfig | None = None,
    ) -> None:
        self.detector = detector
        self.embedder = embedder
        self.liveness_model = liveness
        self.config = config or PipelineConfig()
        self.limits = quality_limits(self.config)

    @classmethod
    def from_config(cls, config: PipelineConfig, store: ModelStore) -> FaceAnalyzer:
        """Build each stage by the name config gives, from verified model files."""
        return cls(
            _pick(DETECTORS, config.detector.name, "detector")(store, config),
            _pick(EMBEDDERS, config.embedder.name, "embedder")(store, config),
            _pick(LIVENESS, config.liveness.name, "liveness model")(store, config),
            config,
        )

    def detect(self, image: ImageArray) -> list[Face]:
        """Faces in the image, best first."""
        return self.detector.detect(to_bgr(image))

    def upside_down(self, image: ImageArray, faces: Sequence[Face]) -> list[bool]:
        """Per face, whether it is upside down (``pipeline.orientation``; one detector run)."""
        margin = self.config.quality.upside_down_margin
        return upside_down(self.detector.detect, to_bgr(image), faces, margin)

    def analyze_face(
        self,
        image: ImageArray,
        face: Face,
        *,
        embed: bool = True,
        liveness: bool = True,
        require_quality: bool = True,
        limits: QualityThresholds | None = None,
    ) -> FaceAnalysis:
        """Quality-check one face; embed it and score liveness if it passes (or if not required).

        ``limits`` overrides the analyzer's quality thresholds (a gate wants larger faces than
        a checkout, with the same models).
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        aligned = align(image, face)
        t1 = time.perf_counter()
        report = assess(face, aligned, limits or self.limits, image.shape)
        t2 = time.perf_counter()
        timings["align"] = (t1 - t0) * 1000
        timings["quality"] = (t2 - t1) * 1000
        usable = report.ok or not require_quality
        # A face failing only for being too close is still scored: the evidence never counts
        # it as live, but a print or a screen this close scores ~0 and is declined at once.
        scorable = usable or report.reasons == ("too_close",)
        vector = None
        p_real = None
        if usable and embed:
            vector = self.embedder.embed(aligned)
            t3 = time.perf_counter()
            timings["embed"] = (t3 - t2) * 1000
            t2 = t3
        if scorable and liveness:
            p_real = self.liveness_model.liveness(image, face)
            timings["liveness"] = (time.perf_counter() - t2) * 1000
        return FaceAnalysis(face, report, p_real, vector, timings)

    def analyze(
        self, image: ImageArray, *, embed: bool = True, liveness: bool = True
    ) -> list[FaceAnalysis]:
        """Every face in a frame, analysed."""
        image = to_bgr(image)
        return [
            self.analyze_face(image, face, embed=embed, liveness=liveness)
            for face in self.detector.detect(image)
        ]
