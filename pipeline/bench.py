"""``facepay bench-pipeline``: per-stage latency and throughput on one CPU machine.

Every figure is a median over repeated runs on a 640x480 frame made from a photo by the
stream generator (camera view, centred on the photo's face). The raw model times are
``session.run`` alone on pre-built inputs, measured in the same run, so
``overhead_ratio = frame_ms / model_ms`` is what our own code adds around the models.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.align import align
from pipeline.analyzer import FaceAnalyzer
from pipeline.detector import YuNetDetector
from pipeline.embedder import MobileFaceNetEmbedder
from pipeline.liveness import MiniFASNetFusion, liveness_crop
from pipeline.quality import assess
from pipeline.streamgen import StreamSpec, generate_frames
from pipeline.types import ImageArray, focus_box


def _median_ms(fn: Callable[[], object], iterations: int) -> float:
    fn()  # warm-up: first runs allocate and are not representative
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def make_frames(analyzer: FaceAnalyzer, photo: ImageArray, count: int) -> list[ImageArray]:
    """``count`` 640x480 camera-view frames of the photo's largest face."""
    focus = focus_box(analyzer.detect(photo))
    spec = StreamSpec(frames=count, cover=True, focus=focus, seed=1)
    return list(generate_frames(photo, spec))


def _throughput(
    factory: Callable[[], FaceAnalyzer], frames: list[ImageArray], workers: int
) -> float:
    analyzers = [factory() for _ in range(workers)]
    for a in analyzers:
        a.analyze(frames[0])

    def run(index: int) -> int:
        for frame in frames:
            analyzers[index].analyze(frame)
        return len(frames)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = sum(pool.map(run, range(workers)))
    return done / (time.perf_counter() - t0)


def bench_pipeline(
    factory: Callable[[], FaceAnalyzer],
    photo: ImageArray,
    *,
    iterations: int = 50,
    frames: int = 60,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """JSON-ready results with DESIGN.md §5 keys: stages_ms, frame_ms, model_ms, ... fps."""
    analyzer = factory()
    stream = make_frames(analyzer, photo, max(frames, 2))
    frame = stream[0]
    faces = analyzer.detect(frame)
    result: dict[str, Any] = {"width": 640, "height": 480, "faces": len(faces)}
    if not faces:
        return result
    face = max(faces, key=lambda f: f.box.area)
    aligned = align(frame, face)
    say = progress or (lambda _msg: None)
    say("bench-pipeline: timing stages")
    stages = {
        "detect": _median_ms(lambda: analyzer.detect(frame), iterations),
        "align": _median_ms(lambda: align(frame, face), iterations),
        "quality": _median_ms(lambda: assess(face, aligned, analyzer.limits), iterations),
        "embed": _median_ms(lambda: analyzer.embedder.embed(aligned), iterations),
        "liveness": _median_ms(lambda: analyzer.liveness_model.liveness(frame, face), iterations),
    }
    model = _raw_model_ms(analyzer, frame, aligned, face, iterations)
    frame_ms = _median_ms(lambda: analyzer.analyze(frame), iterations)
    model_ms = sum(model.values())
    say("bench-pipeline: measuring frames/s with 1 and 2 workers")
    fps = {str(w): round(_throughput(factory, stream[:frames], w), 2) for w in (1, 2)}
    result.update(
        stages_ms={k: round(v, 3) for k, v in stages.items()},
        model_stages_ms={k: round(v, 3) for k, v in model.items()},
        frame_ms=round(frame_ms, 3),
        model_ms=round(model_ms, 3),
        overhead_ratio=round(frame_ms / model_ms, 4),
        fps=fps,
        iterations=iterations,
    )
    return result


def _raw_model_ms(
    analyzer: FaceAnalyzer, frame: ImageArray, aligned: ImageArray, face: Any, iterations: int
) -> dict[str, float]:
    """``session.run`` alone for each model the frame needs, on inputs built beforehand."""
    out: dict[str, float] = {}
    det = analyzer.detector
    if isinstance(det, YuNetDetector):
        blob, _ = det._prepare(frame)
        feed = {det.session.get_inputs()[0].name: blob}
        out["detect"] = _median_ms(lambda: det.session.run(None, feed), iterations)
    emb = analyzer.embedder
    if isinstance(emb, MobileFaceNetEmbedder):
        efeed = {emb.session.get_inputs()[0].name: emb.preprocess(aligned)}
        runs = 2 if emb.flip_augment else 1
        out["embed"] = runs * _median_ms(lambda: emb.session.run(None, efeed), iterations)
    live = analyzer.liveness_model
    if isinstance(live, MiniFASNetFusion):
        total = 0.0
        for m in live.models:
            crop = liveness_crop(frame, face.box, m.scale)
            blob = crop.transpose(2, 0, 1)[None].astype(np.float32)
            feed = {m.session.get_inputs()[0].name: blob}
            total += _median_ms(_runner(m.session, feed), iterations)
        out["liveness"] = total
    return out


def _runner(session: Any, feed: dict[str, Any]) -> Callable[[], object]:
    """A bound ``session.run`` for timing (a closure per model, not a late-bound lambda)."""

    def run() -> object:
        return session.run(None, feed)

    return run
