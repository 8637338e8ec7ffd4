"""1:N search over enrolled face templates, and the match / no-match / ambiguous decision.

Templates are unit vectors kept in one contiguous float32 matrix, so a search is a single
matrix-vector product (about 100k templates of 128 floats score in a few milliseconds).
A subject may hold several templates; its score is the best cosine over them, because
enrolment photos differ in pose and lighting and the closest one is what matters.

Subjects can carry string tags (e.g. ``{"phone_last4": "1234"}``); ``search`` can be limited
to subjects whose tags match, which shrinks the candidate set and with it the chance of a
look-alike scoring close to the true subject.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from pipeline.types import FloatArray

DecisionStatus = Literal["match", "no_match", "ambiguous"]
Candidates = Callable[[str], bool] | Collection[str]

# Slack for decimal boundaries: 0.7 - 0.6 is 0.0999...98 in binary floating point, and a
# margin of exactly 0.1 must still pass.
_EPS = 1e-9
_INITIAL_CAPACITY = 256


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


class Gallery:
    """In-memory template store with vectorised top-k search. Not thread-safe."""

    def __init__(self, dim: int = 128) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self._vectors = np.zeros((_INITIAL_CAPACITY, dim), dtype=np.float32)
        # Row -> subject index; subject indices are never reused, so stale ones stay harmless.
        self._owner = np.zeros(_INITIAL_CAPACITY, dtype=np.int64)
        self._count = 0
        self._index: dict[str, int] = {}
        self._ids: list[str] = []  # subject index -> subject id
        self._tags: dict[str, dict[str, str]] = {}
        self._tag_index: dict[tuple[str, str], set[str]] = {}

    def __len__(self) -> int:
        """Number of templates (not subjects)."""
        return self._count

    def __contains__(self, subject_id: object) -> bool:
        return subject_id in self._index

    def subjects(self) -> list[str]:
        """Enrolled subject ids, in enrolment order."""
        return list(self._index)

    def tags(self, subject_id: str) -> dict[str, str]:
        """A copy of the subject's tags (empty for an unknown subject)."""
        return dict(self._tags.get(subject_id, {}))

    def add(
        self, subject_id: str, template: FloatArray, tags: Mapping[str, str] | None = None
    ) -> None:
        """Store one template for ``subject_id`` (re-normalised to unit length).

        A subject may hold several templates. ``tags`` are merged into the subject's tags,
        a later value replacing an earlier one for the same key.
        """
        if not isinstance(subject_id, str) or not subject_id:
            raise ValueError("subject_id must be a non-empty string")
        vec = self._check_vector(template, "template")
        if self._count == len(self._vectors):
            self._grow()
        if subject_id not in self._index:
            self._index[subject_id] = len(self._ids)
            self._ids.append(subject_id)
            self._tags[subject_id] = {}
        self._vectors[self._count] = vec
        self._owner[self._count] = self._index[subject_id]
        self._count += 1
        for key, value in (tags or {}).items():
            self._set_tag(subject_id, str(key), str(value))

    def remove(self, subject_id: str) -> int:
        """Forget a subject and all its templates; returns how many templates were removed."""
        idx = self._index.pop(subject_id, None)
        if idx is None:
            return 0
        for key, value in self._tags.pop(subject_id).items():
            self._unindex_tag(subject_id, key, value)
        n = self._count
        keep = self._owner[:n] != idx
        kept = int(keep.sum())
        # Fill the holes below the new end with the live rows above it: the matrix stays
        # dense (search never skips tombstones) and only the removed rows' worth is copied.
        holes = np.flatnonzero(~keep[:kept])
        fillers = kept + np.flatnonzero(keep[kept:])
        self._vectors[holes] = self._vectors[fillers]
        self._owner[holes] = self._owner[fillers]
        self._count = kept
        return n - kept

    def search(
        self,
        probe: FloatArray,
        k: int = 5,
        candidates: Candidates | None = None,
        tag_filter: Mapping[str, str] | None = None,
    ) -> list[Match]:
        """Top-``k`` subjects by best cosine to ``probe``, highest first.

        ``candidates`` (a predicate on subject ids, or a collection of them) and
        ``tag_filter`` (every key must equal the value) both narrow the search.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        vec = self._check_vector(probe, "probe")
        allowed = self._allowed(candidates, tag_filter)
        n = self._count
        if allowed is None:
            rows = None
            scores = self._vectors[:n] @ vec
        else:
            rows = np.flatnonzero(allowed[self._owner[:n]])
            scores = self._vectors[rows] @ vec
        if scores.size == 0:
            return []
        owners = self._owner[:n] if rows is None else self._owner[rows]
        return self._top_subjects(scores, owners, k)

    # -- internals ---------------------------------------------------------------------

    def _top_subjects(
        self, scores: FloatArray, owners: npt.NDArray[np.int64], k: int
    ) -> list[Match]:
        """Best ``k`` distinct subjects: scan rows by descending score, widening as needed.

        A full sort of 100k scores costs more than the product itself; usually the top
        few rows already name ``k`` different subjects, so partition a small head first.
        """
        total = scores.size
        neg = -scores
        head = min(total, 4 * k)
        while True:
            part = np.argpartition(neg, head - 1)[:head] if head < total else np.arange(total)
            order = part[np.argsort(neg[part], kind="stable")]
            found: dict[int, float] = {}
            for row in order:
                owner = int(owners[row])
                if owner not in found:
                    found[owner] = float(scores[row])
                    if len(found) == k:
                        break
            if len(found) == k or head == total:
                break
            head = min(total, head * 4)
        return [Match(self._ids[o], min(1.0, max(-1.0, s))) for o, s in found.items()]

    def _allowed(
        self, candidates: Candidates | None, tag_filter: Mapping[str, str] | None
    ) -> npt.NDArray[np.bool_] | None:
        """Mask over subject indices, or None when the whole gallery is searched."""
        if candidates is None and not tag_filter:
            return None
        names: set[str] = set(self._index)
        if tag_filter:
            for key, value in tag_filter.items():
                names &= self._tag_index.get((str(key), str(value)), set())
        if callable(candidates):
            names = {s for s in names if candidates(s)}
        elif candidates is not None:
            names &= set(candidates)
        mask = np.zeros(len(self._ids), dtype=np.bool_)
        mask[[self._index[s] for s in names]] = True
        return mask

    def _check_vector(self, vector: FloatArray, what: str) -> FloatArray:
        vec = np.asarray(vector, dtype=np.float32)
        if vec.shape != (self.dim,):
            raise ValueError(f"{what} must have shape ({self.dim},), got {vec.shape}")
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"{what} contains NaN or infinity")
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:
            raise ValueError(f"{what} is the zero vector")
        return (vec / norm).astype(np.float32)

    def _grow(self) -> None:
        capacity = 2 * len(self._vectors)
        vectors = np.zeros((capacity, self.dim), dtype=np.float32)
        vectors[: self._count] = self._vectors[: self._count]
        owner = np.zeros(capacity, dtype=np.int64)
        owner[: self._count] = self._owner[: self._count]
        self._vectors, self._owner = vectors, owner

    def _set_tag(self, subject_id: str, key: str, value: str) -> None:
        old = self._tags[subject_id].get(key)
        if old is not None:
            self._unindex_tag(subject_id, key, old)
        self._tags[subject_id][key] = value
        self._tag_index.setdefault((key, value), set()).add(subject_id)

    def _unindex_tag(self, subject_id: str, key: str, value: str) -> None:
        members = self._tag_index.get((key, value))
        if members is not None:
            members.discard(subject_id)
            if not members:
                del self._tag_index[(key, value)]


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
