"""The 1:N decision: match only above a threshold AND ahead of the runner-up by a margin."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DecisionStatus = Literal["match", "no_match", "ambiguous"]
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Match:
    """A subject and its best cosine similarity to the probe."""

    subject_id: str
    score: float


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of ``decide``: ``subject_id`` is set only when ``status == "match"``.

    ``second_score`` is the best score of a different subject, -1.0 when there is none.
    """

    status: DecisionStatus
    subject_id: str | None
    score: float
    second_score: float
    reason: str


def decide(matches: Sequence[Match], threshold: float, margin: float) -> Decision:
    """Turn search results into a decision.

    ``match`` needs best >= ``threshold`` and best - second >= ``margin``, where second is
    the best score of a different subject (-1.0 when there is none); ``ambiguous`` when the
    threshold holds but the margin does not; otherwise ``no_match``. Boundaries are
    inclusive.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not matches:
        return Decision("no_match", None, -1.0, -1.0, "no candidates")
    if not all(math.isfinite(m.score) for m in matches):
        # NaN compares False with both bounds below and would read as a match.
        raise ValueError("match scores must be finite")
    ranked = sorted(matches, key=lambda m: m.score, reverse=True)
    best = ranked[0]
    second = next((m.score for m in ranked[1:] if m.subject_id != best.subject_id), -1.0)
    gap = best.score - second
    if best.score < threshold - _EPS:
        reason = f"best score {best.score:.4f} below threshold {threshold:.4f}"
        return Decision("no_match", None, best.score, second, reason)
    if gap < margin - _EPS:
        reason = f"margin {gap:.4f} over the runner-up below required {margin:.4f}"
        return Decision("ambiguous", None, best.score, second, reason)
    reason = f"score {best.score:.4f} >= {threshold:.4f}, margin {gap:.4f} >= {margin:.4f}"
    return Decision("match", best.subject_id, best.score, second, reason)
