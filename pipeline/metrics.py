"""Biometric error rates: verification (EER, TAR@FAR, DET) and presentation attack detection.

Terms follow ISO/IEC 19795-1 and 30107-3: FAR/FRR over comparison scores, APCER (attacks
accepted as live) and BPCER (bona fide presentations rejected) at a liveness threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.types import FloatArray

FAR_POINTS = (1e-2, 1e-3)


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """Error rates of genuine vs impostor comparison scores (higher score = more alike)."""

    genuine: int
    impostor: int
    eer: float | None
    eer_threshold: float | None
    threshold: float
    far: float | None
    frr: float | None
    tar_at_far: dict[str, float | None]
    separated: bool | None

    def to_json(self) -> dict[str, object]:
        """DESIGN.md §5 keys: pairs, eer, threshold, far, frr, tar_at_far (+ extras)."""
        return {
            "pairs": {"genuine": self.genuine, "impostor": self.impostor},
            "eer": _r(self.eer),
            "eer_threshold": _r(self.eer_threshold),
            "threshold": self.threshold,
            "far": _r(self.far),
            "frr": _r(self.frr),
            "tar_at_far": {k: _r(v) for k, v in self.tar_at_far.items()},
            "separated": self.separated,
        }


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def score_summary(scores: FloatArray) -> dict[str, float | int | None]:
    """Count, min, 1st/50th/99th percentile and max of a score set."""
    if scores.size == 0:
        return {"n": 0, "min": None, "p01": None, "median": None, "p99": None, "max": None}
    q = np.percentile(scores, [1, 50, 99])
    return {
        "n": int(scores.size),
        "min": _r(float(scores.min()), 4),
        "p01": _r(float(q[0]), 4),
        "median": _r(float(q[1]), 4),
        "p99": _r(float(q[2]), 4),
        "max": _r(float(scores.max()), 4),
    }


def far_frr(genuine: FloatArray, impostor: FloatArray, threshold: float) -> tuple[float, float]:
    """(FAR, FRR) when accepting scores >= threshold."""
    far = float((impostor >= threshold).mean()) if impostor.size else float("nan")
    frr = float((genuine < threshold).mean()) if genuine.size else float("nan")
    return far, frr


def det_curve(genuine: FloatArray, impostor: FloatArray) -> tuple[FloatArray, ...]:
    """(thresholds, FAR, FRR) at every distinct score, thresholds ascending."""
    thresholds = np.unique(np.concatenate([genuine, impostor]))
    g = np.sort(genuine)
    i = np.sort(impostor)
    # FRR(t) = share of genuine < t; FAR(t) = share of impostor >= t.
    frr = np.searchsorted(g, thresholds, side="left") / max(g.size, 1)
    far = 1.0 - np.searchsorted(i, thresholds, side="left") / max(i.size, 1)
    return thresholds, far.astype(np.float64), frr.astype(np.float64)


def equal_error_rate(genuine: FloatArray, impostor: FloatArray) -> tuple[float, float]:
    """(EER, threshold): where FAR and FRR cross, linearly interpolated between scores."""
    thresholds, far, frr = det_curve(genuine, impostor)
    diff = far - frr  # decreasing in the threshold
    k = int(np.argmax(diff <= 0)) if np.any(diff <= 0) else len(diff) - 1
    if k == 0:
        return float((far[0] + frr[0]) / 2), float(thresholds[0])
    d0, d1 = diff[k - 1], diff[k]
    w = d0 / (d0 - d1) if d0 != d1 else 0.5
    eer = (1 - w) * (far[k - 1] + frr[k - 1]) / 2 + w * (far[k] + frr[k]) / 2
    thr = (1 - w) * thresholds[k - 1] + w * thresholds[k]
    return float(eer), float(thr)


def tar_at_far(genuine: FloatArray, impostor: FloatArray, target: float) -> float | None:
    """Share of genuine scores accepted at the lowest threshold whose FAR <= target.

    None when there are too few impostor pairs to measure that FAR (fewer than 1/target).
    """
    if impostor.size < round(1 / target):
        return None
    ordered = np.sort(impostor)[::-1]
    allowed = int(np.floor(target * impostor.size))  # impostors allowed at or above t
    # Threshold just above the (allowed+1)-th highest impostor score.
    thr = np.nextafter(ordered[allowed], np.float64(np.inf))
    return float((genuine >= thr).mean())


def verification_report(
    genuine: FloatArray, impostor: FloatArray, threshold: float
) -> VerificationReport:
    """Every verification figure ``facepay eval`` reports."""
    genuine = np.asarray(genuine, dtype=np.float64)
    impostor = np.asarray(impostor, dtype=np.float64)
    eer = eer_thr = far = frr = None
    separated = None
    if genuine.size and impostor.size:
        eer, eer_thr = equal_error_rate(genuine, impostor)
        far, frr = far_frr(genuine, impostor, threshold)
        separated = bool(genuine.min() > impostor.max())
    return VerificationReport(
        genuine=int(genuine.size),
        impostor=int(impostor.size),
        eer=eer,
        eer_threshold=eer_thr,
        threshold=threshold,
        far=far,
        frr=frr,
        tar_at_far={
            f"{t:.0e}".replace("e-0", "e-"): tar_at_far(genuine, impostor, t) for t in FAR_POINTS
        }
        if genuine.size
        else {"1e-2": None, "1e-3": None},
        separated=separated,
    )


def pad_rates(live: FloatArray, attack: FloatArray, threshold: float) -> dict[str, float | None]:
    """APCER (attacks with p_real >= threshold) and BPCER (live with p_real < threshold)."""
    apcer = float((attack >= threshold).mean()) if attack.size else None
    bpcer = float((live < threshold).mean()) if live.size else None
    return {"apcer": apcer, "bpcer": bpcer, "liveness_threshold": threshold}
