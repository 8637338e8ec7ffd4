"""``facepay analyze``, ``facepay eval`` and ``facepay bench-pipeline``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analyzer import FaceAnalyzer
from pipeline.config import PipelineConfig
from pipeline.evaluate import (
    SampleSet,
    Selection,
    all_pair_scores,
    analyse_images,
    identity_folders,
    list_images,
    pair_images,
    parse_pairs,
    protocol_scores,
)
from pipeline.image import load_image
from pipeline.metrics import pad_rates, score_summary, verification_report
from pipeline.models import ModelStore
from stream_server.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, emit, say

DATA_ENV = "FACEPAY_TEST_DATA"


def _models_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        default=os.environ.get("FACEPAY_MODELS_DIR"),
        help="folder with the model files (env FACEPAY_MODELS_DIR; default models/)",
    )


def register(sub: Any) -> None:
    """Add the pipeline commands to the ``facepay`` parser."""
    p = sub.add_parser("analyze", help="detect, check and score the faces in photos (demo)")
    _models_arg(p)
    p.add_argument("images", nargs="+", type=Path, help="photos to analyse")
    p.set_defaults(handler=cmd_analyze)

    p = sub.add_parser("eval", help="accuracy of recognition and liveness on photo folders")
    _models_arg(p)
    p.add_argument("faces_dir", type=Path, help="one sub-folder of photos per identity")
    p.add_argument("--spoof", type=Path, help="folder of attack photos (prints, screens)")
    p.add_argument("--live", type=Path, help="folder of genuine live captures")
    p.add_argument("--pairs", type=Path, help="LFW-format pairs file to score as well")
    p.add_argument(
        "--face-select",
        choices=("single", "central"),
        help="single: skip images with several comparable faces (default); "
        "central: the face nearest the centre (default with --pairs)",
    )
    p.add_argument("--plot", type=Path, help="write score histograms and a DET curve (PNG)")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("bench-pipeline", help="per-stage latency and frames/s at 640x480")
    _models_arg(p)
    p.add_argument("--image", type=Path, help="photo to build the test frame from")
    p.add_argument("--iterations", type=int, default=50, help="timed runs per stage")
    p.add_argument("--frames", type=int, default=60, help="frames per worker for frames/s")
    p.set_defaults(handler=cmd_bench_pipeline)


def build_analyzer(args: argparse.Namespace) -> FaceAnalyzer:
    """The analyzer of the default config on the verified models of ``--models-dir``."""
    return FaceAnalyzer.from_config(PipelineConfig(), ModelStore(args.models_dir))


def cmd_analyze(args: argparse.Namespace) -> int:
    """One JSON line per image: faces, quality, liveness; then pairwise similarity."""
    analyzer = build_analyzer(args)
    firsts: list[tuple[str, Any]] = []
    for path in args.images:
        image = load_image(path)
        results = analyzer.analyze(image)
        # An upside-down face is detected and even embedded, but its embedding matches
        # nobody (enrolment refuses such a photo): flag it and leave it out of the pairs.
        turned = analyzer.upside_down(image, [r.face for r in results]) if results else []
        emit(
            {
                "image": str(path),
                "size": [int(image.shape[1]), int(image.shape[0])],
                "faces": [
                    {
                        **r.face.to_json(),
                        "quality": r.quality.to_json(),
                        "p_real": None if r.p_real is None else round(r.p_real, 4),
                        "live": None
                        if r.p_real is None
                        else r.p_real >= analyzer.config.liveness.threshold,
                        "upside_down": flag,
                    }
                    for r, flag in zip(results, turned, strict=True)
                ],
            }
        )
        flagged = zip(results, turned, strict=True)
        usable = [r for r, flag in flagged if r.embedding is not None and not flag]
        if usable:
            firsts.append((str(path), max(usable, key=lambda r: r.face.box.area).embedding))
    if len(firsts) > 1:
        threshold = analyzer.config.match.threshold
        pairs = []
        for i in range(len(firsts)):
            for j in range(i + 1, len(firsts)):
                score = float(firsts[i][1] @ firsts[j][1])
                pairs.append(
                    {
                        "a": firsts[i][0],
                        "b": firsts[j][0],
                        "cosine": round(score, 4),
                        "same_person": score >= threshold,
                    }
                )
        emit({"similarity": pairs, "threshold": threshold})
    return EXIT_OK


def _progress(label: str) -> Any:
    def report(done: int, total: int) -> None:
        if total >= 50 and (done % 200 == 0 or done == total):
            say(f"{label}: {done}/{total} images")

    return report


def _pad_section(analyzer: FaceAnalyzer, live_dir: Path, spoof_dir: Path) -> dict[str, Any]:
    items = [("live", p) for p in list_images(live_dir)]
    items += [("spoof", p) for p in list_images(spoof_dir)]
    got = analyse_images(
        analyzer, items, "single", embed=False, liveness=True, progress=_progress("liveness")
    )
    live = np.array([s.p_real for s in got.usable if s.identity == "live"], np.float32)
    spoof = np.array([s.p_real for s in got.usable if s.identity == "spoof"], np.float32)
    threshold = analyzer.config.liveness.threshold
    out: dict[str, Any] = pad_rates(live, spoof, threshold)
    out["presentations"] = {"live": int(live.size), "spoof": int(spoof.size)}
    out["liveness_scores"] = {"live": score_summary(live), "spoof": score_summary(spoof)}
    out["pad_separated"] = bool(live.size and spoof.size and live.min() > spoof.max())
    out["pad_skipped"] = got.skipped_counts()
    out["_live"], out["_spoof"] = live, spoof
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    """Pair scores over FACES_DIR (and a pairs protocol), PAD rates over spoof/live folders."""
    if (args.spoof is None) != (args.live is None):
        say("facepay eval: --spoof and --live go together")
        return EXIT_USAGE
    for folder in [args.faces_dir, args.spoof, args.live]:
        if folder is not None and not folder.is_dir():
            say(f"facepay eval: {folder} is not a folder")
            return EXIT_USAGE
    pairs: list[tuple[str, int, str, int]] = []
    if args.pairs:
        try:
            pairs = parse_pairs(args.pairs)
        except (OSError, ValueError) as exc:
            say(f"facepay eval: cannot read pairs file: {exc}")
            return EXIT_USAGE
    analyzer = build_analyzer(args)
    how: Selection = args.face_select or ("central" if args.pairs else "single")
    folders = identity_folders(args.faces_dir)
    items = [(name, p) for name, paths in folders for p in paths]
    if args.pairs:
        known = {p for _, p in items}
        items += [it for it in pair_images(pairs, args.faces_dir) if it[1] not in known]
    say(f"facepay eval: {len(items)} images in {len(folders)} folders")
    samples: SampleSet = analyse_images(
        analyzer, items, how, embed=True, liveness=False, progress=_progress("faces")
    )
    genuine, impostor = all_pair_scores(samples.samples)
    threshold = analyzer.config.match.threshold
    out: dict[str, Any] = {"faces_dir": str(args.faces_dir), "face_select": how}
    out["identities"] = len({s.identity for s in samples.usable})
    out["images"] = {"total": len(samples.samples), "used": len(samples.usable)}
    out["skipped"] = samples.skipped_counts()
    out.update(verification_report(genuine, impostor, threshold).to_json())
    out["scores"] = {"genuine": score_summary(genuine), "impostor": score_summary(impostor)}
    plot_sets: dict[str, Any] = {"all pairs": (genuine, impostor)}
    if args.pairs:
        emb = {s.path: s.embedding for s in samples.samples}
        pg, pi, failed = protocol_scores(pairs, emb, args.faces_dir)
        proto = verification_report(pg, pi, threshold).to_json()
        proto["pairs_file"] = str(args.pairs)
        proto["failed_to_acquire"] = failed
        eer_thr = proto["eer_threshold"]
        proto["accuracy_at_eer_threshold"] = _accuracy(
            pg, pi, eer_thr if isinstance(eer_thr, float) else None
        )
        out["protocol"] = proto
        plot_sets["pairs file"] = (pg, pi)
    pad: dict[str, Any] | None = None
    if args.spoof is not None and args.live is not None:
        pad = _pad_section(analyzer, args.live, args.spoof)
        out.update({k: v for k, v in pad.items() if not k.startswith("_")})
    if args.plot:
        from stream_server.plots import plot_eval

        try:
            plot_eval(args.plot, plot_sets, threshold, pad)
        except ImportError:
            say("facepay eval: --plot needs matplotlib: pip install 'facepay[plot]'")
            emit(out)
            return EXIT_USAGE
        out["plot"] = str(args.plot)
    emit(out)
    return EXIT_OK


def _accuracy(genuine: np.ndarray, impostor: np.ndarray, thr: float | None) -> float | None:
    if thr is None or not (genuine.size and impostor.size):
        return None
    right = (genuine >= thr).sum() + (impostor < thr).sum()
    return round(float(right) / (genuine.size + impostor.size), 6)


def _default_image() -> Path | None:
    root = os.environ.get(DATA_ENV)
    candidates = [Path(root)] if root else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for base in candidates:
        path = base / "faces" / "obama" / "obama.jpg"
        if path.is_file():
            return path
    return None


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    """Per-stage medians, the raw model medians, their ratio, and frames/s by workers."""
    from pipeline.bench import bench_pipeline

    image_path = args.image or _default_image()
    if image_path is None:
        say(f"facepay bench-pipeline: give --image PHOTO (or set {DATA_ENV})")
        return EXIT_USAGE
    if args.iterations < 3 or args.frames < 3:
        say("facepay bench-pipeline: --iterations and --frames must be at least 3")
        return EXIT_USAGE
    store = ModelStore(args.models_dir)
    result = bench_pipeline(
        lambda: FaceAnalyzer.from_config(PipelineConfig(), store),
        load_image(image_path),
        iterations=args.iterations,
        frames=args.frames,
        progress=say,
    )
    if result.get("faces", 0) < 1:
        say(f"facepay bench-pipeline: no usable face in {image_path}")
        emit(result)
        return EXIT_REFUSED
    result["image"] = str(image_path)
    emit(result)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(EXIT_USAGE)
